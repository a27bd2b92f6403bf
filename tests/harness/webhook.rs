//! A real HTTP server that records every request, for testing webhook outputs.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
}

impl Request {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

#[derive(Default)]
struct State {
    requests: Mutex<Vec<Request>>,
    /// Requests still to answer with 503.
    failures: AtomicUsize,
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
        Self::failing_first(0).await
    }

    /// Starts a server whose first `failures` requests get 503.
    pub async fn failing_first(failures: usize) -> anyhow::Result<Self> {
        let state = Arc::new(State {
            requests: Mutex::default(),
            failures: AtomicUsize::new(failures),
        });
        let shared = state.clone();
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let state = shared.clone();
                async move {
                    state
                        .requests
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(Request {
                            method: method.to_string(),
                            path: uri.path().to_owned(),
                            headers,
                            body: body.to_vec(),
                        });
                    let fail = state
                        .failures
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok();
                    if fail {
                        (StatusCode::SERVICE_UNAVAILABLE, "try again")
                    } else {
                        (StatusCode::OK, "accepted")
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
