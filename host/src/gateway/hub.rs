//! The hub: one Redis subscription per channel or pattern that some browser watches, shared
//! by all of them, and a [`Ring`] per subscription that every watching client reads at its
//! own pace.
//!
//! The gateway has a subscriber connection of its own (the plugins' routing never waits on a
//! browser, nor a browser on a plugin). Messages arriving on it are rendered to JSON once and
//! put in the subscription's ring without waiting: a client that falls more than
//! `client_buffer` messages (or `client_buffer_bytes`) behind loses the oldest ones it had not
//! read (counted, and told how many), and nobody else notices. Messages on the host's
//! reserved channels and payloads over `max_payload_bytes` never reach a ring.
//!
//! Joining and leaving change the routing table one entry at a time, and a connection's
//! subscriptions are (un)subscribed on Redis together, a batch per command: a connection
//! that goes away with many subscriptions costs one command per [`SUBSCRIBE_BATCH`], not a
//! table rebuild and a round trip for each.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};

use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use redis::PushInfo;
use redis::aio::ConnectionManager;
use tokio::sync::Mutex;

use super::GatewayStats;
use super::ring::{Budget, Event, Limits, Reader, Ring};
use crate::glob::Glob;
use crate::message::{Delivery, Subscription, Via, is_reserved};
use crate::rate::TokenBucket;
use crate::source::embedded::EmbeddedBroker;

/// Channels or patterns per SUBSCRIBE/UNSUBSCRIBE command, to keep each command (and Redis's
/// reply to it) a reasonable size.
const SUBSCRIBE_BATCH: usize = 1000;

/// Where messages for browsers come from and browsers' messages go.
#[derive(Clone)]
pub enum Backend {
    /// A Redis connection of the gateway's own (RESP3, resubscribing by itself after a loss).
    Redis(ConnectionManager),
    /// The in-process broker.
    Embedded(Arc<EmbeddedBroker>),
}

/// The subscriptions in force, read on every message. Writers (a join or leave) hold the
/// lock for one map insert or removal, never across a wait.
#[derive(Default)]
struct Routes {
    channels: HashMap<Bytes, Arc<Ring>>,
    patterns: HashMap<Bytes, (Glob, Arc<Ring>)>,
}

/// Hands each message to the ring of the subscription that delivered it.
pub struct Dispatcher {
    routes: RwLock<Routes>,
    stats: Arc<GatewayStats>,
    max_payload: usize,
    /// One warning a second about oversize messages is plenty.
    oversize_gate: TokenBucket,
}

impl Dispatcher {
    /// A dispatcher counting into `stats` that drops payloads over `max_payload` bytes.
    pub fn new(stats: Arc<GatewayStats>, max_payload: usize) -> Arc<Self> {
        Arc::new(Self {
            routes: RwLock::default(),
            stats,
            max_payload,
            oversize_gate: TokenBucket::new(1.0, 1.0),
        })
    }

    fn routes(&self) -> std::sync::RwLockReadGuard<'_, Routes> {
        self.routes.read().unwrap_or_else(|e| e.into_inner())
    }

    fn routes_mut(&self) -> std::sync::RwLockWriteGuard<'_, Routes> {
        self.routes.write().unwrap_or_else(|e| e.into_inner())
    }

    /// A `message`/`pmessage` push from the gateway's Redis connection.
    pub fn push(&self, push: PushInfo) {
        let Some(Delivery {
            channel,
            via,
            payload,
            ..
        }) = Delivery::from_push(push)
        else {
            return;
        };
        let pattern = match via {
            Via::Channel => None,
            Via::Pattern(pattern) => Some(pattern),
            Via::Sharded => return,
        };
        if !self.deliverable(&channel, &payload) {
            return;
        }
        let routes = self.routes();
        let ring = match &pattern {
            None => routes.channels.get(&channel),
            Some(pattern) => routes.patterns.get(pattern).map(|(_, ring)| ring),
        };
        if let Some(ring) = ring {
            self.send(ring, &channel, pattern.as_deref(), &payload);
        }
    }

    /// A message published on the in-process broker: every subscription it matches.
    pub fn published(&self, channel: &[u8], payload: &[u8]) {
        if !self.deliverable(channel, payload) {
            return;
        }
        let routes = self.routes();
        if let Some(ring) = routes.channels.get(channel) {
            self.send(ring, channel, None, payload);
        }
        for (pattern, (glob, ring)) in &routes.patterns {
            if glob.matches(channel) {
                self.send(ring, channel, Some(pattern), payload);
            }
        }
    }

    /// Whether a message may go to browsers at all: never the host's own channels (a `*`
    /// pattern matches them too), never a payload over the limit.
    fn deliverable(&self, channel: &[u8], payload: &[u8]) -> bool {
        if is_reserved(channel) {
            return false;
        }
        if payload.len() > self.max_payload {
            self.stats.oversize.fetch_add(1, Ordering::Relaxed);
            if self.oversize_gate.admit() {
                tracing::warn!(
                    channel = %String::from_utf8_lossy(channel),
                    bytes = payload.len(),
                    limit = self.max_payload,
                    "gateway: not sending browsers a message over gateway.max_payload_bytes"
                );
            }
            return false;
        }
        true
    }

    fn send(&self, ring: &Ring, channel: &[u8], pattern: Option<&[u8]>, payload: &[u8]) {
        let receivers = ring.push(render(channel, pattern, payload));
        self.stats
            .messages_out
            .fetch_add(receivers as u64, Ordering::Relaxed);
    }
}

