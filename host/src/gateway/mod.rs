//! The browser gateway: WebSocket (`/ws`) and Server-Sent Events (`/sse`) bridges to Redis
//! channels, the dashboard and chat pages, on a listener of its own (off by default).
//!
//! No token, no data: every data endpoint wants a token (`token=` or `Authorization:
//! Bearer`), static or signed (see [`auth`]), whose grants name the channels it may read and
//! write. A browser page from an origin that is neither the gateway's own (`public_origins`)
//! nor listed in `allowed_origins` is refused before any upgrade. Refusals before the upgrade
//! are plain HTTP statuses with a one-line reason; after it, WebSocket close codes: 1008
//! (policy: too many refused requests, a slow client with `slow_clients = "disconnect"`), 1009
//! (a frame or message over `max_message_bytes`), 4001 (the token expired).
//!
//! Messages reach browsers through the [`hub`]: one Redis subscription per channel or
//! pattern, shared by every client watching it, and a [`ring`] per subscription that each
//! client reads at its own pace. A client that falls `client_buffer` messages (or
//! `client_buffer_bytes`) behind loses the oldest it had not read, is told how many, and
//! nobody else waits for it.
//!
//! What a browser can make the gateway hold is bounded: sockets ([`serve`]: pending ones
//! capped and timed out, all of them within a share of the open-file limit), subscriptions
//! (per connection and in total), frames (never more than `max_message_bytes` read), and
//! the bytes its rings keep for slow clients.

pub mod auth;
pub mod hub;
pub mod ring;
pub mod serve;
mod websocket;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Extension;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt as _};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::task::JoinHandle;
use tokio_stream::StreamMap;
use tokio_util::sync::CancellationToken;

use crate::config::{GatewayConfig, SlowClients};
use crate::message::Subscription;
use crate::message::is_reserved;
use crate::plugins::Registry;
use crate::source::embedded::EmbeddedBroker;
use auth::{Access, Authority, bearer, origin_allowed};
use hub::{Backend, Dispatcher, Hub, HubLimits, JoinError};
use ring::Event;
use ring::{Budget, Lagged, Limits};
use serve::{ServeLimits, Streaming, Ticket};

/// The pseudo-channel a token must be able to read for `/api/plugins`.
pub const PLUGINS_CHANNEL: &str = "switchyard:plugins";
/// How often a connection checks that its token has not expired.
const EXPIRY_CHECK: Duration = Duration::from_secs(60);
/// Refused requests in a row after which a WebSocket is closed.
const MAX_REFUSALS: u32 = 10;
/// Read buffer of one WebSocket connection.
const READ_BUFFER: usize = 4096;
/// Interval of SSE keep-alive comments.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Close code: the token expired while connected.
pub const CLOSE_EXPIRED: u16 = 4001;
/// Close code: policy (too many refused requests, too slow).
pub const CLOSE_POLICY: u16 = 1008;
/// Close code: the host is stopping.
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// Close code: a message over the size limit.
pub const CLOSE_TOO_BIG: u16 = 1009;

/// The gateway's counters, for `/metrics`.
#[derive(Debug, Default)]
pub struct GatewayStats {
    /// Open WebSocket connections.
    pub ws_connections: AtomicU64,
    /// Open SSE streams.
    pub sse_connections: AtomicU64,
    /// Messages put in clients' rings (one per client that watches the subscription).
    pub messages_out: AtomicU64,
    /// Messages browsers published.
    pub messages_in: AtomicU64,
    /// Messages slow clients lost.
    pub dropped: AtomicU64,
    /// Slow clients disconnected (`slow_clients = "disconnect"`).
    pub slow_disconnects: AtomicU64,
    /// Redis subscriptions held for browsers.
    pub subscriptions: AtomicU64,
    /// Refusals: no or bad token.
    pub denied_token: AtomicU64,
    /// Refusals: origin not allowed.
    pub denied_origin: AtomicU64,
    /// Refusals: channel not granted (read or write).
    pub denied_channel: AtomicU64,
    /// Refusals: request rate over the limit.
    pub denied_rate: AtomicU64,
    /// Refusals: message over the size limit.
    pub denied_size: AtomicU64,
    /// Refusals: too many connections.
    pub denied_capacity: AtomicU64,
    /// Refusals: too many connections waiting for a request (`max_pending_connections`).
    pub denied_pending: AtomicU64,
    /// Refusals: as many sockets as the gateway may hold (its connection caps within the
    /// open-file limit).
    pub denied_sockets: AtomicU64,
    /// Refusals: more subscriptions than one connection may hold.
    pub denied_subscriptions: AtomicU64,
    /// Refusals: the gateway holds `max_subscriptions` Redis subscriptions.
    pub denied_subscriptions_total: AtomicU64,
    /// Sockets open that are not a stream (see [`serve`]).
    pub pending_connections: AtomicU64,
    /// Connections closed by `request_timeout_ms`.
    pub timeouts: AtomicU64,
    /// Messages not sent to browsers because their payload is over `max_payload_bytes`.
    pub oversize: AtomicU64,
    /// Bytes the subscriptions' rings hold for clients that have not read them.
    pub buffered_bytes: AtomicU64,
}

