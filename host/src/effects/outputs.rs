//! Named outputs: where `call-output(NAME, payload)` sends a payload.
//!
//! Outputs are built once from the configuration (`[outputs.NAME]`) and shared by every
//! plugin. Each call runs on the host's async runtime and is bounded by the calling plugin's
//! remaining deadline, less a reserve the plugin keeps to act on the outcome (see
//! [`output_budget`](crate::config::output_budget)), so a slow webhook costs that plugin its deadline and nothing else, and
//! the plugin still learns why (a timeout, as an error value) instead of being stopped by its
//! deadline.
//!
//! - `http`: POST or PUT with the configured headers. A connection error, a timed-out attempt
//!   or a 5xx answer is retried after `backoff_ms`, doubled for each further retry, as often as
//!   `retries` says and as the budget allows (a retry whose backoff would end past the budget
//!   is not started). Any answer is returned to the plugin as it is: 2xx and 4xx at once, a
//!   5xx once no retry is left. Only when no answer came at all (connection errors,
//!   timeouts) is the call an error.
//! - The reply body is read as it arrives and cut at the output's `max_reply_bytes`
//!   (1 MiB by default): the connection is dropped there, so a server that answers with
//!   gigabytes costs the host no more than the cap. Cut replies are counted (`truncated`)
//!   and logged at most once a second per output.
//! - Redirects are not followed: a 3xx answer is returned to the plugin like any other. A
//!   followed redirect would send the payload and the configured headers (tokens in
//!   `X-Api-Key` and the like; reqwest strips only `Authorization` and cookies) wherever the
//!   server points, another host included.
//! - Errors and logs never carry the webhook's URL, which may hold credentials (a token in
//!   the query string, a password in the userinfo).
//! - `file` and `stdout`: one JSON line per call, `{"plugin":..., "payload":...}`, where the
//!   payload is embedded as JSON when it is JSON and as a string otherwise.
//! - `redis`: PUBLISH on a channel of another server; the reply carries the receivers.
//! - `capture` (not configurable; for the demo and `switchyard test`): hands every call to a
//!   channel and answers what it was told to (by default status 0 and an empty body).

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use opentelemetry::KeyValue;

use crate::config::{HttpMethod, OutputConfig, expand_env};
use crate::rate::TokenBucket;
use crate::trace::Under;

/// What an output answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status, or 0.
    pub status: u16,
    /// HTTP body, or the receiver count of a `redis` output, or empty.
    pub body: Vec<u8>,
}

/// One call as a `capture` output records it.
#[derive(Debug, Clone)]
pub struct Captured {
    /// The output's name.
    pub output: String,
    /// The calling plugin.
    pub plugin: String,
    /// The payload.
    pub payload: Bytes,
}

/// Why an output call failed.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// No output of that name is configured.
    #[error("output {0:?} is not defined")]
    Undefined(String),
    /// The output could not be reached or failed.
    #[error("output {name}: {why}")]
    Failed {
        /// The output.
        name: String,
        /// What went wrong, last attempt last.
        why: String,
    },
}

/// Counters of one output.
#[derive(Debug)]
struct Counters {
    calls: AtomicU64,
    errors: AtomicU64,
    /// Replies whose body was cut at `max_reply_bytes`.
    truncated: AtomicU64,
    /// Lets one warning about a cut reply through per second.
    truncation_log: TokenBucket,
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            calls: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            truncated: AtomicU64::new(0),
            truncation_log: TokenBucket::new(1.0, 1.0),
        }
    }
}

/// One output's counters, for `/plugins`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OutputReport {
    /// Its name.
    pub name: String,
    /// Its kind.
    pub kind: &'static str,
    /// Calls made.
    pub calls: u64,
    /// Calls that failed.
    pub errors: u64,
    /// Replies whose body was cut at the output's `max_reply_bytes`.
    pub truncated: u64,
}

/// A webhook, ready to call.
struct Http {
    client: reqwest::Client,
    url: reqwest::Url,
    method: reqwest::Method,
    headers: reqwest::header::HeaderMap,
    timeout: Duration,
    retries: u32,
    backoff: Duration,
    /// The longest reply body kept (`max_reply_bytes`).
    max_reply: usize,
}

