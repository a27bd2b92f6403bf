//! The Redis Cluster source: the cluster client's RESP3 connections, owned by a control task.
//!
//! Exact channels and patterns work cluster-wide: a `PUBLISH` on any node reaches the
//! subscribers of every node, so they are subscribed once, on whichever node the client
//! picks. Sharded channels (`SSUBSCRIBE`) are carried only by the shard owning the channel's
//! slot; the client subscribes each on that shard's primary, one channel per command (a
//! command spanning slots fails with CROSSSLOT).
//!
//! The client keeps track of the subscriptions it confirmed and makes them again on a node
//! that comes back, and on the current owners whenever it looks up the cluster's shape. The
//! control task applies changes (subscribe the new, barrier, unsubscribe the gone, as
//! [`super::redis`] does) and watches the cluster each second: `CLUSTER INFO` and a `PING`
//! to every primary decide readiness (a shard without a reachable primary turns it off), and
//! `CLUSTER SLOTS` shows when the shape changed (a failover, a slot moved). Keyspace and
//! keyevent notifications are node-local: they are subscribed on every primary instead
//! (see [`super::nodes`]), and each tick follows the primaries. A connection
//! that only listens sends nothing that would make the client notice a new shape, so on a
//! change the control task subscribes everything again: the client then finds each
//! subscription's current owner (a no-op where it already is). Messages published on a shard
//! while it had no reachable primary are lost (pub/sub is at most once).

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{
    MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo, SingleNodeRoutingInfo,
};
use redis::{PushInfo, PushKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::nodes::{NodeSubscriptions, is_node_local, node_local};
use super::redis::{
    BACKOFF_MAX, BACKOFF_MIN, BARRIER_TIMEOUT, Backoff, count_subscriptions, names_of,
};
use super::{ControlHandle, SourceStatus, Update};
use crate::config::RedisConfig;
use crate::message::{Delivery, Subscription};
use crate::router::{Router, RoutingTable};

/// How often the control task checks that every primary answers.
const HEALTH_INTERVAL: Duration = Duration::from_secs(1);
/// Health ticks (one a second) after a change of the cluster's shape on which the
/// subscriptions are confirmed again, for the nodes that learn of the change late.
const CONFIRM_AFTER_CHANGE: u8 = 3;

/// How long one health check may take.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a failed update keeps retrying (a failover takes a few seconds) before it
/// reports the error.
const UPDATE_PATIENCE: Duration = Duration::from_secs(20);

/// Handle to the cluster source's control task.
#[derive(Clone)]
pub struct ClusterSource {
    handle: ControlHandle,
}

impl ClusterSource {
    /// Starts the control task on the cluster reached through `seeds`. It connects
    /// (retrying until a seed answers) and keeps the subscriptions until `shutdown`.
    pub fn start(
        config: &RedisConfig,
        seeds: &[String],
        router: Arc<Router>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<(Self, tokio::task::JoinHandle<()>)> {
        let deliver = router.clone();
        let on_push = move |push: PushInfo| {
            if matches!(
                push.kind,
                PushKind::Message | PushKind::PMessage | PushKind::SMessage
            ) && let Some(delivery) = Delivery::from_push(push)
            {
                deliver.deliver(delivery);
            }
            Ok::<(), Infallible>(())
        };
        let client = cluster_client(config, seeds, Some(on_push))?;
        let nodes = NodeSubscriptions::new(
            &config.client()?,
            router.clone(),
            config.set_keyspace_events,
        );
        let (handle, updates, status) = ControlHandle::new("cluster source");
        let control = Control {
            client,
            nodes,
            router,
            status,
            desired: BTreeSet::new(),
            active: BTreeSet::new(),
            shape: None,
            resubscribe_pending: false,
            confirm_again: 0,
        };
        let task = tokio::spawn(control.run(updates, shutdown));
        Ok((Self { handle }, task))
    }

    /// See [`super::Source::update`].
    pub async fn update(
        &self,
        subscriptions: BTreeSet<Subscription>,
        table: RoutingTable,
    ) -> anyhow::Result<()> {
        self.handle.update(subscriptions, table).await
    }

    /// The connection's current state.
    pub fn status(&self) -> SourceStatus {
        self.handle.status()
    }
}

struct Control {
    client: redis::cluster::ClusterClient,
    /// Keyspace notifications, subscribed on every primary.
    nodes: NodeSubscriptions,
    router: Arc<Router>,
    status: Arc<Mutex<SourceStatus>>,
    desired: BTreeSet<Subscription>,
    /// What the client has confirmed (and resubscribes by itself after losses).
    active: BTreeSet<Subscription>,
    /// The primary of every slot range, as last seen.
    shape: Option<Vec<(i64, i64, String)>>,
    /// Whether subscribing again after a change of shape has yet to succeed.
    resubscribe_pending: bool,
    /// Health ticks on which the subscriptions are confirmed once more after a change of
    /// shape: while a slot moves, the nodes learn of it one after the other, and a
    /// subscription confirmed on a node that has not learnt yet is dropped by it (a
    /// `sunsubscribe`) once it does.
    confirm_again: u8,
}

impl Control {
    async fn run(mut self, mut updates: mpsc::Receiver<Update>, shutdown: CancellationToken) {
        let mut connection = match self.connect(&mut updates, &shutdown).await {
            Some(connection) => connection,
            None => return,
        };
        let mut health = tokio::time::interval(HEALTH_INTERVAL);
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut down_since: Option<Instant> = None;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                update = updates.recv() => {
                    let Some(update) = update else { return };
                    let result = self
                        .apply_patiently(&mut connection, update.subscriptions, update.table, &shutdown)
                        .await;
                    let _ = update.done.send(result);
                }
                _ = health.tick() => {
                    let checked = self.check_health(&mut connection).await;
                    match (checked, down_since) {
                        (Ok(()), Some(since)) => {
                            down_since = None;
                            tracing::warn!(
                                outage = ?since.elapsed(),
                                "every cluster shard answers again; messages published on an unreachable shard meanwhile were not received"
                            );
                            self.set_status(|s| {
                                s.connected = true;
                                s.reconnects += 1;
                                s.last_error = None;
                            });
                        }
                        (Err(e), None) => {
                            down_since = Some(Instant::now());
                            tracing::error!("a Redis Cluster shard does not answer: {e}");
                            self.set_status(|s| {
                                s.connected = false;
                                s.last_error = Some(e);
                            });
                        }
                        _ => {}
                    }
                    self.follow_topology(&mut connection).await;
                }
            }
        }
    }

    /// Subscribes everything again when the cluster's shape changed (a failover, a slot
    /// moved): the client moves its subscriptions only when it looks up the shape itself,
    /// which a connection that only listens may not do for a long time. Asking a node that
    /// no longer owns a channel is what makes the client look.
    async fn follow_topology(&mut self, connection: &mut ClusterConnection) {
        let shape = match tokio::time::timeout(
            HEALTH_TIMEOUT,
            connection.route_command(
                redis::cmd("CLUSTER").arg("SLOTS").to_owned(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
            ),
        )
        .await
        {
            Ok(Ok(slots)) if !matches!(slots, redis::Value::ServerError(_)) => {
                primaries_by_slot_range(slots)
            }
            _ => return,
        };
        if let Err(e) = self.nodes.follow(&primaries_of(&shape)).await {
            tracing::warn!("{e}; retrying on the next check");
        }
        self.report_keyspace();
        let same = self.shape.as_ref() == Some(&shape);
        if same && !self.resubscribe_pending && self.confirm_again == 0 {
            return;
        }
        let changed = !same && self.shape.is_some();
        self.shape = Some(shape);
        if changed {
            self.confirm_again = CONFIRM_AFTER_CHANGE;
        } else if self.confirm_again > 0 && !self.resubscribe_pending {
            self.confirm_again -= 1;
        } else if !self.resubscribe_pending {
            return;
        }
        let mut all = self.active.clone();
        all.insert(Subscription::Channel(self.router.barrier_channel().clone()));
        match subscribe(connection, &all, true).await {
            Ok(()) => {
                if changed {
                    tracing::info!(
                        subscriptions = all.len(),
                        "the cluster's shape changed; subscriptions confirmed on their current nodes"
                    );
                } else {
                    tracing::debug!(
                        subscriptions = all.len(),
                        "subscriptions confirmed again after the cluster's shape changed"
                    );
                }
                self.resubscribe_pending = false;
            }
            Err(e) => {
                tracing::warn!(
                    "the cluster's shape changed; subscribing again failed, will retry: {e}"
                );
                self.resubscribe_pending = true;
            }
        }
    }

    /// Asks a node for `CLUSTER INFO` (a shard without a reachable primary makes it
    /// `cluster_state:fail`) and PINGs every primary the client knows.
    async fn check_health(&self, connection: &mut ClusterConnection) -> Result<(), String> {
        let ask = |cmd: redis::Cmd, routing: RoutingInfo| {
            let mut connection = connection.clone();
            async move {
                match tokio::time::timeout(HEALTH_TIMEOUT, connection.route_command(cmd, routing))
                    .await
                {
                    Ok(Ok(value)) => value.extract_error().map_err(|e| e.to_string()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no answer within {HEALTH_TIMEOUT:?}")),
                }
            }
        };
        let info = ask(
            redis::cmd("CLUSTER").arg("INFO").to_owned(),
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
        );
        let ping = ask(
            redis::cmd("PING"),
            RoutingInfo::MultiNode((
                MultipleNodeRoutingInfo::AllMasters,
                Some(ResponsePolicy::AllSucceeded),
            )),
        );
        let (info, ping) = tokio::join!(info, ping);
        ping?;
        let info: String = redis::from_redis_value(info?).map_err(|e| e.to_string())?;
        if info.lines().any(|line| line.trim() == "cluster_state:ok") {
            Ok(())
        } else {
            Err("the cluster reports cluster_state:fail (a shard has no reachable primary)".into())
        }
    }

    /// Connects with backoff, accepting updates meanwhile (they take effect at once:
    /// nothing is delivered yet), then subscribes the barrier channel and the desired set.
    async fn connect(
        &mut self,
        updates: &mut mpsc::Receiver<Update>,
        shutdown: &CancellationToken,
    ) -> Option<ClusterConnection> {
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        loop {
            let attempt = async {
                let mut connection = self.client.get_async_connection().await?;
                connection
                    .subscribe(self.router.barrier_channel().as_ref())
                    .await?;
                Ok::<_, redis::RedisError>(connection)
            };
            let failure = tokio::select! {
                () = shutdown.cancelled() => return None,
                connected = attempt => match connected {
                    Ok(mut connection) => {
                        let desired = self.desired.clone();
                        match subscribe(&mut connection, &desired, true).await {
                            Ok(()) => {
                                self.nodes.add(&node_local(&desired)).await.ok();
                                if let Err(e) = self.follow_primaries(&mut connection).await {
                                    tracing::warn!("{e}; retrying on the next check");
                                }
                                self.active = desired;
                                self.router.apply_now(None);
                                self.report_subscribed();
                                tracing::info!(subscriptions = self.active.len(), "subscribed to the Redis Cluster");
                                return Some(connection);
                            }
                            Err(e) => e.to_string(),
                        }
                    }
                    Err(e) => e.to_string(),
                },
            };
            self.set_status(|s| {
                s.connected = false;
                s.last_error = Some(failure.clone());
            });
            let wait = backoff.next_wait();
            tracing::warn!(retry_in = ?wait, "cannot subscribe to the Redis Cluster: {failure}");
            let until = tokio::time::Instant::now() + wait;
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return None,
                    () = tokio::time::sleep_until(until) => break,
                    update = updates.recv() => {
                        let update = update?;
                        self.desired = update.subscriptions;
                        self.nodes.set_needed(update.table.keyspace_flags());
                        self.nodes.set_tracking(&update.table.tracking_prefixes()).await;
                        self.router.apply_now(Some(update.table));
                        let _ = update.done.send(Ok(()));
                    }
                }
            }
        }
    }

    /// Applies a change of subscriptions: subscribes what is new, switches tables at a barrier,
    /// unsubscribes what is gone; each step retried while a failover settles.
    async fn apply_patiently(
        &mut self,
        connection: &mut ClusterConnection,
        wanted: BTreeSet<Subscription>,
        table: RoutingTable,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        self.desired = wanted;
        self.nodes.set_needed(table.keyspace_flags());
        self.nodes.set_tracking(&table.tracking_prefixes()).await;
        let barrier = self.router.stage(table);
        let started = Instant::now();
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        loop {
            let added: BTreeSet<_> = self.desired.difference(&self.active).cloned().collect();
            let subscribed = match subscribe(connection, &added, true).await {
                Ok(()) => self.subscribe_on_primaries(connection, &added).await,
                Err(e) => Err(e),
            };
            match subscribed {
                Ok(()) => {
                    self.active.extend(added);
                    break;
                }
                Err(e) if started.elapsed() < UPDATE_PATIENCE && !shutdown.is_cancelled() => {
                    tracing::warn!("cluster subscribe failed, retrying: {e}");
                    tokio::time::sleep(backoff.next_wait()).await;
                }
                Err(e) => {
                    // The new table still takes over: it routes what does arrive.
                    self.router.apply_now(None);
                    return Err(e);
                }
            }
        }

        let published = redis::cmd("PUBLISH")
            .arg(barrier.channel.as_ref())
            .arg(barrier.payload.as_ref())
            .exec_async(connection)
            .await;
        let switched = published.is_ok()
            && tokio::time::timeout(BARRIER_TIMEOUT, barrier.applied)
                .await
                .is_ok();
        if !switched {
            tracing::warn!("routing barrier did not come back; switching tables now");
            self.router.apply_now(None);
        }

        let removed: BTreeSet<_> = self.active.difference(&self.desired).cloned().collect();
        if let Err(e) = subscribe(connection, &removed, false).await {
            // Harmless: what arrives for them is routed to no one.
            tracing::warn!("cluster unsubscribe failed: {e}");
        }
        self.nodes.remove(&node_local(&removed)).await;
        for subscription in &removed {
            self.active.remove(subscription);
        }
        self.report_subscribed();
        Ok(())
    }

    /// Subscribes the node-local members of `added` on every primary connected, then makes
    /// sure every current primary is connected (the first node-local subscription or tracked
    /// prefix connects to them all).
    async fn subscribe_on_primaries(
        &mut self,
        connection: &mut ClusterConnection,
        added: &BTreeSet<Subscription>,
    ) -> anyhow::Result<()> {
        self.nodes.add(&node_local(added)).await?;
        if self.nodes.is_empty() {
            return Ok(());
        }
        self.follow_primaries(connection)
            .await
            .map_err(anyhow::Error::msg)
    }

    /// Asks the cluster for its primaries and holds the node-local subscriptions on them.
    async fn follow_primaries(&mut self, connection: &mut ClusterConnection) -> Result<(), String> {
        if self.nodes.is_empty() {
            return Ok(());
        }
        let slots = tokio::time::timeout(
            HEALTH_TIMEOUT,
            connection.route_command(
                redis::cmd("CLUSTER").arg("SLOTS").to_owned(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
            ),
        )
        .await
        .map_err(|_| format!("CLUSTER SLOTS: no answer within {HEALTH_TIMEOUT:?}"))?
        .map_err(|e| format!("CLUSTER SLOTS: {e}"))?;
        let followed = self
            .nodes
            .follow(&primaries_of(&primaries_by_slot_range(slots)))
            .await;
        self.report_keyspace();
        followed
    }

    /// Reports what the primaries' `notify-keyspace-events` lack, logging a change.
    fn report_keyspace(&self) {
        let missing = self.nodes.missing();
        self.set_status(|status| {
            if status.keyspace_events == missing {
                return;
            }
            match &missing {
                Some(missing) => tracing::error!(missing = ?missing.missing, "{}", missing.reason),
                None => tracing::info!(
                    "every primary now publishes the keyspace notifications key subscriptions need"
                ),
            }
            status.keyspace_events = missing;
        });
    }

    fn report_subscribed(&self) {
        let active = &self.active;
        self.set_status(|s| {
            s.connected = true;
            count_subscriptions(s, active);
            s.last_error = None;
        });
    }

    fn set_status(&self, change: impl FnOnce(&mut SourceStatus)) {
        change(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// (Un)subscribes `set`: channels and patterns in one command each, sharded channels one
/// per command (each goes to the shard owning its slot).
async fn subscribe(
    connection: &mut ClusterConnection,
    set: &BTreeSet<Subscription>,
    on: bool,
) -> anyhow::Result<()> {
    let prefix = if on { "" } else { "UN" };
    // Keyspace notifications are held on every primary, apart.
    let set: BTreeSet<Subscription> = set.iter().filter(|s| !is_node_local(s)).cloned().collect();
    let set = &set;
    let channels = names_of(set, "channel");
    if !channels.is_empty() {
        let result = if on {
            connection.subscribe(&channels).await
        } else {
            connection.unsubscribe(&channels).await
        };
        result.map_err(|e| anyhow::anyhow!("{prefix}SUBSCRIBE failed: {e}"))?;
    }
    let patterns = names_of(set, "pattern");
    if !patterns.is_empty() {
        let result = if on {
            connection.psubscribe(&patterns).await
        } else {
            connection.punsubscribe(&patterns).await
        };
        result.map_err(|e| anyhow::anyhow!("P{prefix}SUBSCRIBE failed: {e}"))?;
    }
    for name in names_of(set, "sharded") {
        let result = if on {
            connection.ssubscribe(name).await
        } else {
            connection.sunsubscribe(name).await
        };
        result.map_err(|e| {
            anyhow::anyhow!(
                "S{prefix}SUBSCRIBE {} failed: {e}",
                String::from_utf8_lossy(name)
            )
        })?;
    }
    Ok(())
}

/// The addresses of the primaries in `shape`.
fn primaries_of(shape: &[(i64, i64, String)]) -> BTreeSet<String> {
    shape
        .iter()
        .map(|(_, _, primary)| primary.clone())
        .collect()
}

/// `(first slot, last slot, primary address)` of every range in a `CLUSTER SLOTS` reply,
/// sorted.
fn primaries_by_slot_range(reply: redis::Value) -> Vec<(i64, i64, String)> {
    let redis::Value::Array(ranges) = reply else {
        return Vec::new();
    };
    let mut shape: Vec<_> = ranges
        .into_iter()
        .filter_map(|range| {
            let redis::Value::Array(parts) = range else {
                return None;
            };
            let int = |v: &redis::Value| match v {
                redis::Value::Int(n) => Some(*n),
                _ => None,
            };
            let (first, last) = (int(parts.first()?)?, int(parts.get(1)?)?);
            let redis::Value::Array(primary) = parts.get(2)? else {
                return None;
            };
            let host = match primary.first()? {
                redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                redis::Value::SimpleString(s) => s.clone(),
                _ => return None,
            };
            Some((first, last, format!("{host}:{}", int(primary.get(1)?)?)))
        })
        .collect();
    shape.sort();
    shape
}

/// A client for the cluster `seeds` of `config`, speaking RESP3, with pub/sub pushes sent to `push`.
pub fn cluster_client(
    config: &RedisConfig,
    seeds: &[String],
    push: Option<impl redis::aio::AsyncPushSender>,
) -> anyhow::Result<redis::cluster::ClusterClient> {
    use anyhow::Context as _;

    let mut builder = redis::cluster::ClusterClientBuilder::new(seeds.to_vec())
        .use_protocol(redis::ProtocolVersion::RESP3)
        .tcp_settings(super::redis::with_dead_peer_detection(
            redis::io::tcp::TcpSettings::default(),
        ));
    if let Some(certificates) = config.tls_certificates()? {
        builder = builder.certs(certificates);
    }
    if let Some(push) = push {
        builder = builder.push_sender(push);
    }
    builder
        .build()
        .with_context(|| format!("redis.url {} is not a usable cluster seed", config.url))
}
