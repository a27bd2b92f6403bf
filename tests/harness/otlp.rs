//! A real OpenTelemetry collector endpoint for tests: an OTLP receiver for traces, over HTTP
//! or over gRPC.
//!
//! [`OtlpReceiver`] listens on a free loopback port and decodes every export request with the
//! protocol's own generated types (`opentelemetry-proto`, through prost), so a test sees what
//! a real collector would have received.
//!
//! Started with [`OtlpReceiver::start`], it serves OTLP/HTTP, `POST /v1/traces`, and accepts:
//!
//! - protobuf (`application/x-protobuf`), the exporters' default, and OTLP's JSON mapping
//!   (`application/json`: ids in hex, enums as integers);
//! - bodies sent with `Content-Encoding: gzip`;
//!
//! and answers 200 with an empty `ExportTraceServiceResponse` in the request's encoding, as
//! the OTLP/HTTP specification asks. A request it cannot take (another path, media type or
//! content encoding, a body that does not decode) gets a 4xx answer and is recorded as a
//! rejection, which [`OtlpReceiver::wait_for_spans`] reports on timeout: a malformed export
//! fails the test with its reason, not as a span that never came.
//!
//! Started with [`OtlpReceiver::start_grpc`], it serves OTLP/gRPC instead: the
//! `TraceService/Export` call over HTTP/2 without TLS (tonic's server, the service
//! `opentelemetry-proto` generates), uncompressed. It answers with an empty
//! `ExportTraceServiceResponse`; a call it refuses (another service or method, a message that
//! does not decode, a compression it does not take) is answered with its gRPC status and
//! recorded as a rejection the same way.
//!
//! Spans are kept flattened ([`ReceivedSpan`]): ids in lowercase hex, attribute values as
//! text, and the attributes of the span's resource copied onto it.
//!
//! [`OtlpReceiver::stop`] takes the collector down (the port refuses connections, open ones
//! are closed) and [`OtlpReceiver::restart`] brings it back on the same port, for tests of
//! what the system under test does while its collector is away. Spans received before a stop
//! are kept; a receiver comes back speaking the protocol it was started with. The server runs
//! on the runtime of the caller of [`OtlpReceiver::start`] or [`OtlpReceiver::start_grpc`].

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::io::Read as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context as _, bail};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::header::{CONTENT_ENCODING, CONTENT_TYPE};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse as _, Response};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode as OtlpStatusCode;
use opentelemetry_proto::tonic::trace::v1::{Span, Status};
use prost::Message as _;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::codegen::{BoxFuture, Service};

/// The path exporters post traces to, under [`OtlpReceiver::endpoint`].
pub const TRACES_PATH: &str = "/v1/traces";

/// The largest request body taken, as sent and once inflated. Exporters send batches of a few
/// hundred spans, far below this; the cap bounds the memory a bad body, or a gzip stream that
/// inflates without end, can take.
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// How long [`OtlpReceiver::stop`] lets requests in progress finish before it cuts them.
const STOP_DEADLINE: Duration = Duration::from_secs(5);
/// Interval between checks in [`OtlpReceiver::wait_for_spans`].
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Media type of OTLP's protobuf encoding.
const PROTOBUF: &str = "application/x-protobuf";
/// Media type of OTLP's JSON encoding.
const JSON: &str = "application/json";
/// An empty `ExportTraceServiceResponse` in OTLP's JSON encoding.
const EMPTY_JSON_RESPONSE: &[u8] = b"{}";

/// One span as the receiver got it, flattened out of its resource and scope.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedSpan {
    /// The trace id, 32 lowercase hex digits.
    pub trace_id: String,
    /// The span id, 16 lowercase hex digits.
    pub span_id: String,
    /// The parent's span id in hex; `None` for a root span.
    pub parent_span_id: Option<String>,
    /// The span's name.
    pub name: String,
    /// `internal`, `server`, `client`, `producer`, `consumer` or `unspecified`
    /// (`unknown(N)` for a value the protocol does not define).
    pub kind: String,
    /// The span's attributes, their values as text: strings as they are, integers, doubles
    /// and booleans as Rust prints them, arrays comma-joined, key-value lists as `k=v`
    /// comma-joined, bytes in hex.
    pub attributes: BTreeMap<String, String>,
    /// `unset`, `ok` or `error` (`unknown(N)` for a value the protocol does not define).
    pub status_code: String,
    /// The status message, empty when there is none.
    pub status_message: String,
    /// The attributes of the span's resource (`service.name`, ...), rendered like
    /// [`ReceivedSpan::attributes`].
    pub resource: BTreeMap<String, String>,
    /// The names of the span's events, in order.
    pub events: Vec<String>,
    /// The spans it links to, as (trace id, span id) in hex, in order.
    pub links: Vec<(String, String)>,
    /// When the span started, in nanoseconds since the Unix epoch.
    pub start_unix_nanos: u64,
    /// When the span ended, in nanoseconds since the Unix epoch.
    pub end_unix_nanos: u64,
}