enum Kind {
    Http(Box<Http>),
    File(Mutex<std::fs::File>),
    Stdout,
    Redis {
        connection: redis::aio::ConnectionManager,
        channel: String,
    },
    Capture(Arc<Capture>),
}

/// Where `capture` outputs hand their calls, and what they answer.
struct Capture {
    calls: mpsc::UnboundedSender<Captured>,
    /// Answers by output name; outputs not named here answer status 0 and no body.
    replies: Mutex<HashMap<String, Reply>>,
}

impl Capture {
    fn new() -> (Arc<Self>, mpsc::UnboundedReceiver<Captured>) {
        let (calls, rx) = mpsc::unbounded_channel();
        let capture = Self {
            calls,
            replies: Mutex::default(),
        };
        (Arc::new(capture), rx)
    }

    fn take(&self, name: &str, plugin: &str, payload: &[u8]) -> Result<Reply, String> {
        self.calls
            .send(Captured {
                output: name.to_owned(),
                plugin: plugin.to_owned(),
                payload: Bytes::copy_from_slice(payload),
            })
            .map_err(|_| "nobody is capturing any more".to_owned())?;
        let replies = self.replies.lock().unwrap_or_else(|e| e.into_inner());
        Ok(replies.get(name).cloned().unwrap_or(Reply {
            status: 0,
            body: Vec::new(),
        }))
    }
}

impl Kind {
    fn label(&self) -> &'static str {
        match self {
            Kind::Http(_) => "http",
            Kind::File(_) => "file",
            Kind::Stdout => "stdout",
            Kind::Redis { .. } => "redis",
            Kind::Capture(_) => "capture",
        }
    }
}

struct Output {
    kind: Kind,
    counters: Counters,
}

/// Every configured output.
#[derive(Default)]
pub struct Outputs {
    outputs: BTreeMap<String, Output>,
    /// When set, every name not configured is a `capture` output too.
    capture_any: Option<Arc<Capture>>,
}

impl std::fmt::Debug for Outputs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.outputs.keys()).finish()
    }
}

impl Outputs {
    /// Builds the outputs of the configuration: resolves `${VAR}`s, opens files, creates
    /// clients (connections are made on first use).
    pub fn from_config(config: &BTreeMap<String, OutputConfig>) -> anyhow::Result<Self> {
        let mut outputs = BTreeMap::new();
        for (name, output) in config {
            let kind = build(output).map_err(|e| anyhow::anyhow!("outputs.{name}: {e}"))?;
            outputs.insert(
                name.clone(),
                Output {
                    kind,
                    counters: Counters::default(),
                },
            );
        }
        Ok(Self {
            outputs,
            capture_any: None,
        })
    }

    /// Outputs named `names` that hand every call to the returned receiver.
    pub fn capture(names: &[&str]) -> (Self, mpsc::UnboundedReceiver<Captured>) {
        let (capture, rx) = Capture::new();
        let outputs = names
            .iter()
            .map(|name| {
                let output = Output {
                    kind: Kind::Capture(capture.clone()),
                    counters: Counters::default(),
                };
                ((*name).to_owned(), output)
            })
            .collect();
        let outputs = Self {
            outputs,
            capture_any: None,
        };
        (outputs, rx)
    }

    /// An output of every name, each handing its calls to the returned receiver: grants
    /// alone decide what a plugin may call. For running a plugin offline.
    pub fn capture_any() -> (Self, mpsc::UnboundedReceiver<Captured>) {
        let (capture, rx) = Capture::new();
        let outputs = Self {
            outputs: BTreeMap::new(),
            capture_any: Some(capture),
        };
        (outputs, rx)
    }

    /// Makes the `capture` output `name` answer `reply` from now on.
    pub fn set_capture_reply(&self, name: &str, reply: Reply) {
        let capture = match self.outputs.get(name).map(|output| &output.kind) {
            Some(Kind::Capture(capture)) => Some(capture),
            Some(_) => None,
            None => self.capture_any.as_ref(),
        };
        if let Some(capture) = capture {
            let mut replies = capture.replies.lock().unwrap_or_else(|e| e.into_inner());
            replies.insert(name.to_owned(), reply);
        }
    }

