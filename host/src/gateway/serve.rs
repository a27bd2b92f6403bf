//! The gateway's HTTP server: accepts browsers' connections within a budget of sockets, and
//! closes those that do not use them in time.
//!
//! Every accepted socket is either *streaming* (an admitted WebSocket or SSE stream, counted
//! against `max_connections`) or *pending* (anything else: a connection that has not sent a
//! request yet, one between two requests, one fetching a page). Pending sockets are what an
//! unauthenticated client can hold, so they are capped (`max_pending_connections`) and timed
//! out: a request head must be complete within `request_timeout_ms` of the connection opening
//! or of the previous response (hyper's header read timeout), and a response to a pending
//! socket must not stall longer than that either. A socket over either cap is refused at
//! once, without being read.
//!
//! All gateway sockets together stay within a share of the process's open-file limit
//! (`RLIMIT_NOFILE`), so browsers can never take the descriptors the host needs for its own
//! work: its Redis connections, the plugins folder and its watcher, outputs, and the admin
//! endpoint, which keeps answering `/readyz` and `/metrics` however the gateway is loaded.
//!
//! This is `axum::serve` with those limits: axum's own server takes no configuration, so
//! connections are served here with hyper directly.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, AtomicU8, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::Service as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::GatewayStats;

/// Open files the gateway leaves to the rest of the host, at least: Redis connections, plugin
/// files and the compile cache, the folder watcher, outputs' HTTP connections, the admin
/// endpoint and its clients, the runtime's own descriptors.
pub const FILES_KEPT_FOR_HOST_MIN: u64 = 128;
/// The share of the open-file limit kept for the rest of the host (one in this many), when
/// that is more than [`FILES_KEPT_FOR_HOST_MIN`].
pub const FILES_KEPT_FOR_HOST_SHARE: u64 = 4;
/// How long the accept loop waits after the process ran out of descriptors (`EMFILE`) or
/// the kernel refused an accept for lack of memory, as `axum::serve` does: retrying at once
/// would spin, and a second between warnings is plenty.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// How many sockets the gateway may hold, and for how long pending ones.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    /// Time a pending socket gets for a complete request head, and that a response to it may
    /// stall.
    pub request_timeout: Duration,
    /// Pending sockets at once.
    pub max_pending: usize,
    /// Sockets at once, pending and streaming.
    pub max_sockets: usize,
}

/// The process's open-file limit (the soft `RLIMIT_NOFILE`), if it has one and it can be
/// read (Linux: `/proc/self/limits`).
pub fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The sockets the gateway may hold: `wanted` (its connection caps), unless the open-file
/// `limit` leaves less once the host's share is kept.
pub fn socket_budget(wanted: usize, limit: Option<u64>) -> usize {
    let Some(limit) = limit else {
        return wanted;
    };
    let kept = (limit / FILES_KEPT_FOR_HOST_SHARE).max(FILES_KEPT_FOR_HOST_MIN);
    let room = usize::try_from(limit.saturating_sub(kept)).unwrap_or(usize::MAX);
    wanted.min(room)
}

/// A socket's state: not a stream (counted against `max_pending_connections`, timed out).
const PENDING: u8 = 0;
/// A socket's state: an admitted WebSocket or SSE stream holds it.
const STREAMING: u8 = 1;
/// A socket's state: closed.
const CLOSED: u8 = 2;

/// Counts of the gateway's sockets.
struct Sockets {
    open: AtomicUsize,
    /// Signed: a stream ending and its socket closing may count in either order.
    pending: AtomicIsize,
    stats: Arc<GatewayStats>,
}

impl Sockets {
    fn pending(&self) -> usize {
        usize::try_from(self.pending.load(Ordering::Acquire)).unwrap_or(0)
    }

    fn add_pending(&self, change: isize) {
        let now = self.pending.fetch_add(change, Ordering::AcqRel) + change;
        self.stats
            .pending_connections
            .store(u64::try_from(now).unwrap_or(0), Ordering::Relaxed);
    }
}

/// One accepted socket, shared by the socket itself and the requests made on it: whether a
/// stream holds it. Handlers find it in the request's extensions.
pub struct Ticket {
    state: AtomicU8,
    sockets: Arc<Sockets>,
}

impl Ticket {
    /// Marks the socket as streaming until the guard is dropped: no longer pending, so
    /// neither counted against `max_pending_connections` nor timed out.
    pub fn streaming(self: &Arc<Self>) -> Streaming {
        if self
            .state
            .compare_exchange(PENDING, STREAMING, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.sockets.add_pending(-1);
        }
        Streaming(self.clone())
    }

    fn is_pending(&self) -> bool {
        self.state.load(Ordering::Acquire) == PENDING
    }