/// Where the gateway's messages come from.
pub enum GatewaySource {
    /// A Redis server (for a cluster, one of its nodes: classic pub/sub reaches every node).
    Redis(Box<redis::Client>),
    /// The in-process broker.
    Embedded(Arc<EmbeddedBroker>),
}

/// A running gateway.
pub struct Gateway {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its counters.
    pub stats: Arc<GatewayStats>,
    /// Its server task.
    pub task: JoinHandle<()>,
}

struct Shared {
    hub: Arc<Hub>,
    authority: Authority,
    config: GatewayConfig,
    stats: Arc<GatewayStats>,
    registry: Arc<Registry>,
    connections: AtomicUsize,
    /// Ends every stream and socket when the host stops.
    shutdown: CancellationToken,
}

/// Starts the gateway on `listener` until `shutdown`.
pub fn start(
    config: &GatewayConfig,
    listener: tokio::net::TcpListener,
    source: GatewaySource,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> anyhow::Result<Gateway> {
    let stats = Arc::new(GatewayStats::default());
    let dispatcher = Dispatcher::new(stats.clone(), config.max_payload_bytes);
    let backend = match source {
        GatewaySource::Redis(client) => {
            let info = client.get_connection_info().clone();
            let settings = info
                .redis_settings()
                .clone()
                .set_protocol(redis::ProtocolVersion::RESP3);
            let client = redis::Client::open(info.set_redis_settings(settings))?;
            let pushes = dispatcher.clone();
            let manager = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(5)))
                .set_response_timeout(Some(Duration::from_secs(5)))
                .set_push_sender(move |push| {
                    pushes.push(push);
                    Ok::<(), std::convert::Infallible>(())
                })
                .set_automatic_resubscription();
            Backend::Redis(ConnectionManager::new_lazy_with_config(client, manager)?)
        }
        GatewaySource::Embedded(broker) => {
            let mut published = broker.tap();
            let dispatcher = dispatcher.clone();
            tokio::spawn(async move {
                while let Some(message) = published.recv().await {
                    dispatcher.published(&message.channel, &message.payload);
                }
            });
            Backend::Embedded(broker)
        }
    };
    let hub_limits = HubLimits {
        ring: Limits {
            messages: config.client_buffer,
            bytes: config.client_buffer_bytes,
        },
        max_subscriptions: config.max_subscriptions,
    };
    let budget = Arc::new(Budget::new(stats.clone(), config.buffer_bytes_total));
    let shared = Arc::new(Shared {
        hub: Arc::new(Hub::new(backend, dispatcher, hub_limits, budget)),
        authority: Authority::from_config(config)?,
        config: config.clone(),
        stats: stats.clone(),
        registry,
        connections: AtomicUsize::new(0),
        shutdown: shutdown.clone(),
    });
    let mut app = axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/ws", get(websocket::websocket))
        .route("/sse", get(server_sent_events))
        .route("/api/plugins", get(plugins));
    if config.pages {
        app = app.merge(pages());
    }
    let app = app.with_state(shared);
    let addr = listener.local_addr()?;
    let limits = serve_limits(config, serve::open_file_limit());
    let task = serve::spawn(listener, app, limits, stats.clone(), shutdown);
    tracing::info!(
        %addr,
        max_sockets = limits.max_sockets,
        max_pending = limits.max_pending,
        "gateway listening"
    );
    Ok(Gateway { addr, stats, task })
}

