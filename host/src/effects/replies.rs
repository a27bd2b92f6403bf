//! Requests and their replies over pub/sub, for handlers whose world has them (wasmCloud's
//! `consumer.request`, answered through a message's `reply-to`).
//!
//! Redis pub/sub carries a channel and a payload, nothing more, so a request says where to
//! answer inside its payload: [`REPLY_MARK`], the reply channel, a newline, then the body
//! unchanged. A handler of such a world gets the body alone and the reply channel as its
//! `reply-to`; other subscribers of the channel see the payload as sent.
//!
//! Reply channels are the host's own (`__switchyard:reply:HOST:N`, under the reserved prefix
//! no grant reaches): a plugin may publish on one only while it handles the message that
//! named it. The host listens to all of its reply channels with one pattern subscription,
//! opened on the first request and opened again on the next one after its connection is lost.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::effects::InProcessBroker;

/// What starts the payload of a request: its reply channel follows, up to a newline.
pub const REPLY_MARK: &[u8] = b"\0switchyard-reply-to:";

/// The longest reply channel read from a payload; a longer one is not a reply channel.
const MAX_REPLY_CHANNEL: usize = 256;

/// The payload of a request whose reply goes to `reply_to`.
pub fn wrap(reply_to: &str, body: &[u8]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(REPLY_MARK.len() + reply_to.len() + 1 + body.len());
    payload.extend_from_slice(REPLY_MARK);
    payload.extend_from_slice(reply_to.as_bytes());
    payload.push(b'\n');
    payload.extend_from_slice(body);
    payload
}

/// Splits a request's payload into its reply channel and its body; any other payload is
/// the body itself, with no reply channel.
pub fn unwrap(payload: Bytes) -> (Option<String>, Bytes) {
    let Some(rest) = payload.strip_prefix(REPLY_MARK) else {
        return (None, payload);
    };
    let Some(end) = rest
        .iter()
        .take(MAX_REPLY_CHANNEL)
        .position(|&b| b == b'\n')
    else {
        return (None, payload);
    };
    let Ok(reply_to) = std::str::from_utf8(&rest[..end]) else {
        return (None, payload);
    };
    let reply_to = reply_to.to_owned();
    let body = payload.slice(REPLY_MARK.len() + end + 1..);
    (Some(reply_to), body)
}

/// Where the replies to this host's requests arrive from.
enum Feed {
    /// A Redis server (any node of a cluster: classic pub/sub reaches every node).
    Redis(Box<redis::Client>),
    /// The embedded broker, whose published messages the host can watch.
    Embedded(Arc<dyn InProcessBroker>),
}

/// The requests of this host's plugins waiting for their replies.
pub struct Replies {
    /// `__switchyard:reply:HOST:`, HOST told apart from other hosts by chance.
    prefix: String,
    next: AtomicU64,
    waiting: Arc<Mutex<HashMap<Bytes, oneshot::Sender<Bytes>>>>,
    feed: Option<Feed>,
    /// The task that reads replies, while its subscription lasts.
    listener: tokio::sync::Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Replies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replies")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// A reply channel and the reply that may come on it. Dropping it stops waiting.
pub struct Awaited {
    channel: Bytes,
    reply: oneshot::Receiver<Bytes>,
    waiting: Arc<Mutex<HashMap<Bytes, oneshot::Sender<Bytes>>>>,
}

impl Awaited {
    /// The channel the reply is to be published on.
    pub fn channel(&self) -> &str {
        std::str::from_utf8(&self.channel).unwrap_or_default()
    }

