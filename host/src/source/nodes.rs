//! Connections to each node that serves keys (every primary of a cluster; the server
//! itself otherwise), for what Redis says only about the keys of the node one is connected to.
//!
//! **Node-local subscriptions.** Keyspace and keyevent notifications (`__keyspace@DB__:KEY`,
//! `__keyevent@DB__:EVENT`) go only to the subscribers of the node where the key changed,
//! never across the cluster bus, so a subscriber on one node of a 3-primary cluster hears
//! about a third of the keys. The cluster source therefore subscribes them on every primary,
//! each over a RESP3 connection of its own whose messages go to the router like the cluster
//! client's. A write happens on the primary that owns its key, so every event arrives once.
//! Replicas replay their primary's writes and notify them again, so they are not subscribed.
//!
//! **Tracked keys.** For plugins that track key prefixes, each connection also turns on
//! client-side caching invalidations: `CLIENT TRACKING ON BCAST PREFIX ... NOLOOP` (prefixes
//! that another one covers are left out: Redis refuses overlapping ones). Each invalidated key
//! goes to the router; a `null` invalidation (Redis flushed its table) and the loss of a
//! connection go as one flush, since keys may have changed unseen. A change of the prefixes
//! turns tracking off and on again, and is a flush too.
//!
//! The primaries are followed on every health tick of the cluster source (`CLUSTER SLOTS`,
//! each second): a promoted replica gets a connection, a node that is no longer a primary
//! loses its own, and a connection that broke is opened again. Events on a shard while it has
//! no reachable primary, and until the next tick finds its new one, are lost (pub/sub is at
//! most once).
//!
//! Each primary's `notify-keyspace-events` is checked as on a single server (see
//! [`super::keyspace`]): when it is connected, when the flags the subscriptions need change,
//! and on every tick while a node lacks some. With `redis.set_keyspace_events` the host adds
//! them on that node.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use redis::aio::MultiplexedConnection;
use redis::{ConnectionAddr, PushInfo, PushKind, Value};

use super::redis::names_of;
use crate::keyspace::{Flags, MissingFlags};
use crate::message::{Delivery, Subscription};
use crate::router::Router;

/// How long connecting to a node, or one command on it, may take.
const NODE_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether `subscription` is one a cluster node keeps to itself: a keyspace or keyevent
/// channel or pattern.
pub fn is_node_local(subscription: &Subscription) -> bool {
    matches!(
        subscription,
        Subscription::Channel(_) | Subscription::Pattern(_)
    ) && {
        let name = subscription.name();
        name.starts_with(b"__keyspace@") || name.starts_with(b"__keyevent@")
    }
}

/// The node-local members of `set`.
pub fn node_local(set: &BTreeSet<Subscription>) -> BTreeSet<Subscription> {
    set.iter().filter(|s| is_node_local(s)).cloned().collect()
}

/// The node-local subscriptions, held on every primary.
pub struct NodeSubscriptions {
    /// How to reach a node: the first seed's connection settings, its address replaced.
    template: redis::ConnectionInfo,
    router: Arc<Router>,
    /// What every primary is to be subscribed to.
    wanted: BTreeSet<Subscription>,
    /// A connection to each primary (`host:port`), with its subscriptions.
    nodes: BTreeMap<String, Node>,
    /// The `notify-keyspace-events` flags the key subscriptions need.
    needed: Flags,
    /// Whether to add missing flags (`redis.set_keyspace_events`).
    set_missing: bool,
    /// The key prefixes tracked on every node (none covering another).
    tracking: BTreeSet<Bytes>,
}

/// One primary's connection.
struct Node {
    connection: MultiplexedConnection,
    /// Cleared when the connection is lost.
    alive: Arc<AtomicBool>,
    /// Whether its `notify-keyspace-events` has been checked for the flags needed now.
    checked: bool,
    /// What the last check found missing there.
    missing: Option<MissingFlags>,
}

