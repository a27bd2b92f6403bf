//! An in-process broker with Redis's pub/sub semantics, for running without Redis
//! (`switchyard demo`, offline plugin runs).
//!
//! It delivers like Redis does: for one publish, a delivery for the exact channel if it is
//! subscribed, then one per matching pattern, using the same glob matcher the router uses
//! (which is itself tested against a real Redis). Publishing and table changes happen under
//! one lock, so a table always changes between two published messages, never within one.
//!
//! It also keeps a small key space (strings only), so that invalidation can be shown without
//! Redis. Like Redis, it publishes no keyspace notifications unless they are turned on
//! ([`EmbeddedBroker::set_keyspace_events`]); then each of its own writes publishes the event
//! on `__keyspace@0__:KEY` (its one database is 0), in the same step as the write: `set` for
//! [`EmbeddedBroker::set`], `del` for each key [`EmbeddedBroker::unlink`] removed. Key
//! subscriptions then work as on Redis, through the same patterns and router.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::SourceStatus;
use crate::PluginName;
use crate::effects::InProcessBroker;
use crate::glob::Glob;
use crate::keyspace::KeySubscription;
use crate::message::{Delivery, Subscription, Via};
use crate::router::{Router, RoutingTable};

/// A message published on the embedded broker, as its taps see it.
#[derive(Debug, Clone)]
pub struct Published {
    /// The plugin that published it, or `None` for messages fed from outside.
    pub from: Option<PluginName>,
    /// The channel.
    pub channel: Bytes,
    /// The payload.
    pub payload: Bytes,
}

/// The in-process broker.
#[derive(Default)]
pub struct EmbeddedBroker {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    router: Option<Arc<Router>>,
    channels: HashSet<Bytes>,
    patterns: Vec<(Bytes, Glob)>,
    sharded: HashSet<Bytes>,
    taps: Vec<mpsc::UnboundedSender<Published>>,
    unlink_taps: Vec<mpsc::UnboundedSender<Vec<String>>>,
    /// A key space, so that invalidation can be shown without Redis.
    keys: HashMap<String, Bytes>,
    /// Whether writes to `keys` publish keyspace notifications.
    keyspace_events: bool,
}

/// The database of the broker's key space, as keyspace channels name it.
const DATABASE: u32 = 0;

impl State {
    /// Delivers one message to the router's subscriptions and the taps; returns the number of
    /// receivers, counting each subscription and each tap, as Redis counts each subscribed
    /// client per match.
    fn publish(&mut self, from: Option<&PluginName>, channel: Bytes, payload: Bytes) -> u32 {
        let mut receivers = 0u32;
        if let Some(router) = self.router.clone() {
            let received_at = SystemTime::now();
            let deliver = |via: Via| {
                router.deliver(Delivery {
                    channel: channel.clone(),
                    via,
                    payload: payload.clone(),
                    received_at,
                })
            };
            if self.sharded.contains(&channel) {
                // The host publishes to sharded channels with SPUBLISH, which only
                // sharded subscribers receive.
                deliver(Via::Sharded);
                receivers += 1;
            } else {
                if self.channels.contains(&channel) {
                    deliver(Via::Channel);
                    receivers += 1;
                }
                for (pattern, glob) in &self.patterns {
                    if glob.matches(&channel) {
                        deliver(Via::Pattern(pattern.clone()));
                        receivers += 1;
                    }
                }
            }
        }
        self.taps.retain(|tap| {
            tap.send(Published {
                from: from.cloned(),
                channel: channel.clone(),
                payload: payload.clone(),
            })
            .is_ok()
        });
        receivers + u32::try_from(self.taps.len()).unwrap_or(u32::MAX)
    }

    /// Publishes `event` on the keyspace channel of `key`, if notifications are on.
    fn notify(&mut self, key: &str, event: &'static str) {
        if !self.keyspace_events {
            return;
        }
        let mut channel = KeySubscription::prefix(DATABASE).into_bytes();
        channel.extend_from_slice(key.as_bytes());
        self.publish(None, channel.into(), Bytes::from_static(event.as_bytes()));
    }
}

impl EmbeddedBroker {
    /// An empty broker.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Makes `router` the subscriber that plugin subscriptions deliver to.
    pub fn attach(&self, router: Arc<Router>) {
        self.lock().router = Some(router);
    }

