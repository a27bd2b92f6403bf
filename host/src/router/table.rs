//! The routing table: an immutable snapshot of which plugin listens to what, rebuilt on every
//! plugin change and swapped in whole, so the reading task routes without locks.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;

use crate::config::StreamSettings;
use crate::glob::Glob;
use crate::keyspace::{Events, Flags, KeySubscription};
use crate::message::{Delivery, Heard, Subscription, Via};
use crate::worker::{Envelope, Inbox};

/// A plugin's stream, as the routing table lists it.
#[derive(Clone)]
pub struct StreamTarget {
    /// The plugin's queue.
    pub inbox: Inbox,
    /// The stream's key.
    pub key: Bytes,
    /// How to read it.
    pub settings: Arc<StreamSettings>,
}

impl StreamTarget {
    pub(crate) fn same(&self, other: &StreamTarget) -> bool {
        self.key == other.key
            && self.inbox.same_queue(&other.inbox)
            && self.settings == other.settings
    }
}

/// How a key subscription's notifications become the plugin's messages.
struct KeyRoute {
    /// The length of `__keyspace@DB__:`, cut from the channel to leave the key.
    prefix_len: usize,
    /// The events that reach the plugin.
    events: Events,
    /// The subscription, as the plugin's messages name it.
    heard: Heard,
}

/// One plugin's entry: its queue and its subscriptions, in the order it listed them.
pub struct Route {
    inbox: Inbox,
    subscriptions: Vec<Subscription>,
    /// One matcher per subscription (`None` for exact channels), same order.
    matchers: Vec<Option<Glob>>,
    /// For each subscription that is a key subscription's pattern, how to deliver it; same
    /// order, `None` for the others.
    keyed: Vec<Option<KeyRoute>>,
    /// The key prefixes whose client-side caching invalidations it hears of, each as its
    /// messages name it.
    tracking: Vec<(Bytes, Heard)>,
    /// How its streams are read, if it has any.
    stream_settings: Arc<StreamSettings>,
}

impl Route {
    /// A route to `inbox` for `subscriptions` (duplicates after the first are ignored).
    pub fn new(inbox: Inbox, subscriptions: &[Subscription]) -> Self {
        let mut seen = BTreeSet::new();
        let subscriptions: Vec<Subscription> = subscriptions
            .iter()
            .filter(|s| seen.insert((*s).clone()))
            .cloned()
            .collect();
        let matchers = subscriptions
            .iter()
            .map(|s| match s {
                Subscription::Pattern(p) => Some(Glob::new(p.to_vec())),
                _ => None,
            })
            .collect();
        let keyed = subscriptions.iter().map(|_| None).collect();
        Self {
            inbox,
            subscriptions,
            matchers,
            keyed,
            tracking: Vec::new(),
            stream_settings: Arc::default(),
        }
    }

    /// Adds `keys`, after the route's other subscriptions: each is the pattern of its
    /// keyspace channels, delivered with the key as the channel and only for its events.
    pub fn with_keys(mut self, keys: &[KeySubscription]) -> Self {
        for key in keys {
            let pattern = Subscription::Pattern(key.pattern());
            // A duplicate counts once, as in `new`.
            if self.subscriptions.contains(&pattern) {
                continue;
            }
            self.matchers.push(Some(Glob::new(pattern.name().to_vec())));
            self.subscriptions.push(pattern);
            self.keyed.push(Some(KeyRoute {
                prefix_len: key.prefix_len(),
                events: key.events.clone(),
                heard: Heard::Keys(Arc::new(key.clone())),
            }));
        }
        self
    }

    /// Whether the delivery of subscription `index` with `payload` is for the plugin: always,
    /// unless that is a key subscription and the payload (the event) is not one of its
    /// events.
    fn admits(&self, index: usize, payload: &[u8]) -> bool {
        match self.keyed.get(index) {
            Some(Some(key)) => key.events.admits(payload),
            _ => true,
        }
    }