impl NodeSubscriptions {
    /// Node-local subscriptions reached with the settings of `seed` (credentials, database,
    /// TLS), delivered to `router`.
    pub fn new(seed: &redis::Client, router: Arc<Router>, set_missing: bool) -> Self {
        let template = seed.get_connection_info().clone();
        let settings = template
            .redis_settings()
            .clone()
            .set_protocol(redis::ProtocolVersion::RESP3);
        Self {
            template: template.set_redis_settings(settings),
            router,
            wanted: BTreeSet::new(),
            nodes: BTreeMap::new(),
            needed: Flags::NONE,
            set_missing,
            tracking: BTreeSet::new(),
        }
    }

    /// Tracks `prefixes` on every node from now on. A change turns tracking off and on again
    /// on each connected node, and the router flushes the tracking plugins, since
    /// invalidations in between are not seen.
    pub async fn set_tracking(&mut self, prefixes: &BTreeSet<Bytes>) {
        let prefixes = outermost(prefixes);
        if prefixes == self.tracking {
            return;
        }
        self.tracking = prefixes;
        let mut failed = Vec::new();
        for (address, node) in &mut self.nodes {
            if let Err(e) = track(&mut node.connection, &self.tracking).await {
                tracing::warn!(node = %address, "cannot change client tracking: {e}; connecting again");
                failed.push(address.clone());
            }
        }
        // A connection that could not change is opened again on the next follow.
        self.nodes.retain(|address, _| !failed.contains(address));
        if self.is_empty() {
            self.nodes.clear();
        }
        self.router.invalidate_tracked(None);
    }

    /// Records the flags the routing table's key subscriptions need; every primary is checked
    /// again on the next [`NodeSubscriptions::follow`] when they changed.
    pub fn set_needed(&mut self, needed: Flags) {
        if needed != self.needed {
            self.needed = needed;
            for node in self.nodes.values_mut() {
                node.checked = false;
            }
        }
    }

    /// What some primary's `notify-keyspace-events` lacks, naming the primaries concerned;
    /// `None` when every connected primary has what is needed.
    pub fn missing(&self) -> Option<MissingFlags> {
        let lacking: Vec<(&String, &MissingFlags)> = self
            .nodes
            .iter()
            .filter_map(|(address, node)| Some((address, node.missing.as_ref()?)))
            .collect();
        let (_, first) = lacking.first()?;
        let addresses: Vec<&str> = lacking.iter().map(|(a, _)| a.as_str()).collect();
        Some(MissingFlags {
            reason: format!(
                "on {} of {} primaries ({}): {}",
                lacking.len(),
                self.nodes.len(),
                addresses.join(", "),
                first.reason
            ),
            ..(*first).clone()
        })
    }

    /// Whether there is nothing to hold on the nodes: no node-local subscription and no
    /// tracked prefix.
    pub fn is_empty(&self) -> bool {
        self.wanted.is_empty() && self.tracking.is_empty()
    }

    /// Subscribes `added` on every primary connected; it is also subscribed on those
    /// connected later.
    pub async fn add(&mut self, added: &BTreeSet<Subscription>) -> anyhow::Result<()> {
        self.wanted.extend(added.iter().cloned());
        for (address, node) in &mut self.nodes {
            change(&mut node.connection, added, true)
                .await
                .map_err(|e| anyhow::anyhow!("on {address}: {e}"))?;
        }
        Ok(())
    }

    /// Unsubscribes `removed` everywhere. A failure only leaves a subscription nobody is
    /// routed from.
    pub async fn remove(&mut self, removed: &BTreeSet<Subscription>) {
        if removed.is_empty() {
            return;
        }
        for subscription in removed {
            self.wanted.remove(subscription);
        }
        for (address, node) in &mut self.nodes {
            if let Err(e) = change(&mut node.connection, removed, false).await {
                tracing::warn!("unsubscribing keyspace notifications on {address} failed: {e}");
            }
        }
        if self.wanted.is_empty() {
            self.needed = Flags::NONE;
        }
        if self.is_empty() {
            self.nodes.clear();
        }
    }

