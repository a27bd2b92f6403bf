//! Effects: what plugins cause outside themselves: publishing and invalidating on the host's
//! own Redis connection (never the subscriber connection), and calls to named [`outputs`].
//!
//! Host imports run on a plugin's worker thread, not on the async runtime; they wait for
//! Redis through [`Effects::block_on`], bounded by the remaining deadline of the call, so a
//! slow Redis shows up as `error::unavailable` in the plugin, not as a stuck worker.
//!
//! What plugins publish is bounded in bytes on its way out: a payload over
//! `plugins.max_payload_bytes` is refused at once (`error::invalid`), and the outgoing
//! queue holds at most `effects.outgoing_bytes` of messages waiting for Redis; when that is
//! spent, `send` and `publish` wait for room until the plugin's deadline and then fail with
//! `error::unavailable`. The writer sends at most [`MAX_BATCH_BYTES`] (plus one message) per
//! pipeline, since each pipeline is copied on its way to the socket and the connection keeps
//! its largest write buffer.

pub mod loop_guard;
pub mod outputs;
pub mod replies;

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError, mpsc, oneshot};

use crate::PluginName;
use crate::config::Config;
use crate::glob::Glob;
use crate::stats::PluginStats;
use crate::trace::Tracing;
use loop_guard::Flows;
use outputs::{OutputError, Outputs, Reply};
use replies::{Awaited, Replies};

/// Messages waiting to be written to Redis, from every plugin's `send` and `publish`. When
/// full, a plugin's next call waits (up to its deadline) for room. Bytes are bounded too
/// (`effects.outgoing_bytes`); this bounds the count of small messages.
const OUTGOING_CAPACITY: usize = 16_384;
/// The most PUBLISH commands written as one pipeline.
const MAX_BATCH: usize = 512;
/// Payload bytes written as one pipeline, at most (the message that crosses it is the last):
/// a round trip shared by a megabyte costs little per byte, and every byte of a pipeline is
/// copied on its way to the socket (into the commands, then into the connection's write
/// buffer, which keeps the largest size it ever held).
pub const MAX_BATCH_BYTES: usize = 1 << 20;
/// What one outgoing message costs beyond its channel and payload: the queue entry, its
/// reply channel and the command's framing.
pub const OUTGOING_OVERHEAD: usize = 128;
/// Bytes written since the allocator was last asked to give freed memory back, past which
/// the writer asks it once the queue is empty: the copies of a burst of messages are freed
/// into the heaps of the threads that made them, and glibc returns that space to the system
/// only when asked (or when it lies at the top of a heap and is larger than its trim
/// threshold, which follows the largest recent allocation), so the process would otherwise
/// keep much of its peak.
const RELEASE_AFTER_BYTES: usize = 64 << 20;
/// The default of `effects.outgoing_bytes`.
pub const DEFAULT_OUTGOING_BYTES: usize = 64 << 20;
/// The default of `plugins.max_payload_bytes`.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 1 << 20;
/// How often a writer that lost Redis checks whether it is back.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// What bounds plugins' effects in the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EffectLimits {
    /// Bytes the outgoing queue may hold (`effects.outgoing_bytes`).
    pub outgoing_bytes: usize,
    /// The largest payload `publish` and `send` accept (`plugins.max_payload_bytes`).
    pub max_payload_bytes: usize,
}

impl Default for EffectLimits {
    fn default() -> Self {
        Self {
            outgoing_bytes: DEFAULT_OUTGOING_BYTES,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
        }
    }
}

impl EffectLimits {
    /// The limits `config` sets.
    pub fn from_config(config: &Config) -> Self {
        Self {
            outgoing_bytes: usize::try_from(config.effects.outgoing_bytes).unwrap_or(usize::MAX),
            max_payload_bytes: config.plugins.max_payload_bytes,
        }
    }
}

