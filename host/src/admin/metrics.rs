//! `/metrics`: Prometheus text, read from the counters the stages already keep.
//!
//! Nothing on the message path knows about Prometheus: a collector reads the atomics at
//! scrape time, so a scrape costs the scraper, not the messages. Labels are bounded: plugin
//! names, output names, fixed outcomes; never channel names.
//!
//! Two formats, chosen by the scraper's `Accept` ([`Format::negotiate`]): OpenMetrics, which
//! carries the trace exemplars of `switchyard_plugin_handle_seconds`, for a scraper that asks
//! for it (Prometheus does); the Prometheus text format 0.0.4, without exemplars, for anyone
//! else, since its parsers refuse them.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry as MetricsRegistry;

use crate::effects::outputs::Outputs;
use crate::gateway::GatewayStats;
use crate::plugins::Registry;
use crate::router::Router;
use crate::source::Source;
use crate::stats::outcome::{FailureReason, ShedReason};

/// Every metric family `/metrics` serves (without the `_total` suffix counters get), so that
/// dashboards and alert rules can be checked against it.
pub const METRIC_NAMES: &[&str] = &[
    "switchyard_messages_received",
    "switchyard_messages_unrouted",
    "switchyard_messages_oversize",
    "switchyard_redis_connected",
    "switchyard_redis_reconnects",
    "switchyard_subscriptions",
    "switchyard_plugins_failed",
    "switchyard_plugin_messages",
    "switchyard_plugin_failures",
    "switchyard_plugin_shed",
    "switchyard_plugin_refusals",
    "switchyard_stream_entries",
    "switchyard_plugin_queue_depth",
    "switchyard_plugin_parked",
    "switchyard_plugin_reloads",
    "switchyard_components_refused",
    "switchyard_plugin_handle_seconds",
    "switchyard_output_calls",
    "switchyard_gateway_connections",
    "switchyard_gateway_messages",
    "switchyard_gateway_dropped",
    "switchyard_gateway_slow_disconnects",
    "switchyard_gateway_denied",
    "switchyard_gateway_subscriptions",
    "switchyard_gateway_pending_connections",
    "switchyard_gateway_timeouts",
    "switchyard_gateway_oversize",
    "switchyard_gateway_buffered_bytes",
];

/// The text formats `/metrics` answers in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0.0: the handle-time histogram carries exemplars; ends with `# EOF`.
    OpenMetrics,
    /// The Prometheus text format 0.0.4: no exemplars.
    PrometheusText,
}

/// The media type a scraper names to ask for OpenMetrics.
const OPENMETRICS_TYPE: &str = "application/openmetrics-text";

impl Format {
    /// The format for a request with these `Accept` header values: OpenMetrics when they
    /// accept `application/openmetrics-text` (any version, with a `q` above 0) at least as
    /// much as `text/plain`; the Prometheus text format otherwise, as for no header or `*/*`.
    pub fn negotiate<'a>(accept: impl IntoIterator<Item = &'a str>) -> Self {
        let (mut openmetrics, mut text) = (0.0_f32, 0.0_f32);
        for range in accept.into_iter().flat_map(|value| value.split(',')) {
            let mut parts = range.split(';');
            let media_type = parts.next().unwrap_or_default().trim();
            let quality = parts
                .filter_map(|parameter| parameter.split_once('='))
                .find(|(name, _)| name.trim().eq_ignore_ascii_case("q"))
                .and_then(|(_, value)| value.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            if media_type.eq_ignore_ascii_case(OPENMETRICS_TYPE) {
                openmetrics = openmetrics.max(quality);
            } else if media_type.eq_ignore_ascii_case("text/plain")
                || media_type.eq_ignore_ascii_case("text/*")
            {
                text = text.max(quality);
            }
        }
        if openmetrics > 0.0 && openmetrics >= text {
            Self::OpenMetrics
        } else {
            Self::PrometheusText
        }
    }

    /// The response's `Content-Type`.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Self::PrometheusText => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        }
    }

    /// Every metric in `metrics`, in this format.
    pub fn encode(self, metrics: &MetricsRegistry) -> Result<String, std::fmt::Error> {
        let mut body = String::new();
        match self {
            Self::OpenMetrics => prometheus_client::encoding::text::encode(&mut body, metrics)?,
            Self::PrometheusText => {
                prometheus_client::encoding::prometheus_text::encode(&mut body, metrics)?;
            }
        }
        Ok(body)
    }
}

