//! The hub: one Redis subscription per channel or pattern that some browser watches, shared
//! by all of them, and a broadcast ring per subscription that every watching client reads
//! at its own pace.
//!
//! The gateway has a subscriber connection of its own (the plugins' routing never waits on a
//! browser, nor a browser on a plugin). Messages arriving on it are rendered to JSON once and
//! put in the subscription's ring without waiting: a client that falls more than
//! `client_buffer` messages behind loses the oldest ones it had not read (counted, and told
//! how many), and nobody else notices.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use arc_swap::ArcSwap;
use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use redis::aio::ConnectionManager;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::{Mutex, broadcast};

use super::GatewayStats;
use crate::router::glob::Glob;
use crate::source::Subscription;
use crate::source::embedded::EmbeddedBroker;

/// One message on its way to browsers: the JSON object both protocols send,
/// `{"type":"message","channel":…,"pattern":…,"payload":…}`, rendered once and shared by
/// every client's frame (cloning it copies no bytes).
pub type Event = Utf8Bytes;

/// Where messages for browsers come from and browsers' messages go.
#[derive(Clone)]
pub enum Backend {
    /// A Redis connection of the gateway's own (RESP3, resubscribing by itself after a loss).
    Redis(ConnectionManager),
    /// The in-process broker.
    Embedded(Arc<EmbeddedBroker>),
}

/// The subscriptions in force, read on every message without a lock.
#[derive(Default)]
struct Routes {
    channels: HashMap<Bytes, broadcast::Sender<Event>>,
    patterns: Vec<(Bytes, Glob, broadcast::Sender<Event>)>,
}

/// Hands each message to the ring of the subscription that delivered it.
#[derive(Default)]
pub struct Dispatcher {
    routes: ArcSwap<Routes>,
    stats: Arc<GatewayStats>,
}

impl Dispatcher {
    /// A dispatcher counting into `stats`.
    pub fn new(stats: Arc<GatewayStats>) -> Arc<Self> {
        Arc::new(Self {
            routes: ArcSwap::default(),
            stats,
        })
    }

    /// A `message`/`pmessage` push from the gateway's Redis connection.
    pub fn push(&self, push: PushInfo) {
        let mut data = push.data.into_iter().map(|value| match value {
            Value::BulkString(bytes) => Some(Bytes::from(bytes)),
            Value::SimpleString(text) => Some(Bytes::from(text)),
            _ => None,
        });
        let pattern = match push.kind {
            PushKind::Message => None,
            PushKind::PMessage => data.next().flatten(),
            _ => return,
        };
        let (Some(Some(channel)), Some(Some(payload))) = (data.next(), data.next()) else {
            return;
        };
        let routes = self.routes.load();
        let sender = match &pattern {
            None => routes.channels.get(&channel),
            Some(pattern) => routes
                .patterns
                .iter()
                .find(|(p, _, _)| p == pattern)
                .map(|(_, _, sender)| sender),
        };
        if let Some(sender) = sender {
            self.send(sender, &channel, pattern.as_deref(), &payload);
        }
    }

    /// A message published on the in-process broker: every subscription it matches.
    pub fn published(&self, channel: &[u8], payload: &[u8]) {
        let routes = self.routes.load();
        if let Some(sender) = routes.channels.get(channel) {
            self.send(sender, channel, None, payload);
        }
        for (pattern, glob, sender) in &routes.patterns {
            if glob.matches(channel) {
                self.send(sender, channel, Some(pattern), payload);
            }
        }
    }

    fn send(
        &self,
        sender: &broadcast::Sender<Event>,
        channel: &[u8],
        pattern: Option<&[u8]>,
        payload: &[u8],
    ) {
        let receivers = sender.send(render(channel, pattern, payload)).unwrap_or(0);
        self.stats
            .messages_out
            .fetch_add(receivers as u64, Ordering::Relaxed);
    }
}