/// Where plugins' effects go, and the runtime that carries them out.
#[derive(Clone, Debug)]
pub struct Effects {
    publisher: Publisher,
    /// The ordered queue of PUBLISH commands to Redis, for a Redis publisher.
    outgoing: Option<mpsc::Sender<Outgoing>>,
    /// Bytes of room left in the outgoing queue: each message holds its cost until written.
    room: Arc<Semaphore>,
    limits: EffectLimits,
    /// Which plugins' publishes reach which, for the loop guard.
    flows: Arc<Flows>,
    /// Set while the last write to Redis failed and no probe has succeeded since: calls then
    /// fail at once instead of waiting out their deadline.
    redis_down: Arc<AtomicBool>,
    outputs: Arc<Outputs>,
    /// The channel every invalidation is announced on, if any.
    broadcast: Option<Bytes>,
    /// Which channels are sharded: published with `SPUBLISH`.
    sharded: Arc<ShardedChannels>,
    /// Where the host's own Redis is, as `(address, database)`, for plugins that name it.
    own_redis: Option<(redis::ConnectionAddr, i64)>,
    /// Spans of handled messages and their effects (off by default).
    tracing: Arc<Tracing>,
    /// Requests waiting for their replies.
    replies: Arc<Replies>,
    runtime: tokio::runtime::Handle,
}

/// A Redis URL's server and database, if it is one.
fn redis_location(url: &str) -> Option<(redis::ConnectionAddr, i64)> {
    use redis::IntoConnectionInfo as _;
    let info = url.into_connection_info().ok()?;
    Some((info.addr().clone(), info.redis_settings().db()))
}

/// The channels plugins' messages reach with `SPUBLISH`: those matching the operator's
/// `redis.sharded_channels`, and those some loaded plugin subscribes to as sharded.
#[derive(Debug, Default)]
pub struct ShardedChannels {
    configured: Vec<Glob>,
    subscribed: ArcSwap<HashSet<Bytes>>,
}

impl ShardedChannels {
    /// Channels matching `patterns` are sharded.
    pub fn new(patterns: &[String]) -> Self {
        Self {
            configured: patterns.iter().map(|p| Glob::new(p.as_bytes())).collect(),
            subscribed: ArcSwap::default(),
        }
    }

    /// Whether `channel` is sharded.
    pub fn contains(&self, channel: &[u8]) -> bool {
        self.subscribed.load().contains(channel)
            || self.configured.iter().any(|g| g.matches(channel))
    }

    /// Replaces the channels loaded plugins subscribe to as sharded.
    pub fn set_subscribed(&self, channels: HashSet<Bytes>) {
        self.subscribed.store(Arc::new(channels));
    }
}

/// One entry of the outgoing queue.
enum Outgoing {
    /// A PUBLISH; `reply` gets the receiver count for `publish`, none for `send`, whose
    /// failures are counted against `stats` instead.
    Publish {
        channel: Vec<u8>,
        payload: Vec<u8>,
        /// `SPUBLISH` rather than `PUBLISH`.
        sharded: bool,
        reply: Option<oneshot::Sender<Result<u32, String>>>,
        stats: Arc<PluginStats>,
        /// Its share of `effects.outgoing_bytes`, given back once it has been written.
        _room: OwnedSemaphorePermit,
    },
    /// Answered once everything queued before it has been written.
    Flush(oneshot::Sender<()>),
}

impl Outgoing {
    /// Bytes of channel and payload it carries.
    fn payload_len(&self) -> usize {
        match self {
            Outgoing::Publish {
                channel, payload, ..
            } => channel.len() + payload.len(),
            Outgoing::Flush(_) => 0,
        }
    }
}

/// The connection plugins publish through.
#[derive(Clone)]
pub enum Publisher {
    /// A Redis connection that reconnects by itself; while Redis is away, calls fail fast.
    Redis(redis::aio::ConnectionManager),
    /// A Redis Cluster connection: commands go to the shard owning their key.
    Cluster(redis::cluster_async::ClusterConnection),
    /// The in-process broker (`switchyard demo`, `switchyard test`).
    Embedded(Arc<dyn InProcessBroker>),
}