impl ReceivedSpan {
    /// Flattens `span`, whose resource has the attributes `resource`.
    fn new(span: Span, resource: &BTreeMap<String, String>) -> Self {
        let status = span.status.unwrap_or_default();
        Self {
            trace_id: hex(&span.trace_id),
            span_id: hex(&span.span_id),
            parent_span_id: (!span.parent_span_id.is_empty()).then(|| hex(&span.parent_span_id)),
            name: span.name,
            kind: kind_name(span.kind),
            attributes: attributes(&span.attributes),
            status_code: status_code_name(&status),
            status_message: status.message,
            resource: resource.clone(),
            events: span.events.into_iter().map(|event| event.name).collect(),
            links: span
                .links
                .iter()
                .map(|link| (hex(&link.trace_id), hex(&link.span_id)))
                .collect(),
            start_unix_nanos: span.start_time_unix_nano,
            end_unix_nanos: span.end_time_unix_nano,
        }
    }
}

/// What the server has taken in so far; kept across stops and restarts.
#[derive(Default)]
struct Received {
    /// Every span of every accepted request, in arrival order.
    spans: Vec<ReceivedSpan>,
    /// Export requests accepted.
    requests: usize,
    /// Why each refused request was refused, in arrival order.
    rejections: Vec<String>,
}

/// The shared record of what arrived.
type Record = Arc<Mutex<Received>>;

/// Locks the record; a test that panicked while holding it leaves it usable.
fn lock(record: &Record) -> MutexGuard<'_, Received> {
    record.lock().unwrap_or_else(|e| e.into_inner())
}

/// The OTLP transport a receiver serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// OTLP/HTTP: `POST /v1/traces`, protobuf or JSON.
    Http,
    /// OTLP/gRPC: `TraceService/Export` over HTTP/2 without TLS.
    Grpc,
}

/// The serving task of a running receiver.
struct Server {
    /// Cancelled to stop accepting and close connections once their requests are answered.
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Server {
    /// Serves OTLP over `transport` on `listener`, recording into `record`.
    fn spawn(listener: TcpListener, record: Record, transport: Transport) -> Self {
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone().cancelled_owned();
        let task = match transport {
            Transport::Http => tokio::spawn(serve_http(listener, record, signal)),
            Transport::Grpc => tokio::spawn(serve_grpc(listener, record, signal)),
        };
        Self { shutdown, task }
    }
}

/// Serves OTLP/HTTP on `listener` until `signal`.
async fn serve_http(
    listener: TcpListener,
    record: Record,
    signal: impl Future<Output = ()> + Send + 'static,
) {
    let app = axum::Router::new()
        .route(TRACES_PATH, axum::routing::post(export))
        .fallback(unknown_route)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(record);
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(signal)
        .await
    {
        tracing::warn!(%error, "the OTLP receiver stopped serving");
    }
}

/// Serves OTLP/gRPC on `listener` until `signal`: then it stops accepting, sends each
/// connection a GOAWAY, and returns once their calls are answered and they are closed.
async fn serve_grpc(
    listener: TcpListener,
    record: Record,
    signal: impl Future<Output = ()> + Send + 'static,
) {
    let traces = TraceServiceServer::new(GrpcTraces {
        record: record.clone(),
    })
    .max_decoding_message_size(MAX_BODY_BYTES);
    let service = RecordRefusals {
        inner: traces,
        record,
    };
    if let Err(error) = tonic::transport::Server::builder()
        .serve_with_incoming_shutdown(
            service,
            tonic::transport::server::TcpIncoming::from(listener),
            signal,
        )
        .await
    {
        tracing::warn!(%error, "the OTLP gRPC receiver stopped serving");
    }
}

/// An OTLP trace receiver on a loopback port; stops when dropped.
pub struct OtlpReceiver {
    /// Where it listens; kept across [`OtlpReceiver::restart`].
    addr: SocketAddr,
    /// What it speaks; kept across [`OtlpReceiver::restart`].
    transport: Transport,
    record: Record,
    /// `None` between [`OtlpReceiver::stop`] and [`OtlpReceiver::restart`].
    server: Option<Server>,
}

impl OtlpReceiver {
    /// Starts an OTLP/HTTP receiver on a port of 127.0.0.1 that the kernel picks, so no other
    /// server can be holding it.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_serving(Transport::Http).await
    }