    /// Holds a subscribed connection to each of `primaries` (`host:port`) and to no other
    /// node: connects to new primaries and to those whose connection broke, and drops nodes
    /// that are no longer primaries. Returns the nodes it could not subscribe, with why.
    pub async fn follow(&mut self, primaries: &BTreeSet<String>) -> Result<(), String> {
        if self.is_empty() {
            return Ok(());
        }
        let mut dropped_live = false;
        self.nodes.retain(|address, node| {
            let keep = primaries.contains(address) && node.alive.load(Ordering::Relaxed);
            if !keep {
                // Marked lost first, so that closing it does not flush a second time.
                dropped_live |= node.alive.swap(false, Ordering::Relaxed);
                tracing::info!(node = %address, "dropping the connection to a node that is no longer a primary or was lost");
            }
            keep
        });
        if dropped_live && !self.tracking.is_empty() {
            // Its keys are someone else's now, and may have changed unseen in the handover
            // (a lost connection flushed when it was lost).
            self.router.invalidate_tracked(None);
        }
        let mut failures = Vec::new();
        for address in primaries {
            if self.nodes.contains_key(address) {
                continue;
            }
            match tokio::time::timeout(NODE_TIMEOUT * 2, self.open(address)).await {
                Ok(Ok(node)) => {
                    tracing::info!(
                        node = %address,
                        subscriptions = self.wanted.len(),
                        tracked_prefixes = self.tracking.len(),
                        "connected to a node for keyspace notifications and key tracking"
                    );
                    self.nodes.insert(address.clone(), node);
                }
                Ok(Err(e)) => failures.push(format!("{address}: {e}")),
                Err(_) => failures.push(format!("{address}: no answer within {NODE_TIMEOUT:?}")),
            }
        }
        for node in self.nodes.values_mut() {
            if self.needed.is_empty() {
                node.missing = None;
            } else if !node.checked || node.missing.is_some() {
                node.missing =
                    super::keyspace::check(&mut node.connection, self.needed, self.set_missing)
                        .await;
                node.checked = true;
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "cannot hold keyspace notifications and key tracking on {}",
                failures.join("; ")
            ))
        }
    }

    /// A connection to the node at `address`, subscribed to everything wanted.
    async fn open(&self, address: &str) -> anyhow::Result<Node> {
        let (host, port) = address
            .rsplit_once(':')
            .and_then(|(host, port)| Some((host.to_owned(), port.parse::<u16>().ok()?)))
            .ok_or_else(|| anyhow::anyhow!("not a host:port address"))?;
        let addr = match self.template.addr().clone() {
            ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => ConnectionAddr::TcpTls {
                host,
                port,
                insecure,
                tls_params,
            },
            _ => ConnectionAddr::Tcp(host, port),
        };
        let client = redis::Client::open(self.template.clone().set_addr(addr))?;
        let alive = Arc::new(AtomicBool::new(true));
        let (router, lost) = (self.router.clone(), alive.clone());
        let on_push = move |push: PushInfo| {
            match push.kind {
                // Only the first loss flushes: the push may come more than once.
                PushKind::Disconnection if lost.swap(false, Ordering::Relaxed) => {
                    router.invalidate_tracked(None);
                }
                PushKind::Message | PushKind::PMessage => {
                    if let Some(delivery) = Delivery::from_push(push) {
                        router.deliver(delivery);
                    }
                }
                PushKind::Invalidate => match push.data.into_iter().next() {
                    Some(Value::Array(keys)) => {
                        for key in keys {
                            match key {
                                Value::BulkString(key) => {
                                    router.invalidate_tracked(Some(&Bytes::from(key)));
                                }
                                Value::SimpleString(key) => {
                                    router.invalidate_tracked(Some(&Bytes::from(key)));
                                }
                                _ => {}
                            }
                        }
                    }
                    _ => router.invalidate_tracked(None),
                },
                _ => {}
            }
            Ok::<(), Infallible>(())
        };
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(NODE_TIMEOUT))
            .set_response_timeout(Some(NODE_TIMEOUT))
            .set_push_sender(on_push);
        let mut connection = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        change(&mut connection, &self.wanted, true).await?;
        if !self.tracking.is_empty() {
            track(&mut connection, &self.tracking).await?;
        }
        Ok(Node {
            connection,
            alive,
            checked: false,
            missing: None,
        })
    }
}