/// A broker inside the host process that effects go to instead of Redis: the embedded one
/// (`source::embedded`), which hands what is published straight to the router.
pub trait InProcessBroker: Send + Sync {
    /// Publishes `payload` on `channel` for plugin `from`; returns the number of receivers.
    fn publish_from(&self, from: Option<&PluginName>, channel: Bytes, payload: Bytes) -> u32;
    /// Removes `keys`; returns how many existed, as `UNLINK` does.
    fn unlink(&self, keys: &[String]) -> u32;
    /// Every message published from now on, as `(channel, payload)`, until the receiver is
    /// dropped.
    fn watch(&self) -> mpsc::UnboundedReceiver<(Bytes, Bytes)>;
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Publisher::Redis(_) => f.write_str("Publisher::Redis"),
            Publisher::Cluster(_) => f.write_str("Publisher::Cluster"),
            Publisher::Embedded(_) => f.write_str("Publisher::Embedded"),
        }
    }
}

/// Why an effect did not happen.
#[derive(Debug, thiserror::Error)]
pub enum EffectError {
    /// The backend could not be reached or answered with an error.
    #[error("{0}")]
    Unavailable(String),
    /// The call's deadline passed while waiting.
    #[error("no answer within the plugin's deadline ({0:?} left)")]
    Timeout(Duration),
    /// A payload over `plugins.max_payload_bytes`.
    #[error(
        "payload of {size} bytes is over plugins.max_payload_bytes ({limit} bytes); nothing was published"
    )]
    PayloadTooLarge {
        /// The payload's size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The outgoing queue's byte budget stayed spent until the call's deadline.
    #[error(
        "the outgoing queue is full: effects.outgoing_bytes ({budget} bytes) stayed taken by messages waiting for Redis for the {waited:?} the plugin's deadline left; nothing was published"
    )]
    OutgoingFull {
        /// `effects.outgoing_bytes`.
        budget: usize,
        /// How long the call waited for room.
        waited: Duration,
    },
    /// An output call failed.
    #[error(transparent)]
    Output(#[from] OutputError),
}

impl Effects {
    /// Effects carried out through `publisher` and `outputs`, awaited on `runtime`.
    /// Invalidations are announced on `broadcast` unless it is empty.
    pub fn new(
        publisher: Publisher,
        outputs: Arc<Outputs>,
        broadcast: &str,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        let broadcast =
            (!broadcast.is_empty()).then(|| Bytes::copy_from_slice(broadcast.as_bytes()));
        let redis_down = Arc::new(AtomicBool::new(false));
        let wire = match &publisher {
            Publisher::Redis(connection) => Some(Wire::Single(connection.clone())),
            Publisher::Cluster(connection) => Some(Wire::Cluster(connection.clone())),
            Publisher::Embedded(_) => None,
        };
        let outgoing = wire.map(|wire| {
            let (queue, incoming) = mpsc::channel(OUTGOING_CAPACITY);
            runtime.spawn(write_outgoing(wire, incoming, redis_down.clone()));
            queue
        });
        let limits = EffectLimits::default();
        let replies = match &publisher {
            Publisher::Embedded(broker) => Replies::embedded(broker.clone()),
            Publisher::Redis(_) | Publisher::Cluster(_) => Replies::none(),
        };
        Self {
            publisher,
            outgoing,
            room: Arc::new(Semaphore::new(limits.outgoing_bytes)),
            limits,
            flows: Arc::default(),
            redis_down,
            outputs,
            broadcast,
            sharded: Arc::default(),
            own_redis: None,
            tracing: Arc::default(),
            replies: Arc::new(replies),
            runtime,
        }
    }

    /// Says where the host's own Redis is (`url`, credentials aside), so that a plugin that
    /// names it by address is recognised ([`Effects::is_own_redis`]).
    pub fn with_own_redis(mut self, url: &str) -> Self {
        self.own_redis = redis_location(url);
        self
    }

    /// Receives the replies to plugins' requests through `client`'s server.
    pub fn with_replies_from(mut self, client: redis::Client) -> Self {
        self.replies = Arc::new(Replies::redis(client));
        self
    }

    /// Records spans with `tracing`.
    pub fn with_tracing(mut self, tracing: Arc<Tracing>) -> Self {
        self.tracing = tracing;
        self
    }

    /// The host's tracing.
    pub fn tracing(&self) -> &Arc<Tracing> {
        &self.tracing
    }

    /// Whether `url` names the host's own Redis: the same host, port and database,
    /// whatever credentials it carries.
    pub fn is_own_redis(&self, url: &str) -> bool {
        self.own_redis.is_some() && redis_location(url) == self.own_redis
    }

