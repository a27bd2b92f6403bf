//! An in-process broker with Redis's pub/sub semantics, for running without Redis
//! (`switchyard demo`, offline plugin runs).
//!
//! It delivers like Redis does: for one publish, a delivery for the exact channel if it is
//! subscribed, then one per matching pattern, using the same glob matcher the router uses
//! (which is itself tested against a real Redis). Publishing and table changes happen under
//! one lock, so a table always changes between two published messages, never within one.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::SourceStatus;
use crate::PluginName;
use crate::effects::InProcessBroker;
use crate::glob::Glob;
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
        let mut state = self.lock();
        let mut receivers = 0u32;
        if let Some(router) = state.router.clone() {
            let received_at = SystemTime::now();
            let deliver = |via: Via| {
                router.deliver(Delivery {
                    channel: channel.clone(),
                    via,
                    payload: payload.clone(),
                    received_at,
                })
            };
            if state.sharded.contains(&channel) {
                // The host publishes to sharded channels with SPUBLISH, which only
                // sharded subscribers receive.
                deliver(Via::Sharded);
                receivers += 1;
            } else {
                if state.channels.contains(&channel) {
                    deliver(Via::Channel);
                    receivers += 1;
                }
                for (pattern, glob) in &state.patterns {
                    if glob.matches(&channel) {
                        deliver(Via::Pattern(pattern.clone()));
                        receivers += 1;
                    }
                }
            }
        }
        state.taps.retain(|tap| {
            tap.send(Published {
                from: from.cloned(),
                channel: channel.clone(),
                payload: payload.clone(),
            })
            .is_ok()
        });
        receivers + u32::try_from(state.taps.len()).unwrap_or(u32::MAX)
    }

    /// Sets `key` in the broker's key space.
    pub fn set(&self, key: impl Into<String>, value: impl Into<Bytes>) {
        self.lock().keys.insert(key.into(), value.into());
    }

    /// Whether `key` exists.
    pub fn exists(&self, key: &str) -> bool {
        self.lock().keys.contains_key(key)
    }

    /// Removes `keys`; returns how many existed, as `UNLINK` does.
    pub fn unlink(&self, keys: &[String]) -> u32 {
        let mut state = self.lock();
        let removed = keys
            .iter()
            .filter(|key| state.keys.remove(*key).is_some())
            .count();
        state
            .unlink_taps
            .retain(|tap| tap.send(keys.to_vec()).is_ok());
        u32::try_from(removed).unwrap_or(u32::MAX)
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