    /// Whether an output called `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.capture_any.is_some() || self.outputs.contains_key(name)
    }

    /// Counters of every output.
    pub fn report(&self) -> Vec<OutputReport> {
        self.outputs
            .iter()
            .map(|(name, output)| OutputReport {
                name: name.clone(),
                kind: output.kind.label(),
                calls: output.counters.calls.load(Ordering::Relaxed),
                errors: output.counters.errors.load(Ordering::Relaxed),
                truncated: output.counters.truncated.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Calls output `name` for `plugin`, giving up after `within` (the caller's budget, see
    /// [`output_budget`](crate::config::output_budget)). A reply is returned whatever its status; an `http` reply with a
    /// 5xx status (every retry spent) still counts as an error of the output.
    pub async fn call(
        &self,
        name: &str,
        plugin: &str,
        payload: &[u8],
        within: Duration,
        trace: Option<Under<'_>>,
    ) -> Result<Reply, OutputError> {
        let Some(output) = self.outputs.get(name) else {
            return match &self.capture_any {
                Some(capture) => {
                    capture
                        .take(name, plugin, payload)
                        .map_err(|why| OutputError::Failed {
                            name: name.to_owned(),
                            why,
                        })
                }
                None => Err(OutputError::Undefined(name.to_owned())),
            };
        };
        output.counters.calls.fetch_add(1, Ordering::Relaxed);
        let local = matches!(output.kind, Kind::File(_) | Kind::Stdout | Kind::Capture(_));
        let result = if local {
            // A line written here takes microseconds and waits on nothing remote: it needs no
            // share of the deadline, so a plugin near its end can still write it.
            call(output, name, plugin, payload, within, trace).await
        } else if within.is_zero() {
            Err(no_time_left(within))
        } else {
            // The `http` kind keeps within the budget by itself, attempt by attempt; this
            // bounds the other kinds (a stuck Redis) and is a safety net for all.
            tokio::time::timeout(within, call(output, name, plugin, payload, within, trace))
                .await
                .unwrap_or_else(|_| Err(no_time_left(within)))
        };
        let gave_up = match (&output.kind, &result) {
            (_, Err(_)) => true,
            (Kind::Http(_), Ok(reply)) => reply.status >= 500,
            (_, Ok(_)) => false,
        };
        if gave_up {
            output.counters.errors.fetch_add(1, Ordering::Relaxed);
        }
        result.map_err(|why| OutputError::Failed {
            name: name.to_owned(),
            why,
        })
    }
}

/// Why a call ran out of its budget.
fn no_time_left(budget: Duration) -> String {
    format!(
        "timed out: no answer within the {} ms the plugin's deadline leaves for outputs",
        budget.as_millis()
    )
}

fn build(config: &OutputConfig) -> Result<Kind, String> {
    Ok(match config {
        OutputConfig::Http {
            url,
            method,
            headers,
            timeout_ms,
            retries,
            backoff_ms,
            max_reply_bytes,
        } => {
            let url = reqwest::Url::parse(&expand_env(url)?).map_err(|e| e.to_string())?;
            let mut header_map = reqwest::header::HeaderMap::new();
            for (header, value) in headers {
                let name = reqwest::header::HeaderName::from_bytes(header.as_bytes())
                    .map_err(|e| format!("headers.{header}: {e}"))?;
                let value = reqwest::header::HeaderValue::from_str(&expand_env(value)?)
                    .map_err(|e| format!("headers.{header}: {e}"))?;
                header_map.insert(name, value);
            }
            let client = reqwest::Client::builder()
                .connect_timeout(Duration::from_millis(*timeout_ms))
                // See the module doc: a redirect could carry the headers to another host.
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .map_err(|e| e.to_string())?;
            Kind::Http(Box::new(Http {
                client,
                url,
                method: match method {
                    HttpMethod::Post => reqwest::Method::POST,
                    HttpMethod::Put => reqwest::Method::PUT,
                },
                headers: header_map,
                timeout: Duration::from_millis(*timeout_ms),
                retries: *retries,
                backoff: Duration::from_millis(*backoff_ms),
                max_reply: usize::try_from(*max_reply_bytes).unwrap_or(usize::MAX),
            }))
        }
        OutputConfig::File { path } => {
            let path = expand_env(path)?;
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| format!("cannot open {path}: {e}"))?;
            Kind::File(Mutex::new(file))
        }
        OutputConfig::Stdout {} => Kind::Stdout,
        OutputConfig::Redis { url, channel } => {
            let client =
                redis::Client::open(expand_env(url)?.as_str()).map_err(|e| e.to_string())?;
            let connection = redis::aio::ConnectionManager::new_lazy_with_config(
                client,
                redis::aio::ConnectionManagerConfig::new().set_number_of_retries(1),
            )
            .map_err(|e| e.to_string())?;
            Kind::Redis {
                connection,
                channel: expand_env(channel)?,
            }
        }
    })
}

async fn call(
    output: &Output,
    name: &str,
    plugin: &str,
    payload: &[u8],
    within: Duration,
    trace: Option<Under<'_>>,
) -> Result<Reply, String> {
    match &output.kind {
        Kind::Http(http) => call_http(http, &output.counters, name, payload, within, trace).await,
        Kind::File(file) => {
            let line = json_line(plugin, payload);
            let mut file = file.lock().unwrap_or_else(|e| e.into_inner());
            file.write_all(line.as_bytes())
                .map_err(|e| format!("cannot append: {e}"))?;
            Ok(Reply {
                status: 0,
                body: Vec::new(),
            })
        }
        Kind::Stdout => {
            let line = json_line(plugin, payload);
            std::io::stdout()
                .lock()
                .write_all(line.as_bytes())
                .map_err(|e| format!("cannot write to stdout: {e}"))?;
            Ok(Reply {
                status: 0,
                body: Vec::new(),
            })
        }
        Kind::Redis {
            connection,
            channel,
        } => {
            let mut connection = connection.clone();
            let receivers: u32 = redis::cmd("PUBLISH")
                .arg(channel)
                .arg(payload)
                .query_async(&mut connection)
                .await
                .map_err(|e| format!("PUBLISH failed: {e}"))?;
            Ok(Reply {
                status: 0,
                body: receivers.to_string().into_bytes(),
            })
        }
        Kind::Capture(capture) => capture.take(name, plugin, payload),
    }
}

/// Why one webhook attempt got no answer.
enum NoAnswer {
    /// Worth another attempt (a connection error, the output's timeout).
    Retry(String),
    /// Not: the budget ran out, or the answer could not be read.
    GiveUp(String),
}

/// How one webhook attempt ended, when it is worth another.
enum Retryable {
    /// A 5xx answer, kept: it is returned if no retry follows.
    Answer(Reply),
    /// No answer: a connection error or a timeout.
    Failure(String),
}

/// Calls a webhook: attempts, retries and backoffs all end within `within`. Under a traced
/// call (`trace`), each attempt is an HTTP client span, whose context goes with the request
/// as its `traceparent` and `tracestate` headers.
async fn call_http(
    http: &Http,
    counters: &Counters,
    name: &str,
    payload: &[u8],
    within: Duration,
    trace: Option<Under<'_>>,
) -> Result<Reply, String> {
    let Http {
        client,
        url,
        method,
        headers,
        timeout,
        retries,
        backoff,
        max_reply,
    } = http;
    let end = tokio::time::Instant::now() + within;
    let mut wait = *backoff;
    let mut attempt: u32 = 0;
    loop {
        let left = end.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return Err(no_time_left(within));
        }
        // The configured timeout, unless the budget ends first; the error says which.
        let (limit, cut_by_budget) = if left < *timeout {
            (left, true)
        } else {
            (*timeout, false)
        };
        let span = trace.and_then(|under| attempt_span(under, method, url, attempt));
        let carrier = span
            .as_ref()
            .or(trace.map(|under| under.cx))
            .map(crate::trace::carrier_of)
            .unwrap_or_default();
        let mut request = client
            .request(method.clone(), url.clone())
            .headers(headers.clone());
        for (name, value) in &carrier {
            request = request.header(name.as_str(), value.as_str());
        }
        let sent = request.timeout(limit).body(payload.to_vec()).send().await;
        let answered = match sent {
            Ok(response) => {
                let status = response.status().as_u16();
                match read_body(response, *max_reply).await {
                    Ok((body, cut)) => {
                        if cut {
                            counters.truncated.fetch_add(1, Ordering::Relaxed);
                            if counters.truncation_log.admit() {
                                tracing::warn!(
                                    output = name,
                                    status,
                                    max_reply_bytes = *max_reply,
                                    "webhook reply cut at max_reply_bytes; the rest was not read"
                                );
                            }
                        }
                        Ok(Reply { status, body })
                    }
                    Err(e) => Err(NoAnswer::GiveUp(format!(
                        "reading the answer failed: {}",
                        describe(e, url)
                    ))),
                }
            }
            Err(e) if e.is_timeout() && cut_by_budget => {
                Err(NoAnswer::GiveUp(no_time_left(within)))
            }
            Err(e) if e.is_timeout() => Err(NoAnswer::Retry(format!(
                "timed out: no answer within timeout_ms ({} ms)",
                timeout.as_millis()
            ))),
            Err(e) => Err(NoAnswer::Retry(format!(
                "request failed: {}",
                describe(e, url)
            ))),
        };
        if let Some(span) = span {
            end_attempt(&span, &answered);
        }
        let outcome = match answered {
            Ok(reply) if reply.status < 500 => return Ok(reply),
            Ok(reply) => Retryable::Answer(reply),
            Err(NoAnswer::GiveUp(why)) => return Err(why),
            Err(NoAnswer::Retry(why)) => Retryable::Failure(why),
        };
        let attempts = attempt + 1;
        let out_of_time = tokio::time::Instant::now() + wait >= end;
        if attempt >= *retries || out_of_time {
            return match outcome {
                Retryable::Answer(reply) => Ok(reply),
                Retryable::Failure(why) if attempt < *retries => Err(format!(
                    "{why} (after {attempts} of {} attempts: no time left for another within the plugin's deadline)",
                    retries + 1
                )),
                Retryable::Failure(why) if attempts == 1 => Err(format!("{why} (after 1 attempt)")),
                Retryable::Failure(why) => Err(format!("{why} (after {attempts} attempts)")),
            };
        }
        attempt += 1;
        let reason = match &outcome {
            Retryable::Answer(reply) => format!("HTTP status {}", reply.status),
            Retryable::Failure(why) => why.clone(),
        };
        tracing::debug!(
            output = name,
            attempt,
            ?wait,
            "retrying webhook after {reason}"
        );
        tokio::time::sleep(wait).await;
        wait = wait.saturating_mul(2);
    }
}

/// The client span of webhook attempt `attempt` (0 for the first) under `under`, with the
/// HTTP conventions' attributes. The URL's path and query stay out: they may hold a token.
fn attempt_span(
    under: Under<'_>,
    method: &reqwest::Method,
    url: &reqwest::Url,
    attempt: u32,
) -> Option<opentelemetry::Context> {
    under
        .tracing
        .child(under.cx, opentelemetry::trace::SpanKind::Client, || {
            let mut attributes = vec![
                KeyValue::new("http.request.method", method.as_str().to_owned()),
                KeyValue::new("server.address", url.host_str().unwrap_or("").to_owned()),
                KeyValue::new("url.scheme", url.scheme().to_owned()),
            ];
            if let Some(port) = url.port_or_known_default() {
                attributes.push(KeyValue::new("server.port", i64::from(port)));
            }
            if attempt > 0 {
                attributes.push(KeyValue::new(
                    "http.request.resend_count",
                    i64::from(attempt),
                ));
            }
            (method.as_str().to_owned(), attributes)
        })
}

/// Ends an attempt's span: a 5xx answer or no answer is its error.
fn end_attempt(span: &opentelemetry::Context, answered: &Result<Reply, NoAnswer>) {
    match answered {
        Ok(reply) => {
            let status = i64::from(reply.status);
            crate::trace::annotate(
                span,
                vec![KeyValue::new("http.response.status_code", status)],
            );
            if reply.status >= 500 {
                crate::trace::annotate(span, vec![KeyValue::new("error.type", status.to_string())]);
                crate::trace::end(span, Err(&format!("HTTP status {status}")));
            } else {
                crate::trace::end(span, Ok(()));
            }
        }
        Err(NoAnswer::Retry(why) | NoAnswer::GiveUp(why)) => crate::trace::end(span, Err(why)),
    }
}

/// Reads `response`'s body as it arrives, up to `max` bytes; whether it was cut. Once the
/// cap is reached the response is dropped, which closes the connection, so the rest is never
/// read (nor buffered by the client).
async fn read_body(
    mut response: reqwest::Response,
    max: usize,
) -> Result<(Vec<u8>, bool), reqwest::Error> {
    // The announced length is only a hint (a server may lie), and never more than the cap.
    let announced = response
        .content_length()
        .and_then(|length| usize::try_from(length).ok())
        .unwrap_or(0);
    let mut body = Vec::with_capacity(announced.min(max));
    while let Some(chunk) = response.chunk().await? {
        let room = max - body.len();
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            return Ok((body, true));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, false))
}