    /// Starts an OTLP/gRPC receiver, like [`OtlpReceiver::start`] otherwise.
    pub async fn start_grpc() -> anyhow::Result<Self> {
        Self::start_serving(Transport::Grpc).await
    }

    /// Starts a receiver speaking `transport` on a free port of 127.0.0.1.
    async fn start_serving(transport: Transport) -> anyhow::Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .context("binding the OTLP receiver to 127.0.0.1:0")?;
        let addr = listener
            .local_addr()
            .context("reading the OTLP receiver's address")?;
        let record = Record::default();
        let server = Server::spawn(listener, record.clone(), transport);
        Ok(Self {
            addr,
            transport,
            record,
            server: Some(server),
        })
    }

    /// What the receiver speaks.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// The base URL an exporter is given, `http://127.0.0.1:PORT`: over HTTP traces go to
    /// [`TRACES_PATH`] under it, over gRPC it is the whole address.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far, in arrival order.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        lock(&self.record).spans.clone()
    }

    /// How many export requests were accepted (refused ones are not counted).
    pub fn requests(&self) -> usize {
        lock(&self.record).requests
    }

    /// Why each refused request was refused, in arrival order.
    pub fn rejections(&self) -> Vec<String> {
        lock(&self.record).rejections.clone()
    }

    /// Waits until `predicate` holds for the spans received so far, and returns them. After
    /// `within`, fails with an error that names `what` and lists the spans that did arrive
    /// (by name) and the requests that were refused.
    pub async fn wait_for_spans(
        &self,
        what: &str,
        within: Duration,
        predicate: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> anyhow::Result<Vec<ReceivedSpan>> {
        let deadline = Instant::now() + within;
        loop {
            let spans = self.spans();
            if predicate(&spans) {
                return Ok(spans);
            }
            if Instant::now() >= deadline {
                bail!("no {what} after {within:?}: {}", self.describe(&spans));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// What arrived, for an error message: span names with their counts, requests, refusals.
    fn describe(&self, spans: &[ReceivedSpan]) -> String {
        let mut names = BTreeMap::<&str, usize>::new();
        for span in spans {
            *names.entry(span.name.as_str()).or_default() += 1;
        }
        let names: Vec<String> = names
            .into_iter()
            .map(|(name, count)| format!("{name:?} x{count}"))
            .collect();
        let received = lock(&self.record);
        format!(
            "{} spans in {} requests [{}]; {} requests refused {:?}",
            spans.len(),
            received.requests,
            names.join(", "),
            received.rejections.len(),
            received.rejections,
        )
    }

    /// Takes the receiver down: it stops accepting, answers the requests in progress (cut
    /// after a few seconds), and closes every connection, so exporters find the port closed.
    /// Does nothing if it is already stopped.
    pub async fn stop(&mut self) {
        let Some(Server { shutdown, mut task }) = self.server.take() else {
            return;
        };
        shutdown.cancel();
        if tokio::time::timeout(STOP_DEADLINE, &mut task)
            .await
            .is_err()
        {
            tracing::warn!(
                addr = %self.addr,
                "the OTLP receiver's requests did not finish within {STOP_DEADLINE:?}; cutting them"
            );
            task.abort();
        }
    }

    /// Brings the receiver back on the same port (stopping it first if it is running),
    /// keeping what it received before.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await;
        let listener = TcpListener::bind(self.addr)
            .await
            .with_context(|| format!("binding the OTLP receiver to {} again", self.addr))?;
        self.server = Some(Server::spawn(listener, self.record.clone(), self.transport));
        Ok(())
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown.cancel();
            server.task.abort();
        }
    }
}

/// The gRPC trace service: records the spans of every export call.
struct GrpcTraces {
    record: Record,
}

#[tonic::async_trait]
impl TraceService for GrpcTraces {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans = flatten(request.into_inner());
        let mut received = lock(&self.record);
        received.requests += 1;
        received.spans.extend(spans);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// The gRPC server's service: `inner`, with every call it refuses recorded as a rejection.
#[derive(Clone)]
struct RecordRefusals<S> {
    inner: S,
    record: Record,
}

type GrpcRequest = tonic::codegen::http::Request<tonic::body::Body>;
type GrpcResponse = tonic::codegen::http::Response<tonic::body::Body>;

impl<S> Service<GrpcRequest> for RecordRefusals<S>
where
    S: Service<GrpcRequest, Response = GrpcResponse, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = GrpcResponse;
    type Error = Infallible;
    type Future = BoxFuture<GrpcResponse, Infallible>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: GrpcRequest) -> Self::Future {
        let path = request.uri().path().to_owned();
        let record = self.record.clone();
        let answer = self.inner.call(request);
        Box::pin(async move {
            let response = answer.await?;
            // A refusal is answered at once, its status in the headers (`trailers-only`); a
            // success sends its status in trailers, after the message.
            if let Some(status) = tonic::Status::from_header_map(response.headers())
                && status.code() != tonic::Code::Ok
            {
                lock(&record).rejections.push(format!(
                    "{path}: {:?}: {}",
                    status.code(),
                    status.message()
                ));
            }
            Ok(response)
        })
    }
}

