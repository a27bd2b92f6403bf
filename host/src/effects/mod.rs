//! Effects: what plugins cause outside themselves: publishing and invalidating on the host's
//! own Redis connection (never the subscriber connection), and calls to named [`outputs`].
//!
//! Host imports run on a plugin's worker thread, not on the async runtime; they wait for
//! Redis through [`Effects::block_on`], bounded by the remaining deadline of the call, so a
//! slow Redis shows up as `error::unavailable` in the plugin, not as a stuck worker.

pub mod host;
pub mod loop_guard;
pub mod outputs;
pub mod rate;
pub mod text;

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};
use tokio::sync::{mpsc, oneshot};

use crate::PluginName;
use crate::router::glob::Glob;
use crate::source::embedded::EmbeddedBroker;
use crate::worker::PluginStats;
use loop_guard::Flows;
use outputs::{OutputError, Outputs, Reply};

/// Messages waiting to be written to Redis, from every plugin's `send` and `publish`. When
/// full, a plugin's next call waits (up to its deadline) for room.
const OUTGOING_CAPACITY: usize = 16_384;
/// The most PUBLISH commands written as one pipeline.
const MAX_BATCH: usize = 512;
/// How often a writer that lost Redis checks whether it is back.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// Where plugins' effects go, and the runtime that carries them out.
#[derive(Clone, Debug)]
pub struct Effects {
    publisher: Publisher,
    /// The ordered queue of PUBLISH commands to Redis, for a Redis publisher.
    outgoing: Option<mpsc::Sender<Outgoing>>,
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
    runtime: tokio::runtime::Handle,
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
    },
    /// Answered once everything queued before it has been written.
    Flush(oneshot::Sender<()>),
}

/// The connection plugins publish through.
#[derive(Clone)]
pub enum Publisher {
    /// A Redis connection that reconnects by itself; while Redis is away, calls fail fast.
    Redis(redis::aio::ConnectionManager),
    /// A Redis Cluster connection: commands go to the shard owning their key.
    Cluster(redis::cluster_async::ClusterConnection),
    /// The in-process broker (`switchyard demo`, `switchyard test`).
    Embedded(Arc<EmbeddedBroker>),
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
        Self {
            publisher,
            outgoing,
            flows: Arc::default(),
            redis_down,
            outputs,
            broadcast,
            sharded: Arc::default(),
            runtime,
        }
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
    /// its deadline left. The call gets [`outputs::output_budget`] of it, so that the plugin
    /// keeps time to act on the outcome: a slow output ends as a timeout error the plugin
    /// sees, not as the plugin's own deadline trap.
    pub fn call_output(
        &self,
        from: &PluginName,
        name: &str,
        payload: &[u8],
        remaining: Duration,
    ) -> Result<Reply, EffectError> {
        let budget = outputs::output_budget(remaining);
        // `Outputs::call` bounds itself by `budget` and says which limit ended it; a second
        // timeout here would only race it with a vaguer message.
        let call = self.outputs.call(name, from.as_str(), payload, budget);
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
        match &self.publisher {
            Publisher::Redis(_) | Publisher::Cluster(_) => {
                let (reply, receivers) = oneshot::channel();
                self.enqueue(
                    Outgoing::Publish {
                        sharded: self.sharded.contains(&channel),
                        channel,
                        payload,
                        reply: Some(reply),
                        stats: stats.clone(),
                    },
                    deadline,
                )?;
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
        match &self.publisher {
            Publisher::Redis(_) | Publisher::Cluster(_) => self.enqueue(
                Outgoing::Publish {
                    sharded: self.sharded.contains(&channel),
                    channel,
                    payload,
                    reply: None,
                    stats: stats.clone(),
                },
                deadline,
            ),
            Publisher::Embedded(broker) => {
                broker.publish_from(Some(from), Bytes::from(channel), Bytes::from(payload));
                Ok(())
            }
        }
    }

    /// Puts `entry` on the outgoing queue, waiting for room until `deadline`.
    fn enqueue(&self, entry: Outgoing, deadline: Instant) -> Result<(), EffectError> {
        let Some(queue) = &self.outgoing else {
            return Err(EffectError::Unavailable("no Redis connection".into()));
        };
        if self.redis_down.load(Ordering::Acquire) {
            return Err(EffectError::Unavailable(
                "Redis is unreachable: the last write failed".into(),
            ));
        }
        let stopping = || EffectError::Unavailable("the host is stopping".into());
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
    let mut batch = Vec::with_capacity(MAX_BATCH);
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
        if queue.recv_many(&mut batch, MAX_BATCH).await == 0 {
            break;
        }
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
    }
}
