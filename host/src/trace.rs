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
    SpanExporter,
};

use crate::config::{OtlpProtocol, TracingSettings};

/// The stream entry fields, and HTTP headers, that carry a trace's context.
pub const CONTEXT_FIELDS: [&str; 2] = ["traceparent", "tracestate"];

/// How long the exporter may take over one batch before it counts as failed.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Spans by what became of them.
#[derive(Debug, Default)]
pub struct SpanCounts {
    /// Handed to the collector and accepted.
    pub exported: AtomicU64,
    /// Handed to the collector and refused, or not answered (down, timeout).
    pub failed: AtomicU64,
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
        let provider = SdkTracerProvider::builder()
            .with_span_processor(
                BatchSpanProcessor::builder(exporter)
                    .with_batch_config(
                        BatchConfigBuilder::default()
                            .with_scheduled_delay(settings.export_interval)
                            .build(),
                    )
                    .build(),
            )
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
                counts,
            }),
        })
    }

    /// Whether spans are recorded.
    pub fn is_on(&self) -> bool {
        self.active.is_some()
    }

    /// Spans exported and failed so far; `None` when off.
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

    /// Starts the consumer span of a message handled by `plugin`, under `parent`, begun when
    /// the message was read (`received_at`): its queue wait is inside it.
    pub fn consumer(
        &self,
        parent: &Context,
        name: String,
        received_at: SystemTime,
        attributes: Vec<KeyValue>,
    ) -> Option<Context> {
        self.open(
            parent,
            name,
            SpanKind::Consumer,
            Some(received_at),
            attributes,
        )
    }

    /// Starts a child span of `parent` (a consumer span's context).
    pub fn child(
        &self,
        parent: &Context,
        name: String,
        kind: SpanKind,
        attributes: Vec<KeyValue>,
    ) -> Option<Context> {
        self.open(parent, name, kind, None, attributes)
    }

    /// Starts a span of `kind` under `parent`, at `start` or now.
    fn open(
        &self,
        parent: &Context,
        name: String,
        kind: SpanKind,
        start: Option<SystemTime>,
        attributes: Vec<KeyValue>,
    ) -> Option<Context> {
        let active = self.active.as_ref()?;
        let mut builder = active
            .tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes);
        if let Some(start) = start {
            builder = builder.with_start_time(start);
        }
        Some(parent.with_span(builder.start_with_context(&active.tracer, parent)))
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

/// The `traceparent` and `tracestate` of `cx`, as headers or stream entry fields; empty when
/// `cx` holds no sampled span.
pub fn carrier_of(cx: &Context) -> Vec<(String, String)> {
    if !cx.span().span_context().is_valid() {
        return Vec::new();
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(cx, &mut carrier);
    let mut pairs: Vec<(String, String)> = carrier.into_iter().collect();
    pairs.sort();
    pairs
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