    /// Bounds the effects by `limits`. Call it before any plugin uses these effects.
    pub fn with_limits(mut self, limits: EffectLimits) -> Self {
        self.room = Arc::new(Semaphore::new(
            limits.outgoing_bytes.min(Semaphore::MAX_PERMITS),
        ));
        self.limits = limits;
        self
    }

    /// Which plugins' publishes reach which, for the loop guard.
    pub fn flows(&self) -> &Flows {
        &self.flows
    }

    /// The channel invalidations are announced on, if any.
    pub fn broadcast(&self) -> Option<&[u8]> {
        self.broadcast.as_deref()
    }

    /// Publishes channels in `sharded` with `SPUBLISH`.
    pub fn with_sharded(mut self, sharded: ShardedChannels) -> Self {
        self.sharded = Arc::new(sharded);
        self
    }

    /// The channels published with `SPUBLISH`.
    pub fn sharded(&self) -> &ShardedChannels {
        &self.sharded
    }

    /// Waits until every message queued so far has been written (or has failed).
    pub async fn flush(&self) {
        if let Some(queue) = &self.outgoing {
            let (done, written) = oneshot::channel();
            if queue.send(Outgoing::Flush(done)).await.is_ok() {
                let _ = written.await;
            }
        }
    }

    /// The outputs plugins may call.
    pub fn outputs(&self) -> &Arc<Outputs> {
        &self.outputs
    }

    /// Deletes `keys` (UNLINK) and announces it on the broadcast channel; returns how many
    /// keys existed.
    pub fn invalidate(
        &self,
        from: &PluginName,
        keys: &[String],
        within: Duration,
    ) -> Result<u32, EffectError> {
        let notice = self.broadcast.as_ref().map(|channel| {
            let notice = serde_json::json!({ "keys": keys, "source": from.as_str() });
            (channel.clone(), Bytes::from(notice.to_string()))
        });
        match &self.publisher {
            Publisher::Redis(connection) => {
                let mut connection = connection.clone();
                let mut pipe = redis::pipe();
                pipe.cmd("UNLINK").arg(keys);
                if let Some((channel, notice)) = &notice {
                    pipe.cmd("PUBLISH")
                        .arg(channel.as_ref())
                        .arg(notice.as_ref())
                        .ignore();
                }
                self.block_on(within, async move {
                    let (removed,): (u32,) = pipe
                        .query_async(&mut connection)
                        .await
                        .map_err(|e| EffectError::Unavailable(format!("UNLINK failed: {e}")))?;
                    Ok(removed)
                })
            }
            Publisher::Cluster(connection) => {
                let mut connection = connection.clone();
                let unlink = redis::Cmd::new().arg("UNLINK").arg(keys).to_owned();
                self.block_on(within, async move {
                    // The cluster client splits the keys by shard and adds up the answers.
                    let removed: u32 = unlink
                        .query_async(&mut connection)
                        .await
                        .map_err(|e| EffectError::Unavailable(format!("UNLINK failed: {e}")))?;
                    if let Some((channel, notice)) = &notice {
                        redis::cmd("PUBLISH")
                            .arg(channel.as_ref())
                            .arg(notice.as_ref())
                            .exec_async(&mut connection)
                            .await
                            .map_err(|e| {
                                EffectError::Unavailable(format!(
                                    "PUBLISH of the notice failed: {e}"
                                ))
                            })?;
                    }
                    Ok(removed)
                })
            }
            Publisher::Embedded(broker) => {
                let removed = broker.unlink(keys);
                if let Some((channel, notice)) = notice {
                    broker.publish_from(Some(from), channel, notice);
                }
                Ok(removed)
            }
        }
    }

    /// Calls the output `name` with `payload`, when the calling plugin has `remaining` of
    /// its deadline left. The call gets [`output_budget`](crate::config::output_budget) of it, so that the plugin
    /// keeps time to act on the outcome: a slow output ends as a timeout error the plugin
    /// sees, not as the plugin's own deadline trap.
    pub fn call_output(
        &self,
        from: &PluginName,
        name: &str,
        payload: &[u8],
        remaining: Duration,
        trace: Option<&opentelemetry::Context>,
    ) -> Result<Reply, EffectError> {
        let budget = crate::config::output_budget(remaining);
        let trace = trace.map(|cx| crate::trace::Under {
            tracing: &self.tracing,
            cx,
        });
        // `Outputs::call` bounds itself by `budget` and says which limit ended it; a second
        // timeout here would only race it with a vaguer message.
        let call = self
            .outputs
            .call(name, from.as_str(), payload, budget, trace);
        Ok(self.runtime.block_on(call)?)
    }

