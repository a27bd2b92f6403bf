//! Clients of the browser gateway: a WebSocket client speaking its JSON frames, a
//! Server-Sent Events reader, raw sockets for clients that misbehave (idle, forged headers,
//! oversized frames), the gateway's series on the admin `/metrics`, and the process's
//! resident memory for tests that bound it.
//!
//! Every read takes a deadline and fails with what it was waiting for; nothing here sleeps,
//! but the memory sampler, which looks every few milliseconds.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::{PATIENCE, TestHost};

/// The gateway of a [`TestHost`] (configured with `[gateway] listen`).
#[derive(Clone)]
pub struct Gateway {
    addr: SocketAddr,
    http: reqwest::Client,
}

/// A refused WebSocket handshake: the HTTP status and the one-line reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub status: u16,
    pub body: String,
}

impl Gateway {
    /// The gateway `host` serves; panics if it has none.
    pub fn of(host: &TestHost) -> Self {
        Self {
            addr: host
                .host()
                .gateway_addr()
                .expect("the host was configured with [gateway] listen"),
            http: reqwest::Client::new(),
        }
    }

    /// The gateway listening on `addr` (of a [`HostProcess`](crate::process::HostProcess)).
    pub fn at(addr: SocketAddr) -> Self {
        Self {
            addr,
            http: reqwest::Client::new(),
        }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its own origin, as a page it served would send it.
    pub fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://ADDR{path}`
    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `ws://ADDR{path}`
    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// Sends a GET of `path` with `headers`: the response, its status and content type.
    async fn send_get(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<(reqwest::Response, u16, String)> {
        let mut request = self.http.get(self.http_url(path));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = tokio::time::timeout(PATIENCE, request.send())
            .await
            .with_context(|| format!("GET {path}: no answer within {PATIENCE:?}"))??;
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        Ok((response, status, content_type))
    }

    /// A plain GET of `path` with `headers`: (status, content type, body).
    pub async fn get(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<(u16, String, String)> {
        let (response, status, content_type) = self.send_get(path, headers).await?;
        let body = tokio::time::timeout(PATIENCE, response.text())
            .await
            .with_context(|| format!("GET {path}: no complete body within {PATIENCE:?}"))??;
        Ok((status, content_type, body))
    }

    /// Opens a WebSocket on `path` (e.g. `/ws?channel=news&token=T`), without an `Origin`.
    pub async fn ws(&self, path: &str) -> anyhow::Result<Ws> {
        self.ws_from(path, None).await
    }

    /// Opens a WebSocket on `path` as a page from `origin` would (`None`: no `Origin`
    /// header, like a non-browser client).
    pub async fn ws_from(&self, path: &str, origin: Option<&str>) -> anyhow::Result<Ws> {
        match self.handshake(path, origin).await? {
            Ok(stream) => Ok(Ws { stream }),
            Err(refused) => bail!("WebSocket {path} refused: {refused:?}"),
        }
    }

    /// Attempts a WebSocket handshake on `path` that should be refused; the refusal.
    pub async fn ws_refused(&self, path: &str, origin: Option<&str>) -> anyhow::Result<Refused> {
        match self.handshake(path, origin).await? {
            Ok(_) => bail!("the WebSocket handshake on {path} succeeded"),
            Err(refused) => Ok(refused),
        }
    }

    /// Attempts a WebSocket handshake on `path` with `headers` added to (or replacing those
    /// of) the client's request: the socket, or the refusal.
    pub async fn ws_with(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Result<Ws, Refused>> {
        Ok(self
            .handshake_with(path, headers)
            .await?
            .map(|stream| Ws { stream }))
    }

    async fn handshake(
        &self,
        path: &str,
        origin: Option<&str>,
    ) -> anyhow::Result<Result<WebSocketStream<MaybeTlsStream<TcpStream>>, Refused>> {
        let origin: Vec<(&str, &str)> = origin.map(|o| ("Origin", o)).into_iter().collect();
        self.handshake_with(path, &origin).await
    }

    async fn handshake_with(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Result<WebSocketStream<MaybeTlsStream<TcpStream>>, Refused>> {
        let mut request = self.ws_url(path).into_client_request()?;
        for (name, value) in headers {
            request.headers_mut().insert(
                tungstenite::http::HeaderName::from_bytes(name.as_bytes())?,
                HeaderValue::from_str(value)?,
            );
        }
        let connected = tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(request))
            .await
            .with_context(|| format!("WebSocket {path}: no handshake within {PATIENCE:?}"))?;
        match connected {
            Ok((stream, _)) => Ok(Ok(stream)),
            Err(tungstenite::Error::Http(response)) => Ok(Err(Refused {
                status: response.status().as_u16(),
                body: String::from_utf8_lossy(response.body().as_deref().unwrap_or_default())
                    .into_owned(),
            })),
            Err(e) => Err(e).with_context(|| format!("WebSocket handshake on {path}")),
        }
    }

    /// Opens a TCP connection to the gateway and sends nothing.
    pub async fn socket(&self) -> anyhow::Result<TcpStream> {
        tokio::time::timeout(PATIENCE, TcpStream::connect(self.addr))
            .await
            .context("connecting to the gateway: no answer")?
            .context("connecting to the gateway")
    }

    /// Sends `GET path` with exactly `headers` (a `Host` among them, or none at all) over a
    /// connection of its own, and reads the answer until the server closes it: (status,
    /// body). For requests a regular client would not send as they are.
    pub async fn raw_get(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<(u16, String)> {
        let mut socket = self.socket().await?;
        let mut request = format!("GET {path} HTTP/1.1\r\nConnection: close\r\n");
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        socket.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        tokio::time::timeout(PATIENCE, socket.read_to_end(&mut response))
            .await
            .with_context(|| {
                format!("GET {path}: the server did not close within {PATIENCE:?}")
            })??;
        let response = String::from_utf8_lossy(&response).into_owned();
        let status = response
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .with_context(|| format!("GET {path}: not an HTTP response: {response:?}"))?;
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
            .unwrap_or_default();
        Ok((status, body))
    }

    /// Opens an SSE stream on `path` with `headers`; fails unless it is answered 200 with
    /// `text/event-stream`.
    pub async fn sse(&self, path: &str, headers: &[(&str, &str)]) -> anyhow::Result<Sse> {
        let (response, status, content_type) = self.send_get(path, headers).await?;
        if status != 200 || !content_type.starts_with("text/event-stream") {
            let body = response.text().await.unwrap_or_default();
            bail!("SSE {path}: {status} {content_type}: {body}");
        }
        Ok(Sse {
            response,
            buffer: Vec::new(),
        })
    }
}

/// How a raw socket ended.
#[derive(Debug)]
pub struct Ended {
    /// What the server sent before it closed (a refusal, say).
    pub received: String,
    /// How long after the call it closed.
    pub after: Duration,
}

/// Reads `socket` until the server closes it (end of stream or reset); fails if it is still
/// open after `within`.
pub async fn until_closed(socket: &mut TcpStream, within: Duration) -> anyhow::Result<Ended> {
    let started = tokio::time::Instant::now();
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let read = tokio::time::timeout_at(started + within, socket.read(&mut buffer))
            .await
            .with_context(|| format!("the socket is still open after {within:?}"))?;
        match read {
            Ok(0) | Err(_) => {
                return Ok(Ended {
                    received: String::from_utf8_lossy(&received).into_owned(),
                    after: started.elapsed(),
                });
            }
            Ok(n) => received.extend_from_slice(&buffer[..n]),
        }
    }
}

/// The header of a masked binary WebSocket frame from a client announcing `len` bytes of
/// payload (with a zero mask, so the payload goes as it is).
pub fn client_frame_header(len: u64) -> Vec<u8> {
    let mut header = vec![0x82, 0x80 | 127];
    header.extend_from_slice(&len.to_be_bytes());
    header.extend_from_slice(&[0, 0, 0, 0]);
    header
}

/// What the server sent next on a WebSocket.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// A text frame, parsed as JSON.
    Json(Value),
    /// A close frame: its code and reason.
    Close(u16, String),
    /// The connection ended without a close frame: how.
    Ended(String),
}

/// A WebSocket client of the gateway.
pub struct Ws {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Ws {
    /// Sends `value` as a text frame.
    pub async fn send(&mut self, value: &Value) -> anyhow::Result<()> {
        self.send_text(value.to_string()).await
    }

    /// Writes `bytes` to the socket under the WebSocket protocol, as they are (a frame made
    /// by hand, or part of one); the error if the server no longer takes them.
    pub async fn write_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let socket = self.stream.get_mut();
        match tokio::time::timeout(PATIENCE, async {
            socket.write_all(bytes).await?;
            socket.flush().await
        })
        .await
        {
            Ok(written) => written,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the server took nothing for 10 s",
            )),
        }
    }

    /// Sends `text` as a text frame, as is.
    pub async fn send_text(&mut self, text: String) -> anyhow::Result<()> {
        tokio::time::timeout(PATIENCE, self.stream.send(Message::text(text)))
            .await
            .context("sending a frame: still blocked")??;
        Ok(())
    }

    /// The next frame (pings and pongs skipped); fails if none comes `within`.
    pub async fn frame(&mut self, within: Duration) -> anyhow::Result<Frame> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let next = tokio::time::timeout_at(deadline, self.stream.next())
                .await
                .with_context(|| format!("no WebSocket frame within {within:?}"))?;
            return Ok(match next {
                Some(Ok(Message::Text(text))) => Frame::Json(
                    serde_json::from_str(text.as_str())
                        .with_context(|| format!("a text frame that is not JSON: {text}"))?,
                ),
                Some(Ok(Message::Close(frame))) => match frame {
                    Some(frame) => Frame::Close(frame.code.into(), frame.reason.to_string()),
                    None => Frame::Close(1005, String::new()),
                },
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Ok(Message::Binary(bytes))) => bail!("unexpected binary frame: {bytes:?}"),
                Some(Err(e)) => Frame::Ended(e.to_string()),
                None => Frame::Ended("end of stream".to_owned()),
            });
        }
    }

    /// The next frame, which must be JSON.
    pub async fn json(&mut self, within: Duration) -> anyhow::Result<Value> {
        match self.frame(within).await? {
            Frame::Json(value) => Ok(value),
            other => bail!("expected a JSON frame, got {other:?}"),
        }
    }

    /// The next frame, which must be a `{"type":"message"}`.
    pub async fn message(&mut self, within: Duration) -> anyhow::Result<Value> {
        let value = self.json(within).await?;
        anyhow::ensure!(
            value["type"] == "message",
            "expected a message, got {value}"
        );
        Ok(value)
    }

    /// Sends `request` and returns the answer to it (`ok` or `error`), skipping messages
    /// that arrive in between (answers come in the order of the requests).
    pub async fn request(&mut self, request: Value) -> anyhow::Result<Value> {
        self.send(&request).await?;
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.frame(left).await? {
                Frame::Json(value) if value["type"] == "ok" || value["type"] == "error" => {
                    return Ok(value);
                }
                Frame::Json(_) => continue,
                other => bail!("no answer to {request}: {other:?}"),
            }
        }
    }

    /// Returns once the gateway has set up the subscriptions the connection asked for in
    /// its URL: it answers requests only after that, so the answer to a harmless one (an
    /// unsubscription from a channel nobody watches) is the signal.
    pub async fn ready(&mut self) -> anyhow::Result<()> {
        let answer = self
            .request(json!({"type": "unsubscribe", "channel": "gateway-test:none", "id": "ready"}))
            .await?;
        anyhow::ensure!(
            answer == json!({"type": "ok", "request": "ready"}),
            "not ready: {answer}"
        );
        Ok(())
    }

    /// Every JSON frame until the connection closes, and how it closed.
    pub async fn until_closed(&mut self, within: Duration) -> anyhow::Result<(Vec<Value>, Frame)> {
        let deadline = tokio::time::Instant::now() + within;
        let mut frames = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self
                .frame(left)
                .await
                .with_context(|| format!("still open after {} frames", frames.len()))?
            {
                Frame::Json(value) => frames.push(value),
                end => return Ok((frames, end)),
            }
        }
    }

    /// Closes the connection with the close handshake, and waits for the server's end.
    pub async fn close(mut self) -> anyhow::Result<()> {
        tokio::time::timeout(PATIENCE, self.stream.close(None))
            .await
            .context("closing: still blocked")??;
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Ok(None | Some(Err(_))) => return Ok(()),
                Ok(Some(Ok(_))) => continue,
                Err(_) => bail!("the server did not end the connection after the close"),
            }
        }
    }
}

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// Its `event:` field (`message` when absent).
    pub event: String,
    /// Its `data:` lines, joined with newlines.
    pub data: String,
}