/// How many sockets the gateway may hold, given the open-file `limit` of the process; warns
/// when that limit leaves fewer than the configuration asks for.
fn serve_limits(config: &GatewayConfig, limit: Option<u64>) -> ServeLimits {
    let wanted = config
        .max_connections
        .saturating_add(config.max_pending_connections);
    let max_sockets = serve::socket_budget(wanted, limit);
    if max_sockets < wanted {
        tracing::warn!(
            open_file_limit = limit,
            max_sockets,
            "gateway: the open-file limit leaves room for {max_sockets} browser connections, \
             fewer than gateway.max_connections + gateway.max_pending_connections ({wanted}); \
             raise it (ulimit -n, LimitNOFILE=) to serve more"
        );
    }
    ServeLimits {
        request_timeout: Duration::from_millis(config.request_timeout_ms),
        max_pending: config.max_pending_connections.min(max_sockets),
        max_sockets,
    }
}

/// The pages, embedded in the binary.
fn pages() -> axum::Router<Arc<Shared>> {
    fn page(
        content_type: &'static str,
        body: &'static str,
    ) -> axum::routing::MethodRouter<Arc<Shared>> {
        get(move || async move {
            (
                [
                    (header::CONTENT_TYPE, content_type),
                    // The pages load nothing from elsewhere and talk only to this gateway.
                    (
                        header::CONTENT_SECURITY_POLICY,
                        "default-src 'self'; connect-src 'self'; img-src 'self' data:; \
                         frame-ancestors 'none'",
                    ),
                ],
                body,
            )
        })
    }
    const HTML: &str = "text/html; charset=utf-8";
    const JS: &str = "text/javascript; charset=utf-8";
    axum::Router::new()
        .route("/", page(HTML, include_str!("pages/index.html")))
        .route("/index.html", page(HTML, include_str!("pages/index.html")))
        .route(
            "/dashboard.html",
            page(HTML, include_str!("pages/dashboard.html")),
        )
        .route("/chat.html", page(HTML, include_str!("pages/chat.html")))
        .route(
            "/dashboard.js",
            page(JS, include_str!("pages/dashboard.js")),
        )
        .route("/chat.js", page(JS, include_str!("pages/chat.js")))
        .route("/common.js", page(JS, include_str!("pages/common.js")))
        .route(
            "/style.css",
            page("text/css; charset=utf-8", include_str!("pages/style.css")),
        )
}

/// A refusal before the upgrade: a status and a one-line reason.
struct Refusal(StatusCode, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.0, format!("{}\n", self.1)).into_response()
    }
}

fn refuse(status: StatusCode, why: impl Into<String>) -> Refusal {
    Refusal(status, why.into())
}

/// The request's parameters, `channel` repeatable.
type Params = Query<Vec<(String, String)>>;

/// A channel or pattern as a client names it: glob metacharacters make a pattern.
fn subscription_of(name: &str) -> Result<Subscription, String> {
    if name.is_empty() {
        return Err("empty channel name".to_owned());
    }
    if is_reserved(name.as_bytes()) {
        return Err(format!("{name} is reserved for the host"));
    }
    let bytes = Bytes::copy_from_slice(name.as_bytes());
    Ok(if name.contains(['*', '?', '[']) {
        Subscription::Pattern(bytes)
    } else {
        Subscription::Channel(bytes)
    })
}

