//! The loop guard: a plugin whose publishes come back to it would feed itself forever. That
//! happens directly, when it publishes into one of its own subscriptions, or through other
//! plugins: `ping` publishes what `pong` subscribes to and `pong` what `ping` subscribes to,
//! or a plugin invalidates on every invalidation notice it receives, and its own call
//! announces another notice. Such publishes (and invalidations whose notice comes back) are
//! allowed at a bounded rate (a token bucket per plugin version) and refused beyond it, with
//! the refusal counted and logged. A refused publish ends the chain it was part of.
//!
//! Cycles through other plugins are found from what plugins actually do: [`Flows`], shared
//! by every plugin of a host, records for each plugin that has published which other
//! publishing plugins its messages reached (a subscription of theirs matched the channel).
//! A publish is part of a cycle when it reaches a plugin from which the recorded edges lead
//! back to the publisher. A plugin that never publishes cannot close a cycle, so only
//! publishers are recorded.
//!
//! What the guard does not see: loops that leave the host (through another host on the same
//! Redis, an application that republishes what it receives, or an output), and which message
//! caused which: two plugins that legitimately answer each other (a request and its reply)
//! form a cycle too, and each is held to [`LOOP_RATE_PER_SEC`] of the publishes that close
//! it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::rate::TokenBucket;
use crate::PluginName;
use crate::router::glob::Glob;
use crate::source::Subscription;

/// Publishes that feed back to their plugin allowed per second, sustained.
pub const LOOP_RATE_PER_SEC: f64 = 100.0;
/// Publishes that feed back to their plugin allowed in a burst.
pub const LOOP_BURST: f64 = 200.0;
/// Channels whose verdict one plugin's guard remembers; past that it starts over. Plugins
/// that publish on a few fixed channels look each up once per change of the flows.
const MAX_REMEMBERED_CHANNELS: usize = 1024;
/// How long a remembered verdict is trusted. Plugins removed from the host are forgotten
/// by the flows only when some publish looks them up again: after this long, every guard
/// does, so a cycle through a plugin that is gone stops limiting within this time.
const VERDICT_TTL: Duration = Duration::from_secs(1);

/// What a plugin subscribes to, matched against the channels it and others publish on.
#[derive(Debug)]
pub struct Subscriptions {
    channels: Vec<Vec<u8>>,
    patterns: Vec<Glob>,
}

impl Subscriptions {
    fn new(subscriptions: &[Subscription]) -> Self {
        let mut channels = Vec::new();
        let mut patterns = Vec::new();
        for subscription in subscriptions {
            match subscription {
                Subscription::Channel(name) | Subscription::Sharded(name) => {
                    channels.push(name.to_vec());
                }
                Subscription::Pattern(name) => patterns.push(Glob::new(name.to_vec())),
                // Publishing never feeds a stream.
                Subscription::Stream(_) => {}
            }
        }
        Self { channels, patterns }
    }

    /// Whether a message published on `channel` is delivered to these subscriptions.
    pub fn matches(&self, channel: &[u8]) -> bool {
        self.channels.iter().any(|c| c == channel)
            || self.patterns.iter().any(|g| g.matches(channel))
    }

    fn is_empty(&self) -> bool {
        self.channels.is_empty() && self.patterns.is_empty()
    }
}

/// How a publish would come back to the plugin that makes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Feedback {
    /// The channel is one of its own subscriptions.
    Itself,
    /// The channel reaches `via`, whose publishes have been seen to lead back.
    Through(PluginName),
}

/// Detects and limits publishes that come back to a plugin, directly or through others.
#[derive(Debug)]
pub struct LoopGuard {
    subscriptions: Arc<Subscriptions>,
    bucket: TokenBucket,
    remembered: Mutex<Remembered>,
}

/// Verdicts of one guard, valid for one generation of the flows.
#[derive(Debug)]
struct Remembered {
    generation: u64,
    since: Instant,
    verdicts: HashMap<Vec<u8>, Option<Feedback>>,
}

impl LoopGuard {
    /// A guard for a plugin with `subscriptions`.
    pub fn new(subscriptions: &[Subscription]) -> Self {
        Self {
            subscriptions: Arc::new(Subscriptions::new(subscriptions)),
            bucket: TokenBucket::new(LOOP_RATE_PER_SEC, LOOP_BURST),
            remembered: Mutex::new(Remembered {
                generation: u64::MAX,
                since: Instant::now(),
                verdicts: HashMap::new(),
            }),
        }
    }