    /// The socket is gone.
    fn close(&self) {
        if self.state.swap(CLOSED, Ordering::AcqRel) == PENDING {
            self.sockets.add_pending(-1);
        }
        self.sockets.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A socket marked as streaming (see [`Ticket::streaming`]).
pub struct Streaming(Arc<Ticket>);

impl Drop for Streaming {
    /// The stream ended but the socket may serve more requests: pending again.
    fn drop(&mut self) {
        if self
            .0
            .state
            .compare_exchange(STREAMING, PENDING, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.0.sockets.add_pending(1);
        }
    }
}

/// A gateway socket: counted while it is open, and failing a write that stalls past the
/// request timeout while it is pending.
struct Socket {
    stream: TcpStream,
    ticket: Arc<Ticket>,
    timeout: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
}

impl Socket {
    /// Whether a pending socket's write has now waited longer than the request timeout
    /// (called when the write could not go on; arms the timer the first time).
    fn stall_expired(&mut self, cx: &mut Context<'_>) -> bool {
        // A stream that ends wakes the connection (its body ends), which writes again.
        if !self.ticket.is_pending() {
            self.stalled = None;
            return false;
        }
        let timeout = self.timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        stalled.as_mut().poll(cx).is_ready()
    }

    fn wrote<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        if !self.stall_expired(cx) {
            return Poll::Pending;
        }
        self.ticket
            .sockets
            .stats
            .timeouts
            .fetch_add(1, Ordering::Relaxed);
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the client took no response for {:?} (gateway.request_timeout_ms)",
                self.timeout
            ),
        )))
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        self.ticket.close();
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.wrote(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.wrote(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.stream).poll_flush(cx);
        self.wrote(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Serves `app` on `listener` within `limits` until `shutdown`, then lets the requests in
/// flight finish (streams end on `shutdown` themselves).
pub fn spawn(
    listener: TcpListener,
    app: axum::Router,
    limits: ServeLimits,
    stats: Arc<GatewayStats>,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    let sockets = Arc::new(Sockets {
        open: AtomicUsize::new(0),
        pending: AtomicIsize::new(0),
        stats: stats.clone(),
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.request_timeout);
    tokio::spawn(async move {
        let connections = TaskTracker::new();
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Per-connection errors (the client reset before the accept) are no
                    // reason to pause; running out of descriptors or memory is.
                    if !matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionRefused
                            | io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                    ) {
                        tracing::warn!("gateway: cannot accept a connection: {e}");
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    }
                    continue;
                }
            };
            let ticket = match admit(&sockets, &limits) {
                Ok(ticket) => ticket,
                Err(why) => {
                    refuse(&stream, why);
                    continue;
                }
            };
            // Messages are small and each is sent as soon as it arrives: without TCP_NODELAY,
            // every message after the first of a burst waits for the client's delayed ACK
            // (up to 40 ms).
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!("gateway: cannot set TCP_NODELAY: {e}");
            }
            let io = TokioIo::new(Socket {
                stream,
                ticket: ticket.clone(),
                timeout: limits.request_timeout,
                stalled: None,
            });
            let router = TowerToHyperService::new(app.clone());
            let service =
                hyper::service::service_fn(move |mut request: axum::http::Request<Incoming>| {
                    request.extensions_mut().insert(ticket.clone());
                    router.call(request)
                });
            let connection = builder.serve_connection(io, service).with_upgrades();
            let shutdown = shutdown.clone();
            let stats = stats.clone();
            connections.spawn(async move {
                let mut connection = std::pin::pin!(connection);
                let served = tokio::select! {
                    served = connection.as_mut() => served,
                    () = shutdown.cancelled() => {
                        connection.as_mut().graceful_shutdown();
                        connection.await
                    }
                };
                if let Err(e) = served {
                    if e.is_timeout() {
                        stats.timeouts.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::debug!("gateway: connection ended: {e}");
                }
            });
        }
        connections.close();
        connections.wait().await;
    })
}

/// A ticket for a new socket, or why there is none: the gateway holds as many as it may
/// (the reason counted).
fn admit(sockets: &Arc<Sockets>, limits: &ServeLimits) -> Result<Arc<Ticket>, &'static str> {
    let stats = &sockets.stats;
    if sockets.open.load(Ordering::Acquire) >= limits.max_sockets {
        stats.denied_sockets.fetch_add(1, Ordering::Relaxed);
        return Err(
            "the gateway holds all the connections it may: gateway.max_connections \
                    plus gateway.max_pending_connections, within the open-file limit",
        );
    }
    if sockets.pending() >= limits.max_pending {
        stats.denied_pending.fetch_add(1, Ordering::Relaxed);
        return Err("too many connections waiting for a request \
                    (gateway.max_pending_connections)");
    }
    // Only the accept loop adds sockets, so the checks above cannot be overtaken.
    sockets.open.fetch_add(1, Ordering::AcqRel);
    sockets.add_pending(1);
    Ok(Arc::new(Ticket {
        state: AtomicU8::new(PENDING),
        sockets: sockets.clone(),
    }))
}

/// Refuses a socket over the limits at once: a 503 saying `why` if the kernel takes it
/// without waiting, then closed (by the caller dropping it). Nothing is read from it.
fn refuse(stream: &TcpStream, why: &str) {
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{why}\n",
        why.len() + 1
    );
    let _ = stream.try_write(response.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gateway_leaves_the_host_a_share_of_the_open_file_limit() {
        // ulimit -n 256: half for the host's own at least 128.
        assert_eq!(socket_budget(11_024, Some(256)), 128);
        // The common default soft limit: a quarter kept.
        assert_eq!(socket_budget(11_024, Some(1024)), 768);
        // Plenty: the configured caps rule.
        assert_eq!(socket_budget(11_024, Some(1 << 20)), 11_024);
        assert_eq!(socket_budget(11_024, None), 11_024);
        // Too few to spare any.
        assert_eq!(socket_budget(11_024, Some(100)), 0);
    }
}