/// `{"type":"message","channel":…,"pattern":…,"payload":…}`, with `payload_base64` as well
/// when the payload is not UTF-8. Written straight from the borrowed bytes: a large payload
/// is copied once, into the event.
fn render(channel: &[u8], pattern: Option<&[u8]>, payload: &[u8]) -> Event {
    /// The fields in the order a JSON object map would sort them, as earlier versions sent.
    #[derive(serde::Serialize)]
    struct Message<'a> {
        channel: std::borrow::Cow<'a, str>,
        pattern: Option<std::borrow::Cow<'a, str>>,
        payload: std::borrow::Cow<'a, str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        payload_base64: Option<String>,
        r#type: &'static str,
    }
    let payload_base64 = std::str::from_utf8(payload).is_err().then(|| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(payload)
    });
    let message = Message {
        channel: String::from_utf8_lossy(channel),
        pattern: pattern.map(String::from_utf8_lossy),
        payload: String::from_utf8_lossy(payload),
        payload_base64,
        r#type: "message",
    };
    // Serialising strings into a String cannot fail.
    Utf8Bytes::from(serde_json::to_string(&message).unwrap_or_default())
}

/// Why a join failed.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The gateway holds as many Redis subscriptions as it may.
    #[error(
        "the gateway holds its limit of {limit} subscriptions (gateway.max_subscriptions); \
         try again later"
    )]
    Full {
        /// `gateway.max_subscriptions`.
        limit: usize,
    },
    /// Redis refused or did not answer.
    #[error("cannot subscribe: {0}")]
    Redis(#[from] redis::RedisError),
}

struct Topic {
    ring: Arc<Ring>,
    clients: usize,
}

/// How the hub's subscriptions and rings are bounded.
#[derive(Debug, Clone, Copy)]
pub struct HubLimits {
    /// What one subscription's ring may hold.
    pub ring: Limits,
    /// Redis subscriptions the gateway may hold at once.
    pub max_subscriptions: usize,
}

/// The gateway's subscriptions, counted by the clients that want them.
pub struct Hub {
    /// Held across the (un)subscribe command that a change needs, so that a client never
    /// sees its subscription in place before Redis confirmed it.
    topics: Mutex<HashMap<Subscription, Topic>>,
    dispatcher: Arc<Dispatcher>,
    backend: Backend,
    limits: HubLimits,
    budget: Arc<Budget>,
}

impl Hub {
    /// A hub on `backend` within `limits`, whose rings together hold at most `budget`.
    pub fn new(
        backend: Backend,
        dispatcher: Arc<Dispatcher>,
        limits: HubLimits,
        budget: Arc<Budget>,
    ) -> Self {
        Self {
            topics: Mutex::new(HashMap::new()),
            dispatcher,
            backend,
            limits,
            budget,
        }
    }

    /// Starts receiving each of `subscriptions` (distinct) for one more client: a reader
    /// each, in the same order. Subscribes on Redis to those nobody watched yet; all or
    /// nothing.
    pub async fn join(&self, subscriptions: &[Subscription]) -> Result<Vec<Reader>, JoinError> {
        let mut topics = self.topics.lock().await;
        let new: Vec<Subscription> = subscriptions
            .iter()
            .filter(|s| !topics.contains_key(*s))
            .cloned()
            .collect();
        if topics.len() + new.len() > self.limits.max_subscriptions {
            return Err(JoinError::Full {
                limit: self.limits.max_subscriptions,
            });
        }
        {
            let mut routes = self.dispatcher.routes_mut();
            for subscription in &new {
                let ring = Ring::new(self.limits.ring, self.budget.clone());
                route(&mut routes, subscription, Some(&ring));
                topics.insert(subscription.clone(), Topic { ring, clients: 0 });
            }
        }
        if let Err(e) = self.subscribe(&new, true).await {
            let mut routes = self.dispatcher.routes_mut();
            for subscription in &new {
                topics.remove(subscription);
                route(&mut routes, subscription, None);
            }
            return Err(e.into());
        }
        let readers = subscriptions
            .iter()
            .filter_map(|subscription| {
                let topic = topics.get_mut(subscription)?;
                topic.clients += 1;
                Some(topic.ring.reader())
            })
            .collect();
        self.count(&topics);
        Ok(readers)
    }