    /// Whether publishing on `channel` would deliver back to the plugin itself.
    pub fn feeds_itself(&self, channel: &[u8]) -> bool {
        self.subscriptions.matches(channel)
    }

    /// Whether plugin `name` publishing on `channel` would come back to it, directly or
    /// through the plugins `flows` has seen; records the publish in `flows`.
    pub fn feedback(&self, name: &PluginName, flows: &Flows, channel: &[u8]) -> Option<Feedback> {
        if self.feeds_itself(channel) {
            return Some(Feedback::Itself);
        }
        let generation = flows.generation();
        {
            let remembered = self.remembered.lock().unwrap_or_else(|e| e.into_inner());
            if remembered.generation == generation
                && remembered.since.elapsed() < VERDICT_TTL
                && let Some(verdict) = remembered.verdicts.get(channel)
            {
                return verdict.clone();
            }
        }
        let (verdict, generation) = flows.publish(name, &self.subscriptions, channel);
        let mut remembered = self.remembered.lock().unwrap_or_else(|e| e.into_inner());
        if remembered.generation != generation
            || remembered.since.elapsed() >= VERDICT_TTL
            || remembered.verdicts.len() >= MAX_REMEMBERED_CHANNELS
        {
            remembered.generation = generation;
            remembered.since = Instant::now();
            remembered.verdicts.clear();
        }
        remembered
            .verdicts
            .insert(channel.to_vec(), verdict.clone());
        verdict
    }

    /// Takes one token; false when the plugin is over its rate.
    pub fn admit(&self) -> bool {
        self.bucket.admit()
    }
}

/// Which publishing plugins have reached which, shared by every plugin of a host.
#[derive(Debug, Default)]
pub struct Flows {
    graph: Mutex<HashMap<PluginName, Node>>,
    /// Changes whenever a plugin or an edge is added or dropped: verdicts remembered for
    /// an older generation are looked up again.
    generation: AtomicU64,
}

/// A plugin that has published.
#[derive(Debug)]
struct Node {
    /// Its current version's subscriptions; gone once that version is dropped.
    subscriptions: Weak<Subscriptions>,
    /// The publishing plugins its messages reached.
    feeds: HashSet<PluginName>,
}

impl Flows {
    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Records that `from`, subscribed to `subscriptions`, publishes on `channel`; returns
    /// whether that comes back to it through other plugins, and the generation the answer
    /// belongs to.
    fn publish(
        &self,
        from: &PluginName,
        subscriptions: &Arc<Subscriptions>,
        channel: &[u8],
    ) -> (Option<Feedback>, u64) {
        let mut graph = self.graph.lock().unwrap_or_else(|e| e.into_inner());
        let mut changed = false;

        // Plugins whose version is gone (removed, or replaced and not publishing yet).
        let gone: Vec<PluginName> = graph
            .iter()
            .filter(|(_, node)| node.subscriptions.strong_count() == 0)
            .map(|(name, _)| name.clone())
            .collect();
        for name in &gone {
            forget(&mut graph, name);
            changed = true;
        }

        let current = graph.get(from).is_some_and(|node| {
            std::ptr::eq(node.subscriptions.as_ptr(), Arc::as_ptr(subscriptions))
        });
        if !current {
            // A new plugin, or a new version whose subscriptions may differ: what reached the
            // old one is learnt again from the next publishes.
            forget(&mut graph, from);
            graph.insert(
                from.clone(),
                Node {
                    subscriptions: Arc::downgrade(subscriptions),
                    feeds: HashSet::new(),
                },
            );
            changed = true;
        }

        let reached: Vec<PluginName> = graph
            .iter()
            .filter(|(name, node)| {
                *name != from
                    && node
                        .subscriptions
                        .upgrade()
                        .is_some_and(|s| !s.is_empty() && s.matches(channel))
            })
            .map(|(name, _)| name.clone())
            .collect();
        if let Some(node) = graph.get_mut(from) {
            for name in &reached {
                changed |= node.feeds.insert(name.clone());
            }
        }
        let verdict = reached
            .iter()
            .find(|via| leads_to(&graph, via, from))
            .map(|via| Feedback::Through(via.clone()));
        let generation = if changed {
            self.generation.fetch_add(1, Ordering::AcqRel) + 1
        } else {
            self.generation()
        };
        (verdict, generation)
    }
}

/// Drops `name` and every edge into it.
fn forget(graph: &mut HashMap<PluginName, Node>, name: &PluginName) {
    graph.remove(name);
    for node in graph.values_mut() {
        node.feeds.remove(name);
    }
}