    /// The reply's payload, if one comes within `within`.
    pub async fn reply(mut self, within: Duration) -> Option<Bytes> {
        tokio::time::timeout(within, &mut self.reply)
            .await
            .ok()?
            .ok()
    }
}

impl Drop for Awaited {
    fn drop(&mut self) {
        lock(&self.waiting).remove(&self.channel);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Hands a message on a reply channel to the request waiting for it; one for no request
/// (late, or another host's) is dropped.
fn deliver(
    waiting: &Mutex<HashMap<Bytes, oneshot::Sender<Bytes>>>,
    channel: &[u8],
    payload: Bytes,
) {
    if let Some(request) = lock(waiting).remove(channel) {
        // The request may have stopped waiting since; then nobody wants the reply.
        let _ = request.send(payload);
    }
}

impl Replies {
    fn with_feed(feed: Option<Feed>) -> Self {
        Self {
            prefix: format!("__switchyard:reply:{:016x}:", rand::random::<u64>()),
            next: AtomicU64::new(0),
            waiting: Arc::default(),
            feed,
            listener: tokio::sync::Mutex::new(None),
        }
    }

    /// Replies from the Redis server of `client`.
    pub fn redis(client: redis::Client) -> Self {
        Self::with_feed(Some(Feed::Redis(Box::new(client))))
    }

    /// Replies from the embedded broker.
    pub fn embedded(broker: Arc<dyn InProcessBroker>) -> Self {
        Self::with_feed(Some(Feed::Embedded(broker)))
    }

    /// No replies: every request fails.
    pub fn none() -> Self {
        Self::with_feed(None)
    }

    /// A new reply channel, listened to before this returns, so that a reply published as
    /// soon as the request is out is not missed.
    pub async fn open(&self) -> Result<Awaited, String> {
        self.listen().await?;
        let channel = Bytes::from(format!(
            "{}{}",
            self.prefix,
            self.next.fetch_add(1, Ordering::Relaxed)
        ));
        let (sender, reply) = oneshot::channel();
        lock(&self.waiting).insert(channel.clone(), sender);
        Ok(Awaited {
            channel,
            reply,
            waiting: self.waiting.clone(),
        })
    }

    /// Starts the listener if it is not running.
    async fn listen(&self) -> Result<(), String> {
        let mut listener = self.listener.lock().await;
        if listener.as_ref().is_some_and(|task| !task.is_finished()) {
            return Ok(());
        }
        let waiting = self.waiting.clone();
        let task = match &self.feed {
            None => return Err("this host has no connection to receive replies on".into()),
            Some(Feed::Redis(client)) => {
                let mut pubsub = client
                    .get_async_pubsub()
                    .await
                    .map_err(|error| format!("cannot listen for replies: {error}"))?;
                pubsub
                    .psubscribe(format!("{}*", self.prefix))
                    .await
                    .map_err(|error| format!("cannot listen for replies: {error}"))?;
                tokio::spawn(async move {
                    let mut messages = pubsub.into_on_message();
                    while let Some(message) = messages.next().await {
                        let payload = Bytes::copy_from_slice(message.get_payload_bytes());
                        deliver(&waiting, message.get_channel_name().as_bytes(), payload);
                    }
                })
            }
            Some(Feed::Embedded(broker)) => {
                let mut published = broker.watch();
                let prefix = Bytes::from(self.prefix.clone());
                tokio::spawn(async move {
                    while let Some((channel, payload)) = published.recv().await {
                        if channel.starts_with(&prefix) {
                            deliver(&waiting, &channel, payload);
                        }
                    }
                })
            }
        };
        *listener = Some(task);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_carries_its_reply_channel_before_the_body_it_leaves_unchanged() {
        let body = b"\0binary\nbody".as_slice();
        let payload = wrap("__switchyard:reply:ab:7", body);
        let (reply_to, unwrapped) = unwrap(Bytes::from(payload));
        assert_eq!(reply_to.as_deref(), Some("__switchyard:reply:ab:7"));
        assert_eq!(&unwrapped[..], body);
    }

    #[test]
    fn other_payloads_are_their_own_body() {
        for payload in [
            b"plain".as_slice(),
            b"",
            REPLY_MARK,
            &[REPLY_MARK, b"no newline"].concat(),
            &[REPLY_MARK, &[0xff, b'\n'], b"body"].concat(),
        ] {
            let (reply_to, body) = unwrap(Bytes::copy_from_slice(payload));
            assert_eq!(reply_to, None);
            assert_eq!(&body[..], payload);
        }
    }
}
