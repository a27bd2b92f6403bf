//! Workers: where Wasm runs.
//!
//! Each plugin has one bounded queue and one worker thread that owns a long-lived `Store` and
//! instance, so plugin state survives between messages and no message pays for an
//! instantiation. The worker takes messages in queue order (FIFO per plugin), runs `handle`
//! under the plugin's deadline and memory cap, and rebuilds the instance after a trap.
//!
//! Workers are OS threads, not tokio tasks: a call may run until its deadline, and it must not
//! hold a reactor thread while it does. Host imports that wait (publish) block this thread on
//! the runtime, bounded by the same deadline.
//!
//! Hot reload: before each message the worker checks which version of its plugin is current
//! and, if it changed, instantiates the new one. A message is handled once, by whichever
//! version is current when its turn comes; the call in flight during a swap finishes on the
//! old version. When the plugin is removed its [`queue`] is closed; the worker finishes what
//! is queued and exits.
//!
//! Containment: a trap (a panic, the deadline, the memory cap) fails that message only and
//! the next one gets a fresh instance; a plugin that keeps failing is parked by its
//! [`breaker`]. Every message the router offers ends up handled, failed or shed, and failures
//! and sheds are counted by a fixed set of reasons ([`outcome`]).

#[allow(missing_docs)]
pub mod bindings;
pub mod breaker;
pub mod engine;
pub mod instance;
pub mod outcome;
pub mod queue;
pub mod state;

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;

use crate::PluginName;
use crate::plugins::LoadedPlugin;
use crate::source::Subscription;
use crate::source::streams::{StreamEntry, StreamStats};
use breaker::{Breaker, BreakerPolicy};
use instance::{Failure, Instance};
use outcome::{
    FailureCounters, FailureCounts, FailureReason, ShedCounters, ShedCounts, ShedReason,
};
use queue::{Queue, Shed, WhenFull};

/// One message waiting in a plugin's queue.
#[derive(Debug)]
pub struct Envelope {
    /// The channel it was published on.
    pub channel: Bytes,
    /// The plugin's subscription that matched.
    pub subscription: Subscription,
    /// The payload as published.
    pub payload: Bytes,
    /// When the source read it.
    pub received_at: SystemTime,
    /// For a stream entry: its id, its fields, and the ticket its reader awaits.
    pub entry: Option<StreamEntry>,
}

/// How long `handle` calls take, for `switchyard_plugin_handle_seconds`.
#[derive(Debug)]
pub struct HandleTimes(pub prometheus_client::metrics::histogram::Histogram);

impl Default for HandleTimes {
    /// Buckets from 10 µs to about 10 s, a factor of 4 apart: a warm trivial call sits in the
    /// first, the default 100 ms deadline in the tenth.
    fn default() -> Self {
        Self(prometheus_client::metrics::histogram::Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(1e-5, 4.0, 11),
        ))
    }
}

/// Counters of one plugin, shared by the router (accepted, shed) and its worker.
#[derive(Debug, Default)]
pub struct PluginStats {
    /// Duration of every `handle` call.
    pub handle_times: HandleTimes,
    /// What its stream readers did.
    pub streams: Arc<StreamStats>,
    accepted: AtomicU64,
    shed: ShedCounters,
    handled: AtomicU64,
    failed: FailureCounters,
    denied: AtomicU64,
    loop_limited: AtomicU64,
    send_failed: AtomicU64,
    logs_dropped: AtomicU64,
    parks: AtomicU64,
    /// Messages accepted into the queue, then dropped (oldest-first shedding, parking).
    discarded: AtomicU64,
    /// Milliseconds since the Unix epoch until which the plugin is parked; 0 when not.
    parked_until_ms: AtomicU64,
    last_error: Mutex<Option<String>>,
    log_gate: LogGate,
    denial_gate: LogGate,
}