impl Shared {
    /// Checks origin, token and every requested channel; the connection's access and
    /// subscriptions, or the refusal.
    fn admit(
        &self,
        headers: &HeaderMap,
        params: &[(String, String)],
    ) -> Result<(Access, Vec<Subscription>), Refusal> {
        let header = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
        if !origin_allowed(
            header(header::ORIGIN),
            header(header::HOST),
            &self.config.allowed_origins,
            &self.config.public_origins,
        ) {
            self.stats.denied_origin.fetch_add(1, Ordering::Relaxed);
            return Err(refuse(StatusCode::FORBIDDEN, "origin not allowed"));
        }
        let token = params
            .iter()
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v.as_str())
            .or_else(|| bearer(header(header::AUTHORIZATION)?));
        let access = self.authority.check(token).map_err(|refused| {
            self.stats.denied_token.fetch_add(1, Ordering::Relaxed);
            refuse(StatusCode::UNAUTHORIZED, refused.to_string())
        })?;
        let mut subscriptions = Vec::new();
        let mut seen = HashSet::new();
        let most = self.config.max_subscriptions_per_connection;
        for (_, name) in params.iter().filter(|(k, _)| k == "channel") {
            let subscription =
                subscription_of(name).map_err(|why| refuse(StatusCode::BAD_REQUEST, why))?;
            if !access.may_read(&subscription) {
                self.stats.denied_channel.fetch_add(1, Ordering::Relaxed);
                return Err(refuse(
                    StatusCode::FORBIDDEN,
                    format!("not allowed to read {name}"),
                ));
            }
            if seen.insert(subscription.clone()) {
                if subscriptions.len() == most {
                    self.stats
                        .denied_subscriptions
                        .fetch_add(1, Ordering::Relaxed);
                    return Err(refuse(
                        StatusCode::BAD_REQUEST,
                        too_many_subscriptions(most),
                    ));
                }
                subscriptions.push(subscription);
            }
        }
        Ok((access, subscriptions))
    }

    /// Counts a new stream on the socket of `ticket`, or refuses it when the gateway is full.
    fn connect(
        self: &Arc<Self>,
        ticket: &Arc<Ticket>,
        gauge: fn(&GatewayStats) -> &AtomicU64,
    ) -> Result<Slot, Refusal> {
        let open = self.connections.fetch_add(1, Ordering::AcqRel);
        if open >= self.config.max_connections {
            self.connections.fetch_sub(1, Ordering::AcqRel);
            self.stats.denied_capacity.fetch_add(1, Ordering::Relaxed);
            return Err(refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many connections",
            ));
        }
        gauge(&self.stats).fetch_add(1, Ordering::Relaxed);
        Ok(Slot {
            shared: self.clone(),
            gauge,
            subscriptions: HashSet::new(),
            _streaming: ticket.streaming(),
        })
    }
}

/// The refusal of a subscription beyond `most` for one connection.
fn too_many_subscriptions(most: usize) -> String {
    format!(
        "too many subscriptions: at most {most} channels and patterns per connection \
         (gateway.max_subscriptions_per_connection)"
    )
}

/// A client's stream of one subscription's messages.
type Messages = BoxStream<'static, Result<Event, Lagged>>;

/// One open stream: counted while it lives (its socket no longer pending), its
/// subscriptions left together when it goes.
struct Slot {
    shared: Arc<Shared>,
    gauge: fn(&GatewayStats) -> &AtomicU64,
    subscriptions: HashSet<Subscription>,
    _streaming: Streaming,
}

impl Slot {
    /// Joins `subscriptions` (distinct, none of them joined yet): a stream of messages each.
    async fn join(
        &mut self,
        subscriptions: &[Subscription],
    ) -> Result<Vec<(Subscription, Messages)>, JoinError> {
        let readers = self.shared.hub.join(subscriptions).await.inspect_err(|e| {
            if matches!(e, JoinError::Full { .. }) {
                self.shared
                    .stats
                    .denied_subscriptions_total
                    .fetch_add(1, Ordering::Relaxed);
            }
        })?;
        self.subscriptions.extend(subscriptions.iter().cloned());
        Ok(subscriptions
            .iter()
            .cloned()
            .zip(readers.into_iter().map(ring::Reader::into_stream))
            .collect())
    }

