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
//! The publish path reads an immutable snapshot of the flows without a lock: for a plugin
//! that is the only one publishing (the common case) the check is a pointer comparison. Only
//! a change (a plugin's first publish, a new edge, a plugin gone) takes the lock and
//! publishes a new snapshot, with which plugins lead to which worked out once.
//!
//! What the guard does not see: loops that leave the host (through another host on the same
//! Redis, an application that republishes what it receives, or an output), and which message
//! caused which: two plugins that legitimately answer each other (a request and its reply)
//! form a cycle too, and each is held to [`LOOP_RATE_PER_SEC`] of the publishes that close
//! it.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, Weak};

use arc_swap::ArcSwap;

use crate::PluginName;
use crate::glob::Glob;
use crate::message::Subscription;
use crate::rate::TokenBucket;

/// Publishes that feed back to their plugin allowed per second, sustained.
pub const LOOP_RATE_PER_SEC: f64 = 100.0;
/// Publishes that feed back to their plugin allowed in a burst.
pub const LOOP_BURST: f64 = 200.0;

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
}

impl LoopGuard {
    /// A guard for a plugin with `subscriptions`.
    pub fn new(subscriptions: &[Subscription]) -> Self {
        Self {
            subscriptions: Arc::new(Subscriptions::new(subscriptions)),
            bucket: TokenBucket::new(LOOP_RATE_PER_SEC, LOOP_BURST),
        }
    }

    /// Whether publishing on `channel` would deliver back to the plugin itself.
    pub fn feeds_itself(&self, channel: &[u8]) -> bool {
        self.subscriptions.matches(channel)
    }

    /// Whether plugin `name` publishing on `channel` would come back to it, directly or
    /// through the plugins `flows` has seen publish; records the publish in `flows`.
    pub fn feedback(&self, name: &PluginName, flows: &Flows, channel: &[u8]) -> Option<Feedback> {
        if self.feeds_itself(channel) {
            return Some(Feedback::Itself);
        }
        flows.feedback(name, &self.subscriptions, channel)
    }

    /// Takes one token; false when the plugin is over its rate.
    pub fn admit(&self) -> bool {
        self.bucket.admit()
    }
}

/// Which publishing plugins have reached which, shared by every plugin of a host.
#[derive(Debug, Default)]
pub struct Flows {
    /// Changes go through here, one at a time.
    graph: Mutex<Vec<Node>>,
    /// What the publish path reads: rebuilt from `graph` after every change.
    snapshot: ArcSwap<Snapshot>,
}

/// A plugin that has published.
#[derive(Debug)]
struct Node {
    name: PluginName,
    /// Its current version's subscriptions; gone once that version is dropped.
    subscriptions: Weak<Subscriptions>,
    /// The publishing plugins its messages reached.
    feeds: HashSet<PluginName>,
}

/// The flows as the publish path reads them: plugins by position, which one fed which, and
/// which leads to which through any number of others.
#[derive(Debug, Default)]
struct Snapshot {
    nodes: Vec<(PluginName, Weak<Subscriptions>)>,
    /// `feeds[i * n + j]`: `i`'s messages have reached `j`.
    feeds: Vec<bool>,
    /// `leads[i * n + j]`: the recorded edges lead from `i` to `j`.
    leads: Vec<bool>,
}

impl Snapshot {
    fn of(graph: &[Node]) -> Self {
        let n = graph.len();
        let position = |name: &PluginName| graph.iter().position(|node| &node.name == name);
        let mut feeds = vec![false; n * n];
        for (i, node) in graph.iter().enumerate() {
            for j in node.feeds.iter().filter_map(position) {
                feeds[i * n + j] = true;
            }
        }
        let mut leads = vec![false; n * n];
        for start in 0..n {
            let mut next = vec![start];
            while let Some(i) = next.pop() {
                for j in 0..n {
                    if feeds[i * n + j] && !leads[start * n + j] {
                        leads[start * n + j] = true;
                        next.push(j);
                    }
                }
            }
        }
        Self {
            nodes: graph
                .iter()
                .map(|node| (node.name.clone(), node.subscriptions.clone()))
                .collect(),
            feeds,
            leads,
        }
    }
}

/// What the publish path found it must change before it can answer.
enum Change {
    /// The publisher is not in the flows yet (or with another version).
    Join,
    /// The publisher's messages reach the plugin at this position for the first time.
    Edge(usize),
    /// A plugin in the flows is gone.
    Prune,
}

impl Flows {
    /// Whether plugin `from`, subscribed to `subscriptions`, publishing on `channel` reaches
    /// a plugin whose recorded publishes lead back to it; records what is new.
    fn feedback(
        &self,
        from: &PluginName,
        subscriptions: &Arc<Subscriptions>,
        channel: &[u8],
    ) -> Option<Feedback> {
        // Each round either answers or makes one change, and changes are finite: the
        // plugins in the flows and the edges between them.
        loop {
            let snapshot = self.snapshot.load();
            let change = match Self::look(&snapshot, subscriptions, channel) {
                Ok(verdict) => return verdict,
                Err(change) => change,
            };
            let mut graph = self.graph.lock().unwrap_or_else(|e| e.into_inner());
            match change {
                Change::Join => {
                    // A new version's subscriptions may differ: what reached the old one is
                    // learnt again from the next publishes.
                    forget(&mut graph, from);
                    graph.push(Node {
                        name: from.clone(),
                        subscriptions: Arc::downgrade(subscriptions),
                        feeds: HashSet::new(),
                    });
                }
                Change::Edge(to) => {
                    if let (Some((to, _)), Some(node)) = (
                        snapshot.nodes.get(to),
                        graph.iter_mut().find(|node| &node.name == from),
                    ) {
                        node.feeds.insert(to.clone());
                    }
                }
                Change::Prune => {
                    let gone: Vec<PluginName> = graph
                        .iter()
                        .filter(|node| node.subscriptions.strong_count() == 0)
                        .map(|node| node.name.clone())
                        .collect();
                    for name in &gone {
                        forget(&mut graph, name);
                    }
                }
            }
            self.snapshot.store(Arc::new(Snapshot::of(&graph)));
        }
    }

    /// The answer from `snapshot`, or the change it needs first.
    fn look(
        snapshot: &Snapshot,
        subscriptions: &Arc<Subscriptions>,
        channel: &[u8],
    ) -> Result<Option<Feedback>, Change> {
        let n = snapshot.nodes.len();
        let me = snapshot
            .nodes
            .iter()
            .position(|(_, theirs)| std::ptr::eq(theirs.as_ptr(), Arc::as_ptr(subscriptions)))
            .ok_or(Change::Join)?;
        for (j, (name, theirs)) in snapshot.nodes.iter().enumerate() {
            if j == me {
                continue;
            }
            let theirs = theirs.upgrade().ok_or(Change::Prune)?;
            if !theirs.matches(channel) {
                continue;
            }
            if !snapshot.feeds[me * n + j] {
                return Err(Change::Edge(j));
            }
            if snapshot.leads[j * n + me] {
                return Ok(Some(Feedback::Through(name.clone())));
            }
        }
        Ok(None)
    }
}

/// Drops `name` and every edge into it.
fn forget(graph: &mut Vec<Node>, name: &PluginName) {
    graph.retain(|node| &node.name != name);
    for node in graph.iter_mut() {
        node.feeds.remove(name);
    }
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