/// Why a request was refused: the answer's status and a message naming the reason.
struct Rejection {
    status: StatusCode,
    reason: String,
}

impl Rejection {
    /// A 400: the body does not hold what its headers say.
    fn bad_request(reason: String) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            reason,
        }
    }

    /// A 415: a media type or content encoding OTLP/HTTP does not use.
    fn unsupported(reason: String) -> Self {
        Self {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            reason,
        }
    }
}

/// The two encodings OTLP/HTTP defines; the answer uses the request's.
#[derive(Debug, Clone, Copy)]
enum Encoding {
    Protobuf,
    Json,
}

impl Encoding {
    /// The encoding the request's `Content-Type` names (its parameters ignored).
    fn of(headers: &HeaderMap) -> Result<Self, Rejection> {
        let value = headers
            .get(CONTENT_TYPE)
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
            .unwrap_or_default();
        let media_type = value.split(';').next().unwrap_or_default().trim();
        if media_type.eq_ignore_ascii_case(PROTOBUF) {
            Ok(Self::Protobuf)
        } else if media_type.eq_ignore_ascii_case(JSON) {
            Ok(Self::Json)
        } else {
            Err(Rejection::unsupported(format!(
                "content-type {value:?} is neither {PROTOBUF} nor {JSON}"
            )))
        }
    }

    /// Decodes an export request from `body`.
    fn decode(self, body: &[u8]) -> Result<ExportTraceServiceRequest, Rejection> {
        match self {
            Self::Protobuf => ExportTraceServiceRequest::decode(body).map_err(|error| {
                Rejection::bad_request(format!("the protobuf body does not decode: {error}"))
            }),
            Self::Json => serde_json::from_slice(body).map_err(|error| {
                Rejection::bad_request(format!("the JSON body does not decode: {error}"))
            }),
        }
    }

    /// The answer to an accepted request: an empty `ExportTraceServiceResponse`.
    fn accepted(self) -> Response {
        let (media_type, body) = match self {
            Self::Protobuf => (
                PROTOBUF,
                ExportTraceServiceResponse::default().encode_to_vec(),
            ),
            Self::Json => (JSON, EMPTY_JSON_RESPONSE.to_vec()),
        };
        (StatusCode::OK, [(CONTENT_TYPE, media_type)], body).into_response()
    }
}