/// Reads every stage's counters on each scrape.
#[derive(Debug)]
pub struct SwitchyardCollector {
    registry: Arc<Registry>,
    source: Source,
    router: Arc<Router>,
    outputs: Arc<Outputs>,
    gateway: Option<Arc<GatewayStats>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("dir", &self.dir())
            .finish()
    }
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("status", &self.status())
            .finish()
    }
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("received", &self.received())
            .finish()
    }
}

/// A registry holding the collector, ready to encode.
pub fn registry(
    registry: Arc<Registry>,
    source: Source,
    router: Arc<Router>,
    outputs: Arc<Outputs>,
    gateway: Option<Arc<GatewayStats>>,
) -> MetricsRegistry {
    let mut metrics = MetricsRegistry::default();
    metrics.register_collector(Box::new(SwitchyardCollector {
        registry,
        source,
        router,
        outputs,
        gateway,
    }));
    metrics
}

/// Label pairs of one series.
type Labels<'a> = Vec<(&'static str, &'a str)>;

/// Encodes one unlabelled value.
fn single(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: impl EncodeMetric,
) -> std::fmt::Result {
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// Encodes a counter family from (labels, value) series.
fn counters<'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (Labels<'a>, u64)>,
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in series {
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Encodes a gauge family from (labels, value) series.
fn gauges<'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (Labels<'a>, i64)>,
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in series {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Collector for SwitchyardCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let status = self.source.status();
        counters(
            &mut encoder,
            "switchyard_messages_received",
            "Messages read from the broker.",
            [(vec![("source", self.source.kind())], self.router.received())],
        )?;
        single(
            &mut encoder,
            "switchyard_messages_unrouted",
            "Messages no plugin wanted.",
            ConstCounter::new(self.router.unrouted()),
        )?;
        single(
            &mut encoder,
            "switchyard_messages_oversize",
            "Messages dropped for a payload over plugins.max_payload_bytes.",
            ConstCounter::new(self.router.oversize()),
        )?;
        single(
            &mut encoder,
            "switchyard_redis_connected",
            "1 while the subscriber connection is up and subscribed.",
            ConstGauge::new(i64::from(status.connected)),
        )?;
        single(
            &mut encoder,
            "switchyard_redis_reconnects",
            "Times the subscriber connection was re-established.",
            ConstCounter::new(status.reconnects),
        )?;
        gauges(
            &mut encoder,
            "switchyard_subscriptions",
            "Subscriptions on the wire, and streams read through consumer groups.",
            [
                (vec![("kind", "channel")], gauge_value(status.channels)),
                (vec![("kind", "pattern")], gauge_value(status.patterns)),
                (vec![("kind", "sharded")], gauge_value(status.sharded)),
                (vec![("kind", "stream")], gauge_value(status.streams)),
            ],
        )?;
        let (queued, budget) = self.registry.queue_budget();
        single(
            &mut encoder,
            "switchyard_queue_bytes",
            "Bytes of messages waiting in all plugins' queues together.",
            ConstGauge::new(gauge_value(queued)),
        )?;
        single(
            &mut encoder,
            "switchyard_queue_bytes_limit",
            "The host's total queue budget in bytes: past it, the plugin with the largest \
             backlog sheds.",
            ConstGauge::new(gauge_value(budget)),
        )?;
        single(
            &mut encoder,
            "switchyard_plugins_failed",
            "Plugin files that failed to load with no earlier version running.",
            ConstGauge::new(gauge_value(self.registry.failed_count())),
        )?;

        if let Some(cache) = self.registry.compile_cache() {
            single(
                &mut encoder,
                "switchyard_compile_cache_enabled",
                "1 while the compile cache is in use; 0 when its folder was refused at start \
                 (writable by others or owned by another user).",
                ConstGauge::new(i64::from(cache.enabled())),
            )?;
            single(
                &mut encoder,
                "switchyard_compile_cache_rejected",
                "Compiled artefacts discarded because their tag did not match (altered or \
                 copied over another's); each was compiled again.",
                ConstCounter::new(cache.rejected()),
            )?;
        }

        if let Some(counts) = self.registry.tracing().counts() {
            counters(
                &mut encoder,
                "switchyard_trace_spans",
                "Finished spans by result: exported, failed (the collector refused them, or \
                 was away or too slow), or dropped (more were waiting for the exporter than \
                 its queue holds). Failed and dropped spans are lost; the messages are not.",
                [
                    ("exported", counts.exported.load(Ordering::Relaxed)),
                    ("failed", counts.failed.load(Ordering::Relaxed)),
                    ("dropped", counts.dropped.load(Ordering::Relaxed)),
                ]
                .map(|(result, value)| (vec![("result", result)], value)),
            )?;
        }
        let refusals = self.registry.admission().refusals();
        counters(
            &mut encoder,
            "switchyard_components_refused",
            "Components refused by [plugins.verify] and plugins.allowed_digests, pulled or \
             dropped in the folder, by reason: unsigned, unknown_key, bad_signature, \
             digest_mismatch, not_allowed.",
            refusals
                .iter()
                .map(|(reason, count)| (vec![("reason", *reason)], *count)),
        )?;

        let plugins = self.registry.metrics_view();
        let snapshots: Vec<_> = plugins.iter().map(|p| (p, p.stats.snapshot())).collect();
        counters(
            &mut encoder,
            "switchyard_plugin_messages",
            "Messages per plugin by outcome: accepted into its queue, handled, failed, shed.",
            snapshots.iter().flat_map(|(plugin, stats)| {
                [
                    ("accepted", stats.accepted),
                    ("handled", stats.handled),
                    ("failed", stats.failed),
                    ("shed", stats.shed),
                ]
                .map(|(outcome, value)| {
                    (
                        vec![("plugin", plugin.name.as_str()), ("outcome", outcome)],
                        value,
                    )
                })
            }),
        )?;
        counters(
            &mut encoder,
            "switchyard_plugin_failures",
            "Failed messages per plugin by reason: error (an error value returned), trap, \
             deadline, memory (the memory cap), no_instance (the plugin could not be \
             instantiated). They sum to the failed outcome of switchyard_plugin_messages.",
            snapshots.iter().flat_map(|(plugin, stats)| {
                FailureReason::ALL.map(|reason| {
                    (
                        vec![
                            ("plugin", plugin.name.as_str()),
                            ("reason", reason.as_str()),
                        ],
                        stats.failed_by.get(reason),
                    )
                })
            }),
        )?;
        counters(
            &mut encoder,
            "switchyard_plugin_shed",
            "Shed messages per plugin by reason: queue_full (its queue budget was spent), \
             host_budget (the host's total queue budget was spent and it had the largest \
             backlog), parked (by the circuit breaker), stopped (the plugin was being removed). They sum to the shed outcome of \
             switchyard_plugin_messages.",
            snapshots.iter().flat_map(|(plugin, stats)| {
                ShedReason::ALL.map(|reason| {
                    (
                        vec![
                            ("plugin", plugin.name.as_str()),
                            ("reason", reason.as_str()),
                        ],
                        stats.shed_by.get(reason),
                    )
                })
            }),
        )?;
        counters(
            &mut encoder,
            "switchyard_plugin_refusals",
            "Host calls refused or lost per plugin: denied (no grant), loop_guard, log_dropped, \
             send_failed (queued by send, then not written to Redis), payload_too_large \
             (a publish or send over plugins.max_payload_bytes), outgoing_full (a publish or \
             send that found effects.outgoing_bytes spent until its deadline).",
            snapshots.iter().flat_map(|(plugin, stats)| {
                [
                    ("denied", stats.denied),
                    ("loop_guard", stats.loop_limited),
                    ("log_dropped", stats.logs_dropped),
                    ("send_failed", stats.send_failed),
                    ("payload_too_large", stats.payload_too_large),
                    ("outgoing_full", stats.outgoing_full),
                ]
                .map(|(reason, value)| {
                    (
                        vec![("plugin", plugin.name.as_str()), ("reason", reason)],
                        value,
                    )
                })
            }),
        )?;
        counters(
            &mut encoder,
            "switchyard_stream_entries",
            "Stream entries per plugin by outcome: acked after handling (or dead-lettering), \
             retried, dead_lettered (moved to <stream>:dead), claimed (taken over from an idle \
             consumer).",
            snapshots.iter().flat_map(|(plugin, stats)| {
                [
                    ("acked", stats.stream_acked),
                    ("retried", stats.stream_retried),
                    ("dead_lettered", stats.stream_dead_lettered),
                    ("claimed", stats.stream_claimed),
                ]
                .map(|(outcome, value)| {
                    (
                        vec![("plugin", plugin.name.as_str()), ("outcome", outcome)],
                        value,
                    )
                })
            }),
        )?;
        gauges(
            &mut encoder,
            "switchyard_plugin_queue_depth",
            "Messages waiting in each plugin's queue.",
            plugins.iter().map(|p| {
                (
                    vec![("plugin", p.name.as_str())],
                    gauge_value(p.queue_depth),
                )
            }),
        )?;
        gauges(
            &mut encoder,
            "switchyard_plugin_queue_bytes",
            "Bytes of messages waiting in each plugin's queue (payload, channel, subscription \
             and a fixed overhead per message).",
            plugins.iter().map(|p| {
                (
                    vec![("plugin", p.name.as_str())],
                    gauge_value(p.queue_bytes.0),
                )
            }),
        )?;
        gauges(
            &mut encoder,
            "switchyard_plugin_queue_bytes_limit",
            "Each plugin's queue budget in bytes: past it, the plugin sheds.",
            plugins.iter().map(|p| {
                (
                    vec![("plugin", p.name.as_str())],
                    gauge_value(p.queue_bytes.1),
                )
            }),
        )?;
        gauges(
            &mut encoder,
            "switchyard_plugin_parked",
            "1 while a plugin is parked by its circuit breaker.",
            plugins.iter().map(|p| {
                (
                    vec![("plugin", p.name.as_str())],
                    i64::from(p.stats.parked()),
                )
            }),
        )?;
        counters(
            &mut encoder,
            "switchyard_plugin_reloads",
            "New plugin files per plugin: ok (swapped in) or rejected (old version kept).",
            plugins.iter().flat_map(|p| {
                [("ok", p.reloads), ("rejected", p.rejects)].map(|(result, value)| {
                    (vec![("plugin", p.name.as_str()), ("result", result)], value)
                })
            }),
        )?;
        let mut family = encoder.encode_descriptor(
            "switchyard_plugin_handle_seconds",
            "Duration of handle calls.",
            None,
            MetricType::Histogram,
        )?;
        for plugin in &plugins {
            let labels: Labels = vec![("plugin", plugin.name.as_str())];
            plugin
                .stats
                .handle_times
                .encode(family.encode_family(&labels)?)?;
        }
        let outputs = self.outputs.report();
        counters(
            &mut encoder,
            "switchyard_output_calls",
            "Output calls by outcome.",
            outputs.iter().flat_map(|output| {
                [
                    ("ok", output.calls.saturating_sub(output.errors)),
                    ("error", output.errors),
                ]
                .map(|(outcome, value)| {
                    (
                        vec![("output", output.name.as_str()), ("outcome", outcome)],
                        value,
                    )
                })
            }),
        )?;
        if let Some(gateway) = &self.gateway {
            encode_gateway(&mut encoder, gateway)?;
        }
        Ok(())
    }
}