/// A Server-Sent Events stream.
pub struct Sse {
    response: reqwest::Response,
    buffer: Vec<u8>,
}

impl Sse {
    /// The next event (comments such as keep-alives skipped); fails if none comes `within`
    /// or the stream ends.
    pub async fn event(&mut self, within: Duration) -> anyhow::Result<SseEvent> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            while let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
                if let Some(event) = parse_event(&String::from_utf8_lossy(&block)) {
                    return Ok(event);
                }
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk())
                .await
                .with_context(|| format!("no SSE event within {within:?}"))?
                .context("reading the SSE stream")?;
            match chunk {
                Some(bytes) => self.buffer.extend_from_slice(&bytes),
                None => bail!("the SSE stream ended"),
            }
        }
    }

    /// The next event, which must be a `message`: its data, parsed.
    pub async fn message(&mut self, within: Duration) -> anyhow::Result<Value> {
        let event = self.event(within).await?;
        anyhow::ensure!(event.event == "message", "expected a message: {event:?}");
        serde_json::from_str(&event.data).with_context(|| format!("data of {event:?}"))
    }
}

/// An event from its lines; `None` for a block of comments only.
fn parse_event(block: &str) -> Option<SseEvent> {
    let mut event = None;
    let mut data: Option<String> = None;
    for line in block.lines() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() || line.starts_with(':') {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => event = Some(value.to_owned()),
            "data" => match &mut data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => data = Some(value.to_owned()),
            },
            _ => {}
        }
    }
    if event.is_none() && data.is_none() {
        return None;
    }
    Some(SseEvent {
        event: event.unwrap_or_else(|| "message".to_owned()),
        data: data.unwrap_or_default(),
    })
}

