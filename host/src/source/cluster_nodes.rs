//! Subscriptions a Redis Cluster keeps on one node: keyspace and keyevent notifications
//! (`__keyspace@DB__:KEY`, `__keyevent@DB__:EVENT`). A node publishes them only to its own
//! subscribers, never across the cluster bus, so a subscriber on one node of a 3-primary
//! cluster hears about a third of the keys.
//!
//! The cluster source therefore subscribes them on every primary, each over a RESP3 connection
//! of its own whose messages go to the router like the cluster client's. A write happens on
//! the primary that owns its key, so every event arrives once. Replicas replay their primary's
//! writes and notify them again, so they are not subscribed.
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

use redis::aio::MultiplexedConnection;
use redis::{ConnectionAddr, PushInfo, PushKind};

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
        }
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

    /// Whether there is a node-local subscription.
    pub fn is_empty(&self) -> bool {
        self.wanted.is_empty()
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
            self.nodes.clear();
            self.needed = Flags::NONE;
        }
    }

    /// Holds a subscribed connection to each of `primaries` (`host:port`) and to no other
    /// node: connects to new primaries and to those whose connection broke, and drops nodes
    /// that are no longer primaries. Returns the nodes it could not subscribe, with why.
    pub async fn follow(&mut self, primaries: &BTreeSet<String>) -> Result<(), String> {
        if self.wanted.is_empty() {
            return Ok(());
        }
        self.nodes.retain(|address, node| {
            let keep = primaries.contains(address) && node.alive.load(Ordering::Relaxed);
            if !keep {
                tracing::info!(node = %address, "keyspace notifications: dropping the connection to a node that is no longer a primary or was lost");
            }
            keep
        });
        let mut failures = Vec::new();
        for address in primaries {
            if self.nodes.contains_key(address) {
                continue;
            }
            match tokio::time::timeout(NODE_TIMEOUT * 2, self.open(address)).await {
                Ok(Ok(node)) => {
                    tracing::info!(node = %address, subscriptions = self.wanted.len(), "keyspace notifications subscribed on a primary");
                    self.nodes.insert(address.clone(), node);
                }
                Ok(Err(e)) => failures.push(format!("{address}: {e}")),
                Err(_) => failures.push(format!("{address}: no answer within {NODE_TIMEOUT:?}")),
            }
        }
        for node in self.nodes.values_mut() {
            if !node.checked || node.missing.is_some() {
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
                "cannot subscribe keyspace notifications on {}",
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
                PushKind::Disconnection => lost.store(false, Ordering::Relaxed),
                PushKind::Message | PushKind::PMessage => {
                    if let Some(delivery) = Delivery::from_push(push) {
                        router.deliver(delivery);
                    }
                }
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
        Ok(Node {
            connection,
            alive,
            checked: false,
            missing: None,
        })
    }
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
