//! The Redis source: one RESP3 subscriber connection, owned by a control task.
//!
//! Deliveries arrive as RESP3 pushes and are routed inside the connection's push callback,
//! in stream order, without waiting on anything: the router only offers them to bounded
//! queues. The payload buffers Redis handed us move into the queues without a copy.
//!
//! The control task owns everything that changes the connection: subscription updates
//! (subscribe the new, barrier, unsubscribe the gone; see [`crate::router`]) and
//! reconnection. When the connection drops it retries with capped exponential backoff and
//! jitter, then subscribes the current set again. Messages published while it was down are
//! lost (pub/sub is at-most-once); the outage is logged, counted and shown by readiness.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use rand::Rng;
use redis::aio::{ConnectionManager, MultiplexedConnection};
use redis::{AsyncConnectionConfig, ProtocolVersion, PushInfo, PushKind, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{ControlHandle, Delivery, SourceStatus, Subscription, Update, Via};
use crate::router::{Router, RoutingTable};

/// First wait before reconnecting.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between reconnection attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long a barrier may take to come back through the stream before the table is switched
/// anyway (it only fails to come back if the connection broke meanwhile).
pub const BARRIER_TIMEOUT: Duration = Duration::from_secs(5);
/// Timeout of connecting and of each (un)subscribe command.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// Every host names its subscriber connection `switchyard-<instance>`.
pub const CLIENT_NAME_PREFIX: &str = "switchyard-";
/// Subscriptions per (P)SUBSCRIBE command, to keep each command a reasonable size.
const SUBSCRIBE_BATCH: usize = 1000;

/// Handle to the Redis source's control task.
#[derive(Clone)]
pub struct RedisSource {
    handle: ControlHandle,
}

impl RedisSource {
    /// Starts the control task, which connects (retrying until Redis answers) and keeps the
    /// connection subscribed until `shutdown`.
    pub fn start(
        client: &redis::Client,
        publisher: ConnectionManager,
        router: Arc<Router>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<(Self, tokio::task::JoinHandle<()>)> {
        let info = client.get_connection_info().clone();
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let client = redis::Client::open(info.set_redis_settings(settings))?;
        let (handle, updates, status) = ControlHandle::new("Redis source");
        let control = Control {
            client,
            publisher,
            router,
            status,
            desired: BTreeSet::new(),
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

/// A live subscriber connection.
struct Session {
    connection: MultiplexedConnection,
    /// Fires when the connection is lost.
    lost: mpsc::UnboundedReceiver<()>,
    /// What the connection is subscribed to (besides the barrier channel).
    active: BTreeSet<Subscription>,
}

/// How a session ended.
enum SessionEnd {
    Shutdown,
    Disconnected,
}

struct Control {
    client: redis::Client,
    publisher: ConnectionManager,
    router: Arc<Router>,
    status: Arc<Mutex<SourceStatus>>,
    desired: BTreeSet<Subscription>,
}

impl Control {
    async fn run(mut self, mut updates: mpsc::Receiver<Update>, shutdown: CancellationToken) {
        let mut backoff = BACKOFF_MIN;
        let mut down_since: Option<Instant> = None;
        loop {
            let session = tokio::select! {
                () = shutdown.cancelled() => return,
                session = self.connect() => session,
            };
            let session = match session {
                Ok(session) => session,
                Err(error) => {
                    self.set_status(|s| {
                        s.connected = false;
                        s.last_error = Some(error.clone());
                    });
                    let wait = jittered(backoff);
                    tracing::warn!(retry_in = ?wait, "cannot subscribe to Redis: {error}");
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    if !self.idle(wait, &mut updates, &shutdown).await {
                        return;
                    }
                    continue;
                }
            };
            if let Some(since) = down_since.take() {
                self.set_status(|s| s.reconnects += 1);
                tracing::warn!(
                    outage = ?since.elapsed(),
                    "reconnected to Redis and resubscribed; messages published during the outage were not received"
                );
            } else {
                tracing::info!(subscriptions = self.desired.len(), "subscribed to Redis");
            }
            backoff = BACKOFF_MIN;
            match self.serve(session, &mut updates, &shutdown).await {
                SessionEnd::Shutdown => return,
                SessionEnd::Disconnected => {
                    down_since = Some(Instant::now());
                    self.set_status(|s| {
                        s.connected = false;
                        s.last_error = Some("connection lost".to_owned());
                    });
                    tracing::error!("lost the Redis subscriber connection; reconnecting");
                }
            }
        }
    }

    /// Connects, subscribes the barrier channel and the desired set, and puts the newest
    /// table in force (nothing is delivered before the subscriptions, so no barrier is
    /// needed).
    async fn connect(&mut self) -> Result<Session, String> {
        let (lost_tx, lost) = mpsc::unbounded_channel();
        let router = self.router.clone();
        let on_push = move |push: PushInfo| {
            match push.kind {
                PushKind::Message | PushKind::PMessage | PushKind::SMessage => {
                    if let Some(delivery) = delivery(push) {
                        router.deliver(delivery);
                    }
                }
                PushKind::Disconnection => {
                    let _ = lost_tx.send(());
                }
                _ => {}
            }
            Ok::<(), Infallible>(())
        };
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_push_sender(on_push);
        let mut connection = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| e.to_string())?;
        // Named, so that operators (and `switchyard status`) can find it in CLIENT LIST.
        let _: redis::RedisResult<()> = redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg(self.client_name())
            .query_async(&mut connection)
            .await;
        connection
            .subscribe(self.router.barrier_channel().as_ref())
            .await
            .map_err(|e| format!("SUBSCRIBE failed: {e}"))?;
        let mut session = Session {
            connection,
            lost,
            active: BTreeSet::new(),
        };
        let desired = self.desired.clone();
        subscribe(&mut session.connection, &desired, true)
            .await
            .map_err(|e| e.to_string())?;
        session.active = desired;
        self.router.apply_now(None);
        self.report_subscribed(&session.active);
        Ok(session)
    }

    /// `switchyard-<instance>`: the barrier channel's unique part.
    fn client_name(&self) -> String {
        let channel = String::from_utf8_lossy(self.router.barrier_channel());
        let instance = channel.rsplit(':').next().unwrap_or_default();
        format!("{CLIENT_NAME_PREFIX}{instance}")
    }

    /// Serves updates on a live session until it is lost or the host stops.
    async fn serve(
        &mut self,
        mut session: Session,
        updates: &mut mpsc::Receiver<Update>,
        shutdown: &CancellationToken,
    ) -> SessionEnd {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return SessionEnd::Shutdown,
                _ = session.lost.recv() => return SessionEnd::Disconnected,
                update = updates.recv() => {
                    let Some(update) = update else { return SessionEnd::Shutdown };
                    let result = self.apply(&mut session, update.subscriptions, update.table).await;
                    let failed = result.is_err();
                    let _ = update.done.send(result);
                    if failed {
                        // A failed (un)subscribe means the connection is in an unknown state:
                        // start over from a fresh one.
                        return SessionEnd::Disconnected;
                    }
                }
            }
        }
    }

    /// Waits `wait` while disconnected, still accepting updates (which take effect at once:
    /// nothing is being delivered). Returns false on shutdown.
    async fn idle(
        &mut self,
        wait: Duration,
        updates: &mut mpsc::Receiver<Update>,
        shutdown: &CancellationToken,
    ) -> bool {
        let until = tokio::time::Instant::now() + wait;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return false,
                () = tokio::time::sleep_until(until) => return true,
                update = updates.recv() => {
                    let Some(update) = update else { return false };
                    self.desired = update.subscriptions;
                    self.router.apply_now(Some(update.table));
                    let _ = update.done.send(Ok(()));
                }
            }
        }
    }

    /// Subscribes what is new, switches tables at a barrier, unsubscribes what is gone.
    async fn apply(
        &mut self,
        session: &mut Session,
        wanted: BTreeSet<Subscription>,
        table: RoutingTable,
    ) -> anyhow::Result<()> {
        self.desired = wanted.clone();
        let added: BTreeSet<_> = wanted.difference(&session.active).cloned().collect();
        let removed: BTreeSet<_> = session.active.difference(&wanted).cloned().collect();

        subscribe(&mut session.connection, &added, true).await?;
        session.active.extend(added);

        let barrier = self.router.stage(table);
        let mut publisher = self.publisher.clone();
        let published: redis::RedisResult<i64> = redis::cmd("PUBLISH")
            .arg(barrier.channel.as_ref())
            .arg(barrier.payload.as_ref())
            .query_async(&mut publisher)
            .await;
        let switched = match published {
            Ok(_) => tokio::time::timeout(BARRIER_TIMEOUT, barrier.applied)
                .await
                .is_ok(),
            Err(e) => {
                tracing::warn!("cannot publish routing barrier: {e}");
                false
            }
        };
        if !switched {
            tracing::warn!("routing barrier did not come back; switching tables now");
            self.router.apply_now(None);
        }

        subscribe(&mut session.connection, &removed, false).await?;
        for subscription in &removed {
            session.active.remove(subscription);
        }
        self.report_subscribed(&session.active);
        Ok(())
    }

    fn report_subscribed(&self, active: &BTreeSet<Subscription>) {
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

/// Sets the channel, pattern and sharded counts of `status` from `active`.
pub(super) fn count_subscriptions(status: &mut SourceStatus, active: &BTreeSet<Subscription>) {
    let count = |kind: &str| active.iter().filter(|s| s.kind() == kind).count();
    status.channels = count("channel");
    status.patterns = count("pattern");
    status.sharded = count("sharded");
}

/// The names of `set`'s subscriptions of one kind.
pub(super) fn names_of<'a>(set: &'a BTreeSet<Subscription>, kind: &str) -> Vec<&'a [u8]> {
    set.iter()
        .filter(|s| s.kind() == kind)
        .map(|s| s.name().as_ref())
        .collect()
}