/// Whether the recorded edges lead from `start` to `goal`.
fn leads_to(graph: &HashMap<PluginName, Node>, start: &PluginName, goal: &PluginName) -> bool {
    let mut seen: HashSet<&PluginName> = HashSet::from([start]);
    let mut next = vec![start];
    while let Some(name) = next.pop() {
        let Some(node) = graph.get(name) else {
            continue;
        };
        for fed in &node.feeds {
            if fed == goal {
                return true;
            }
            if seen.insert(fed) {
                next.push(fed);
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn name(text: &str) -> PluginName {
        text.parse().expect("a plugin name")
    }

    fn pattern(text: &'static str) -> Subscription {
        Subscription::Pattern(Bytes::from_static(text.as_bytes()))
    }

    #[test]
    fn only_own_subscriptions_count_and_bursts_are_bounded() {
        let guard = LoopGuard::new(&[
            pattern("loop:*"),
            Subscription::Channel(Bytes::from_static(b"echo")),
        ]);
        let flows = Flows::default();
        let me = name("me");
        assert_eq!(
            guard.feedback(&me, &flows, b"loop:x"),
            Some(Feedback::Itself)
        );
        assert_eq!(guard.feedback(&me, &flows, b"echo"), Some(Feedback::Itself));
        assert_eq!(guard.feedback(&me, &flows, b"other"), None);
        let admitted = (0..1000).filter(|_| guard.admit()).count();
        assert!((200..=210).contains(&admitted), "{admitted}");
    }

    #[test]
    fn two_plugins_relaying_to_each_other_are_a_cycle_once_both_have_published() {
        let flows = Flows::default();
        let (ping, pong) = (name("ping"), name("pong"));
        let ping_guard = LoopGuard::new(&[pattern("ping:*")]);
        let pong_guard = LoopGuard::new(&[pattern("pong:*")]);
        // Neither has seen the other publish yet.
        assert_eq!(ping_guard.feedback(&ping, &flows, b"pong:x"), None);
        assert_eq!(pong_guard.feedback(&pong, &flows, b"ping:x"), None);
        // Now pong is known to publish into ping's subscriptions.
        assert_eq!(
            ping_guard.feedback(&ping, &flows, b"pong:x"),
            Some(Feedback::Through(pong.clone()))
        );
        assert_eq!(
            pong_guard.feedback(&pong, &flows, b"ping:x"),
            Some(Feedback::Through(ping.clone()))
        );
        // Channels that reach no one stay free.
        assert_eq!(ping_guard.feedback(&ping, &flows, b"elsewhere"), None);
    }

    #[test]
    fn a_chain_without_a_way_back_is_free_and_longer_cycles_are_found() {
        let flows = Flows::default();
        let (a, b, c) = (name("a"), name("b"), name("c"));
        let guards = [
            LoopGuard::new(&[pattern("a:*")]),
            LoopGuard::new(&[pattern("b:*")]),
            LoopGuard::new(&[pattern("c:*")]),
        ];
        // a -> b -> c, published twice so that every plugin is known.
        for _ in 0..2 {
            assert_eq!(guards[0].feedback(&a, &flows, b"b:1"), None);
            assert_eq!(guards[1].feedback(&b, &flows, b"c:1"), None);
            assert_eq!(guards[2].feedback(&c, &flows, b"out"), None);
        }
        // c closes the cycle a -> b -> c -> a.
        assert_eq!(
            guards[2].feedback(&c, &flows, b"a:1"),
            Some(Feedback::Through(a.clone()))
        );
        assert_eq!(
            guards[0].feedback(&a, &flows, b"b:1"),
            Some(Feedback::Through(b.clone()))
        );
    }

    #[test]
    fn a_plugin_that_is_gone_no_longer_closes_a_cycle() {
        let flows = Flows::default();
        let (ping, pong) = (name("ping"), name("pong"));
        let ping_guard = LoopGuard::new(&[pattern("ping:*")]);
        let pong_guard = LoopGuard::new(&[pattern("pong:*")]);
        for _ in 0..2 {
            ping_guard.feedback(&ping, &flows, b"pong:x");
            pong_guard.feedback(&pong, &flows, b"ping:x");
        }
        assert!(ping_guard.feedback(&ping, &flows, b"pong:x").is_some());
        drop(pong_guard);
        // A new version of ping looks the flows up afresh (its verdicts are its own).
        let ping_guard = LoopGuard::new(&[pattern("ping:*")]);
        assert_eq!(ping_guard.feedback(&ping, &flows, b"pong:x"), None);
    }
}