/// `POST /v1/traces`: decodes the export request, records its spans, answers 200; or records
/// why it could not and answers 4xx.
async fn export(State(record): State<Record>, headers: HeaderMap, body: Bytes) -> Response {
    match decode(&headers, &body) {
        Ok((request, encoding)) => {
            let spans = flatten(request);
            let mut received = lock(&record);
            received.requests += 1;
            received.spans.extend(spans);
            encoding.accepted()
        }
        Err(rejection) => refuse(&record, rejection),
    }
}

/// Any other method or path: recorded, so a misdirected exporter shows in test failures.
async fn unknown_route(State(record): State<Record>, method: Method, uri: Uri) -> Response {
    let rejection = Rejection {
        status: StatusCode::NOT_FOUND,
        reason: format!("{method} {uri}: OTLP traces are posted to {TRACES_PATH}"),
    };
    refuse(&record, rejection)
}

/// Records `rejection` and answers with it.
fn refuse(record: &Record, rejection: Rejection) -> Response {
    lock(record).rejections.push(rejection.reason.clone());
    (rejection.status, rejection.reason).into_response()
}

/// The export request in `body`, undoing its content encoding, and the encoding it came in.
fn decode(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(ExportTraceServiceRequest, Encoding), Rejection> {
    let encoding = Encoding::of(headers)?;
    let body = decompress(headers, body)?;
    Ok((encoding.decode(&body)?, encoding))
}

/// `body` without its `Content-Encoding` (none, `identity` or `gzip`).
fn decompress<'a>(headers: &HeaderMap, body: &'a [u8]) -> Result<Cow<'a, [u8]>, Rejection> {
    let Some(value) = headers.get(CONTENT_ENCODING) else {
        return Ok(Cow::Borrowed(body));
    };
    let coding = String::from_utf8_lossy(value.as_bytes());
    let coding = coding.trim();
    if coding.eq_ignore_ascii_case("identity") {
        Ok(Cow::Borrowed(body))
    } else if coding.eq_ignore_ascii_case("gzip") {
        gunzip(body).map(Cow::Owned)
    } else {
        Err(Rejection::unsupported(format!(
            "content-encoding {coding:?} is neither gzip nor identity"
        )))
    }
}

/// Inflates a gzip body, up to [`MAX_BODY_BYTES`].
fn gunzip(body: &[u8]) -> Result<Vec<u8>, Rejection> {
    let limit = u64::try_from(MAX_BODY_BYTES).unwrap_or(u64::MAX);
    let mut inflated = Vec::new();
    flate2::read::GzDecoder::new(body)
        .take(limit.saturating_add(1))
        .read_to_end(&mut inflated)
        .map_err(|error| {
            Rejection::bad_request(format!("the gzip body does not inflate: {error}"))
        })?;
    if inflated.len() > MAX_BODY_BYTES {
        return Err(Rejection {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            reason: format!("the gzip body inflates to more than {MAX_BODY_BYTES} bytes"),
        });
    }
    Ok(inflated)
}

/// Every span of `request`, each with its resource's attributes.
fn flatten(request: ExportTraceServiceRequest) -> Vec<ReceivedSpan> {
    let mut spans = Vec::new();
    for resource_spans in request.resource_spans {
        let resource = resource_spans
            .resource
            .map(|resource| attributes(&resource.attributes))
            .unwrap_or_default();
        for scope_spans in resource_spans.scope_spans {
            spans.extend(
                scope_spans
                    .spans
                    .into_iter()
                    .map(|span| ReceivedSpan::new(span, &resource)),
            );
        }
    }
    spans
}

/// Attributes as text, by key.
fn attributes(attributes: &[KeyValue]) -> BTreeMap<String, String> {
    attributes
        .iter()
        .map(|attribute| (attribute.key.clone(), render(attribute.value.as_ref())))
        .collect()
}

/// One attribute value as text (see [`ReceivedSpan::attributes`]); empty when absent.
fn render(value: Option<&AnyValue>) -> String {
    use any_value::Value;
    let Some(value) = value.and_then(|value| value.value.as_ref()) else {
        return String::new();
    };
    match value {
        Value::StringValue(text) => text.clone(),
        Value::BoolValue(flag) => flag.to_string(),
        Value::IntValue(number) => number.to_string(),
        Value::DoubleValue(number) => number.to_string(),
        Value::ArrayValue(array) => {
            let items: Vec<String> = array.values.iter().map(|item| render(Some(item))).collect();
            items.join(",")
        }
        Value::KvlistValue(list) => {
            let pairs: Vec<String> = list
                .values
                .iter()
                .map(|pair| format!("{}={}", pair.key, render(pair.value.as_ref())))
                .collect();
            pairs.join(",")
        }
        Value::BytesValue(bytes) => hex(bytes),
        // An index into a string table that only the profiles signal has.
        Value::StringValueStrindex(index) => format!("strindex:{index}"),
    }
}

