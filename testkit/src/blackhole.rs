//! A TCP relay on loopback whose link can be cut and healed, for network
//! partitions in tests.
//!
//! A cut link behaves like packets dropped on the wire, not like a closed
//! socket: connections stay open, nothing they send arrives, and new
//! connections are accepted (the kernel completes the handshake) but never
//! reach the other side. What was sent meanwhile is delivered on heal, as
//! TCP retransmission would. Nothing is closed until the relay is dropped.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// A relay from a free loopback port to `target`. Dropping it ends every
/// connection it carries.
#[derive(Debug)]
pub struct Blackhole {
    addr: SocketAddr,
    cut: watch::Sender<bool>,
    open: Arc<AtomicUsize>,
    _tasks: JoinSet<()>,
}

impl Blackhole {
    /// Starts relaying to `target`.
    pub async fn start(target: SocketAddr) -> anyhow::Result<Blackhole> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (cut, _) = watch::channel(false);
        let open = Arc::new(AtomicUsize::new(0));
        let mut tasks = JoinSet::new();
        let (cut_rx, counter) = (cut.subscribe(), open.clone());
        tasks.spawn(accept(listener, target, cut_rx, counter));
        Ok(Blackhole { addr, cut, open, _tasks: tasks })
    }

    /// The relay's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `nats://` URL of the relay.
    pub fn nats_url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    /// Connections open through the relay now.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Stops carrying bytes, both ways, on every connection.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Carries bytes again; what waited is delivered.
    pub fn heal(&self) {
        self.cut.send_replace(false);
    }
}

async fn accept(listener: TcpListener, target: SocketAddr, cut: watch::Receiver<bool>, open: Arc<AtomicUsize>) {
    // The connections die with this task (and so with the relay).
    let mut links = JoinSet::new();
    loop {
        let Ok((client, _)) = listener.accept().await else { return };
        let (mut cut, open) = (cut.clone(), open.clone());
        links.spawn(async move {
            if cut.wait_for(|c| !*c).await.is_err() {
                return;
            }
            let Ok(server) = TcpStream::connect(target).await else { return };
            let _ = (client.set_nodelay(true), server.set_nodelay(true));
            open.fetch_add(1, Ordering::Relaxed);
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::select! {
                _ = pipe(client_read, server_write, cut.clone()) => {}
                _ = pipe(server_read, client_write, cut) => {}
            }
            open.fetch_sub(1, Ordering::Relaxed);
        });
        // Forget the links that ended.
        while links.try_join_next().is_some() {}
    }
}

/// Copies `from` to `to`, holding each chunk while the link is cut.
async fn pipe(mut from: impl AsyncReadExt + Unpin, mut to: impl AsyncWriteExt + Unpin, mut cut: watch::Receiver<bool>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if cut.wait_for(|c| !*c).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
