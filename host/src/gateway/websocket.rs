//! `GET /ws`: one browser's WebSocket session. It subscribes what the connection asked for,
//! takes further `subscribe`/`unsubscribe`/`publish` requests as JSON frames, and sends
//! messages from its rings, closing with a code that says why when the token expires, the
//! client is refused too often, or a frame is over the limit.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Extension;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures::{SinkExt as _, StreamExt as _};
use tokio_stream::StreamMap;

use super::auth::Access;
use super::ring::Lagged;
use super::serve::Ticket;
use super::{
    CLOSE_EXPIRED, CLOSE_GOING_AWAY, CLOSE_POLICY, CLOSE_TOO_BIG, EXPIRY_CHECK, MAX_REFUSALS,
    Messages, Params, READ_BUFFER, Shared, Slot, subscription_of, too_many_subscriptions,
};
use crate::config::SlowClients;
use crate::message::{Subscription, is_reserved};
use crate::rate::TokenBucket;

/// `GET /ws`: the requested channels, further (un)subscriptions and publishing.
pub(super) async fn websocket(
    State(shared): State<Arc<Shared>>,
    Extension(ticket): Extension<Arc<Ticket>>,
    headers: HeaderMap,
    Query(params): Params,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    // Token, origin and channels first: a plain GET learns why it would be refused.
    let (access, subscriptions) = match shared.admit(&headers, &params) {
        Ok(admitted) => admitted,
        Err(refusal) => return refusal.into_response(),
    };
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection.into_response(),
    };
    let mut slot = match shared.connect(&ticket, |s| &s.ws_connections) {
        Ok(slot) => slot,
        Err(refusal) => return refusal.into_response(),
    };
    // Subscribed before the socket opens: a client that sees it open misses nothing.
    let streams = match slot.join_all(&subscriptions).await {
        Ok(streams) => streams,
        Err(refusal) => return refusal.into_response(),
    };
    // A frame whose header announces more than the limit fails the read before any of its
    // payload is buffered, as does a message whose fragments add up to more; either is
    // answered with 1009 (see `over_hard_limit`).
    let limit = shared.config.max_message_bytes;
    upgrade
        .max_frame_size(limit)
        .max_message_size(limit)
        // Browsers send little: a small read buffer saves clearing 128 KiB on every read,
        // which was most of the fan-out's CPU.
        .read_buffer_size(READ_BUFFER)
        .on_upgrade(move |socket| async move {
            let session = Session {
                bucket: TokenBucket::new(
                    shared.config.max_messages_per_sec,
                    shared.config.max_messages_per_sec * 2.0,
                ),
                shared,
                access,
                slot,
                streams,
                refusals: 0,
            };
            session.run(socket).await;
        })
}

/// A request a WebSocket client sends.
#[derive(serde::Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Request {
    Publish {
        channel: String,
        payload: String,
        #[serde(default)]
        id: Option<serde_json::Value>,
    },
    Subscribe {
        channel: String,
        #[serde(default)]
        id: Option<serde_json::Value>,
    },
    Unsubscribe {
        channel: String,
        #[serde(default)]
        id: Option<serde_json::Value>,
    },
}

/// How a client frame ended up.
enum Answer {
    Ok(Option<serde_json::Value>),
    Refused(String, Option<serde_json::Value>),
}

struct Session {
    shared: Arc<Shared>,
    access: Access,
    slot: Slot,
    streams: StreamMap<Subscription, Messages>,
    bucket: TokenBucket,
    refusals: u32,
}