/// The browser gateway's series.
fn encode_gateway(encoder: &mut DescriptorEncoder, stats: &GatewayStats) -> std::fmt::Result {
    let read = |value: &std::sync::atomic::AtomicU64| value.load(Ordering::Relaxed);
    let gauge =
        |value: &std::sync::atomic::AtomicU64| i64::try_from(read(value)).unwrap_or(i64::MAX);
    gauges(
        encoder,
        "switchyard_gateway_connections",
        "Open browser connections, by protocol.",
        [
            (vec![("protocol", "ws")], gauge(&stats.ws_connections)),
            (vec![("protocol", "sse")], gauge(&stats.sse_connections)),
        ],
    )?;
    counters(
        encoder,
        "switchyard_gateway_messages",
        "Messages through the gateway: out (to a client, counted per client), in (published by \
         a client).",
        [
            (vec![("direction", "out")], read(&stats.messages_out)),
            (vec![("direction", "in")], read(&stats.messages_in)),
        ],
    )?;
    single(
        encoder,
        "switchyard_gateway_dropped",
        "Messages slow clients lost because they fell client_buffer messages behind.",
        ConstCounter::new(read(&stats.dropped)),
    )?;
    single(
        encoder,
        "switchyard_gateway_slow_disconnects",
        "Slow clients disconnected (slow_clients = \"disconnect\").",
        ConstCounter::new(read(&stats.slow_disconnects)),
    )?;
    counters(
        encoder,
        "switchyard_gateway_denied",
        "Refused connections and requests, by reason.",
        [
            ("token", &stats.denied_token),
            ("origin", &stats.denied_origin),
            ("channel", &stats.denied_channel),
            ("rate", &stats.denied_rate),
            ("size", &stats.denied_size),
            ("capacity", &stats.denied_capacity),
            ("pending", &stats.denied_pending),
            ("sockets", &stats.denied_sockets),
            ("subscriptions", &stats.denied_subscriptions),
            ("subscriptions_total", &stats.denied_subscriptions_total),
        ]
        .map(|(reason, value)| (vec![("reason", reason)], read(value))),
    )?;
    single(
        encoder,
        "switchyard_gateway_subscriptions",
        "Redis subscriptions held for browsers (one per channel or pattern, however many watch).",
        ConstGauge::new(gauge(&stats.subscriptions)),
    )?;
    single(
        encoder,
        "switchyard_gateway_pending_connections",
        "Gateway sockets open that are not a WebSocket or SSE stream (no request yet, between \
         requests, fetching a page).",
        ConstGauge::new(gauge(&stats.pending_connections)),
    )?;
    single(
        encoder,
        "switchyard_gateway_timeouts",
        "Gateway connections closed because a request head or the reading of a response took \
         longer than request_timeout_ms.",
        ConstCounter::new(read(&stats.timeouts)),
    )?;
    single(
        encoder,
        "switchyard_gateway_oversize",
        "Messages not sent to browsers because their payload is over max_payload_bytes.",
        ConstCounter::new(read(&stats.oversize)),
    )?;
    single(
        encoder,
        "switchyard_gateway_buffered_bytes",
        "Bytes the gateway's subscriptions hold for clients that have not read them.",
        ConstGauge::new(gauge(&stats.buffered_bytes)),
    )
}

