//! Traces: one consumer span per handled message, with a child span per effect, exported to
//! an OpenTelemetry collector over OTLP (`[tracing]`). Off by default; when off, nothing
//! here allocates or locks on the message path.
//!
//! Spans are handed to the SDK's batch processor, which exports them from a thread of its
//! own: neither the reader nor a worker ever waits on the collector. A collector that is down
//! costs spans, counted ([`SpanCounts`]), never messages.
//!
//! Context crosses the process in W3C Trace Context form (`traceparent`, `tracestate`): in
//! from a stream entry's fields or, when `tracing.payload_field` names one, from a JSON
//! payload's top-level field; out as headers of HTTP output calls.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{SpanKind, Status, TraceContextExt as _, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, SpanData,
    SpanExporter, SpanProcessor,
};

use crate::config::{OtlpProtocol, TracingSettings};

/// The stream entry fields, and HTTP headers, that carry a trace's context.
pub const CONTEXT_FIELDS: [&str; 2] = ["traceparent", "tracestate"];

/// How long the exporter may take over one batch before it counts as failed.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Finished spans waiting for the exporter, at most; more are dropped (and counted) until
/// it catches up. The SDK's default: a second of a few thousand traced messages.
pub const QUEUE_SPANS: usize = 2048;

/// Spans by what became of them.
#[derive(Debug, Default)]
pub struct SpanCounts {
    /// Handed to the collector and accepted.
    pub exported: AtomicU64,
    /// Handed to the collector and refused, or not answered (down, timeout).
    pub failed: AtomicU64,
    /// Not handed to the collector: the queue was full (the collector slower than the
    /// traffic, or away).
    pub dropped: AtomicU64,
    /// Queued for the exporter, ever.
    queued: AtomicU64,
}

impl SpanCounts {
    /// Spans queued and not yet exported or failed.
    fn waiting(&self) -> u64 {
        let done = self.exported.load(Ordering::Relaxed) + self.failed.load(Ordering::Relaxed);
        self.queued.load(Ordering::Relaxed).saturating_sub(done)
    }
}

/// A host's tracing: off, or a tracer exporting to a collector.
#[derive(Debug, Default)]
pub struct Tracing {
    active: Option<Active>,
}

#[derive(Debug)]
struct Active {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    payload_field: Option<String>,
    /// Whether `payload_field` is written into JSON payloads going out.
    write_payload_field: bool,
    counts: Arc<SpanCounts>,
}

impl Tracing {
    /// Tracing that records nothing.
    pub fn off() -> Self {
        Self::default()
    }

