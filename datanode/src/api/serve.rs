//! Serving connections: a cap on open connections, header and body read timeouts, and a drain on
//! shutdown that never waits longer than its deadline.
//!
//! `axum::serve` offers none of these (its hyper builder runs without a timer, so header timeouts
//! never fire), so connections are accepted here and handed to hyper's HTTP/1 server directly.

use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::{Layer, ServiceExt};
use tower_http::timeout::RequestBodyTimeoutLayer;

/// One connection until it ends, its client stops reading, or shutdown closes it.
async fn serve_connection<IO, S>(
    builder: &hyper::server::conn::http1::Builder,
    io: IO,
    service: S,
    watcher: hyper_util::server::graceful::Watcher,
    activity: &WriteActivity,
    write_limit: Duration,
    peer: std::net::SocketAddr,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<hyper::Request<hyper::body::Incoming>, Response = axum::response::Response>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: std::error::Error + Send + Sync + 'static,
{
    let connection = watcher.watch(builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(service)));
    tokio::select! {
        ended = connection => if let Err(e) = ended {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        },
        // Dropping the connection closes it.
        _ = activity.stalled(epoch(), write_limit) => {
            tracing::debug!(%peer, "connection closed: the client stopped reading its response");
        }
    }
}

/// Limits of the HTTP server.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Open connections at most; one more is answered 503 and closed.
    pub max_connections: usize,
    /// A client must send a request's headers within this (also an idle keep-alive connection).
    pub header_timeout: Duration,
    /// Longest pause between two pieces of a request body, and longest a response may wait for
    /// a client that does not read it.
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
fn too_many_connections() -> Vec<u8> {
    let body = super::error::error_json("busy", "too many open connections; try again shortly");
    let mut out = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\nx-content-type-options: nosniff\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend(body);
    out
}

