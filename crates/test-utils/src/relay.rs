//! A TCP relay in front of a server (an RPC endpoint, say) that can stop answering and
//! answer again: what a hosted endpoint that hangs looks like to its clients.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Forwards every connection on its own port to `target`, until [`Relay::cut`].
/// Stops when dropped.
#[derive(Debug)]
pub struct Relay {
    url: String,
    cut: Arc<AtomicBool>,
    connections: Arc<Mutex<Connections>>,
    accept: JoinHandle<()>,
}

#[derive(Debug, Default)]
struct Connections {
    /// Connections being forwarded.
    forwarding: Vec<JoinHandle<()>>,
    /// Connections accepted while cut, held open without an answer.
    held: Vec<TcpStream>,
}

impl Relay {
    /// Listens on `host` (a free port) and forwards to `target` (`host:port`, or a URL
    /// `http://host:port`). Called within a Tokio runtime, whose task it starts.
    ///
    /// # Errors
    /// The port cannot be bound.
    pub fn start(host: IpAddr, target: &str) -> std::io::Result<Self> {
        let target = target.trim_start_matches("http://").trim_end_matches('/').to_owned();
        let listener = std::net::TcpListener::bind(SocketAddr::new(host, 0))?;
        listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(listener)?;
        let url = format!("http://{}", listener.local_addr()?);
        let cut = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(Mutex::new(Connections::default()));
        let (is_cut, held) = (cut.clone(), connections.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut connections = held.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                connections.forwarding.retain(|c| !c.is_finished());
                if is_cut.load(Ordering::SeqCst) {
                    // Accepted, never answered: the client waits for its own timeout, as
                    // with an endpoint that hangs (a refused connection would fail fast).
                    connections.held.push(inbound);
                    continue;
                }
                let target = target.clone();
                connections.forwarding.push(tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                }));
            }
        });
        Ok(Self { url, cut, connections, accept })
    }

    /// Its URL (`http://host:port`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Stops answering: the connections it forwards are closed, and new ones are accepted
    /// and never answered.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for connection in self.lock().forwarding.drain(..) {
            connection.abort();
        }
    }

    /// Answers again (the connections held while cut are closed).
    pub fn mend(&self) {
        self.cut.store(false, Ordering::SeqCst);
        self.lock().held.clear();
    }

    /// Whether it is cut.
    pub fn is_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connections> {
        self.connections.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        for connection in self.lock().forwarding.drain(..) {
            connection.abort();
        }
    }
}