#[cfg(test)]
mod tests {
    use opentelemetry::Context;
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
    };

    use super::*;
    use crate::stats::HandleTimes;

    /// An `Accept` of the shape Prometheus sends: every format it reads, best first.
    const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0;\
        escaping=allow-utf-8;q=0.6,application/openmetrics-text;version=0.0.1;q=0.5,\
        text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;q=0.3,\
        */*;q=0.2";

    #[test]
    fn openmetrics_only_for_a_scraper_that_asks_for_it() {
        for (accept, expected) in [
            (&[][..], Format::PrometheusText),
            (&["*/*"][..], Format::PrometheusText),
            (&["text/plain; version=0.0.4"][..], Format::PrometheusText),
            (&["application/json"][..], Format::PrometheusText),
            (
                &["application/openmetrics-text; version=1.0.0"][..],
                Format::OpenMetrics,
            ),
            (&["Application/OpenMetrics-Text"][..], Format::OpenMetrics),
            (&[PROMETHEUS_ACCEPT][..], Format::OpenMetrics),
            (
                &["text/html", "application/openmetrics-text"][..],
                Format::OpenMetrics,
            ),
            (
                &["application/openmetrics-text;q=0"][..],
                Format::PrometheusText,
            ),
            (
                &["application/openmetrics-text;q=0.2, text/plain;q=0.9"][..],
                Format::PrometheusText,
            ),
            (
                &["text/plain, application/openmetrics-text"][..],
                Format::OpenMetrics,
            ),
        ] {
            assert_eq!(
                Format::negotiate(accept.iter().copied()),
                expected,
                "{accept:?}"
            );
        }
    }

    /// A registry holding one plugin's handle times, after a sampled call of 3 ms and an
    /// unsampled one of 30 µs (so the 3 ms bucket counts 2, cumulatively).
    fn traced_handle_times() -> MetricsRegistry {
        let times = HandleTimes::default();
        let span = |flags| {
            Context::new().with_remote_span_context(SpanContext::new(
                TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("a trace id"),
                SpanId::from_hex("00f067aa0ba902b7").expect("a span id"),
                flags,
                true,
                TraceState::default(),
            ))
        };
        times.observe(0.003, Some(&span(TraceFlags::SAMPLED)));
        times.observe(0.00003, Some(&span(TraceFlags::NOT_SAMPLED)));
        let mut metrics = MetricsRegistry::default();
        metrics.register(
            "switchyard_plugin_handle_seconds",
            "Duration of handle calls.",
            times,
        );
        metrics
    }

    #[test]
    fn openmetrics_carries_the_exemplar_of_a_sampled_call_in_its_bucket() {
        let text = Format::OpenMetrics
            .encode(&traced_handle_times())
            .expect("encodes");
        let with_exemplars: Vec<&str> = text.lines().filter(|l| l.contains(" # {")).collect();
        assert_eq!(with_exemplars.len(), 1, "{text}");
        // `SERIES VALUE # {LABELS} EXEMPLAR_VALUE TIMESTAMP`, in the bucket 2.56 ms..10.24 ms.
        let (sample, exemplar) = with_exemplars[0].split_once(" # ").expect("an exemplar");
        assert_eq!(
            sample,
            r#"switchyard_plugin_handle_seconds_bucket{le="0.01024"} 2"#
        );
        let (labels, rest) = exemplar.split_once("} ").expect("labels");
        assert_eq!(
            labels,
            r#"{trace_id="4bf92f3577b34da6a3ce929d0e0e4736",span_id="00f067aa0ba902b7""#
        );
        let numbers: Vec<f64> = rest
            .split(' ')
            .map(|n| n.parse().expect("a number"))
            .collect();
        assert_eq!(numbers.len(), 2, "value and timestamp: {rest}");
        assert_eq!(numbers[0], 0.003);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs_f64();
        assert!((now - 60.0..=now).contains(&numbers[1]), "{rest}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn prometheus_text_has_the_same_buckets_and_no_exemplar() {
        let text = Format::PrometheusText
            .encode(&traced_handle_times())
            .expect("encodes");
        assert!(
            !text
                .lines()
                .any(|l| !l.starts_with('#') && l.contains(" # ")),
            "{text}"
        );
        assert!(!text.contains("trace_id"), "{text}");
        assert!(!text.contains("# EOF"), "{text}");
        assert!(
            text.lines()
                .any(|l| l == r#"switchyard_plugin_handle_seconds_bucket{le="0.01024"} 2"#),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l == "switchyard_plugin_handle_seconds_count 2"),
            "{text}"
        );
    }
}
