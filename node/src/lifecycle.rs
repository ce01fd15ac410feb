//! The node's shutdown order and every shutdown deadline, in one place.
//!
//! Every task the node starts is spawned through one [`Lifecycle`] (one
//! task tracker). The node stops in phases; each phase is a stop signal on
//! that tracker, given in this order by `Node::shutdown`:
//!
//! 1. [`Phases::front`]: not ready; MQTT and HTTP stop accepting; every
//!    MQTT connection stops reading, waits for the JetStream acks of what it
//!    read, sends those PUBACKs and closes ([`deadline::CONNECTION_DRAIN`]);
//!    HTTP requests in progress finish; watchers stop; the shard coordinator
//!    stops every shard worker after its batch (outputs stored, checkpoint
//!    written, acked; [`deadline::SHARD_WORKERS`]) and releases its leases.
//! 2. [`Phases::cluster`]: given by the coordinator itself once its leases
//!    are released: heartbeats end and the membership entry is deleted, so
//!    the others take the shards over at once. The node waits for the
//!    coordinator up to [`deadline::COORDINATOR`].
//! 3. [`Phases::history`]: the Postgres writer writes what is queued and
//!    stops ([`deadline::HISTORY_WRITER`]). It comes after the shard workers
//!    because their last checkpoints wait for their rows.
//! 4. Every other task ends ([`deadline::TASKS`]); publishes still awaiting
//!    their JetStream ack drain ([`deadline::PUBLISH_ACKS`]); both NATS
//!    connections flush ([`deadline::NATS_FLUSH`]).
//!
//! A deadline that passes is logged, and shutdown goes on.

pub use fluxmesh_mesh::Lifecycle;
use tokio_util::sync::CancellationToken;

/// How long each step of shutdown may take.
pub mod deadline {
    use std::time::Duration;

    /// An MQTT connection finishing what it read (acks it owes) after the
    /// stop signal.
    pub const CONNECTION_DRAIN: Duration = Duration::from_secs(10);
    /// After a server DISCONNECT: reading until the client closes, so the
    /// kernel sends FIN rather than RST and the DISCONNECT is not lost.
    pub const CONNECTION_LINGER: Duration = Duration::from_secs(1);
    /// Shard workers finishing their batches before they are aborted.
    pub const SHARD_WORKERS: Duration = Duration::from_secs(10);
    /// The shard coordinator: workers stopped and leases released.
    pub const COORDINATOR: Duration = Duration::from_secs(15);
    /// The Postgres writer writing what is queued.
    pub const HISTORY_WRITER: Duration = Duration::from_secs(15);
    /// Every remaining task.
    pub const TASKS: Duration = Duration::from_secs(20);
    /// Publishes still awaiting their JetStream ack.
    pub const PUBLISH_ACKS: Duration = Duration::from_secs(10);
    /// Each NATS connection writing out what it buffered. A node stopping
    /// while NATS is out of reach does not wait for it to come back.
    pub const NATS_FLUSH: Duration = Duration::from_secs(5);
}

/// The node's stop signals, on one tracker, in the order shutdown gives
/// them (see the module docs).
#[derive(Debug, Clone)]
pub struct Phases {
    pub front: Lifecycle,
    pub cluster: Lifecycle,
    pub history: Lifecycle,
}

impl Default for Phases {
    fn default() -> Phases {
        let front = Lifecycle::new();
        let cluster = front.stopping_on(CancellationToken::new());
        let history = front.stopping_on(CancellationToken::new());
        Phases { front, cluster, history }
    }
}

impl Phases {
    /// Gives every stop signal at once (a start that failed halfway).
    pub fn stop_all(&self) {
        self.front.stop();
        self.cluster.stop();
        self.history.stop();
    }
}
