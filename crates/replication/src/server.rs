//! Serves the HTTP front on a listener with the limits a public endpoint needs, which
//! `axum::serve` does not set: a bound on open connections, a deadline for each request's
//! head (a slow-loris client that trickles headers holds nothing for long), and a bound on
//! the head's size, and a deadline for each write of an answer (a client that stops
//! reading holds nothing for long either). Body deadlines and sizes are the front's
//! ([`crate::http`]).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
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
        let stream = WriteDeadline::new(stream, limits.write_timeout);
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

/// A connection whose writes fail with `TimedOut` once one has waited `timeout` for the
/// client to take bytes: hyper then closes it and its slot is free again.
struct WriteDeadline<S> {
    inner: S,
    timeout: Duration,
    /// Armed while a write (or flush) is pending.
    waiting: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteDeadline<S> {
    fn new(inner: S, timeout: Duration) -> Self {
        Self { inner, timeout, waiting: None }
    }

    /// What a pending write becomes: still pending, or `TimedOut` past the deadline.
    fn pending<T>(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<T>> {
        let timeout = self.timeout;
        let sleep = self.waiting.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the client read nothing of the answer for {timeout:?}"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn done<T>(&mut self, result: Poll<std::io::Result<T>>, cx: &mut Context<'_>) -> Poll<std::io::Result<T>> {
        match result {
            Poll::Pending => self.pending(cx),
            ready => {
                self.waiting = None;
                ready
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.done(result, cx)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_flush(cx);
        self.done(result, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.done(result, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn a_client_that_stops_reading_gets_its_connection_closed_after_the_write_timeout() {
        // A pipe that holds 1 KiB: the answer's writer blocks once the reader stops.
        let (server, mut client) = tokio::io::duplex(1024);
        let mut server = WriteDeadline::new(server, Duration::from_millis(200));
        let started = std::time::Instant::now();
        let error = server.write_all(&[7u8; 64 * 1024]).await.unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut, "{error}");
        assert!(started.elapsed() >= Duration::from_millis(200) && started.elapsed() < Duration::from_secs(2));
        // A reader that keeps reading is never cut off, however long the whole answer takes.
        let (server, mut reader) = tokio::io::duplex(1024);
        let mut server = WriteDeadline::new(server, Duration::from_millis(200));
        let reading = tokio::spawn(async move {
            let mut total = 0;
            let mut buf = [0u8; 512];
            while let Ok(n) = reader.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                total += n;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            total
        });
        server.write_all(&[7u8; 64 * 1024]).await.expect("a slow but steady reader is served");
        server.shutdown().await.unwrap();
        assert_eq!(reading.await.unwrap(), 64 * 1024);
        let _ = client.read(&mut [0u8; 1]).await;
    }
}