    /// Adds `prefixes` of keys whose client-side caching invalidations the plugin hears of
    /// (duplicates after the first are ignored).
    pub fn with_tracking(mut self, prefixes: &[Bytes]) -> Self {
        for prefix in prefixes {
            if self.tracking.iter().any(|(p, _)| p == prefix) {
                continue;
            }
            self.tracking
                .push((prefix.clone(), Heard::Tracking(prefix.clone())));
        }
        self
    }

    /// Reads the route's streams with `settings`.
    pub fn with_stream_settings(mut self, settings: Arc<StreamSettings>) -> Self {
        self.stream_settings = settings;
        self
    }

    /// Whether any subscription before `index` also matches `channel`; if so, the delivery
    /// for that earlier one is the plugin's copy of the message.
    fn earlier_match(&self, index: usize, channel: &[u8]) -> bool {
        self.subscriptions[..index].iter().zip(&self.matchers).any(
            |(subscription, matcher)| match (matcher, subscription) {
                (Some(glob), _) => glob.matches(channel),
                (None, Subscription::Channel(name)) => name.as_ref() == channel,
                // Sharded channels and streams arrive by their own deliveries, never as a
                // copy of a pub/sub message.
                (None, _) => false,
            },
        )
    }
}

/// The payload of a tracked key's invalidation.
pub const INVALIDATE: &[u8] = b"invalidate";
/// The payload of the message that says every tracked key may have changed.
pub const FLUSH: &[u8] = b"flush";

/// Where a subscription's deliveries go: (route index, subscription index in that route).
type Targets = Vec<(usize, usize)>;

/// Which plugins each subscription feeds.
#[derive(Default)]
pub struct RoutingTable {
    routes: Vec<Route>,
    by_channel: HashMap<Bytes, Targets>,
    by_pattern: HashMap<Bytes, Targets>,
    by_sharded: HashMap<Bytes, Targets>,
    /// The `notify-keyspace-events` flags the key subscriptions need; none without any. A
    /// table without key subscriptions routes without looking at them at all.
    keyspace_flags: Flags,
}

impl RoutingTable {
    /// Builds the table for `routes`.
    pub fn new(routes: Vec<Route>) -> Self {
        let mut by_channel: HashMap<Bytes, Targets> = HashMap::new();
        let mut by_pattern: HashMap<Bytes, Targets> = HashMap::new();
        let mut by_sharded: HashMap<Bytes, Targets> = HashMap::new();
        let mut keyspace_flags = Flags::NONE;
        for (r, route) in routes.iter().enumerate() {
            for key in route.keyed.iter().flatten() {
                keyspace_flags |= key.events.flags();
            }
            for (s, subscription) in route.subscriptions.iter().enumerate() {
                let index = match subscription {
                    Subscription::Channel(name) => by_channel.entry(name.clone()),
                    Subscription::Pattern(name) => by_pattern.entry(name.clone()),
                    Subscription::Sharded(name) => by_sharded.entry(name.clone()),
                    Subscription::Stream(_) => continue,
                };
                index.or_default().push((r, s));
            }
        }
        Self {
            routes,
            by_channel,
            by_pattern,
            by_sharded,
            keyspace_flags,
        }
    }

    /// The `notify-keyspace-events` flags the table's key subscriptions need (none when it
    /// has none).
    pub fn keyspace_flags(&self) -> Flags {
        self.keyspace_flags
    }

    /// Every key prefix some plugin tracks: what the source must ask Redis to track.
    pub fn tracking_prefixes(&self) -> BTreeSet<Bytes> {
        self.routes
            .iter()
            .flat_map(|route| route.tracking.iter().map(|(prefix, _)| prefix.clone()))
            .collect()
    }