/// (Un)subscribes `set` in batches, channels, patterns and sharded channels with their own
/// commands.
async fn subscribe(
    connection: &mut MultiplexedConnection,
    set: &BTreeSet<Subscription>,
    on: bool,
) -> anyhow::Result<()> {
    let channels = names_of(set, "channel");
    let patterns = names_of(set, "pattern");
    // One server owns every slot: sharded channels are subscribed like the others, one per
    // command (the client has no typed SSUBSCRIBE outside cluster mode, and a raw command
    // expects one confirmation).
    for name in names_of(set, "sharded") {
        let command = if on { "SSUBSCRIBE" } else { "SUNSUBSCRIBE" };
        redis::cmd(command)
            .arg(name)
            .exec_async(connection)
            .await
            .map_err(|e| anyhow::anyhow!("{command} failed: {e}"))?;
    }
    for batch in channels.chunks(SUBSCRIBE_BATCH) {
        let result = if on {
            connection.subscribe(batch).await
        } else {
            connection.unsubscribe(batch).await
        };
        result
            .map_err(|e| anyhow::anyhow!("{}SUBSCRIBE failed: {e}", if on { "" } else { "UN" }))?;
    }
    for batch in patterns.chunks(SUBSCRIBE_BATCH) {
        let result = if on {
            connection.psubscribe(batch).await
        } else {
            connection.punsubscribe(batch).await
        };
        result
            .map_err(|e| anyhow::anyhow!("P{}SUBSCRIBE failed: {e}", if on { "" } else { "UN" }))?;
    }
    Ok(())
}

/// Turns a `message`, `pmessage` or `smessage` push into a delivery, taking Redis's buffers
/// as they are.
pub(super) fn delivery(push: PushInfo) -> Option<Delivery> {
    let received_at = SystemTime::now();
    let mut data = push.data.into_iter().map(|value| match value {
        Value::BulkString(bytes) => Some(Bytes::from(bytes)),
        Value::SimpleString(text) => Some(Bytes::from(text)),
        _ => None,
    });
    let via = match push.kind {
        PushKind::PMessage => Via::Pattern(data.next()??),
        PushKind::SMessage => Via::Sharded,
        _ => Via::Channel,
    };
    let channel = data.next()??;
    let payload = data.next()??;
    Some(Delivery {
        channel,
        via,
        payload,
        received_at,
    })
}

/// `base` give or take 20%, so that many hosts losing the same Redis do not all come back in
/// the same millisecond.
pub(super) fn jittered(base: Duration) -> Duration {
    base.mul_f64(rand::rng().random_range(0.8..1.2))
}