    /// Publishes and returns the number of receivers, as `PUBLISH` does. Goes through the
    /// outgoing queue, so it is written after the plugin's earlier `send`s.
    ///
    /// Must be called from a worker thread, never from inside the async runtime.
    pub fn publish(
        &self,
        from: &PluginName,
        stats: &Arc<PluginStats>,
        channel: Vec<u8>,
        payload: Vec<u8>,
        deadline: Instant,
    ) -> Result<u32, EffectError> {
        self.check_payload(&payload)?;
        match &self.publisher {
            Publisher::Redis(_) | Publisher::Cluster(_) => {
                let (reply, receivers) = oneshot::channel();
                self.enqueue(stats, channel, payload, Some(reply), deadline)?;
                self.block_on(deadline.saturating_duration_since(Instant::now()), async {
                    match receivers.await {
                        Ok(result) => result.map_err(EffectError::Unavailable),
                        Err(_) => Err(EffectError::Unavailable("the host is stopping".into())),
                    }
                })
            }
            Publisher::Embedded(broker) => {
                Ok(broker.publish_from(Some(from), Bytes::from(channel), Bytes::from(payload)))
            }
        }
    }

    /// Queues a PUBLISH without waiting for Redis; a failure to write it later is counted in
    /// `stats`. Waits only while the outgoing queue is full, until `deadline`.
    pub fn send(
        &self,
        from: &PluginName,
        stats: &Arc<PluginStats>,
        channel: Vec<u8>,
        payload: Vec<u8>,
        deadline: Instant,
    ) -> Result<(), EffectError> {
        self.check_payload(&payload)?;
        match &self.publisher {
            Publisher::Redis(_) | Publisher::Cluster(_) => {
                self.enqueue(stats, channel, payload, None, deadline)
            }
            Publisher::Embedded(broker) => {
                broker.publish_from(Some(from), Bytes::from(channel), Bytes::from(payload));
                Ok(())
            }
        }
    }

    /// A reply channel for a request, listened to before this returns (waiting at most
    /// until `deadline` for the subscription).
    ///
    /// Must be called from a worker thread, never from inside the async runtime.
    pub fn open_reply_channel(&self, deadline: Instant) -> Result<Awaited, EffectError> {
        let replies = self.replies.clone();
        self.block_on(
            deadline.saturating_duration_since(Instant::now()),
            async move { replies.open().await.map_err(EffectError::Unavailable) },
        )
    }

    /// The reply `awaited` gets within `within`, if any.
    ///
    /// Must be called from a worker thread, never from inside the async runtime.
    pub fn await_reply(&self, awaited: Awaited, within: Duration) -> Option<Bytes> {
        self.runtime.block_on(awaited.reply(within))
    }

    /// Refuses a payload over `plugins.max_payload_bytes`: every plugin of this host would
    /// drop it unread, and the outgoing queue would hold it whole.
    fn check_payload(&self, payload: &[u8]) -> Result<(), EffectError> {
        let limit = self.limits.max_payload_bytes;
        if payload.len() > limit {
            return Err(EffectError::PayloadTooLarge {
                size: payload.len(),
                limit,
            });
        }
        Ok(())
    }

