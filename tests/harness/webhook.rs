//! A real HTTP server that records every request, for testing webhook outputs.
//!
//! It answers each request as its [`Answer`] says (status, body, delay before answering),
//! except that the first `failures` requests get 503, and records when each request arrived
//! and how many are being answered at the moment.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Request {
    /// `POST`, `PUT`, ...
    pub method: String,
    /// The path, e.g. `/email`.
    pub path: String,
    /// Request headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Vec<u8>,
    /// When the server received it (before any delay).
    pub arrived: Instant,
}

impl Request {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// How the server answers.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The status of every answer (after the first `failures`).
    pub status: u16,
    /// The body of every answer.
    pub body: String,
    /// How long to wait before answering.
    pub delay: Duration,
    /// How many requests, first of all, get 503 `try again` instead.
    pub failures: usize,
}

impl Default for Answer {
    fn default() -> Self {
        Self {
            status: 200,
            body: "accepted".to_owned(),
            delay: Duration::ZERO,
            failures: 0,
        }
    }
}

struct State {
    requests: Mutex<Vec<Request>>,
    answer: Answer,
    /// Requests still to answer with 503.
    failures: AtomicUsize,
    /// Requests received and not answered yet.
    in_flight: AtomicUsize,
}

/// Counts a request as in flight until it is answered or abandoned.
struct InFlight(Arc<State>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An HTTP server on a free loopback port; stops when dropped.
pub struct Webhook {
    addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Webhook {
    /// Starts a server that answers 200 `accepted` to everything.
    pub async fn start() -> anyhow::Result<Self> {
        Self::answering(Answer::default()).await
    }

    /// Starts a server whose first `failures` requests get 503.
    pub async fn failing_first(failures: usize) -> anyhow::Result<Self> {
        Self::answering(Answer {
            failures,
            ..Answer::default()
        })
        .await
    }

    /// Starts a server that waits `delay` before answering 200 `accepted`.
    pub async fn slow(delay: Duration) -> anyhow::Result<Self> {
        Self::answering(Answer {
            delay,
            ..Answer::default()
        })
        .await
    }

    /// Starts a server that answers as `answer` says.
    pub async fn answering(answer: Answer) -> anyhow::Result<Self> {
        let state = Arc::new(State {
            requests: Mutex::default(),
            failures: AtomicUsize::new(answer.failures),
            answer,
            in_flight: AtomicUsize::new(0),
        });
        let shared = state.clone();
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let state = shared.clone();
                async move {
                    let arrived = Instant::now();
                    state.in_flight.fetch_add(1, Ordering::SeqCst);
                    let _in_flight = InFlight(state.clone());
                    state
                        .requests
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(Request {
                            method: method.to_string(),
                            path: uri.path().to_owned(),
                            headers,
                            body: body.to_vec(),
                            arrived,
                        });
                    let fail = state
                        .failures
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok();
                    if !state.answer.delay.is_zero() {
                        tokio::time::sleep(state.answer.delay).await;
                    }
                    if fail {
                        (StatusCode::SERVICE_UNAVAILABLE, "try again".to_owned())
                    } else {
                        let status = StatusCode::from_u16(state.answer.status)
                            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                        (status, state.answer.body.clone())
                    }
                }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, state, task })
    }

    /// The URL of `path` on this server.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Request> {
        self.state
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Requests received and not answered (nor abandoned by the client) yet.
    pub fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` requests arrived and returns them all.
    pub async fn wait_for(&self, n: usize, within: Duration) -> anyhow::Result<Vec<Request>> {
        crate::eventually(within, || async {
            let requests = self.requests();
            if requests.len() >= n {
                Ok(requests)
            } else {
                bail!("{} of {n} requests arrived: {requests:?}", requests.len())
            }
        })
        .await
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        self.task.abort();
    }
}