/// `{"type":"message","channel":…,"pattern":…,"payload":…}`, with `payload_base64` as well
/// when the payload is not UTF-8.
fn render(channel: &[u8], pattern: Option<&[u8]>, payload: &[u8]) -> Event {
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    let mut message = serde_json::json!({
        "type": "message",
        "channel": text(channel),
        "pattern": pattern.map(text),
        "payload": text(payload),
    });
    if std::str::from_utf8(payload).is_err() {
        use base64::Engine as _;
        message["payload_base64"] = base64::engine::general_purpose::STANDARD
            .encode(payload)
            .into();
    }
    Utf8Bytes::from(message.to_string())
}

struct Topic {
    sender: broadcast::Sender<Event>,
    clients: usize,
}

/// The gateway's subscriptions, counted by the clients that want them.
pub struct Hub {
    topics: Mutex<HashMap<Subscription, Topic>>,
    dispatcher: Arc<Dispatcher>,
    backend: Backend,
    capacity: usize,
}

impl Hub {
    /// A hub on `backend` whose rings hold `capacity` messages per subscription.
    pub fn new(backend: Backend, dispatcher: Arc<Dispatcher>, capacity: usize) -> Self {
        Self {
            topics: Mutex::new(HashMap::new()),
            dispatcher,
            backend,
            capacity: capacity.max(1),
        }
    }

    /// Starts receiving `subscription` for one more client; subscribes on Redis if it is
    /// the first.
    pub async fn join(
        &self,
        subscription: &Subscription,
    ) -> anyhow::Result<broadcast::Receiver<Event>> {
        let mut topics = self.topics.lock().await;
        if let Some(topic) = topics.get_mut(subscription) {
            topic.clients += 1;
            return Ok(topic.sender.subscribe());
        }
        let (sender, receiver) = broadcast::channel(self.capacity);
        topics.insert(subscription.clone(), Topic { sender, clients: 1 });
        self.publish_routes(&topics);
        if let Err(e) = self.subscribe(subscription, true).await {
            topics.remove(subscription);
            self.publish_routes(&topics);
            return Err(e);
        }
        self.dispatcher
            .stats
            .subscriptions
            .store(topics.len() as u64, Ordering::Relaxed);
        Ok(receiver)
    }

    /// One client less for `subscription`; unsubscribes on Redis after the last.
    pub async fn leave(&self, subscription: &Subscription) {
        let mut topics = self.topics.lock().await;
        let Some(topic) = topics.get_mut(subscription) else {
            return;
        };
        topic.clients -= 1;
        if topic.clients > 0 {
            return;
        }
        topics.remove(subscription);
        self.publish_routes(&topics);
        if let Err(e) = self.subscribe(subscription, false).await {
            tracing::warn!("gateway: cannot unsubscribe {subscription}: {e}");
        }
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

    fn publish_routes(&self, topics: &HashMap<Subscription, Topic>) {
        let mut routes = Routes::default();
        for (subscription, topic) in topics {
            match subscription {
                Subscription::Pattern(pattern) => routes.patterns.push((
                    pattern.clone(),
                    Glob::new(pattern.to_vec()),
                    topic.sender.clone(),
                )),
                other => {
                    routes
                        .channels
                        .insert(other.name().clone(), topic.sender.clone());
                }
            }
        }
        self.dispatcher.routes.store(Arc::new(routes));
    }

    async fn subscribe(&self, subscription: &Subscription, on: bool) -> anyhow::Result<()> {
        let Backend::Redis(connection) = &self.backend else {
            return Ok(());
        };
        let mut connection = connection.clone();
        let name = subscription.name().as_ref();
        match (subscription, on) {
            (Subscription::Pattern(_), true) => connection.psubscribe(name).await?,
            (Subscription::Pattern(_), false) => connection.punsubscribe(name).await?,
            (_, true) => connection.subscribe(name).await?,
            (_, false) => connection.unsubscribe(name).await?,
        }
        Ok(())
    }
}