/// A reqwest error as text without the request's URL (it may carry credentials): the error
/// and its causes, outermost first.
fn describe(error: reqwest::Error, url: &reqwest::Url) -> String {
    let error = error.without_url();
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    // Causes come from other crates; none should quote the URL, but make sure.
    text.replace(url.as_str(), "<url>")
}

/// `{"plugin": ..., "payload": ...}` and a newline; the payload embedded as JSON when it is
/// JSON, as a string otherwise.
fn json_line(plugin: &str, payload: &[u8]) -> String {
    let payload = serde_json::from_slice::<serde_json::Value>(payload).unwrap_or_else(|_| {
        serde_json::Value::String(String::from_utf8_lossy(payload).into_owned())
    });
    let mut line = serde_json::json!({ "plugin": plugin, "payload": payload }).to_string();
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_embed_json_payloads_and_quote_the_rest() {
        assert_eq!(
            json_line("p", br#"{"a":1}"#),
            "{\"payload\":{\"a\":1},\"plugin\":\"p\"}\n"
        );
        assert_eq!(
            json_line("p", b"plain \"text\""),
            "{\"payload\":\"plain \\\"text\\\"\",\"plugin\":\"p\"}\n"
        );
    }

    #[tokio::test]
    async fn webhook_errors_never_carry_the_url() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .unwrap()
            .port();
        let mut config = BTreeMap::new();
        config.insert(
            "hook".to_owned(),
            OutputConfig::Http {
                url: format!("http://user:pw@127.0.0.1:{port}/x?token=s3cret"),
                method: HttpMethod::Post,
                headers: BTreeMap::new(),
                timeout_ms: 1000,
                retries: 0,
                backoff_ms: 1,
                max_reply_bytes: 1 << 20,
            },
        );
        let outputs = Outputs::from_config(&config).unwrap();
        let err = outputs
            .call("hook", "p", b"{}", Duration::from_secs(2), None)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("output hook: request failed: "), "{err}");
        assert!(err.ends_with("(after 1 attempt)"), "{err}");
        for secret in ["s3cret", "pw", &port.to_string()] {
            assert!(!err.contains(secret), "{err}");
        }
    }

    #[tokio::test]
    async fn file_output_appends_one_line_per_call() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let mut config = BTreeMap::new();
        config.insert(
            "audit".to_owned(),
            OutputConfig::File {
                path: path.to_str().unwrap().to_owned(),
            },
        );
        let outputs = Outputs::from_config(&config).unwrap();
        // The second call has no time left: a local write needs none.
        for (payload, within) in [
            (&b"{\"n\":1}"[..], Duration::from_secs(1)),
            (b"two", Duration::ZERO),
        ] {
            outputs
                .call("audit", "p", payload, within, None)
                .await
                .unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(text.contains("\"two\""));
        let err = outputs
            .call("nope", "p", b"", Duration::from_secs(1), None)
            .await
            .unwrap_err();
        assert!(matches!(err, OutputError::Undefined(_)));
        assert_eq!(outputs.report()[0].calls, 2);
    }
}