    /// Hands an invalidation of client-side caching to each plugin tracking the key, once:
    /// `Some(key)` as a message with the key as the channel and `invalidate` as the payload;
    /// `None` ("anything may have changed": Redis flushed, or the tracking connection was
    /// lost) as one message with an empty channel and `flush` as the payload to every
    /// tracking plugin. Returns how many plugins it was offered to.
    pub fn dispatch_invalidation(&self, key: Option<&Bytes>) -> usize {
        let received_at = SystemTime::now();
        let mut offered = 0;
        for route in &self.routes {
            let tracked = match key {
                Some(key) => route.tracking.iter().find(|(p, _)| key.starts_with(p)),
                None => route.tracking.first(),
            };
            let Some((_, heard)) = tracked else {
                continue;
            };
            let (channel, payload) = match key {
                Some(key) => (key.clone(), Bytes::from_static(INVALIDATE)),
                None => (Bytes::new(), Bytes::from_static(FLUSH)),
            };
            route.inbox.offer(Envelope {
                channel,
                subscription: heard.clone(),
                payload,
                received_at,
                entry: None,
            });
            offered += 1;
        }
        offered
    }

    /// Every (plugin, stream) pair to read through a consumer group.
    pub fn streams(&self) -> Vec<StreamTarget> {
        self.routes
            .iter()
            .flat_map(|route| {
                route.subscriptions.iter().filter_map(|s| match s {
                    Subscription::Stream(key) => Some(StreamTarget {
                        inbox: route.inbox.clone(),
                        key: key.clone(),
                        settings: route.stream_settings.clone(),
                    }),
                    _ => None,
                })
            })
            .collect()
    }

    /// Every subscription some plugin needs: what the source must subscribe.
    pub fn subscriptions(&self) -> BTreeSet<Subscription> {
        let channels = self
            .by_channel
            .keys()
            .map(|c| Subscription::Channel(c.clone()));
        let patterns = self
            .by_pattern
            .keys()
            .map(|p| Subscription::Pattern(p.clone()));
        let sharded = self
            .by_sharded
            .keys()
            .map(|c| Subscription::Sharded(c.clone()));
        channels.chain(patterns).chain(sharded).collect()
    }

    /// Offers `delivery` to every plugin whose first matching subscription delivered it.
    /// Returns how many plugins it was offered to.
    ///
    /// The last plugin takes the delivery's buffers themselves; only the others get shared
    /// references. With one plugin per message (the usual case) the payload then reaches the
    /// plugin as the very buffer Redis's reply was parsed into, never shared, so that it
    /// moves into the call without a copy and without a reference count.
    pub fn dispatch(&self, delivery: Delivery) -> usize {
        let targets = match &delivery.via {
            Via::Channel => self.by_channel.get(&delivery.channel),
            Via::Pattern(pattern) => self.by_pattern.get(pattern),
            Via::Sharded => self.by_sharded.get(&delivery.channel),
        };
        let keyed = !self.keyspace_flags.is_empty();
        let mut chosen = targets.into_iter().flatten().filter(|&&(r, s)| {
            (s == 0 || !self.routes[r].earlier_match(s, &delivery.channel))
                // A key subscription's events not asked for never reach the plugin.
                && (!keyed || self.routes[r].admits(s, &delivery.payload))
        });
        let Some(mut current) = chosen.next() else {
            return 0;
        };
        let mut offered = 1;
        for next in chosen {
            self.offer(
                current,
                delivery.channel.clone(),
                delivery.payload.clone(),
                delivery.received_at,
            );
            current = next;
            offered += 1;
        }
        self.offer(
            current,
            delivery.channel,
            delivery.payload,
            delivery.received_at,
        );
        offered
    }