/// Requests' headers at most (count and bytes), answered with a JSON 431 by the API. hyper's
/// own limits are set well above, so that its bare answer is for requests far beyond these.
pub const MAX_HEADERS: usize = 128;
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Serves `router` on `listener` until `shutdown`; then stops accepting, lets requests in flight
/// finish for up to the drain timeout, and closes whatever is left.
///
/// With `tls`, every connection is TLS: the handshake has the header timeout to finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: &ServerLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let service = RequestBodyTimeoutLayer::new(limits.body_timeout).layer(router);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_headers(MAX_HEADERS * 8)
        .max_buf_size(MAX_HEADER_BYTES * 16);
    let builder = Arc::new(builder);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let refusal: Arc<[u8]> = too_many_connections().into();
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (mut stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
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
            let refusal = refusal.clone();
            connections.spawn(async move {
                // Answer, then read a little of the request so that closing sends no reset.
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    stream.write_all(&refusal).await?;
                    stream.shutdown().await?;
                    let mut sink = [0u8; 4096];
                    while tokio::io::AsyncReadExt::read(&mut stream, &mut sink).await? > 0 {}
                    Ok::<_, std::io::Error>(())
                })
                .await;
            });
            continue;
        };
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(WriteActivity::default());
        // Each request knows the address it came from (authentication limits failures by it).
        let service = service.clone().map_request(move |mut request: hyper::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(axum::extract::ConnectInfo(peer));
            request
        });
        let (builder, watcher, tls) = (builder.clone(), graceful.watcher(), tls.clone());
        let (write_limit, handshake_limit) = (limits.body_timeout, limits.header_timeout);
        connections.spawn(async move {
            let io = WriteTimeout::new(stream, activity.clone());
            match tls {
                None => {
                    serve_connection(&builder, JsonParseErrors::new(io), service, watcher, &activity, write_limit, peer)
                        .await
                }
                Some(acceptor) => match tokio::time::timeout(handshake_limit, acceptor.accept(io)).await {
                    Ok(Ok(tls)) => {
                        let io = JsonParseErrors::new(tls);
                        serve_connection(&builder, io, service, watcher, &activity, write_limit, peer).await
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                },
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.drain_timeout, graceful.shutdown()).await.is_err() {
        tracing::warn!(timeout = ?limits.drain_timeout, "requests still in flight at the drain deadline were cut off");
    }
    // Whatever is left is closed now, before the volumes are.
    connections.shutdown().await;
    Ok(())
}

/// A connection whose writes may not stall longer than a limit: a client that stops reading a
/// response (and so holds a connection, and the blob's chunks in flight) is cut off. The writes
/// only note their progress (no timer per write); a watchdog per connection looks at it.
struct WriteTimeout<S> {
    inner: S,
    activity: Arc<WriteActivity>,
}

/// Whether a write is waiting on the client, and since when (ms since the connection began).
#[derive(Default)]
struct WriteActivity {
    waiting: std::sync::atomic::AtomicBool,
    since_ms: std::sync::atomic::AtomicU64,
}

impl<S> WriteTimeout<S> {
    fn new(inner: S, activity: Arc<WriteActivity>) -> Self {
        Self { inner, activity }
    }

    fn note<T>(&self, poll: Poll<std::io::Result<T>>, epoch: std::time::Instant) -> Poll<std::io::Result<T>> {
        use std::sync::atomic::Ordering::Relaxed;
        match &poll {
            Poll::Pending if !self.activity.waiting.load(Relaxed) => {
                self.activity.since_ms.store(epoch.elapsed().as_millis() as u64, Relaxed);
                self.activity.waiting.store(true, Relaxed);
            }
            Poll::Pending => {}
            Poll::Ready(_) => self.activity.waiting.store(false, Relaxed),
        }
        poll
    }
}

impl WriteActivity {
    /// Resolves when a write has waited on the client for longer than `limit`.
    async fn stalled(&self, epoch: std::time::Instant, limit: Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        let mut tick = tokio::time::interval(limit / 4);
        loop {
            tick.tick().await;
            let now = epoch.elapsed().as_millis() as u64;
            if self.waiting.load(Relaxed) && now.saturating_sub(self.since_ms.load(Relaxed)) > limit.as_millis() as u64
            {
                return;
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteTimeout<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

/// The connection's start: progress is noted as milliseconds since it.
static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

fn epoch() -> std::time::Instant {
    *EPOCH.get_or_init(std::time::Instant::now)
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note(poll, epoch())
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note(poll, epoch())
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.note(poll, epoch())
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The connection as hyper sees it. hyper answers a request it cannot parse (a malformed request
/// line or header, headers too large, a URI too long) by itself, with an empty body. When that is
/// the first request of the connection (a client that does not speak HTTP), the answer is the
/// first thing ever written, so it can only be a response head: it is rewritten here into the
/// JSON error every other response carries. Once anything has been written, nothing is touched,
/// so no response body can ever be mistaken for such an answer.
struct JsonParseErrors<S> {
    inner: S,
    /// Nothing has been written yet on this connection.
    fresh: bool,
    /// A rewritten answer being written: its bytes, how many are out, and the length of hyper's
    /// original (reported as written once the rewrite is out).
    pending: Option<(Vec<u8>, usize, usize)>,
}

impl<S> JsonParseErrors<S> {
    fn new(inner: S) -> Self {
        Self { inner, fresh: true, pending: None }
    }
}

/// hyper's automatic answer to a request it could not parse, as JSON.
fn rewrite_parse_error(head: &[u8]) -> Option<Vec<u8>> {
    let status = match head.get(..12)? {
        b"HTTP/1.1 400" => axum::http::StatusCode::BAD_REQUEST,
        b"HTTP/1.1 414" => axum::http::StatusCode::URI_TOO_LONG,
        b"HTTP/1.1 431" => axum::http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        _ => return None,
    };
    let text = std::str::from_utf8(head).ok()?.to_ascii_lowercase();
    if !text.ends_with("\r\n\r\n") || !text.contains("\r\ncontent-length: 0\r\n") {
        return None;
    }
    let message = match status.as_u16() {
        414 => "the request URI is too long",
        431 => "the request headers are too large",
        _ => "the request is not valid HTTP/1.1 (request line or header syntax)",
    };
    let body = super::error::error_json(super::error::code_for_status(status), message);
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\
         x-content-type-options: nosniff\r\n\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    )
    .into_bytes();
    out.extend(body);
    Some(out)
}

impl<S: AsyncWrite + Unpin> JsonParseErrors<S> {
    /// Writes out a pending rewrite; ready with the original's length once all of it is out.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<Option<usize>>> {
        while let Some((bytes, written, original)) = self.pending.as_mut() {
            if *written == bytes.len() {
                let original = *original;
                self.pending = None;
                return Poll::Ready(Ok(Some(original)));
            }
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..]))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        Poll::Ready(Ok(None))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for JsonParseErrors<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for JsonParseErrors<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        if self.pending.is_none() {
            let rewritten = if std::mem::take(&mut self.fresh) { rewrite_parse_error(buf) } else { None };
            match rewritten {
                Some(rewritten) => self.pending = Some((rewritten, 0, buf.len())),
                None => return Pin::new(&mut self.inner).poll_write(cx, buf),
            }
        }
        match ready!(self.poll_pending(cx))? {
            Some(original) => Poll::Ready(Ok(original)),
            None => Pin::new(&mut self.inner).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let mut parts = bufs.iter().filter(|b| !b.is_empty());
        let (first, second) = (parts.next(), parts.next());
        if first.is_some() && self.pending.is_none() && std::mem::take(&mut self.fresh) {
            if let (Some(only), None) = (first, second) {
                if let Some(rewritten) = rewrite_parse_error(only) {
                    self.pending = Some((rewritten, 0, only.len()));
                }
            }
        }
        if self.pending.is_some() {
            if let Some(original) = ready!(self.poll_pending(cx))? {
                return Poll::Ready(Ok(original));
            }
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hypers_empty_parse_error_answers_are_rewritten() {
        let hyper_431 = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let out = String::from_utf8(rewrite_parse_error(hyper_431).unwrap()).unwrap();
        assert!(out.starts_with("HTTP/1.1 431 "), "{out}");
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())), "{out}");
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "headers_too_large");
        assert!(rewrite_parse_error(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n").is_some());
        // The API's own errors have a body; other statuses and partial heads pass through.
        assert!(rewrite_parse_error(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 91\r\n\r\n").is_none());
        assert!(rewrite_parse_error(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n").is_none());
        assert!(rewrite_parse_error(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n").is_none());
        assert!(rewrite_parse_error(b"some body bytes").is_none());
    }

    #[tokio::test]
    async fn only_the_first_write_of_a_connection_is_ever_rewritten() {
        use tokio::io::AsyncReadExt;
        let lookalike = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n";
        // A response whose body happens to be that text: passes through byte for byte.
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let mut conn = JsonParseErrors::new(a);
        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", lookalike.len());
        conn.write_all(head.as_bytes()).await.unwrap();
        conn.write_all(lookalike).await.unwrap();
        let n = conn.write_vectored(&[IoSlice::new(lookalike)]).await.unwrap();
        assert_eq!(n, lookalike.len());
        drop(conn);
        let mut seen = Vec::new();
        b.read_to_end(&mut seen).await.unwrap();
        assert_eq!(seen, [head.as_bytes(), lookalike, lookalike].concat());
        // The first write of a connection, when it is hyper's answer: JSON.
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let mut conn = JsonParseErrors::new(a);
        conn.write_all(lookalike).await.unwrap();
        drop(conn);
        let mut seen = String::new();
        b.read_to_string(&mut seen).await.unwrap();
        assert!(seen.starts_with("HTTP/1.1 400 ") && seen.contains("\"code\":\"invalid_request\""), "{seen}");
    }
}