/// The lowercase name of a span kind.
fn kind_name(kind: i32) -> String {
    match SpanKind::try_from(kind) {
        Ok(SpanKind::Unspecified) => "unspecified",
        Ok(SpanKind::Internal) => "internal",
        Ok(SpanKind::Server) => "server",
        Ok(SpanKind::Client) => "client",
        Ok(SpanKind::Producer) => "producer",
        Ok(SpanKind::Consumer) => "consumer",
        Err(_) => return format!("unknown({kind})"),
    }
    .to_owned()
}

/// The lowercase name of a status code.
fn status_code_name(status: &Status) -> String {
    match OtlpStatusCode::try_from(status.code) {
        Ok(OtlpStatusCode::Unset) => "unset",
        Ok(OtlpStatusCode::Ok) => "ok",
        Ok(OtlpStatusCode::Error) => "error",
        Err(_) => return format!("unknown({})", status.code),
    }
    .to_owned()
}

/// `bytes` as lowercase hex.
fn hex(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(text, "{byte:02x}");
    }
    text
}

#[cfg(test)]
mod tests {
    //! The receiver against the real OTLP exporters: over HTTP in each encoding it can send,
    //! and over gRPC.

    use opentelemetry::trace::{
        Span as _, SpanKind, Status, TraceContextExt as _, Tracer as _, TracerProvider as _,
    };
    use opentelemetry::{Array, KeyValue, Value};
    use opentelemetry_otlp::{
        Compression, Protocol, SpanExporter, WithExportConfig as _, WithHttpConfig as _,
    };
    use opentelemetry_sdk::Resource;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tokio::runtime::Runtime;

    use super::*;
    use crate::PATIENCE;

    /// The ids the exporting side gave a trace: (trace id, parent's span id, child's span id).
    struct Sent {
        trace_id: String,
        parent_id: String,
        child_id: String,
    }

    /// The real OTLP/HTTP exporter to the receiver at `endpoint`.
    fn http_exporter(
        endpoint: &str,
        protocol: Protocol,
        compression: Option<Compression>,
    ) -> anyhow::Result<SpanExporter> {
        // reqwest configures TLS even for plain HTTP, and where the build enables rustls
        // without choosing its primitives (the host's registry client does), building a client
        // panics unless a process-wide provider is installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut exporter = SpanExporter::builder()
            .with_http()
            .with_protocol(protocol)
            .with_endpoint(format!("{endpoint}{TRACES_PATH}"));
        if let Some(compression) = compression {
            exporter = exporter.with_compression(compression);
        }
        Ok(exporter.build()?)
    }

    /// The real OTLP/gRPC exporter to the receiver at `endpoint`; its channel runs on
    /// `runtime`.
    fn grpc_exporter(runtime: &Runtime, endpoint: &str) -> anyhow::Result<SpanExporter> {
        let _entered = runtime.enter();
        Ok(SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()?)
    }