/// A snapshot of [`PluginStats`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct StatsSnapshot {
    /// Messages queued for the plugin.
    pub accepted: u64,
    /// Messages dropped unhandled: its queue was full, it was parked, or it had stopped.
    pub shed: u64,
    /// `shed` by reason.
    pub shed_by: ShedCounts,
    /// Messages `handle` returned `ok` for.
    pub handled: u64,
    /// Messages that failed: an error value, a trap, a deadline, the memory cap, or no
    /// instance.
    pub failed: u64,
    /// `failed` by reason.
    pub failed_by: FailureCounts,
    /// Host calls refused for want of a grant.
    pub denied: u64,
    /// Publishes into the plugin's own subscriptions refused by the loop guard.
    pub loop_limited: u64,
    /// Messages queued with `send` that could not be written to Redis.
    pub send_failed: u64,
    /// `log` lines dropped by the log rate limit.
    pub logs_dropped: u64,
    /// Times the circuit breaker parked the plugin.
    pub parks: u64,
    /// Until when the plugin is parked (milliseconds since the Unix epoch), if it is.
    pub parked_until_ms: Option<u64>,
    /// The most recent failure.
    pub last_error: Option<String>,
    /// Stream entries acknowledged after `handle` succeeded.
    pub stream_acked: u64,
    /// Stream entries scheduled for another delivery after a failure (or while parked).
    pub stream_retried: u64,
    /// Stream entries moved to the dead-letter stream.
    pub stream_dead_lettered: u64,
    /// Stream entries claimed from other consumers that left them idle.
    pub stream_claimed: u64,
}

impl PluginStats {
    /// Fresh counters.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// A consistent-enough copy for reporting.
    pub fn snapshot(&self) -> StatsSnapshot {
        // Failures first: a reader that sees a failure counted also sees its `last_error`.
        let failed_by = self.failed.snapshot();
        let shed_by = self.shed.snapshot();
        StatsSnapshot {
            accepted: self.accepted.load(Ordering::Relaxed),
            shed: shed_by.total(),
            shed_by,
            handled: self.handled.load(Ordering::Relaxed),
            failed: failed_by.total(),
            failed_by,
            denied: self.denied.load(Ordering::Relaxed),
            loop_limited: self.loop_limited.load(Ordering::Relaxed),
            send_failed: self.send_failed.load(Ordering::Relaxed),
            logs_dropped: self.logs_dropped.load(Ordering::Relaxed),
            parks: self.parks.load(Ordering::Relaxed),
            parked_until_ms: match self.parked_until_ms.load(Ordering::Relaxed) {
                0 => None,
                until => Some(until),
            },
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            stream_acked: self.streams.acked.load(Ordering::Relaxed),
            stream_retried: self.streams.retried.load(Ordering::Relaxed),
            stream_dead_lettered: self.streams.dead_lettered.load(Ordering::Relaxed),
            stream_claimed: self.streams.claimed.load(Ordering::Relaxed),
        }
    }

    /// Counts a host call refused for want of a grant.
    pub fn record_denied(&self, plugin: &PluginName, why: &str) {
        self.denied.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = self.denial_gate.admit() {
            tracing::warn!(%plugin, suppressed, "denied: {why}");
        }
    }

    /// Counts a publish refused by the loop guard.
    pub fn record_loop_limited(&self, plugin: &PluginName, channel: &str) {
        self.loop_limited.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = self.denial_gate.admit() {
            tracing::warn!(%plugin, suppressed, channel, "loop guard: plugin keeps publishing into its own subscriptions");
        }
    }

    /// Counts a message queued by `send` that could not be written.
    pub fn record_send_failed(&self, why: &str) {
        self.send_failed.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.to_owned());
    }

    /// Counts a `log` line dropped by the rate limit.
    pub fn record_log_dropped(&self, plugin: &PluginName) {
        self.logs_dropped.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = self.denial_gate.admit() {
            tracing::warn!(%plugin, suppressed, "plugin logs too much; dropping its log lines");
        }
    }

    /// Whether every accepted message has been handled, failed or discarded.
    pub fn settled(&self) -> bool {
        let done = self.handled.load(Ordering::Relaxed)
            + self.failed.total()
            + self.discarded.load(Ordering::Relaxed);
        self.accepted.load(Ordering::Relaxed) == done
    }

    /// Whether the plugin is parked right now.
    pub fn parked(&self) -> bool {
        self.parked_until_ms.load(Ordering::Relaxed) > millis_now()
    }

    /// Counts a message dropped unhandled, and logs it (rate limited).
    fn record_shed(&self, plugin: &PluginName, reason: ShedReason, detail: &str) {
        self.shed.add(reason);
        if let Some(suppressed) = self.log_gate.admit() {
            tracing::warn!(
                %plugin,
                suppressed,
                reason = reason.as_str(),
                "shedding message: {}{detail}",
                reason.describe()
            );
        }
    }

    /// Counts a failed message, keeps its error as `last_error`, and logs it (rate limited).
    fn record_failure(&self, plugin: &PluginName, failure: &Failure) {
        if let Some(suppressed) = self.log_gate.admit() {
            tracing::warn!(
                %plugin,
                suppressed,
                reason = failure.reason.as_str(),
                "message failed: {}",
                failure.message
            );
        }
        // The error is in place before the count moves, so a reader that sees the failure
        // counted also sees why.
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(failure.message.clone());
        self.failed.add(failure.reason);
    }
}