    /// One client less for each of `subscriptions`; unsubscribes on Redis from those it was
    /// the last one to watch.
    pub async fn leave(&self, subscriptions: &[Subscription]) {
        let mut topics = self.topics.lock().await;
        let mut gone = Vec::new();
        for subscription in subscriptions {
            let Some(topic) = topics.get_mut(subscription) else {
                continue;
            };
            topic.clients -= 1;
            if topic.clients == 0 {
                topics.remove(subscription);
                gone.push(subscription.clone());
            }
        }
        {
            let mut routes = self.dispatcher.routes_mut();
            for subscription in &gone {
                route(&mut routes, subscription, None);
            }
        }
        self.count(&topics);
        if let Err(e) = self.subscribe(&gone, false).await {
            tracing::warn!(
                subscriptions = gone.len(),
                "gateway: cannot unsubscribe: {e}"
            );
        }
    }

    fn count(&self, topics: &HashMap<Subscription, Topic>) {
        self.dispatcher
            .stats
            .subscriptions
            .store(topics.len() as u64, Ordering::Relaxed);
    }

    /// Publishes a browser's message.
    pub async fn publish(&self, channel: &str, payload: &str) -> anyhow::Result<u32> {
        match &self.backend {
            Backend::Redis(connection) => Ok(redis::cmd("PUBLISH")
                .arg(channel)
                .arg(payload)
                .query_async(&mut connection.clone())
                .await?),
            Backend::Embedded(broker) => Ok(broker.publish(
                Bytes::copy_from_slice(channel.as_bytes()),
                Bytes::copy_from_slice(payload.as_bytes()),
            )),
        }
    }

    /// (Un)subscribes `subscriptions` on Redis, channels and patterns each in batches.
    async fn subscribe(&self, subscriptions: &[Subscription], on: bool) -> redis::RedisResult<()> {
        let Backend::Redis(connection) = &self.backend else {
            return Ok(());
        };
        let mut connection = connection.clone();
        let (patterns, channels): (Vec<&Subscription>, Vec<&Subscription>) = subscriptions
            .iter()
            .partition(|s| matches!(s, Subscription::Pattern(_)));
        for batch in channels.chunks(SUBSCRIBE_BATCH) {
            let names: Vec<&[u8]> = batch.iter().map(|s| s.name().as_ref()).collect();
            if on {
                connection.subscribe(names).await?;
            } else {
                connection.unsubscribe(names).await?;
            }
        }
        for batch in patterns.chunks(SUBSCRIBE_BATCH) {
            let names: Vec<&[u8]> = batch.iter().map(|s| s.name().as_ref()).collect();
            if on {
                connection.psubscribe(names).await?;
            } else {
                connection.punsubscribe(names).await?;
            }
        }
        Ok(())
    }
}

/// Puts `subscription`'s ring in the table, or takes it out.
fn route(routes: &mut Routes, subscription: &Subscription, ring: Option<&Arc<Ring>>) {
    let name = subscription.name().clone();
    match (subscription, ring) {
        (Subscription::Pattern(_), Some(ring)) => {
            let glob = Glob::new(name.to_vec());
            routes.patterns.insert(name, (glob, ring.clone()));
        }
        (Subscription::Pattern(_), None) => {
            routes.patterns.remove(&name);
        }
        (_, Some(ring)) => {
            routes.channels.insert(name, ring.clone());
        }
        (_, None) => {
            routes.channels.remove(&name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_renders_as_the_json_both_protocols_send() {
        assert_eq!(
            render(b"news", None, b"hi").as_str(),
            r#"{"channel":"news","pattern":null,"payload":"hi","type":"message"}"#
        );
        assert_eq!(
            render(b"bin", Some(b"b*"), &[0xff, 0x00]).as_str(),
            "{\"channel\":\"bin\",\"pattern\":\"b*\",\"payload\":\"\u{fffd}\\u0000\",\
             \"payload_base64\":\"/wA=\",\"type\":\"message\"}"
        );
    }
}