/// Turns client tracking on for `prefixes` on one node (after turning it off, which drops
/// any earlier prefixes), or only off when there are none.
async fn track(
    connection: &mut MultiplexedConnection,
    prefixes: &BTreeSet<Bytes>,
) -> redis::RedisResult<()> {
    redis::cmd("CLIENT")
        .arg("TRACKING")
        .arg("OFF")
        .exec_async(connection)
        .await?;
    if prefixes.is_empty() {
        return Ok(());
    }
    let mut on = redis::cmd("CLIENT");
    on.arg("TRACKING").arg("ON").arg("BCAST");
    for prefix in prefixes {
        on.arg("PREFIX").arg(prefix.as_ref());
    }
    on.arg("NOLOOP").exec_async(connection).await
}

/// `prefixes` without those another one starts: Redis refuses a `BCAST` prefix that
/// overlaps another, and the shorter one already covers the keys of the longer.
fn outermost(prefixes: &BTreeSet<Bytes>) -> BTreeSet<Bytes> {
    prefixes
        .iter()
        .filter(|prefix| {
            !prefixes
                .iter()
                .any(|other| other != *prefix && prefix.starts_with(other))
        })
        .cloned()
        .collect()
}

/// (Un)subscribes the channels and patterns of `set` on one node.
async fn change(
    connection: &mut MultiplexedConnection,
    set: &BTreeSet<Subscription>,
    on: bool,
) -> anyhow::Result<()> {
    let channels = names_of(set, "channel");
    if !channels.is_empty() {
        if on {
            connection.subscribe(&channels).await?;
        } else {
            connection.unsubscribe(&channels).await?;
        }
    }
    let patterns = names_of(set, "pattern");
    if !patterns.is_empty() {
        if on {
            connection.psubscribe(&patterns).await?;
        } else {
            connection.punsubscribe(&patterns).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    #[test]
    fn prefixes_another_covers_are_left_out() {
        let set = |names: &[&'static str]| -> BTreeSet<Bytes> {
            names
                .iter()
                .map(|n| Bytes::from_static(n.as_bytes()))
                .collect()
        };
        assert_eq!(
            outermost(&set(&["cache:", "cache:user:", "session:"])),
            set(&["cache:", "session:"])
        );
        assert_eq!(outermost(&set(&["", "cache:"])), set(&[""]));
        assert_eq!(outermost(&set(&["a", "b"])), set(&["a", "b"]));
    }

    #[test]
    fn keyspace_and_keyevent_subscriptions_are_node_local_and_others_are_not() {
        let pattern =
            |name: &'static str| Subscription::Pattern(Bytes::from_static(name.as_bytes()));
        let channel =
            |name: &'static str| Subscription::Channel(Bytes::from_static(name.as_bytes()));
        assert!(is_node_local(&pattern("__keyspace@0__:user:*")));
        assert!(is_node_local(&channel("__keyevent@3__:expired")));
        assert!(!is_node_local(&pattern("news:*")));
        assert!(!is_node_local(&pattern("*")));
        assert!(!is_node_local(&Subscription::Sharded(Bytes::from_static(
            b"__keyspace@0__:x"
        ))));
    }
}