/// Lets one log line through per [`LOG_INTERVAL`] and counts the rest, so a plugin failing
/// on every message cannot flood the log.
#[derive(Debug, Default)]
struct LogGate {
    state: Mutex<(Option<Instant>, u64)>,
}

/// The shortest gap between two log lines about the same plugin's failures or shedding.
pub const LOG_INTERVAL: Duration = Duration::from_secs(1);

impl LogGate {
    /// `Some(suppressed since the last admitted line)` if a line may be logged now.
    fn admit(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match state.0 {
            Some(last) if now.duration_since(last) < LOG_INTERVAL => {
                state.1 += 1;
                None
            }
            _ => {
                let suppressed = std::mem::take(&mut state.1);
                state.0 = Some(now);
                Some(suppressed)
            }
        }
    }
}

/// The sending side of a plugin's queue, held by the routing table.
#[derive(Clone, Debug)]
pub struct Inbox {
    plugin: PluginName,
    queue: Arc<Queue>,
    stats: Arc<PluginStats>,
}

/// Creates a plugin's queue with room for `capacity` messages.
pub fn inbox(
    plugin: PluginName,
    capacity: usize,
    when_full: WhenFull,
    stats: Arc<PluginStats>,
) -> Inbox {
    Inbox {
        plugin,
        queue: Arc::new(Queue::new(capacity, when_full)),
        stats,
    }
}

impl Inbox {
    /// Queues `envelope` if there is room; otherwise sheds by the queue's policy and counts.
    /// Never waits: the caller is the reading task, and Redis drops a subscriber that stops
    /// reading.
    pub fn offer(&self, envelope: Envelope) {
        match self.queue.push(envelope) {
            Ok(()) => {
                self.stats.accepted.fetch_add(1, Ordering::Relaxed);
            }
            Err(Shed::Oldest) => {
                // The new message is in; an older accepted one is gone.
                self.stats.accepted.fetch_add(1, Ordering::Relaxed);
                self.stats.discarded.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .record_shed(&self.plugin, ShedReason::QueueFull, ", dropped the oldest");
            }
            Err(Shed::Newest) => {
                self.stats
                    .record_shed(&self.plugin, ShedReason::QueueFull, ", dropped the newest");
            }
            Err(Shed::Closed) => self
                .stats
                .record_shed(&self.plugin, ShedReason::Stopped, ""),
        }
    }

    /// Queues a stream entry, even beyond the queue's capacity (its reader bounds what it
    /// has in flight). Returns false if the plugin has stopped; the entry's ticket then
    /// reports it as not handled.
    pub fn offer_entry(&self, envelope: Envelope) -> bool {
        let queued = self.queue.push_beyond_capacity(envelope).is_ok();
        if queued {
            self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        }
        queued
    }

    /// The plugin's name.
    pub fn plugin(&self) -> &PluginName {
        &self.plugin
    }

    /// The plugin's counters.
    pub fn stats(&self) -> &Arc<PluginStats> {
        &self.stats
    }

    /// Whether this and `other` feed the same queue (the same plugin, not reloaded from
    /// scratch in between).
    pub fn same_queue(&self, other: &Inbox) -> bool {
        Arc::ptr_eq(&self.queue, &other.queue)
    }

    /// Whether the plugin has stopped taking messages.
    pub fn is_closed(&self) -> bool {
        self.queue.is_closed()
    }

    /// Messages waiting.
    pub fn depth(&self) -> usize {
        self.queue.len()
    }

    /// Takes the next waiting message, as a worker would (for tests of routing).
    #[cfg(test)]
    pub(crate) fn try_take(&self) -> Option<Envelope> {
        self.queue.try_pop()
    }

    /// Stops accepting messages; the worker drains the rest and exits.
    pub fn close(&self) {
        self.queue.close();
    }
}

