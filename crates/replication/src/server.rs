//! Serves the HTTP front on a listener with the limits a public endpoint needs, which
//! `axum::serve` does not set: a bound on open connections, a deadline for each request's
//! head (a slow-loris client that trickles headers holds nothing for long), and a bound on
//! the head's size. Body deadlines and sizes are the front's ([`crate::http`]).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::config::Limits;

/// How long connections may finish their requests after the server is told to stop.
const DRAIN: Duration = Duration::from_secs(5);

/// What a connection over the limit is told before it is closed.
fn too_many_connections() -> Vec<u8> {
    let body = r#"{"error":"this replica has too many open connections; retry in a moment"}"#;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Serves `app` on `listener` until `stop` completes, then lets open connections finish
/// their requests for a few seconds.
pub(crate) async fn serve(listener: TcpListener, app: Router, limits: Limits, stop: impl Future<Output = ()>) {
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        // The front answers a head over `max_head` with a message saying so; hyper drops
        // (with a bare 431) only heads far beyond it, before they take much memory.
        .max_buf_size((limits.max_head * 4).max(16 * 1024))
        .max_header_size(limits.max_head * 2)
        .max_headers(100);
    tokio::pin!(stop);
    loop {
        let (mut stream, peer) = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    warn!(error = %e, "could not accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            debug!(%peer, "refusing a connection: at the connection limit");
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&too_many_connections())).await;
            });
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    if tokio::time::timeout(DRAIN, graceful.shutdown()).await.is_err() {
        debug!("connections still open after the drain period are dropped");
    }
}