impl Session {
    async fn run(mut self, socket: WebSocket) {
        let (mut sink, mut incoming) = socket.split();
        let mut expiry = tokio::time::interval(EXPIRY_CHECK);
        let stats = self.shared.stats.clone();
        loop {
            let outgoing = tokio::select! {
                () = self.shared.shutdown.cancelled() => close(CLOSE_GOING_AWAY, "the host is stopping"),
                Some((_, item)) = self.streams.next(), if !self.streams.is_empty() => match item {
                    Ok(event) => Message::Text(event),
                    Err(Lagged(missed)) => {
                        stats.dropped.fetch_add(missed, Ordering::Relaxed);
                        if self.shared.config.slow_clients == SlowClients::Disconnect {
                            stats.slow_disconnects.fetch_add(1, Ordering::Relaxed);
                            close(CLOSE_POLICY, "too slow")
                        } else {
                            text(serde_json::json!({ "type": "dropped", "dropped": missed }))
                        }
                    }
                },
                frame = incoming.next() => match frame {
                    Some(Ok(Message::Text(frame))) => self.answer(frame.as_bytes()).await,
                    Some(Ok(Message::Binary(frame))) => self.answer(&frame).await,
                    Some(Ok(Message::Close(_))) | None => break,
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        tracing::debug!(subject = %self.access.subject, "gateway: websocket read failed: {e}");
                        if !over_hard_limit(&e) {
                            // The client went away without a close, or broke the protocol.
                            break;
                        }
                        stats.denied_size.fetch_add(1, Ordering::Relaxed);
                        close(CLOSE_TOO_BIG, "message too big")
                    }
                },
                _ = expiry.tick() => {
                    if self.access.expired() {
                        close(CLOSE_EXPIRED, "token expired")
                    } else {
                        continue;
                    }
                }
            };
            let closing = matches!(outgoing, Message::Close(_));
            if sink.send(outgoing).await.is_err() || closing {
                break;
            }
        }
        // Dropping the slot leaves every subscription, in one batch.
    }

    /// Carries out one client frame; the frame to send back.
    async fn answer(&mut self, frame: &[u8]) -> Message {
        let stats = self.shared.stats.clone();
        if frame.len() > self.shared.config.max_message_bytes {
            stats.denied_size.fetch_add(1, Ordering::Relaxed);
            return close(CLOSE_TOO_BIG, "message too big");
        }
        if self.access.expired() {
            return close(CLOSE_EXPIRED, "token expired");
        }
        let answer = if self.bucket.admit() {
            self.carry_out(frame).await
        } else {
            stats.denied_rate.fetch_add(1, Ordering::Relaxed);
            // The client may match the refusal to its request by id.
            let id = serde_json::from_slice::<serde_json::Value>(frame)
                .ok()
                .and_then(|request| request.get("id").cloned());
            Answer::Refused("rate limit".to_owned(), id)
        };
        match answer {
            Answer::Ok(id) => {
                self.refusals = 0;
                text(serde_json::json!({ "type": "ok", "request": id }))
            }
            Answer::Refused(error, id) => {
                self.refusals += 1;
                if self.refusals >= MAX_REFUSALS {
                    return close(CLOSE_POLICY, "too many refused requests");
                }
                text(serde_json::json!({ "type": "error", "error": error, "request": id }))
            }
        }
    }

    async fn carry_out(&mut self, frame: &[u8]) -> Answer {
        let stats = self.shared.stats.clone();
        let request: Request = match serde_json::from_slice(frame) {
            Ok(request) => request,
            Err(e) => return Answer::Refused(format!("not a request: {e}"), None),
        };
        match request {
            Request::Publish {
                channel,
                payload,
                id,
            } => {
                if !self.access.may_write(&channel) || is_reserved(channel.as_bytes()) {
                    stats.denied_channel.fetch_add(1, Ordering::Relaxed);
                    return Answer::Refused(format!("not allowed to publish on {channel}"), id);
                }
                match self.shared.hub.publish(&channel, &payload).await {
                    Ok(_) => {
                        stats.messages_in.fetch_add(1, Ordering::Relaxed);
                        Answer::Ok(id)
                    }
                    Err(e) => Answer::Refused(format!("publish failed: {e}"), id),
                }
            }
            Request::Subscribe { channel, id } => {
                let subscription = match subscription_of(&channel) {
                    Ok(subscription) => subscription,
                    Err(why) => return Answer::Refused(why, id),
                };
                if !self.access.may_read(&subscription) {
                    stats.denied_channel.fetch_add(1, Ordering::Relaxed);
                    return Answer::Refused(format!("not allowed to read {channel}"), id);
                }
                if self.streams.contains_key(&subscription) {
                    return Answer::Ok(id);
                }
                let most = self.shared.config.max_subscriptions_per_connection;
                if self.streams.len() >= most {
                    stats.denied_subscriptions.fetch_add(1, Ordering::Relaxed);
                    return Answer::Refused(too_many_subscriptions(most), id);
                }
                match self.slot.join(std::slice::from_ref(&subscription)).await {
                    Ok(joined) => {
                        self.streams.extend(joined);
                        Answer::Ok(id)
                    }
                    Err(e) => Answer::Refused(e.to_string(), id),
                }
            }
            Request::Unsubscribe { channel, id } => {
                if let Ok(subscription) = subscription_of(&channel)
                    && self.streams.remove(&subscription).is_some()
                {
                    self.slot.leave(&subscription).await;
                }
                Answer::Ok(id)
            }
        }
    }
}

/// Whether a WebSocket read failed on a message over the hard limit set on the upgrade.
fn over_hard_limit(error: &axum::Error) -> bool {
    use tokio_tungstenite::tungstenite::error::{CapacityError, Error};
    std::error::Error::source(error)
        .and_then(|inner| inner.downcast_ref::<Error>())
        .is_some_and(|inner| matches!(inner, Error::Capacity(CapacityError::MessageTooLong { .. })))
}

fn text(value: serde_json::Value) -> Message {
    Message::Text(value.to_string().into())
}

fn close(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.to_owned().into(),
    }))
}