/// The value of `series` (name with its labels, as written, e.g.
/// `switchyard_gateway_denied_total{reason="token"}`) on the host's `/metrics`.
pub async fn metric(host: &TestHost, series: &str) -> anyhow::Result<f64> {
    let (status, body) = host.get("/metrics").await?;
    let text = body.as_str().context("/metrics is text")?;
    anyhow::ensure!(status == 200, "/metrics: {status}");
    metric_value(text, series)
}

/// The value of `series` in the Prometheus text `text`.
pub fn metric_value(text: &str, series: &str) -> anyhow::Result<f64> {
    text.lines()
        .find_map(|line| {
            let value = line.strip_prefix(series)?.strip_prefix(' ')?;
            value.trim().parse().ok()
        })
        .with_context(|| format!("no {series} on /metrics:\n{text}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_read_from_their_fields_and_comments_skipped() {
        assert_eq!(parse_event(": keep-alive\n\n"), None);
        assert_eq!(
            parse_event("event: dropped\ndata: {\"dropped\":3}\n\n"),
            Some(SseEvent {
                event: "dropped".into(),
                data: "{\"dropped\":3}".into()
            })
        );
        assert_eq!(
            parse_event("data:a\ndata: b\n\n"),
            Some(SseEvent {
                event: "message".into(),
                data: "a\nb".into()
            })
        );
    }
}