/// Starts the worker thread of `plugin`, which runs whichever version `current` holds.
pub fn spawn(
    plugin: PluginName,
    current: Arc<ArcSwap<LoadedPlugin>>,
    inbox: &Inbox,
    breaker: BreakerPolicy,
    engine: wasmtime::Engine,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let queue = inbox.queue.clone();
    let stats = inbox.stats.clone();
    std::thread::Builder::new()
        .name(format!("plugin-{plugin}"))
        .spawn(move || {
            Worker {
                plugin,
                current,
                stats,
                engine,
                breaker: Breaker::new(breaker),
                live: None,
                version: None,
            }
            .run(&queue)
        })
}

struct Worker {
    plugin: PluginName,
    current: Arc<ArcSwap<LoadedPlugin>>,
    stats: Arc<PluginStats>,
    engine: wasmtime::Engine,
    breaker: Breaker,
    live: Option<Instance>,
    /// The version the breaker's record is about.
    version: Option<Arc<LoadedPlugin>>,
}

impl Worker {
    fn run(mut self, queue: &Queue) {
        while let Some(mut envelope) = queue.pop() {
            // A stream entry's ticket reports the outcome; dropped unfinished (the plugin
            // parked), it reports the entry as not handled.
            let ticket = envelope.entry.as_mut().map(|e| e.ticket.take());
            let version = self.current.load_full();
            if !self
                .version
                .as_ref()
                .is_some_and(|v| Arc::ptr_eq(v, &version))
            {
                // A new version gets a fresh start, and its own instance; the old store is
                // dropped first so that its memory goes before the new one's arrives.
                self.breaker.reset();
                self.stats.parked_until_ms.store(0, Ordering::Relaxed);
                self.live = None;
                self.version = Some(version.clone());
            }
            let now = Instant::now();
            if self.breaker.parked(now) {
                self.stats.discarded.fetch_add(1, Ordering::Relaxed);
                self.stats.record_shed(&self.plugin, ShedReason::Parked, "");
                continue;
            }
            self.stats.parked_until_ms.store(0, Ordering::Relaxed);
            let (outcome, finished) = self.handle(&version, envelope, now);
            let ok = outcome.is_ok();
            if let Some(ticket) = ticket {
                ticket.finish(outcome, &version.hash);
            }
            if let Some(backoff) = self.breaker.record(ok, finished) {
                self.stats.parks.fetch_add(1, Ordering::Relaxed);
                let until = millis_now() + u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX);
                self.stats.parked_until_ms.store(until, Ordering::Relaxed);
                tracing::error!(plugin = %self.plugin, ?backoff, "plugin keeps failing; parked");
            }
        }
        tracing::debug!(plugin = %self.plugin, "queue closed and drained; worker done");
    }

    /// Handles one message on a live instance (built if needed), taken from the queue at
    /// `now`; whether it succeeded (or why not), and when it was over.
    fn handle(
        &mut self,
        version: &Arc<LoadedPlugin>,
        envelope: Envelope,
        mut now: Instant,
    ) -> (Result<(), String>, Instant) {
        if self.live.is_none() {
            match Instance::new(&self.engine, version.clone(), self.stats.clone()) {
                Ok(instance) => {
                    tracing::debug!(plugin = %self.plugin, version = %version.hash, "instance ready");
                    self.live = Some(instance);
                }
                Err(e) => {
                    let failure = Failure {
                        reason: FailureReason::NoInstance,
                        message: format!("cannot instantiate: {e:#}"),
                    };
                    self.stats.record_failure(&self.plugin, &failure);
                    return (Err(failure.message), Instant::now());
                }
            }
            // The handle time leaves instantiation out.
            now = Instant::now();
        }
        let Some(instance) = self.live.as_mut() else {
            // Unreachable (built just above), but a message that reaches here must still be
            // counted, or the plugin would never look settled.
            let failure = Failure {
                reason: FailureReason::NoInstance,
                message: "no instance".to_owned(),
            };
            self.stats.record_failure(&self.plugin, &failure);
            return (Err(failure.message), now);
        };
        let outcome = instance.handle(envelope);
        let finished = Instant::now();
        self.stats
            .handle_times
            .0
            .observe((finished - now).as_secs_f64());
        let outcome = match outcome {
            Ok(()) => {
                self.stats.handled.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(failure) => {
                if failure.reason.poisons_instance() {
                    // A trap poisons the store: the next message gets a fresh instance.
                    self.live = None;
                }
                self.stats.record_failure(&self.plugin, &failure);
                Err(failure.message)
            }
        };
        (outcome, finished)
    }
}

fn millis_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