    /// Tracing as `settings` say: off without an endpoint.
    pub fn start(settings: &TracingSettings) -> anyhow::Result<Self> {
        let Some(endpoint) = &settings.endpoint else {
            return Ok(Self::off());
        };
        crate::crypto::install_crypto_provider();
        use opentelemetry_otlp::WithExportConfig as _;
        let exporter = match settings.protocol {
            OtlpProtocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
                .with_timeout(EXPORT_TIMEOUT)
                .build()?,
            OtlpProtocol::Grpc => grpc_exporter(endpoint)?,
        };
        let counts = Arc::new(SpanCounts::default());
        let exporter = Counting {
            inner: exporter,
            counts: counts.clone(),
        };
        let mut resource = opentelemetry_sdk::Resource::builder_empty()
            .with_service_name(settings.service_name.clone());
        for (key, value) in &settings.resource {
            resource = resource.with_attribute(KeyValue::new(key.clone(), value.clone()));
        }
        let batches = BatchSpanProcessor::builder(exporter)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_max_queue_size(QUEUE_SPANS)
                    .with_scheduled_delay(settings.export_interval)
                    .build(),
            )
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(Bounded {
                inner: batches,
                counts: counts.clone(),
            })
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                settings.sample_ratio,
            ))))
            .with_resource(resource.build())
            .build();
        use opentelemetry::trace::TracerProvider as _;
        let tracer = provider.tracer("switchyard");
        Ok(Self {
            active: Some(Active {
                provider,
                tracer,
                payload_field: settings.payload_field.clone(),
                write_payload_field: settings.write_payload_field,
                counts,
            }),
        })
    }

    /// Whether spans are recorded.
    pub fn is_on(&self) -> bool {
        self.active.is_some()
    }

    /// Spans exported, failed and dropped so far; `None` when off.
    pub fn counts(&self) -> Option<&SpanCounts> {
        self.active.as_ref().map(|a| a.counts.as_ref())
    }

    /// The parent a message carries: its stream entry's `traceparent`/`tracestate` fields, or
    /// the JSON payload's field named by `tracing.payload_field`.
    pub fn parent_of(&self, fields: &[(String, bytes::Bytes)], payload: &[u8]) -> Context {
        let Some(active) = &self.active else {
            return Context::new();
        };
        let mut carrier: HashMap<String, String> = fields
            .iter()
            .filter(|(name, _)| CONTEXT_FIELDS.contains(&name.as_str()))
            .filter_map(|(name, value)| {
                Some((name.clone(), std::str::from_utf8(value).ok()?.to_owned()))
            })
            .collect();
        if carrier.is_empty()
            && let Some(field) = &active.payload_field
            && payload.first() == Some(&b'{')
            && let Ok(serde_json::Value::Object(object)) = serde_json::from_slice(payload)
        {
            if let Some(serde_json::Value::String(parent)) = object.get(field) {
                carrier.insert("traceparent".to_owned(), parent.clone());
            }
            if let Some(serde_json::Value::String(state)) = object.get("tracestate") {
                carrier.insert("tracestate".to_owned(), state.clone());
            }
        }
        if carrier.is_empty() {
            return Context::new();
        }
        TraceContextPropagator::new().extract(&carrier)
    }

    /// `payload` as it goes out in the span `cx`: when `tracing.write_payload_field` is on
    /// and it is a JSON object, with the payload field (and `tracestate`) set to `cx`'s
    /// context, its other members kept in their order and spelling. Anything else goes out
    /// untouched.
    pub fn stamp(&self, cx: &Context, payload: Vec<u8>) -> Vec<u8> {
        let Some(active) = &self.active else {
            return payload;
        };
        let Some(field) = active
            .payload_field
            .as_deref()
            .filter(|_| active.write_payload_field)
        else {
            return payload;
        };
        if payload.trim_ascii_start().first() != Some(&b'{') {
            return payload;
        }
        let carrier = carrier_of(cx);
        let context: Vec<(&str, &str)> = carrier
            .iter()
            .map(|(name, value)| {
                let name = if name == "traceparent" {
                    field
                } else {
                    name.as_str()
                };
                (name, value.as_str())
            })
            .collect();
        with_members(&payload, &context).unwrap_or(payload)
    }

    /// Starts the consumer span of a message, under `parent`, begun when the message was
    /// read (`received_at`): its queue wait is inside it. `details` (the span's name and
    /// attributes) is called only when the span is sampled.
    pub fn consumer(
        &self,
        parent: &Context,
        received_at: SystemTime,
        details: impl FnOnce() -> (String, Vec<KeyValue>),
    ) -> Option<Context> {
        self.open(
            parent,
            SpanKind::Consumer,
            Some(received_at),
            Vec::new(),
            details,
        )
    }

    /// Starts a child span of `parent` (a consumer span's context); `details` as for
    /// [`consumer`](Self::consumer).
    pub fn child(
        &self,
        parent: &Context,
        kind: SpanKind,
        details: impl FnOnce() -> (String, Vec<KeyValue>),
    ) -> Option<Context> {
        self.open(parent, kind, None, Vec::new(), details)
    }

    /// Starts a span of `kind` begun at `start`, under `parent` (or a new trace when it holds
    /// none), linked to the spans of `links`: for work done for many messages at once, as a
    /// stream read. `details` as for [`consumer`](Self::consumer).
    pub fn since(
        &self,
        parent: &Context,
        kind: SpanKind,
        start: SystemTime,
        links: &[Context],
        details: impl FnOnce() -> (String, Vec<KeyValue>),
    ) -> Option<Context> {
        let links = links
            .iter()
            .map(|cx| cx.span().span_context().clone())
            .filter(|span| span.is_valid())
            .map(opentelemetry::trace::Link::with_context)
            .collect();
        self.open(parent, kind, Some(start), links, details)
    }

    /// Starts a span of `kind` under `parent`, at `start` or now. The sampler decides before
    /// the name and attributes are built: a span left out costs its ids and nothing else,
    /// and still carries the trace onwards (unsampled) to what it calls.
    fn open(
        &self,
        parent: &Context,
        kind: SpanKind,
        start: Option<SystemTime>,
        links: Vec<opentelemetry::trace::Link>,
        details: impl FnOnce() -> (String, Vec<KeyValue>),
    ) -> Option<Context> {
        use opentelemetry::trace::Span as _;
        let active = self.active.as_ref()?;
        let mut builder = active.tracer.span_builder("").with_kind(kind);
        if !links.is_empty() {
            builder = builder.with_links(links);
        }
        if let Some(start) = start {
            builder = builder.with_start_time(start);
        }
        let mut span = builder.start_with_context(&active.tracer, parent);
        if span.is_recording() {
            let (name, attributes) = details();
            span.update_name(name);
            span.set_attributes(attributes);
        }
        Some(parent.with_span(span))
    }

    /// Exports what is left, waiting at most a few seconds; tracing is over.
    pub fn shutdown(&self) {
        if let Some(active) = &self.active
            && let Err(error) = active.provider.shutdown_with_timeout(EXPORT_TIMEOUT)
        {
            tracing::warn!("the last spans were not exported: {error}");
        }
    }
}

