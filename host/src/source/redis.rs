//! The Redis source: one RESP3 subscriber connection, owned by a control task.
//!
//! Deliveries arrive as RESP3 pushes and are routed inside the connection's push callback,
//! in stream order, without waiting on anything: the router only offers them to bounded
//! queues. The payload buffers Redis handed us move into the queues without a copy.
//!
//! The control task owns everything that changes the connection: subscription updates
//! (subscribe the new, barrier, unsubscribe the gone; see [`crate::router`]) and
//! reconnection. A connection is lost when it closes, when a command on it fails, or when it
//! goes silent: a network that drops packets without closing anything would otherwise leave
//! the host "ready" and receiving nothing, so a health task PINGs the connection whenever it
//! has been quiet for [`HEALTH_INTERVAL`] and gives it up when neither the reply nor anything
//! else arrives within `redis.health_timeout_ms` (10 s by default: a server stalled by a slow
//! command or a fork must not make the host drop a live connection). TCP keepalive and
//! `TCP_USER_TIMEOUT` notice a partitioned network at the kernel's level, within about the
//! same time, since an unacknowledged PING is what `TCP_USER_TIMEOUT` measures. After a loss it waits, retries with capped exponential backoff and
//! jitter ([`Backoff`]), then subscribes the current set again. Messages published while it
//! was down are lost (pub/sub is at-most-once); the outage is logged, counted and shown by
//! readiness.
//!
//! When plugins have key subscriptions, the control task also checks, on every connection
//! and change of subscriptions, that Redis publishes the keyspace notifications they need
//! (see [`super::keyspace`]).

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use redis::aio::{ConnectionManager, MultiplexedConnection};
use redis::io::tcp::{TcpSettings, socket2::TcpKeepalive};
use redis::{AsyncConnectionConfig, ProtocolVersion, PushInfo, PushKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{ControlHandle, SourceStatus, Update};
use crate::keyspace::Flags;
use crate::message::{Delivery, Subscription};
use crate::router::{Router, RoutingTable};

/// First wait before reconnecting (also after losing a connection that was up: a server that
/// drops every connection it accepts must not be hammered).
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between reconnection attempts, before jitter.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long a session must stay up before a loss starts the backoff again from
/// [`BACKOFF_MIN`]: shorter sessions count as failed attempts, so a server that accepts and
/// at once drops connections is retried at the capped pace, not in a tight loop.
pub const HEALTHY_SESSION: Duration = Duration::from_secs(10);
/// How long the subscriber connection may go without receiving anything before it is PINGed.
/// A delivery proves the connection alive as well as a reply does, so a busy connection is
/// never PINGed.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(1);
/// Idle time before the kernel sends TCP keepalive probes, interval between probes, and
/// probes unanswered before it declares the peer dead.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
#[cfg(target_os = "linux")]
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
#[cfg(target_os = "linux")]
const KEEPALIVE_PROBES: u32 = 3;
/// How long data written to the socket may stay unacknowledged before the kernel fails the
/// connection (`TCP_USER_TIMEOUT`): a command sent into a silent network errors instead of
/// being retransmitted for the kernel's default of about 15 minutes.
#[cfg(target_os = "linux")]
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a barrier may take to come back through the stream before the table is switched
/// anyway (it only fails to come back if the connection broke meanwhile).
pub const BARRIER_TIMEOUT: Duration = Duration::from_secs(5);
/// Timeout of connecting and of each (un)subscribe command.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// Every host names its subscriber connection `switchyard-<instance>`.
pub const CLIENT_NAME_PREFIX: &str = "switchyard-";
/// While Redis lacks keyspace notifications that key subscriptions need, how often the host
/// reads the setting again, so that an operator's `CONFIG SET` makes it ready without a
/// restart.
pub const KEYSPACE_RECHECK: Duration = Duration::from_secs(2);
/// Subscriptions per (P)SUBSCRIBE command, to keep each command a reasonable size.
const SUBSCRIBE_BATCH: usize = 1000;

/// Handle to the Redis source's control task.
#[derive(Clone)]
pub struct RedisSource {
    handle: ControlHandle,
}

impl RedisSource {
    /// Starts the control task, which connects (retrying until Redis answers) and keeps the
    /// connection subscribed until `shutdown`. With `set_keyspace_events`, it turns on the
    /// keyspace notifications key subscriptions need rather than only reporting them missing.
    pub fn start(
        client: &redis::Client,
        publisher: ConnectionManager,
        router: Arc<Router>,
        health_timeout: Duration,
        set_keyspace_events: bool,
        shutdown: CancellationToken,
    ) -> anyhow::Result<(Self, tokio::task::JoinHandle<()>)> {
        let info = client.get_connection_info().clone();
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let tcp = with_dead_peer_detection(info.tcp_settings().clone());
        let client = redis::Client::open(info.set_redis_settings(settings).set_tcp_settings(tcp))?;
        let (handle, updates, status) = ControlHandle::new("Redis source");
        let control = Control {
            client,
            publisher,
            router,
            status,
            desired: BTreeSet::new(),
            keyspace_flags: Flags::NONE,
            set_keyspace_events,
            health_timeout,
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
    /// Says why the connection was lost: sent by the push callback when it closes and by the
    /// health task when it goes silent.
    lost: mpsc::UnboundedReceiver<Lost>,
    /// What the connection is subscribed to (besides the barrier channel).
    active: BTreeSet<Subscription>,
    /// The health task, which holds a handle of the connection: stopped with the session, so
    /// that a given-up connection is closed rather than kept open by its own watcher.
    health: tokio::task::AbortHandle,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.health.abort();
    }
}

/// How a session ended.
enum SessionEnd {
    Shutdown,
    Lost(Lost),
}

/// Why a live connection was given up.
#[derive(Debug)]
enum Lost {
    /// It closed: the server went away, the connection was killed, or the network reset it.
    Closed,
    /// A health-check PING got no reply within this long, and nothing else arrived either.
    Silent(Duration),
    /// A command on it failed, so its state is unknown.
    Failed(String),
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lost::Closed => f.write_str("the connection closed"),
            Lost::Silent(waited) => write!(
                f,
                "no reply to a health-check PING within {waited:?}, and nothing else received (network silent?)"
            ),
            Lost::Failed(why) => f.write_str(why),
        }
    }
}

