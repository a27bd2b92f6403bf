//! Counters of one plugin, shared by the stages that move its messages: the router and the
//! stream readers (accepted, shed), its workers (handled, failed, parked) and its effects
//! (denied, loop-limited, payloads too large). The ground floor: every stage writes here
//! without importing another stage; `/plugins` and `/metrics` read the snapshots.

pub mod outcome;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use opentelemetry::trace::TraceContextExt as _;
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, LabelSetEncoder, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::exemplar::HistogramWithExemplars;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

use crate::PluginName;
use crate::stream_entry::StreamStats;
use crate::text;
use outcome::{Failure, FailureCounters, FailureCounts, ShedCounters, ShedCounts, ShedReason};

/// How long `handle` calls take, for `switchyard_plugin_handle_seconds`; when the host traces,
/// each bucket also keeps the trace of the latest sampled message that fell in it (an
/// OpenMetrics exemplar), so a slow bucket leads to a trace of a slow call.
///
/// Its form is set by the first call it observes: a plain histogram when that call came
/// without a consumer span (tracing is off), one with exemplars when it came with one. Tracing
/// is on or off for the host's whole life, so every later call agrees (one that does not is
/// still counted, without an exemplar). With tracing off a call therefore costs what it always
/// did: one lock of the histogram, no allocation. With exemplars the crate's histogram takes a
/// second lock around the first on every call, and a sampled call copies its ids into its
/// bucket's exemplar (the map of exemplars allocates only while it grows to one per bucket).
#[derive(Debug, Default)]
pub struct HandleTimes {
    form: OnceLock<HandleHistogram>,
}

/// The two forms of [`HandleTimes`].
#[derive(Debug)]
enum HandleHistogram {
    /// Tracing is off: no exemplars.
    Plain(Histogram),
    /// Tracing is on: sampled calls leave their trace as their bucket's exemplar.
    Traced(HistogramWithExemplars<TraceExemplar>),
}

/// Buckets from 10 µs to about 10 s, a factor of 4 apart: a warm trivial call sits in the
/// first, the default 100 ms deadline in the tenth.
fn handle_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(1e-5, 4.0, 11)
}

impl HandleTimes {
    /// Counts one call that took `seconds`; `span` is its consumer span, present when the host
    /// traces. A sampled span becomes the exemplar of the call's bucket.
    pub fn observe(&self, seconds: f64, span: Option<&opentelemetry::Context>) {
        let form = self.form.get_or_init(|| match span {
            None => HandleHistogram::Plain(Histogram::new(handle_buckets())),
            Some(_) => HandleHistogram::Traced(HistogramWithExemplars::new(handle_buckets())),
        });
        match form {
            HandleHistogram::Plain(histogram) => histogram.observe(seconds),
            HandleHistogram::Traced(histogram) => {
                let exemplar = span.and_then(TraceExemplar::of);
                let at = exemplar.is_some().then(SystemTime::now);
                histogram.observe(seconds, exemplar, at);
            }
        }
    }
}

impl EncodeMetric for HandleTimes {
    /// The histogram, with its exemplars where the format carries them (OpenMetrics does, the
    /// Prometheus text format does not).
    fn encode(&self, encoder: MetricEncoder) -> std::fmt::Result {
        match self.form.get() {
            Some(HandleHistogram::Plain(histogram)) => histogram.encode(encoder),
            Some(HandleHistogram::Traced(histogram)) => histogram.encode(encoder),
            // No call yet: every bucket empty, and the form still open.
            None => Histogram::new(handle_buckets()).encode(encoder),
        }
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// The trace and span ids of a sampled consumer span, as lowercase hex (as W3C `traceparent`
/// and OTLP JSON write them): the labels of an exemplar. Held inline, so recording one
/// allocates nothing; 63 characters of labels, within the 128 OpenMetrics allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceExemplar {
    trace_id: [u8; 32],
    span_id: [u8; 16],
}

impl TraceExemplar {
    /// The ids of the span in `cx`, if it is sampled: an unsampled span never reaches the
    /// collector, so its ids would lead nowhere.
    pub fn of(cx: &opentelemetry::Context) -> Option<Self> {
        let span = cx.span();
        let ids = span.span_context();
        if !ids.is_sampled() || !ids.is_valid() {
            return None;
        }
        let mut exemplar = Self {
            trace_id: [0; 32],
            span_id: [0; 16],
        };
        write_hex(&ids.trace_id().to_bytes(), &mut exemplar.trace_id);
        write_hex(&ids.span_id().to_bytes(), &mut exemplar.span_id);
        Some(exemplar)
    }

    /// The trace id, 32 hex digits.
    pub fn trace_id(&self) -> &str {
        hex_str(&self.trace_id)
    }

    /// The span id, 16 hex digits.
    pub fn span_id(&self) -> &str {
        hex_str(&self.span_id)
    }
}

impl EncodeLabelSet for TraceExemplar {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> std::fmt::Result {
        [("trace_id", self.trace_id()), ("span_id", self.span_id())].encode(encoder)
    }
}

/// Writes `bytes` as lowercase hex into `out`, two digits a byte.
fn write_hex(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (byte, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = DIGITS[usize::from(byte >> 4)];
        pair[1] = DIGITS[usize::from(byte & 0x0f)];
    }
}

/// Hex digits written by [`write_hex`] as text (always ASCII; empty if they were not).
fn hex_str(digits: &[u8]) -> &str {
    std::str::from_utf8(digits).unwrap_or_default()
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

#[cfg(test)]
mod tests {
    use opentelemetry::Context;
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
    };

    use super::*;

    fn span(flags: TraceFlags) -> Context {
        Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").expect("a trace id"),
            SpanId::from_hex("b7ad6b7169203331").expect("a span id"),
            flags,
            true,
            TraceState::default(),
        ))
    }

    #[test]
    fn a_sampled_span_gives_its_ids_in_lowercase_hex() {
        let exemplar = TraceExemplar::of(&span(TraceFlags::SAMPLED)).expect("sampled");
        assert_eq!(exemplar.trace_id(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(exemplar.span_id(), "b7ad6b7169203331");
    }

    #[test]
    fn an_unsampled_or_empty_span_gives_no_exemplar() {
        assert_eq!(TraceExemplar::of(&span(TraceFlags::NOT_SAMPLED)), None);
        assert_eq!(TraceExemplar::of(&Context::new()), None);
    }

    #[test]
    fn the_first_call_sets_the_form_and_a_later_one_of_the_other_kind_still_counts() {
        let untraced = HandleTimes::default();
        untraced.observe(0.001, None);
        untraced.observe(0.001, Some(&span(TraceFlags::SAMPLED)));
        assert!(matches!(
            untraced.form.get(),
            Some(HandleHistogram::Plain(_))
        ));

        let traced = HandleTimes::default();
        traced.observe(0.001, Some(&span(TraceFlags::NOT_SAMPLED)));
        traced.observe(0.001, None);
        assert!(matches!(
            traced.form.get(),
            Some(HandleHistogram::Traced(_))
        ));
    }
}