/// The OTLP/gRPC exporter to the collector at `endpoint`, its base address
/// (`http://collector:4317`).
///
/// The channel's connection runs as tasks on the runtime this is called on, the host's; the
/// batch processor's thread only waits for the answers they deliver. So the exporter must be
/// built inside that runtime, and a collector that cannot be reached holds up no worker.
fn grpc_exporter(endpoint: &str) -> anyhow::Result<opentelemetry_otlp::SpanExporter> {
    use anyhow::Context as _;
    use opentelemetry_otlp::{WithExportConfig as _, WithTonicConfig as _};
    anyhow::ensure!(
        tokio::runtime::Handle::try_current().is_ok(),
        "tracing over gRPC is started from within a tokio runtime, where its connection runs"
    );
    let mut channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())
        .with_context(|| format!("tracing.otlp_endpoint {endpoint:?} is not a gRPC address"))?
        // Unbounded by default: a collector that drops SYNs would hold each export for the
        // kernel's connect timeout (minutes), while spans pile up and are dropped.
        .connect_timeout(EXPORT_TIMEOUT)
        .timeout(EXPORT_TIMEOUT);
    if endpoint.starts_with("https://") {
        channel = channel
            .tls_config(tonic::transport::ClientTlsConfig::new().with_native_roots())
            .with_context(|| format!("TLS to {endpoint} with the system's root certificates"))?;
    }
    Ok(opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_channel(channel.connect_lazy())
        .with_timeout(EXPORT_TIMEOUT)
        .build()?)
}

/// Where a callee adds its spans: under `cx`, recorded by `tracing`.
#[derive(Debug, Clone, Copy)]
pub struct Under<'a> {
    /// The host's tracing.
    pub tracing: &'a Tracing,
    /// The parent span's context.
    pub cx: &'a Context,
}

/// Ends the span of `cx` with `outcome`: an error's text becomes its status.
pub fn end(cx: &Context, outcome: Result<(), &str>) {
    let span = cx.span();
    if let Err(why) = outcome {
        span.set_status(Status::error(why.to_owned()));
    }
    span.end();
}

/// Adds `attributes` to the span of `cx`.
pub fn annotate(cx: &Context, attributes: Vec<KeyValue>) {
    cx.span().set_attributes(attributes);
}