    fn offer(
        &self,
        &(r, s): &(usize, usize),
        channel: Bytes,
        payload: Bytes,
        received_at: SystemTime,
    ) {
        let route = &self.routes[r];
        // A key subscription's plugin gets the key: the channel without `__keyspace@DB__:`,
        // sharing its buffer.
        let (channel, heard) = if !self.keyspace_flags.is_empty()
            && let Some(Some(key)) = route.keyed.get(s)
        {
            (
                channel.slice(key.prefix_len.min(channel.len())..),
                key.heard.clone(),
            )
        } else {
            (channel, Heard::Subscribed(route.subscriptions[s].clone()))
        };
        route.inbox.offer(Envelope {
            channel,
            subscription: heard,
            payload,
            received_at,
            entry: None,
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::config::WhenFull;
    use crate::stats::PluginStats;
    use crate::worker::queue::{HostBudget, Limits};
    use crate::worker::{Inbox, inbox};

    fn test_inbox(name: &str) -> Inbox {
        let limits = Limits {
            bytes: 1 << 20,
            count: Some(16),
            when_full: WhenFull::DropNewest,
        };
        inbox(
            name.parse().unwrap(),
            limits,
            HostBudget::new(1 << 20),
            PluginStats::new(),
        )
    }

    fn pattern(p: &str) -> Subscription {
        Subscription::Pattern(Bytes::copy_from_slice(p.as_bytes()))
    }

    fn channel(c: &str) -> Subscription {
        Subscription::Channel(Bytes::copy_from_slice(c.as_bytes()))
    }

    fn delivery(ch: &str, via: &Subscription) -> Delivery {
        Delivery {
            channel: Bytes::copy_from_slice(ch.as_bytes()),
            via: match via {
                Subscription::Pattern(p) => Via::Pattern(p.clone()),
                Subscription::Sharded(_) => Via::Sharded,
                _ => Via::Channel,
            },
            payload: Bytes::from_static(b"x"),
            received_at: SystemTime::now(),
        }
    }

    /// Feeds the table every delivery Redis would send for one PUBLISH on `ch`, given the
    /// table's own subscriptions, in an arbitrary order.
    fn publish(table: &RoutingTable, ch: &str) {
        for s in table.subscriptions().iter().rev() {
            let matches = match s {
                Subscription::Channel(c) => c.as_ref() == ch.as_bytes(),
                Subscription::Pattern(p) => Glob::new(p.to_vec()).matches(ch.as_bytes()),
                Subscription::Sharded(_) | Subscription::Stream(_) => false,
            };
            if matches {
                table.dispatch(delivery(ch, s));
            }
        }
    }

    #[test]
    fn plugin_with_overlapping_subscriptions_sees_message_once_via_its_first() {
        let inbox = test_inbox("p");
        let rx = inbox.clone();
        let subs = [pattern("fwd:*"), channel("fwd:a"), pattern("fwd:?")];
        let table = RoutingTable::new(vec![Route::new(inbox, &subs)]);
        publish(&table, "fwd:a");
        let got = rx.try_take().unwrap();
        assert_eq!(got.subscription, pattern("fwd:*").into());
        assert!(rx.try_take().is_none(), "delivered twice");
    }

    #[test]
    fn shared_pattern_feeds_every_plugin_that_has_it() {
        let a = test_inbox("a");
        let rx_a = a.clone();
        let b = test_inbox("b");
        let rx_b = b.clone();
        let table = RoutingTable::new(vec![
            Route::new(a, &[pattern("m:*")]),
            Route::new(b, &[channel("m:1"), pattern("m:*")]),
        ]);
        assert_eq!(table.subscriptions().len(), 2);
        publish(&table, "m:1");
        assert_eq!(rx_a.try_take().unwrap().subscription, pattern("m:*").into());
        assert_eq!(rx_b.try_take().unwrap().subscription, channel("m:1").into());
        assert!(rx_a.try_take().is_none() && rx_b.try_take().is_none());
        publish(&table, "m:2");
        assert_eq!(rx_b.try_take().unwrap().subscription, pattern("m:*").into());
    }

    #[test]
    fn key_subscriptions_deliver_the_key_and_only_their_events() {
        let keys = test_inbox("keys");
        let rx_keys = keys.clone();
        let raw = test_inbox("raw");
        let rx_raw = raw.clone();
        let subscription = KeySubscription {
            database: 0,
            keys: Bytes::from_static(b"user:*"),
            events: Events::only(&["del", "expired"]).unwrap(),
        };
        let table = RoutingTable::new(vec![
            Route::new(keys, &[]).with_keys(std::slice::from_ref(&subscription)),
            // Another plugin subscribing the same notifications as a plain pattern.
            Route::new(raw, &[pattern("__keyspace@0__:user:*")]),
        ]);
        assert_eq!(
            table.subscriptions().into_iter().collect::<Vec<_>>(),
            [pattern("__keyspace@0__:user:*")]
        );
        assert_eq!(table.keyspace_flags().to_string(), "Kgx");

        let notification = |event: &'static str| Delivery {
            payload: Bytes::from_static(event.as_bytes()),
            ..delivery("__keyspace@0__:user:1", &pattern("__keyspace@0__:user:*"))
        };
        assert_eq!(table.dispatch(notification("set")), 1);
        let got = rx_raw.try_take().unwrap();
        assert_eq!(got.channel.as_ref(), b"__keyspace@0__:user:1");
        assert!(rx_keys.try_take().is_none(), "an event it did not ask for");

        assert_eq!(table.dispatch(notification("del")), 2);
        let got = rx_keys.try_take().unwrap();
        assert_eq!(got.channel.as_ref(), b"user:1");
        assert_eq!(got.payload.as_ref(), b"del");
        assert!(
            matches!(&got.subscription, Heard::Keys(keys) if keys.keys.as_ref() == b"user:*"),
            "{:?}",
            got.subscription
        );
        assert_eq!(rx_raw.try_take().unwrap().payload.as_ref(), b"del");
    }

    #[test]
    fn a_table_without_key_subscriptions_needs_no_flags() {
        let table = RoutingTable::new(vec![Route::new(test_inbox("p"), &[pattern("a*")])]);
        assert!(table.keyspace_flags().is_empty());
    }

    #[test]
    fn an_invalidation_reaches_each_tracking_plugin_once_and_a_flush_every_one() {
        let prefixes = |names: &[&str]| -> Vec<Bytes> {
            names
                .iter()
                .map(|n| Bytes::copy_from_slice(n.as_bytes()))
                .collect()
        };
        let (cache, sessions, other) = (test_inbox("c"), test_inbox("s"), test_inbox("o"));
        let (rx_cache, rx_sessions, rx_other) = (cache.clone(), sessions.clone(), other.clone());
        let table = RoutingTable::new(vec![
            Route::new(cache, &[]).with_tracking(&prefixes(&["cache:", "cache:user:"])),
            Route::new(sessions, &[]).with_tracking(&prefixes(&["session:"])),
            Route::new(other, &[pattern("cache:*")]),
        ]);
        assert_eq!(
            table.tracking_prefixes(),
            prefixes(&["cache:", "cache:user:", "session:"])
                .into_iter()
                .collect()
        );
        let key = Bytes::from_static(b"cache:user:1");
        assert_eq!(table.dispatch_invalidation(Some(&key)), 1);
        let got = rx_cache.try_take().unwrap();
        assert_eq!(
            (got.channel.as_ref(), got.payload.as_ref()),
            (&key[..], INVALIDATE)
        );
        assert_eq!(
            got.subscription,
            Heard::Tracking(Bytes::from_static(b"cache:"))
        );
        assert!(
            rx_cache.try_take().is_none(),
            "once, under its first prefix"
        );
        assert!(rx_sessions.try_take().is_none() && rx_other.try_take().is_none());

        assert_eq!(table.dispatch_invalidation(None), 2);
        for rx in [&rx_cache, &rx_sessions] {
            let got = rx.try_take().unwrap();
            assert_eq!(
                (got.channel.as_ref(), got.payload.as_ref()),
                (&b""[..], FLUSH)
            );
        }
        assert!(rx_other.try_take().is_none(), "it tracks nothing");
    }

    #[test]
    fn duplicate_subscriptions_count_once() {
        let inbox = test_inbox("p");
        let rx = inbox.clone();
        let table = RoutingTable::new(vec![Route::new(inbox, &[pattern("a*"), pattern("a*")])]);
        publish(&table, "abc");
        assert!(rx.try_take().is_some());
        assert!(rx.try_take().is_none());
    }
}