    /// Puts a PUBLISH on the outgoing queue, waiting for room (bytes, then a slot) until
    /// `deadline`.
    fn enqueue(
        &self,
        stats: &Arc<PluginStats>,
        channel: Vec<u8>,
        payload: Vec<u8>,
        reply: Option<oneshot::Sender<Result<u32, String>>>,
        deadline: Instant,
    ) -> Result<(), EffectError> {
        let Some(queue) = &self.outgoing else {
            return Err(EffectError::Unavailable("no Redis connection".into()));
        };
        if self.redis_down.load(Ordering::Acquire) {
            return Err(EffectError::Unavailable(
                "Redis is unreachable: the last write failed".into(),
            ));
        }
        let stopping = || EffectError::Unavailable("the host is stopping".into());
        // A message larger than the whole budget (a long channel name) waits for all of it.
        let cost = (channel.len() + payload.len() + OUTGOING_OVERHEAD)
            .min(self.limits.outgoing_bytes)
            .min(Semaphore::MAX_PERMITS);
        let cost = u32::try_from(cost).unwrap_or(u32::MAX);
        let room = match self.room.clone().try_acquire_many_owned(cost) {
            Ok(room) => room,
            Err(TryAcquireError::Closed) => return Err(stopping()),
            Err(TryAcquireError::NoPermits) => {
                let waited = deadline.saturating_duration_since(Instant::now());
                let room = self.room.clone();
                self.block_on(waited, async move {
                    room.acquire_many_owned(cost).await.map_err(|_| stopping())
                })
                .map_err(|error| match error {
                    EffectError::Timeout(waited) => EffectError::OutgoingFull {
                        budget: self.limits.outgoing_bytes,
                        waited,
                    },
                    other => other,
                })?
            }
        };
        let entry = Outgoing::Publish {
            sharded: self.sharded.contains(&channel),
            channel,
            payload,
            reply,
            stats: stats.clone(),
            _room: room,
        };
        match queue.try_send(entry) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(stopping()),
            Err(mpsc::error::TrySendError::Full(entry)) => self
                .block_on(deadline.saturating_duration_since(Instant::now()), async {
                    queue.send(entry).await.map_err(|_| stopping())
                }),
        }
    }

    /// Runs `future` to completion from a worker thread, giving up after `within`.
    fn block_on<T>(
        &self,
        within: Duration,
        future: impl Future<Output = Result<T, EffectError>>,
    ) -> Result<T, EffectError> {
        self.runtime
            .block_on(async { tokio::time::timeout(within, future).await })
            .unwrap_or(Err(EffectError::Timeout(within)))
    }
}