/// The `traceparent` and `tracestate` of `cx`, as headers, stream entry fields or payload
/// members; a `tracestate` only when it holds something, nothing when `cx` holds no valid
/// span (an unsampled one is valid: it passes the decision on).
pub fn carrier_of(cx: &Context) -> Vec<(String, String)> {
    if !cx.span().span_context().is_valid() {
        return Vec::new();
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(cx, &mut carrier);
    let mut pairs: Vec<(String, String)> = carrier
        .into_iter()
        .filter(|(_, value)| !value.is_empty())
        .collect();
    pairs.sort();
    pairs
}

/// The batch processor, with its queue bounded here so that what it would drop is counted:
/// a span finished while [`QUEUE_SPANS`] wait is dropped before it reaches the queue.
#[derive(Debug)]
struct Bounded<P> {
    inner: P,
    counts: Arc<SpanCounts>,
}

impl<P: SpanProcessor> SpanProcessor for Bounded<P> {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if self.counts.waiting() >= QUEUE_SPANS as u64 {
            self.counts.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.counts.queued.fetch_add(1, Ordering::Relaxed);
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// The JSON object `payload` with the string members `set` in place of any of the same
/// name (added at the end when absent), its other members kept in their order and their
/// values byte for byte; `None` when `payload` is not a JSON object.
fn with_members(payload: &[u8], set: &[(&str, &str)]) -> Option<Vec<u8>> {
    use serde_json::value::RawValue;
    let members: Members<'_> = serde_json::from_slice(payload).ok()?;
    let mut out = Vec::with_capacity(payload.len() + 128);
    out.push(b'{');
    let kept = members
        .0
        .iter()
        .filter(|(name, _)| !set.iter().any(|(key, _)| key == name))
        .map(|(name, value)| (serde_json::to_string(name), value.get().to_owned()));
    let added = set.iter().map(|(name, value)| {
        (
            serde_json::to_string(name),
            serde_json::to_string(value).unwrap_or_default(),
        )
    });
    for (index, (name, value)) in kept.chain(added).enumerate() {
        if index > 0 {
            out.push(b',');
        }
        out.extend_from_slice(name.ok()?.as_bytes());
        out.push(b':');
        out.extend_from_slice(value.as_bytes());
    }
    out.push(b'}');
    return Some(out);

    /// A JSON object's members in order, their values as written.
    struct Members<'a>(Vec<(String, &'a RawValue)>);

    impl<'de> serde::Deserialize<'de> for Members<'de> {
        fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct Visit;
            impl<'de> serde::de::Visitor<'de> for Visit {
                type Value = Members<'de>;

                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }

                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> Result<Self::Value, A::Error> {
                    let mut members = Vec::new();
                    while let Some(member) = map.next_entry::<String, &'de RawValue>()? {
                        members.push(member);
                    }
                    Ok(Members(members))
                }
            }
            deserializer.deserialize_map(Visit)
        }
    }
}

/// The exporter, counting what it exports and what fails.
#[derive(Debug)]
struct Counting<E> {
    inner: E,
    counts: Arc<SpanCounts>,
}

impl<E: SpanExporter> SpanExporter for Counting<E> {
    async fn export(&self, batch: Vec<SpanData>) -> opentelemetry_sdk::error::OTelSdkResult {
        let spans = batch.len() as u64;
        let result = self.inner.export(batch).await;
        let counter = if result.is_ok() {
            &self.counts.exported
        } else {
            &self.counts.failed
        };
        counter.fetch_add(spans, Ordering::Relaxed);
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn a_payload_member_is_replaced_in_place_of_order_and_the_rest_kept_as_written() {
        let payload = br#"{ "user" : 42, "traceparent": "old", "tags": [1, 2 ,3] }"#;
        let out = with_members(payload, &[("traceparent", PARENT)]).expect("an object");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!(r#"{{"user":42,"tags":[1, 2 ,3],"traceparent":"{PARENT}"}}"#)
        );
    }

    #[test]
    fn only_json_objects_are_rewritten() {
        for payload in [&b"[1,2]"[..], b"\"text\"", b"{not json", b"plain", b""] {
            assert_eq!(with_members(payload, &[("traceparent", PARENT)]), None);
        }
        assert_eq!(
            with_members(b"{}", &[("traceparent", PARENT), ("tracestate", "a=b")]).unwrap(),
            format!(r#"{{"traceparent":"{PARENT}","tracestate":"a=b"}}"#).into_bytes()
        );
    }

    #[test]
    fn a_context_read_from_a_payload_is_the_one_written_back() {
        let settings = crate::config::TracingConfig {
            otlp_endpoint: Some("http://127.0.0.1:9".to_owned()),
            payload_field: Some("trace".to_owned()),
            write_payload_field: true,
            ..Default::default()
        }
        .settings();
        let tracing = Tracing::start(&settings).expect("tracing starts");
        let parent = tracing.parent_of(&[], format!(r#"{{"trace":"{PARENT}"}}"#).as_bytes());
        assert_eq!(
            tracing.stamp(&parent, br#"{"a":1}"#.to_vec()),
            format!(r#"{{"a":1,"trace":"{PARENT}"}}"#).into_bytes()
        );
        assert_eq!(tracing.stamp(&parent, b"not json".to_vec()), b"not json");
        tracing.shutdown();
    }
}
