//! Counters of one plugin, shared by the stages that move its messages: the router and the
//! stream readers (accepted, shed), its workers (handled, failed, parked) and its effects
//! (denied, loop-limited, payloads too large). The ground floor: every stage writes here
//! without importing another stage; `/plugins` and `/metrics` read the snapshots.

pub mod outcome;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::PluginName;
use crate::stream_entry::StreamStats;
use crate::text;
use outcome::{Failure, FailureCounters, FailureCounts, ShedCounters, ShedCounts, ShedReason};

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

/// Counters of one plugin, shared by the router (accepted, shed) and its workers.
#[derive(Debug, Default)]
pub struct PluginStats {
    /// Duration of every `handle` call.
    pub handle_times: HandleTimes,
    /// What its stream readers did.
    pub streams: Arc<StreamStats>,
    pub(crate) accepted: AtomicU64,
    shed: ShedCounters,
    pub(crate) handled: AtomicU64,
    failed: FailureCounters,
    denied: AtomicU64,
    loop_limited: AtomicU64,
    send_failed: AtomicU64,
    payload_too_large: AtomicU64,
    outgoing_full: AtomicU64,
    logs_dropped: AtomicU64,
    pub(crate) parks: AtomicU64,
    /// Messages accepted into the queue, then dropped (oldest-first shedding, parking).
    pub(crate) discarded: AtomicU64,
    /// Milliseconds since the Unix epoch until which the plugin is parked; 0 when not.
    pub(crate) parked_until_ms: AtomicU64,
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
    /// `publish`es and `send`s refused for a payload over `plugins.max_payload_bytes`.
    pub payload_too_large: u64,
    /// `publish`es and `send`s that found `effects.outgoing_bytes` spent until their deadline.
    pub outgoing_full: u64,
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
            payload_too_large: self.payload_too_large.load(Ordering::Relaxed),
            outgoing_full: self.outgoing_full.load(Ordering::Relaxed),
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
            let plugin = text::escaped(plugin.as_str());
            let why = text::loggable(why, text::MAX_ERROR_TEXT);
            tracing::warn!(%plugin, suppressed, "denied: {why}");
        }
    }

    /// Counts a publish refused by the loop guard; `what` names it (the channel, or the
    /// invalidation notice).
    pub fn record_loop_limited(&self, plugin: &PluginName, what: &str) {
        self.loop_limited.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = self.denial_gate.admit() {
            let plugin = text::escaped(plugin.as_str());
            let what = text::loggable(what, text::MAX_ERROR_TEXT);
            tracing::warn!(%plugin, suppressed, "loop guard: plugin keeps publishing what comes back to it ({what})");
        }
    }

    /// Counts a `publish` or `send` refused for a payload over `plugins.max_payload_bytes`.
    pub fn record_payload_too_large(&self, plugin: &PluginName, why: &str) {
        self.payload_too_large.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = self.denial_gate.admit() {
            let plugin = text::escaped(plugin.as_str());
            tracing::warn!(%plugin, suppressed, "refused: {why}");
        }
    }

    /// Counts a `publish` or `send` that found the outgoing queue full until its deadline.
    pub fn record_outgoing_full(&self, plugin: &PluginName, why: &str) {
        self.outgoing_full.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = self.denial_gate.admit() {
            let plugin = text::escaped(plugin.as_str());
            tracing::warn!(%plugin, suppressed, "refused: {why}");
        }
    }

    /// Counts a message queued by `send` that could not be written.
    pub fn record_send_failed(&self, why: &str) {
        self.send_failed.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(text::bounded(why, text::MAX_ERROR_TEXT).into_owned());
    }

    /// Counts a `log` line dropped by the rate limit.
    pub fn record_log_dropped(&self, plugin: &PluginName) {
        self.logs_dropped.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = self.denial_gate.admit() {
            let plugin = text::escaped(plugin.as_str());
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
    pub(crate) fn record_shed(&self, plugin: &PluginName, reason: ShedReason, detail: &str) {
        self.shed.add(reason);
        if let Some(suppressed) = self.log_gate.admit() {
            let plugin = text::escaped(plugin.as_str());
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
    /// The error text is the plugin's: bounded (see `worker::Worker::handle`) and logged escaped.
    pub(crate) fn record_failure(&self, plugin: &PluginName, failure: &Failure) {
        if let Some(suppressed) = self.log_gate.admit() {
            let plugin = text::escaped(plugin.as_str());
            tracing::warn!(
                %plugin,
                suppressed,
                reason = failure.reason.as_str(),
                "message failed: {}",
                text::loggable(&failure.message, text::MAX_ERROR_TEXT)
            );
        }
        // The error is in place before the count moves, so a reader that sees the failure
        // counted also sees why.
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(text::bounded(&failure.message, text::MAX_ERROR_TEXT).into_owned());
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

/// Milliseconds since the Unix epoch, as parking deadlines are kept.
pub(crate) fn millis_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