    /// Sends a `parent` span and its `child` through `exporter`, one request per span. Runs
    /// on the test's own thread: an exporter waits for its answer there, off the receiver's
    /// runtime.
    fn export_trace(exporter: SpanExporter) -> anyhow::Result<Sent> {
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter)
            .with_resource(
                Resource::builder_empty()
                    .with_service_name("otlp-self-test")
                    .build(),
            )
            .build();
        let tracer = provider.tracer("switchyard-tests");
        let sent = tracer.in_span("parent", |cx| {
            let parent = cx.span();
            parent.set_attribute(KeyValue::new("messaging.destination.name", "orders"));
            parent.add_event("retried", vec![]);
            parent.set_status(Status::error("boom"));
            let mut child = tracer
                .span_builder("child")
                .with_kind(SpanKind::Consumer)
                .with_attributes([
                    KeyValue::new("attempt", 2_i64),
                    KeyValue::new("ratio", 0.5),
                    KeyValue::new("redelivered", false),
                    KeyValue::new(
                        "channels",
                        Value::Array(Array::String(vec!["a".into(), "b".into()])),
                    ),
                ])
                .start(&tracer);
            let child_id = child.span_context().span_id().to_string();
            child.end();
            Sent {
                trace_id: parent.span_context().trace_id().to_string(),
                parent_id: parent.span_context().span_id().to_string(),
                child_id,
            }
        });
        provider.shutdown()?;
        Ok(sent)
    }

    /// Waits for the trace `sent` and checks every field the exporter filled in.
    fn check_trace(runtime: &Runtime, receiver: &OtlpReceiver, sent: &Sent) -> anyhow::Result<()> {
        let spans = runtime.block_on(receiver.wait_for_spans(
            "parent and child",
            PATIENCE,
            |spans| spans.iter().filter(|s| s.trace_id == sent.trace_id).count() == 2,
        ))?;
        let find = |id: &str| {
            spans
                .iter()
                .find(|span| span.span_id == id)
                .with_context(|| format!("no span {id} in {spans:#?}"))
        };
        let (parent, child) = (find(&sent.parent_id)?, find(&sent.child_id)?);

        assert_eq!(parent.name, "parent");
        assert_eq!(parent.parent_span_id, None);
        assert_eq!(parent.kind, "internal");
        assert_eq!(parent.attributes["messaging.destination.name"], "orders");
        assert_eq!(parent.events, ["retried"]);
        assert_eq!(
            (parent.status_code.as_str(), parent.status_message.as_str()),
            ("error", "boom")
        );
        assert!(parent.start_unix_nanos > 0 && parent.start_unix_nanos <= parent.end_unix_nanos);

        assert_eq!(child.name, "child");
        assert_eq!(
            child.parent_span_id.as_deref(),
            Some(sent.parent_id.as_str())
        );
        assert_eq!(child.kind, "consumer");
        assert_eq!(child.status_code, "unset");
        let attributes: Vec<(&str, &str)> = child
            .attributes
            .iter()
            .map(|(key, value)| (key.as_str(), value.as_str()))
            .collect();
        assert_eq!(
            attributes,
            [
                ("attempt", "2"),
                ("channels", "a,b"),
                ("ratio", "0.5"),
                ("redelivered", "false")
            ]
        );
        assert_eq!(child.resource["service.name"], "otlp-self-test");
        Ok(())
    }

    #[test]
    fn decodes_what_the_real_exporter_sends_in_each_encoding() -> anyhow::Result<()> {
        let runtime = Runtime::new()?;
        for (protocol, compression) in [
            (Protocol::HttpBinary, None),
            (Protocol::HttpBinary, Some(Compression::Gzip)),
            (Protocol::HttpJson, None),
        ] {
            let receiver = runtime.block_on(OtlpReceiver::start())?;
            let sent = export_trace(http_exporter(&receiver.endpoint(), protocol, compression)?)?;
            check_trace(&runtime, &receiver, &sent)
                .with_context(|| format!("{protocol:?} with compression {compression:?}"))?;
            assert_eq!(receiver.requests(), 2, "one request per span");
            assert_eq!(receiver.rejections(), Vec::<String>::new());
        }
        Ok(())
    }

    #[test]
    fn restart_serves_the_same_port_and_keeps_what_arrived() -> anyhow::Result<()> {
        let runtime = Runtime::new()?;
        let mut receiver = runtime.block_on(OtlpReceiver::start())?;
        let first = export_trace(http_exporter(
            &receiver.endpoint(),
            Protocol::HttpBinary,
            None,
        )?)?;
        check_trace(&runtime, &receiver, &first)?;

        stop_refusing(&runtime, &mut receiver);

        runtime.block_on(receiver.restart())?;
        let second = export_trace(http_exporter(
            &receiver.endpoint(),
            Protocol::HttpBinary,
            None,
        )?)?;
        check_trace(&runtime, &receiver, &first)?;
        check_trace(&runtime, &receiver, &second)?;
        assert_eq!(receiver.requests(), 4);

        let missing = runtime.block_on(receiver.wait_for_spans(
            "span named missing",
            Duration::from_millis(50),
            |spans| spans.iter().any(|span| span.name == "missing"),
        ));
        let message = format!("{:#}", missing.err().context("found a span never sent")?);
        assert!(
            message.contains("no span named missing") && message.contains("\"child\" x2"),
            "{message}"
        );
        Ok(())
    }

    /// Stops `receiver` and checks that its port refuses connections.
    fn stop_refusing(runtime: &Runtime, receiver: &mut OtlpReceiver) {
        runtime.block_on(receiver.stop());
        let refused = std::net::TcpStream::connect(receiver.addr)
            .map(drop)
            .map_err(|error| error.kind());
        assert_eq!(refused, Err(std::io::ErrorKind::ConnectionRefused));
    }

    #[test]
    fn decodes_what_the_real_grpc_exporter_sends_before_and_after_a_restart() -> anyhow::Result<()>
    {
        let runtime = Runtime::new()?;
        let mut receiver = runtime.block_on(OtlpReceiver::start_grpc())?;
        assert_eq!(receiver.transport(), Transport::Grpc);
        let first = export_trace(grpc_exporter(&runtime, &receiver.endpoint())?)?;
        check_trace(&runtime, &receiver, &first)?;
        assert_eq!(receiver.requests(), 2, "one call per span");

        stop_refusing(&runtime, &mut receiver);

        runtime.block_on(receiver.restart())?;
        assert_eq!(receiver.transport(), Transport::Grpc);
        let second = export_trace(grpc_exporter(&runtime, &receiver.endpoint())?)?;
        check_trace(&runtime, &receiver, &first)?;
        check_trace(&runtime, &receiver, &second)?;
        assert_eq!(receiver.requests(), 4);
        assert_eq!(receiver.rejections(), Vec::<String>::new());
        Ok(())
    }

    /// Calls `path` on the gRPC receiver at `endpoint` with `message` (protobuf bytes) as a
    /// raw gRPC request, and returns the status it answered with.
    async fn raw_grpc_call(endpoint: &str, path: &str, message: &[u8]) -> anyhow::Result<String> {
        let mut channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())?
            .connect()
            .await?;
        // One uncompressed length-prefixed message.
        let mut frame = vec![0];
        frame.extend_from_slice(&u32::try_from(message.len())?.to_be_bytes());
        frame.extend_from_slice(message);
        let request = tonic::codegen::http::Request::post(format!("{endpoint}{path}"))
            .header(CONTENT_TYPE, "application/grpc")
            .header("te", "trailers")
            .body(tonic::body::Body::new(axum::body::Body::from(frame)))?;
        std::future::poll_fn(|cx| Service::poll_ready(&mut channel, cx)).await?;
        let response = Service::call(&mut channel, request).await?;
        let status = tonic::Status::from_header_map(response.headers())
            .context("no status in the answer's headers")?;
        Ok(format!("{:?}", status.code()))
    }

    #[tokio::test]
    async fn records_each_grpc_call_it_refuses_with_its_status() -> anyhow::Result<()> {
        const SERVICE: &str = "/opentelemetry.proto.collector.trace.v1.TraceService";
        let receiver = OtlpReceiver::start_grpc().await?;
        let endpoint = receiver.endpoint();
        let unknown = raw_grpc_call(&endpoint, &format!("{SERVICE}/Missing"), &[]).await?;
        // Field 1, length-delimited, 5 bytes long, of which 1 follows.
        let truncated =
            raw_grpc_call(&endpoint, &format!("{SERVICE}/Export"), &[0x0a, 5, 1]).await?;
        assert_eq!(
            (unknown.as_str(), truncated.as_str()),
            ("Unimplemented", "Internal")
        );

        let rejections = receiver.rejections();
        assert_eq!(rejections.len(), 2, "{rejections:?}");
        assert!(
            rejections[0].starts_with(&format!("{SERVICE}/Missing: Unimplemented")),
            "{rejections:?}"
        );
        assert!(
            rejections[1].starts_with(&format!("{SERVICE}/Export: Internal")),
            "{rejections:?}"
        );
        assert_eq!(receiver.requests(), 0);
        assert_eq!(receiver.spans(), Vec::new());
        Ok(())
    }
}