    /// Joins every one of `subscriptions`, or refuses the connection.
    async fn join_all(
        &mut self,
        subscriptions: &[Subscription],
    ) -> Result<StreamMap<Subscription, Messages>, Refusal> {
        let joined = self
            .join(subscriptions)
            .await
            .map_err(|e| refuse(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
        Ok(joined.into_iter().collect())
    }

    async fn leave(&mut self, subscription: &Subscription) {
        if self.subscriptions.remove(subscription) {
            self.shared
                .hub
                .leave(std::slice::from_ref(subscription))
                .await;
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.shared.connections.fetch_sub(1, Ordering::AcqRel);
        (self.gauge)(&self.shared.stats).fetch_sub(1, Ordering::Relaxed);
        let subscriptions: Vec<Subscription> = self.subscriptions.drain().collect();
        if !subscriptions.is_empty() {
            let hub = self.shared.hub.clone();
            tokio::spawn(async move { hub.leave(&subscriptions).await });
        }
    }
}

/// `GET /api/plugins`: the host's plugins, for dashboards.
async fn plugins(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(params): Params,
) -> Response {
    let (access, _) = match shared.admit(&headers, &params) {
        Ok(admitted) => admitted,
        Err(refusal) => return refusal.into_response(),
    };
    let plugins = Subscription::Channel(Bytes::from_static(PLUGINS_CHANNEL.as_bytes()));
    if !access.may_read(&plugins) {
        shared.stats.denied_channel.fetch_add(1, Ordering::Relaxed);
        return refuse(
            StatusCode::FORBIDDEN,
            format!("not allowed to read {PLUGINS_CHANNEL}"),
        )
        .into_response();
    }
    axum::Json(shared.registry.report()).into_response()
}

type Events = Pin<Box<dyn Stream<Item = Result<SseEvent, std::convert::Infallible>> + Send>>;

/// `GET /sse`: the requested channels as Server-Sent Events.
async fn server_sent_events(
    State(shared): State<Arc<Shared>>,
    Extension(ticket): Extension<Arc<Ticket>>,
    headers: HeaderMap,
    Query(params): Params,
) -> Response {
    let (access, subscriptions) = match shared.admit(&headers, &params) {
        Ok(admitted) => admitted,
        Err(refusal) => return refusal.into_response(),
    };
    if subscriptions.is_empty() {
        return refuse(StatusCode::BAD_REQUEST, "channel= is required").into_response();
    }
    let mut slot = match shared.connect(&ticket, |s| &s.sse_connections) {
        Ok(slot) => slot,
        Err(refusal) => return refusal.into_response(),
    };
    let streams = match slot.join_all(&subscriptions).await {
        Ok(streams) => streams,
        Err(refusal) => return refusal.into_response(),
    };
    let disconnect_slow = shared.config.slow_clients == SlowClients::Disconnect;
    let stats = shared.stats.clone();
    let shutdown = shared.shutdown.clone();
    let expiry = tokio::time::interval(EXPIRY_CHECK);
    // The slot lives as long as the stream: dropping it (client gone) leaves the
    // subscriptions.
    let events: Events = Box::pin(futures::stream::unfold(
        (streams, expiry, slot, access, false),
        move |(mut streams, mut expiry, slot, access, done)| {
            let stats = stats.clone();
            let shutdown = shutdown.clone();
            async move {
                if done {
                    return None;
                }
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => return None,
                        next = streams.next() => {
                            let (_, item) = next?;
                            let event = match item {
                                Ok(event) => SseEvent::default().event("message").data(event.as_str()),
                                Err(Lagged(missed)) => {
                                    stats.dropped.fetch_add(missed, Ordering::Relaxed);
                                    if disconnect_slow {
                                        stats.slow_disconnects.fetch_add(1, Ordering::Relaxed);
                                        let event = SseEvent::default()
                                            .event("closed")
                                            .data(r#"{"reason":"too slow"}"#);
                                        return Some((Ok(event), (streams, expiry, slot, access, true)));
                                    }
                                    SseEvent::default()
                                        .event("dropped")
                                        .data(serde_json::json!({ "dropped": missed }).to_string())
                                }
                            };
                            return Some((Ok(event), (streams, expiry, slot, access, false)));
                        }
                        _ = expiry.tick() => {
                            if access.expired() {
                                let event = SseEvent::default()
                                    .event("closed")
                                    .data(r#"{"reason":"token expired"}"#);
                                return Some((Ok(event), (streams, expiry, slot, access, true)));
                            }
                        }
                    }
                }
            }
        },
    ));
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}