    /// A receiver of every message published from now on (by plugins or from outside).
    pub fn tap(&self) -> mpsc::UnboundedReceiver<Published> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.lock().taps.push(tx);
        rx
    }

    /// A receiver of the keys of every `unlink` from now on.
    pub fn tap_unlinks(&self) -> mpsc::UnboundedReceiver<Vec<String>> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.lock().unlink_taps.push(tx);
        rx
    }

    /// Publishes from outside the host; returns the number of receivers.
    pub fn publish(&self, channel: impl Into<Bytes>, payload: impl Into<Bytes>) -> u32 {
        self.publish_from(None, channel.into(), payload.into())
    }

    /// Publishes on behalf of `from`; returns the number of receivers, counting each
    /// subscription and each tap, as Redis counts each subscribed client per match.
    pub fn publish_from(&self, from: Option<&PluginName>, channel: Bytes, payload: Bytes) -> u32 {
        self.lock().publish(from, channel, payload)
    }

    /// Turns keyspace notifications of the broker's own writes on or off (off at first, as
    /// Redis's `notify-keyspace-events` is empty by default).
    pub fn set_keyspace_events(&self, on: bool) {
        self.lock().keyspace_events = on;
    }

    /// Whether the broker's writes publish keyspace notifications.
    pub fn keyspace_events(&self) -> bool {
        self.lock().keyspace_events
    }

    /// Sets `key` in the broker's key space; with keyspace notifications on, publishes `set`
    /// on `__keyspace@0__:KEY`.
    pub fn set(&self, key: impl Into<String>, value: impl Into<Bytes>) {
        let key = key.into();
        let mut state = self.lock();
        state.keys.insert(key.clone(), value.into());
        state.notify(&key, "set");
    }

    /// Whether `key` exists.
    pub fn exists(&self, key: &str) -> bool {
        self.lock().keys.contains_key(key)
    }

    /// Removes `keys`; returns how many existed, as `UNLINK` does. With keyspace
    /// notifications on, publishes `del` for each key that existed, as Redis does.
    pub fn unlink(&self, keys: &[String]) -> u32 {
        let mut state = self.lock();
        let mut removed = 0u32;
        for key in keys {
            if state.keys.remove(key).is_some() {
                removed = removed.saturating_add(1);
                state.notify(key, "del");
            }
        }
        state
            .unlink_taps
            .retain(|tap| tap.send(keys.to_vec()).is_ok());
        removed
    }

    /// Replaces the subscriptions and the routing table at once.
    pub fn update(&self, subscriptions: BTreeSet<Subscription>, table: RoutingTable) {
        let mut state = self.lock();
        state.channels.clear();
        state.patterns.clear();
        state.sharded.clear();
        for subscription in subscriptions {
            match subscription {
                Subscription::Channel(name) => {
                    state.channels.insert(name);
                }
                Subscription::Sharded(name) => {
                    state.sharded.insert(name);
                }
                // Routing tables never list streams among subscriptions.
                Subscription::Stream(_) => {}
                Subscription::Pattern(name) => {
                    let glob = Glob::new(name.to_vec());
                    state.patterns.push((name, glob));
                }
            }
        }
        if let Some(router) = &state.router {
            router.apply_now(Some(table));
        }
    }

    /// Always connected; counts what is subscribed.
    pub fn status(&self) -> SourceStatus {
        let state = self.lock();
        SourceStatus {
            connected: true,
            channels: state.channels.len(),
            patterns: state.patterns.len(),
            sharded: state.sharded.len(),
            streams: 0,
            reconnects: 0,
            last_error: None,
            keyspace_events: None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl InProcessBroker for EmbeddedBroker {
    fn publish_from(&self, from: Option<&PluginName>, channel: Bytes, payload: Bytes) -> u32 {
        EmbeddedBroker::publish_from(self, from, channel, payload)
    }

    fn unlink(&self, keys: &[String]) -> u32 {
        EmbeddedBroker::unlink(self, keys)
    }

    fn watch(&self) -> mpsc::UnboundedReceiver<(Bytes, Bytes)> {
        let mut published = self.tap();
        let (watcher, watched) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(message) = published.recv().await {
                if watcher.send((message.channel, message.payload)).is_err() {
                    break;
                }
            }
        });
        watched
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(tap: &mut mpsc::UnboundedReceiver<Published>) -> Vec<(String, String)> {
        let mut seen = Vec::new();
        while let Ok(published) = tap.try_recv() {
            seen.push((
                String::from_utf8_lossy(&published.channel).into_owned(),
                String::from_utf8_lossy(&published.payload).into_owned(),
            ));
        }
        seen
    }

    #[test]
    fn writes_publish_keyspace_notifications_only_when_turned_on() {
        let broker = EmbeddedBroker::new();
        let mut tap = broker.tap();
        broker.set("user:1", "a");
        broker.unlink(&["user:1".to_owned()]);
        assert!(drain(&mut tap).is_empty(), "notifications are off at first");
        assert!(!broker.keyspace_events());

        broker.set_keyspace_events(true);
        broker.set("user:1", "a");
        broker.set("user:2", "b");
        // Like Redis, `del` only for the keys that existed, each once.
        let removed = broker.unlink(&["user:1".into(), "user:3".into(), "user:1".into()]);
        assert_eq!(removed, 1);
        assert_eq!(
            drain(&mut tap),
            [
                ("__keyspace@0__:user:1".to_owned(), "set".to_owned()),
                ("__keyspace@0__:user:2".to_owned(), "set".to_owned()),
                ("__keyspace@0__:user:1".to_owned(), "del".to_owned()),
            ]
        );
        assert!(!broker.exists("user:1") && broker.exists("user:2"));
    }
}
