//! The one controller of a node's tasks: every long-lived task is spawned
//! through a [`Lifecycle`], which tracks it and hands it the signal that
//! stops it.
//!
//! A node has more than one stop signal (its parts stop in an order, see
//! the node's `lifecycle` module), but one tracker: [`Lifecycle::stopping_on`]
//! gives a controller that shares the tracker and listens to another
//! signal. Closing the tracker and waiting for it therefore waits for every
//! task the node started, whichever signal stops it.

use std::future::Future;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;

/// Spawns tracked tasks and tells them when to stop. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Lifecycle {
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Lifecycle {
    pub fn new() -> Lifecycle {
        Lifecycle::default()
    }

    /// A controller on the same tracker whose tasks stop on `stop` instead.
    pub fn stopping_on(&self, stop: CancellationToken) -> Lifecycle {
        Lifecycle { stop, tasks: self.tasks.clone() }
    }

    /// A controller on the same tracker whose tasks stop with these ones,
    /// or earlier when the returned controller's [`Lifecycle::stop`] is
    /// called (one connection, one pull loop).
    pub fn child(&self) -> Lifecycle {
        self.stopping_on(self.stop.child_token())
    }

    /// Spawns `task` on the tracker. The task must end once
    /// [`Lifecycle::stopped`] resolves (or once its input closes).
    #[track_caller]
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tasks.spawn(task)
    }

    /// Resolves once this controller's stop signal is given.
    pub fn stopped(&self) -> WaitForCancellationFuture<'_> {
        self.stop.cancelled()
    }

    /// Resolves once the stop signal is given; owns its token, for tasks
    /// and servers that need a `'static` future.
    pub fn stopped_owned(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.stop.clone().cancelled_owned()
    }

    pub fn is_stopping(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Gives this controller's stop signal (and its children's).
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// The stop signal itself, for code that keeps a token of its own.
    pub fn token(&self) -> &CancellationToken {
        &self.stop
    }

    /// Closes the tracker (no more tasks) and waits up to `deadline` for
    /// every tracked task to end. Returns how many were still running.
    pub async fn close_and_wait(&self, deadline: Duration) -> usize {
        self.tasks.close();
        match tokio::time::timeout(deadline, self.tasks.wait()).await {
            Ok(()) => 0,
            Err(_) => self.tasks.len(),
        }
    }

    /// Tasks still running.
    pub fn running(&self) -> usize {
        self.tasks.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn close_and_wait_waits_for_tasks_on_every_signal() {
        let life = Lifecycle::new();
        let later = life.stopping_on(CancellationToken::new());
        let (a, b) = (life.clone(), later.clone());
        life.spawn(async move { a.stopped().await });
        later.spawn(async move { b.stopped().await });
        assert_eq!(life.running(), 2);
        life.stop();
        // The second task listens to another signal: still running.
        assert_eq!(life.close_and_wait(Duration::from_millis(50)).await, 1);
        later.stop();
        assert_eq!(life.close_and_wait(Duration::from_secs(5)).await, 0);
    }

    #[tokio::test]
    async fn a_child_stops_with_its_parent_or_alone() {
        let life = Lifecycle::new();
        let (one, two) = (life.child(), life.child());
        one.stop();
        assert!(one.is_stopping() && !two.is_stopping() && !life.is_stopping());
        life.stop();
        assert!(two.is_stopping());
    }
}
