//! Serving connections: a cap on open connections, header and body read timeouts, and a drain on
//! shutdown that never waits longer than its deadline.
//!
//! `axum::serve` offers none of these (its hyper builder runs without a timer, so header timeouts
//! never fire), so connections are accepted here and handed to hyper's HTTP/1 server directly.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::Layer;
use tower_http::timeout::RequestBodyTimeoutLayer;

/// Limits of the HTTP server.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Open connections at most; one more is answered 503 and closed.
    pub max_connections: usize,
    /// A client must send a request's headers within this (also an idle keep-alive connection).
    pub header_timeout: Duration,
    /// Longest pause between two pieces of a request body.
    pub body_timeout: Duration,
    /// How long shutdown waits for requests in flight before closing their connections.
    pub drain_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(20),
        }
    }
}

/// What an over-the-cap connection reads before it is closed.
const TOO_MANY_CONNECTIONS: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n\
Retry-After: 1\r\nConnection: close\r\nContent-Length: 90\r\n\r\n\
{\"error\":{\"code\":\"busy\",\"message\":\"too many open connections; try again shortly\"}}\n";

/// Serves `router` on `listener` until `shutdown`; then stops accepting, lets requests in flight
/// finish for up to the drain timeout, and closes whatever is left.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: &ServerLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let service = RequestBodyTimeoutLayer::new(limits.body_timeout).layer(router);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    let builder = Arc::new(builder);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    loop {
        let (mut stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, say: the connection waits in the backlog until
                    // one is free. Never a reason to stop serving.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "connection refused: too many open");
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(TOO_MANY_CONNECTIONS)).await;
            });
            continue;
        };
        let _ = stream.set_nodelay(true);
        let connection = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service.clone()));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.drain_timeout, graceful.shutdown()).await.is_err() {
        tracing::warn!(timeout = ?limits.drain_timeout, "requests still in flight at the drain deadline were cut off");
    }
    Ok(())
}