/// The connection the outgoing queue is written to.
enum Wire {
    Single(redis::aio::ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Wire {
    /// Writes `commands` (PUBLISH or SPUBLISH) and returns each one's receiver count.
    ///
    /// On one server they go out as one pipeline. On a cluster, `SPUBLISH`es go to the
    /// shard owning their channel and every `PUBLISH` to one node (the primary of slot 0),
    /// so that what one plugin publishes keeps its order; one pipeline per node, all at once.
    async fn write(&mut self, commands: &[(bool, &[u8], &[u8])]) -> Result<Vec<u32>, String> {
        let command = |sharded: bool| if sharded { "SPUBLISH" } else { "PUBLISH" };
        match self {
            Wire::Single(connection) => {
                let mut pipe = redis::pipe();
                for &(sharded, channel, payload) in commands {
                    pipe.cmd(command(sharded)).arg(channel).arg(payload);
                }
                pipe.query_async::<Vec<u32>>(connection)
                    .await
                    .map_err(|e| format!("PUBLISH failed: {e}"))
            }
            Wire::Cluster(connection) => {
                let mut groups: Vec<(Route, redis::Pipeline, Vec<usize>)> = Vec::new();
                for (index, &(sharded, channel, payload)) in commands.iter().enumerate() {
                    let route = if sharded {
                        Route::with_key(channel, SlotAddr::Master)
                    } else {
                        Route::new(0, SlotAddr::Master)
                    };
                    let at = match groups.iter().position(|(r, _, _)| *r == route) {
                        Some(at) => at,
                        None => {
                            groups.push((route, redis::pipe(), Vec::new()));
                            groups.len() - 1
                        }
                    };
                    let (_, pipe, indices) = &mut groups[at];
                    pipe.cmd(command(sharded)).arg(channel).arg(payload);
                    indices.push(index);
                }
                let writes = groups.into_iter().map(|(route, pipe, indices)| {
                    let mut connection = connection.clone();
                    async move {
                        let count = pipe.len();
                        let replies = connection
                            .route_pipeline(
                                pipe,
                                0,
                                count,
                                SingleNodeRoutingInfo::SpecificNode(route),
                            )
                            .await?;
                        Ok::<_, redis::RedisError>((indices, replies))
                    }
                });
                let mut counts = vec![0; commands.len()];
                for written in futures::future::join_all(writes).await {
                    let (indices, replies) = written.map_err(|e| format!("PUBLISH failed: {e}"))?;
                    for (index, reply) in indices.into_iter().zip(replies) {
                        counts[index] = reply
                            .extract_error()
                            .and_then(|reply| Ok(redis::from_redis_value(reply)?))
                            .map_err(|e| format!("PUBLISH failed: {e}"))?;
                    }
                }
                Ok(counts)
            }
        }
    }

    /// Whether Redis answers.
    async fn ping(&mut self) -> bool {
        let ping = redis::cmd("PING");
        match self {
            Wire::Single(connection) => ping.exec_async(connection).await.is_ok(),
            Wire::Cluster(connection) => ping.exec_async(connection).await.is_ok(),
        }
    }
}

/// Writes the outgoing queue to Redis: whatever has accumulated since the last write goes
/// out as one pipeline, in queue order, with one pipeline in flight. Under load the batches
/// grow, so the cost of a round trip is shared by many messages.
///
/// After a failed write, `down` is set (new calls fail at once) and the writer probes Redis
/// with PING every [`PROBE_INTERVAL`] until it answers.
async fn write_outgoing(
    mut wire: Wire,
    mut queue: mpsc::Receiver<Outgoing>,
    down: Arc<AtomicBool>,
) {
    let mut batch: Vec<Outgoing> = Vec::with_capacity(MAX_BATCH);
    let mut since_release = 0_usize;
    loop {
        if down.load(Ordering::Acquire) {
            if queue.is_closed() && queue.is_empty() {
                break;
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
            if wire.ping().await {
                tracing::info!("Redis answers again; plugins may publish");
                down.store(false, Ordering::Release);
            }
            continue;
        }
        let Some(first) = queue.recv().await else {
            break;
        };
        let mut bytes = first.payload_len();
        batch.push(first);
        while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            let Ok(next) = queue.try_recv() else {
                break;
            };
            bytes += next.payload_len();
            batch.push(next);
        }
        since_release += bytes;
        let commands: Vec<(bool, &[u8], &[u8])> = batch
            .iter()
            .filter_map(|entry| match entry {
                Outgoing::Publish {
                    channel,
                    payload,
                    sharded,
                    ..
                } => Some((*sharded, &channel[..], &payload[..])),
                Outgoing::Flush(_) => None,
            })
            .collect();
        let result = if commands.is_empty() {
            Ok(Vec::new())
        } else {
            wire.write(&commands).await
        };
        if let Err(why) = &result {
            tracing::warn!(messages = commands.len(), "{why}");
            down.store(true, Ordering::Release);
        }
        drop(commands);
        let mut receivers = result.as_ref().ok().map(|counts| counts.iter());
        for entry in batch.drain(..) {
            match entry {
                Outgoing::Publish { reply, stats, .. } => {
                    let outcome = match receivers.as_mut() {
                        Some(counts) => Ok(counts.next().copied().unwrap_or(0)),
                        None => Err(result.as_ref().err().cloned().unwrap_or_default()),
                    };
                    match (reply, outcome) {
                        (Some(reply), outcome) => {
                            let _ = reply.send(outcome);
                        }
                        (None, Err(why)) => stats.record_send_failed(&why),
                        (None, Ok(_)) => {}
                    }
                }
                Outgoing::Flush(done) => {
                    let _ = done.send(());
                }
            }
        }
        if since_release >= RELEASE_AFTER_BYTES && queue.is_empty() {
            since_release = 0;
            // It walks every arena: not on a reactor thread.
            drop(tokio::task::spawn_blocking(release_free_memory));
        }
    }
}

/// Asks the allocator to give the memory it holds free back to the system.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_free_memory() {
    unsafe extern "C" {
        /// glibc: releases free memory at the top of the heap and free pages elsewhere.
        fn malloc_trim(pad: usize) -> std::ffi::c_int;
    }
    // SAFETY: malloc_trim takes no pointers and is safe to call from any thread at any time.
    unsafe {
        malloc_trim(0);
    }
}

/// Other allocators give memory back by themselves, or offer no way to ask.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_memory() {}
