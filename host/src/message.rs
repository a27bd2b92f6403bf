//! The words every stage shares: what the host subscribes to, how a message arrived, and the
//! message itself as a source hands it on. The ground floor: it imports no stage.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;

use crate::keyspace::KeySubscription;

/// Channels starting with this prefix belong to the host: they are never routed to plugins
/// and plugins may not publish on them.
pub const RESERVED_PREFIX: &[u8] = b"__switchyard:";

/// Whether `channel` is one of the host's own.
pub fn is_reserved(channel: &[u8]) -> bool {
    channel.starts_with(RESERVED_PREFIX)
}

/// Something the host subscribes to on behalf of plugins.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Subscription {
    /// An exact channel (`SUBSCRIBE`).
    Channel(Bytes),
    /// A Redis glob pattern (`PSUBSCRIBE`).
    Pattern(Bytes),
    /// A sharded channel (`SSUBSCRIBE`), served by the shard owning its slot.
    Sharded(Bytes),
    /// A stream read through a consumer group (`XREADGROUP`), by the readers of `source::streams`.
    Stream(Bytes),
}

impl Subscription {
    /// The channel name, pattern or stream key.
    pub fn name(&self) -> &Bytes {
        match self {
            Subscription::Channel(name)
            | Subscription::Pattern(name)
            | Subscription::Sharded(name)
            | Subscription::Stream(name) => name,
        }
    }

    /// `channel`, `pattern`, `sharded` or `stream`.
    pub fn kind(&self) -> &'static str {
        match self {
            Subscription::Channel(_) => "channel",
            Subscription::Pattern(_) => "pattern",
            Subscription::Sharded(_) => "sharded",
            Subscription::Stream(_) => "stream",
        }
    }
}

impl std::fmt::Display for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}",
            self.kind(),
            String::from_utf8_lossy(self.name())
        )
    }
}

/// What brought a message to a plugin, as the plugin is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Heard {
    /// One of its subscriptions.
    Subscribed(Subscription),
    /// One of its key subscriptions (on the wire, the pattern `__keyspace@DB__:KEYS`).
    Keys(Arc<KeySubscription>),
    /// One of its tracked key prefixes.
    Tracking(Bytes),
}

impl Heard {
    /// The subscription's name: a channel, pattern or stream key, a key pattern, a prefix.
    pub fn name(&self) -> &Bytes {
        match self {
            Heard::Subscribed(subscription) => subscription.name(),
            Heard::Keys(keys) => &keys.keys,
            Heard::Tracking(prefix) => prefix,
        }
    }

    /// The pattern Redis matched, if one did: a pattern subscription's, or a key
    /// subscription's keyspace pattern.
    pub fn wire_pattern(&self) -> Option<Bytes> {
        match self {
            Heard::Subscribed(Subscription::Pattern(pattern)) => Some(pattern.clone()),
            Heard::Keys(keys) => Some(keys.pattern()),
            _ => None,
        }
    }
}

impl From<Subscription> for Heard {
    fn from(subscription: Subscription) -> Self {
        Heard::Subscribed(subscription)
    }
}

impl std::fmt::Display for Heard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Heard::Subscribed(subscription) => subscription.fmt(f),
            Heard::Keys(keys) => write!(f, "keys {}", String::from_utf8_lossy(&keys.keys)),
            Heard::Tracking(prefix) => {
                write!(f, "tracking {}", String::from_utf8_lossy(prefix))
            }
        }
    }
}

/// How a delivery reached the host: through an exact subscription or through a pattern.
/// Redis sends one delivery per matching subscription of the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Via {
    /// The connection's `SUBSCRIBE` to the message's channel.
    Channel,
    /// The connection's `PSUBSCRIBE` to this pattern.
    Pattern(Bytes),
    /// The connection's `SSUBSCRIBE` to the message's channel.
    Sharded,
}

/// One message as a source received it.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// The channel it was published to (bytes: Redis channel names need not be UTF-8).
    pub channel: Bytes,
    /// Which of the connection's subscriptions delivered it.
    pub via: Via,
    /// The payload, untouched.
    pub payload: Bytes,
    /// When the host read it.
    pub received_at: SystemTime,
}

impl Delivery {
    /// A `message`, `pmessage` or `smessage` push of a subscriber connection as a delivery,
    /// taking Redis's buffers as they are; `None` for any other push.
    pub fn from_push(push: redis::PushInfo) -> Option<Delivery> {
        use redis::{PushKind, Value};

        let received_at = SystemTime::now();
        let mut data = push.data.into_iter().map(|value| match value {
            Value::BulkString(bytes) => Some(Bytes::from(bytes)),
            Value::SimpleString(text) => Some(Bytes::from(text)),
            _ => None,
        });
        let via = match push.kind {
            PushKind::Message => Via::Channel,
            PushKind::PMessage => Via::Pattern(data.next()??),
            PushKind::SMessage => Via::Sharded,
            _ => return None,
        };
        let channel = data.next()??;
        let payload = data.next()??;
        Some(Delivery {
            channel,
            via,
            payload,
            received_at,
        })
    }
}