struct Control {
    client: redis::Client,
    publisher: ConnectionManager,
    router: Arc<Router>,
    status: Arc<Mutex<SourceStatus>>,
    desired: BTreeSet<Subscription>,
    /// The `notify-keyspace-events` flags the desired table's key subscriptions need.
    keyspace_flags: Flags,
    /// Whether to add missing flags (`redis.set_keyspace_events`).
    set_keyspace_events: bool,
    /// How long a health-check PING may go unanswered.
    health_timeout: Duration,
}

impl Control {
    async fn run(mut self, mut updates: mpsc::Receiver<Update>, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
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
                    let wait = backoff.next_wait();
                    tracing::warn!(retry_in = ?wait, "cannot subscribe to Redis: {error}");
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
                    subscriptions = self.desired.len(),
                    "reconnected to Redis and resubscribed; messages published during the outage were not received"
                );
            } else {
                tracing::info!(subscriptions = self.desired.len(), "subscribed to Redis");
            }
            let connected_at = Instant::now();
            let why = match self.serve(session, &mut updates, &shutdown).await {
                SessionEnd::Shutdown => return,
                SessionEnd::Lost(why) => why,
            };
            down_since = Some(Instant::now());
            self.set_status(|s| {
                s.connected = false;
                s.last_error = Some(format!("connection lost: {why}"));
            });
            if connected_at.elapsed() >= HEALTHY_SESSION {
                backoff.reset();
            }
            let wait = backoff.next_wait();
            tracing::error!(
                retry_in = ?wait,
                "lost the Redis subscriber connection ({why}); reconnecting"
            );
            if !self.idle(wait, &mut updates, &shutdown).await {
                return;
            }
        }
    }

    /// Connects, subscribes the barrier channel and the desired set, and puts the newest
    /// table in force (nothing is delivered before the subscriptions, so no barrier is
    /// needed).
    async fn connect(&mut self) -> Result<Session, String> {
        let (lost_tx, lost) = mpsc::unbounded_channel();
        let closed = lost_tx.clone();
        let router = self.router.clone();
        let received = Arc::new(AtomicU64::new(0));
        let activity = received.clone();
        let on_push = move |push: PushInfo| {
            activity.fetch_add(1, Ordering::Relaxed);
            match push.kind {
                PushKind::Message | PushKind::PMessage | PushKind::SMessage => {
                    if let Some(delivery) = Delivery::from_push(push) {
                        router.deliver(delivery);
                    }
                }
                PushKind::Disconnection => {
                    let _ = closed.send(Lost::Closed);
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
        let health = tokio::spawn(watch_health(
            connection.clone(),
            received,
            self.health_timeout,
            lost_tx,
        ));
        let mut session = Session {
            connection,
            lost,
            active: BTreeSet::new(),
            health: health.abort_handle(),
        };
        let desired = self.desired.clone();
        subscribe(&mut session.connection, &desired, true)
            .await
            .map_err(|e| e.to_string())?;
        session.active = desired;
        self.router.apply_now(None);
        self.report_subscribed(&session.active);
        // A restarted server may have lost a setting made with CONFIG SET: check again.
        self.check_keyspace(&mut session.connection).await;
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
            let keyspace_missing = self.keyspace_missing();
            tokio::select! {
                () = shutdown.cancelled() => return SessionEnd::Shutdown,
                why = session.lost.recv() => return SessionEnd::Lost(why.unwrap_or(Lost::Closed)),
                () = tokio::time::sleep(KEYSPACE_RECHECK), if keyspace_missing => {
                    self.check_keyspace(&mut session.connection).await;
                }
                update = updates.recv() => {
                    let Some(update) = update else { return SessionEnd::Shutdown };
                    let result = self.apply(&mut session, update.subscriptions, update.table).await;
                    let failed = result.as_ref().err().map(|e| format!("{e:#}"));
                    let _ = update.done.send(result);
                    if let Some(why) = failed {
                        // A failed (un)subscribe means the connection is in an unknown state:
                        // start over from a fresh one.
                        return SessionEnd::Lost(Lost::Failed(why));
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
                    self.keyspace_flags = update.table.keyspace_flags();
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
        self.keyspace_flags = table.keyspace_flags();
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
        self.check_keyspace(&mut session.connection).await;
        Ok(())
    }

    /// Whether the last check found keyspace notifications missing.
    fn keyspace_missing(&self) -> bool {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keyspace_events
            .is_some()
    }

    /// Checks (and with `redis.set_keyspace_events`, sets) the keyspace notifications the
    /// key subscriptions need, on the subscriber's own connection, and reports what is
    /// missing; clears the report when nothing needs them.
    async fn check_keyspace(&self, connection: &mut MultiplexedConnection) {
        let missing =
            super::keyspace::check(connection, self.keyspace_flags, self.set_keyspace_events).await;
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        // Logged when it changes, not at every check while it lasts.
        if status.keyspace_events != missing {
            match &missing {
                Some(missing) => tracing::warn!(
                    configured = %missing.configured,
                    needed = %missing.needed,
                    missing = %missing.missing.concat(),
                    "{}",
                    missing.reason
                ),
                None if !self.keyspace_flags.is_empty() => tracing::info!(
                    "Redis now publishes the keyspace notifications key subscriptions need"
                ),
                None => {}
            }
        }
        status.keyspace_events = missing;
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

/// Watches a live subscriber connection: whenever [`HEALTH_INTERVAL`] passes with nothing
/// received, PINGs it, and reports it [`Lost`] when neither the reply nor anything else
/// arrives within `timeout`, or when the PING fails. `received` counts what the
/// connection delivered (messages, confirmations); in RESP3 a subscribed connection answers
/// PING like any command, so the PING needs no pub/sub form.
async fn watch_health(
    mut connection: MultiplexedConnection,
    received: Arc<AtomicU64>,
    timeout: Duration,
    lost: mpsc::UnboundedSender<Lost>,
) {
    let mut seen = received.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep(HEALTH_INTERVAL).await;
        let now = received.load(Ordering::Relaxed);
        if now != seen {
            seen = now;
            continue;
        }
        let ping = redis::cmd("PING");
        let why = match tokio::time::timeout(timeout, ping.exec_async(&mut connection)).await {
            Ok(Ok(())) => continue,
            Ok(Err(error)) => Lost::Failed(format!("health-check PING failed: {error}")),
            // The reply may be queued behind deliveries that are still arriving: those prove
            // the connection alive too.
            Err(_) if received.load(Ordering::Relaxed) != seen => continue,
            Err(_) => Lost::Silent(timeout),
        };
        let _ = lost.send(why);
        return;
    }
}

/// `tcp` with TCP keepalive (and on Linux `TCP_USER_TIMEOUT`) set, so that the kernel itself
/// fails a connection whose peer has silently gone away. The subscriber's health check
/// notices sooner; this also covers connections that carry no health check.
pub fn with_dead_peer_detection(tcp: TcpSettings) -> TcpSettings {
    let keepalive = TcpKeepalive::new().with_time(KEEPALIVE_IDLE);
    #[cfg(target_os = "linux")]
    let keepalive = keepalive
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    #[cfg(target_os = "linux")]
    let tcp = tcp.set_user_timeout(TCP_USER_TIMEOUT);
    tcp.set_keepalive(keepalive)
}

/// A client for the same server as `client` whose connections have
/// [`with_dead_peer_detection`]'s TCP settings.
pub fn client_with_dead_peer_detection(
    client: &redis::Client,
) -> redis::RedisResult<redis::Client> {
    let info = client.get_connection_info().clone();
    let tcp = with_dead_peer_detection(info.tcp_settings().clone());
    redis::Client::open(info.set_tcp_settings(tcp))
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

/// How much a wait may differ from its step, either way: many hosts losing the same Redis
/// then do not all come back in the same millisecond.
const JITTER: f64 = 0.2;

/// `base` give or take [`JITTER`].
pub(super) fn jittered(base: Duration) -> Duration {
    base.mul_f64(rand::rng().random_range(1.0 - JITTER..=1.0 + JITTER))
}

/// Capped exponential backoff with jitter: the waits between reconnection attempts.
///
/// The step starts at `base` and doubles after every wait up to `cap`; each wait is the step
/// give or take [`JITTER`]. [`Backoff::reset`] starts again from `base`: call it only once a
/// connection has proven healthy, never merely because one was accepted.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    step: Duration,
}

impl Backoff {
    /// Waits from `base`, doubling up to `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        let base = base.min(cap);
        Self {
            base,
            cap,
            step: base,
        }
    }

    /// The wait before the next attempt; the step after it doubles (up to the cap).
    pub fn next_wait(&mut self) -> Duration {
        let wait = jittered(self.step);
        self.step = self.step.saturating_mul(2).min(self.cap);
        wait
    }

    /// Starts again from the base.
    pub fn reset(&mut self) {
        self.step = self.base;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: Duration = Duration::from_millis(100);
    const CAP: Duration = Duration::from_secs(5);

    fn within_jitter(wait: Duration, step: Duration) -> bool {
        wait >= step.mul_f64(1.0 - JITTER) && wait <= step.mul_f64(1.0 + JITTER)
    }

    #[test]
    fn backoff_doubles_from_the_base() {
        let mut backoff = Backoff::new(BASE, CAP);
        for step in [100, 200, 400, 800, 1600, 3200] {
            let wait = backoff.next_wait();
            assert!(
                within_jitter(wait, Duration::from_millis(step)),
                "{wait:?} for a step of {step} ms"
            );
        }
    }

    #[test]
    fn backoff_stops_growing_at_the_cap() {
        let mut backoff = Backoff::new(BASE, CAP);
        for _ in 0..100 {
            let wait = backoff.next_wait();
            assert!(wait <= CAP.mul_f64(1.0 + JITTER), "{wait:?}");
        }
        for _ in 0..100 {
            let wait = backoff.next_wait();
            assert!(within_jitter(wait, CAP), "{wait:?}");
        }
    }

    #[test]
    fn jitter_stays_within_its_bounds_and_varies() {
        let waits: Vec<Duration> = (0..1000)
            .map(|_| Backoff::new(CAP, CAP).next_wait())
            .collect();
        assert!(waits.iter().all(|&w| within_jitter(w, CAP)), "{waits:?}");
        let (min, max) = (waits.iter().min(), waits.iter().max());
        assert!(min < max, "no jitter: every wait was {min:?}");
    }

    #[test]
    fn reset_starts_again_from_the_base() {
        let mut backoff = Backoff::new(BASE, CAP);
        for _ in 0..10 {
            backoff.next_wait();
        }
        backoff.reset();
        assert!(within_jitter(backoff.next_wait(), BASE));
        assert!(within_jitter(backoff.next_wait(), BASE * 2));
    }

    #[test]
    fn a_base_above_the_cap_is_capped() {
        let mut backoff = Backoff::new(CAP * 2, CAP);
        assert!(within_jitter(backoff.next_wait(), CAP));
    }
}
