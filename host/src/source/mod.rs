//! Sources: where messages enter the host.
//!
//! A source owns the subscriber connection, turns every delivery into a [`Delivery`](crate::message::Delivery) and hands
//! it to the [`Router`](crate::router::Router) right where it was read, without waiting on any
//! plugin. It also applies subscription changes: it subscribes what is new, has the router
//! switch tables at a point in the stream that no published message straddles, then
//! unsubscribes what is gone (see [`crate::router`] for why the order matters).
//!
//! - [`redis`]: a real Redis server over one RESP3 connection, reconnecting with backoff.
//! - [`cluster`]: a Redis Cluster, through the cluster client's connections (sharded channels
//!   on the shard owning their slot).
//! - [`streams`]: consumer-group readers of Redis streams, one per plugin and stream, beside
//!   either of the above.
//! - [`embedded`]: an in-process broker with Redis's pub/sub semantics, for the demo and for
//!   running plugins offline; it can publish keyspace notifications of its own writes.

pub mod cluster;
pub mod embedded;
mod keyspace;
mod nodes;
pub mod redis;
pub mod streams;
pub mod tracking;

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::keyspace::MissingFlags;
use crate::message::Subscription;
use crate::router::RoutingTable;

/// A change of subscriptions (and the table that goes with them), for a control task.
pub(crate) struct Update {
    pub(crate) subscriptions: BTreeSet<Subscription>,
    pub(crate) table: RoutingTable,
    pub(crate) done: tokio::sync::oneshot::Sender<anyhow::Result<()>>,
}

/// The handle of a Redis source's control task: where updates go and the state it reports.
#[derive(Clone)]
pub(crate) struct ControlHandle {
    commands: tokio::sync::mpsc::Sender<Update>,
    status: Arc<std::sync::Mutex<SourceStatus>>,
    /// Names the source in errors.
    what: &'static str,
}

impl ControlHandle {
    /// A handle, the receiving end of its updates, and the status its task keeps.
    pub(crate) fn new(
        what: &'static str,
    ) -> (
        Self,
        tokio::sync::mpsc::Receiver<Update>,
        Arc<std::sync::Mutex<SourceStatus>>,
    ) {
        let (commands, updates) = tokio::sync::mpsc::channel(16);
        let status = Arc::new(std::sync::Mutex::new(SourceStatus::default()));
        (
            Self {
                commands,
                status: status.clone(),
                what,
            },
            updates,
            status,
        )
    }

    /// See [`Source::update`].
    pub(crate) async fn update(
        &self,
        subscriptions: BTreeSet<Subscription>,
        table: RoutingTable,
    ) -> anyhow::Result<()> {
        let (done, result) = tokio::sync::oneshot::channel();
        let what = self.what;
        self.commands
            .send(Update {
                subscriptions,
                table,
                done,
            })
            .await
            .map_err(|_| anyhow::anyhow!("the {what} has stopped"))?;
        result
            .await
            .map_err(|_| anyhow::anyhow!("the {what} stopped during an update"))?
    }

    /// The connection's current state.
    pub(crate) fn status(&self) -> SourceStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// What the host's subscriber connection is doing, for readiness and `/plugins`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SourceStatus {
    /// Whether the subscriber connection is up and subscribed to the current set.
    pub connected: bool,
    /// Exact channels subscribed.
    pub channels: usize,
    /// Patterns subscribed.
    pub patterns: usize,
    /// Sharded channels subscribed.
    pub sharded: usize,
    /// Streams read through consumer groups.
    pub streams: usize,
    /// Times the connection was re-established after a loss.
    pub reconnects: u64,
    /// The last connection error, if the connection is down.
    pub last_error: Option<String>,
    /// What Redis's `notify-keyspace-events` lacks for the plugins' key subscriptions, when
    /// it lacks something (see [`crate::keyspace`]): the host is not ready meanwhile.
    pub keyspace_events: Option<MissingFlags>,
}

/// The subscriber side of a broker.
#[derive(Clone)]
pub enum Source {
    /// A Redis server, the readers of plugins' streams on it, and its key tracking.
    Redis(
        redis::RedisSource,
        Arc<streams::StreamReaders>,
        tracking::Tracking,
    ),
    /// A Redis Cluster, and the readers of plugins' streams on it.
    Cluster(cluster::ClusterSource, Arc<streams::StreamReaders>),
    /// The in-process broker.
    Embedded(Arc<embedded::EmbeddedBroker>),
}

impl Source {
    /// Makes `subscriptions` the subscribed set and `table` the routing table, without losing
    /// or duplicating a message for any plugin present in both the old and the new table,
    /// and reads exactly the table's streams. Returns once the new table routes messages.
    pub async fn update(
        &self,
        subscriptions: BTreeSet<Subscription>,
        table: RoutingTable,
    ) -> anyhow::Result<()> {
        match self {
            Source::Redis(source, streams, tracking) => {
                streams.update(table.streams());
                tracking.update(table.tracking_prefixes()).await;
                source.update(subscriptions, table).await
            }
            Source::Cluster(source, streams) => {
                streams.update(table.streams());
                source.update(subscriptions, table).await
            }
            Source::Embedded(broker) => {
                if !table.tracking_prefixes().is_empty() {
                    tracing::warn!(
                        "key tracking needs a Redis server: the in-process broker sends no \
                         invalidations"
                    );
                }
                if !table.keyspace_flags().is_empty() && !broker.keyspace_events() {
                    tracing::warn!(
                        "key subscriptions receive nothing here: the in-process broker's \
                         keyspace notifications are off (only `switchyard demo` turns them on)"
                    );
                }
                for target in table.streams() {
                    tracing::warn!(
                        plugin = %target.inbox.plugin(),
                        stream = %String::from_utf8_lossy(&target.key),
                        "streams need a Redis server; the in-process broker has none"
                    );
                }
                broker.update(subscriptions, table);
                Ok(())
            }
        }
    }

    /// `redis`, `cluster` or `embedded`, for metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Source::Redis(..) => "redis",
            Source::Cluster(..) => "cluster",
            Source::Embedded(_) => "embedded",
        }
    }

    /// The connection's current state.
    pub fn status(&self) -> SourceStatus {
        match self {
            Source::Redis(source, streams, _) => SourceStatus {
                streams: streams.count(),
                ..source.status()
            },
            Source::Cluster(source, streams) => SourceStatus {
                streams: streams.count(),
                ..source.status()
            },
            Source::Embedded(broker) => broker.status(),
        }
    }

    /// Stops the stream readers, after each has acknowledged what its plugin handled.
    pub async fn stop_streams(&self) {
        if let Source::Redis(_, streams, _) | Source::Cluster(_, streams) = self {
            streams.stop().await;
        }
    }
}
