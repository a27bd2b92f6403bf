//! The router: for every delivery, finds the plugins that must see it and offers it to their
//! queues. It never waits: a full queue sheds for that plugin only (see [`crate::worker`]).
//!
//! # Once per plugin
//!
//! Redis sends one delivery per matching subscription of the connection: a `message` for an
//! exact channel and one `pmessage` per matching pattern. A plugin whose several
//! subscriptions match one published message must still see it once. The rule: deliver to a
//! plugin only on the delivery of the *first* of its own subscriptions (in the order it listed
//! them) that matches the channel. Which deliveries Redis sends for one `PUBLISH` depends only
//! on the connection's subscriptions, and they arrive back to back, so the rule picks exactly
//! one of them, provided the table does not change in the middle of that run.
//!
//! # Key subscriptions
//!
//! A plugin's key subscription (see [`crate::keyspace`]) is, on the wire, a pattern like any
//! other: `__keyspace@DB__:KEYS`, shared with every plugin that needs the same one. What
//! differs is delivery: the plugin sees the key as the channel and the event as the payload,
//! and only for the events it listed; others are dropped here, before its queue. A table
//! without key subscriptions skips both steps.
//!
//! # Tracked keys
//!
//! A plugin may also track key prefixes (`[subscriptions] tracking = ["cache:"]`): the source
//! asks Redis for client-side caching invalidations of those keys (`CLIENT TRACKING ON BCAST
//! PREFIX ...`) on connections of its own, and hands each to the router
//! ([`Router::invalidate_tracked`]). A tracking plugin gets a message per invalidated key
//! (the key as the channel, `invalidate` as the payload), once, under its first prefix that
//! matches; and one `flush` message (empty channel) whenever every key may have changed:
//! Redis flushed its tracking table, or a tracking connection was lost. Invalidations do not
//! pass the barrier rule above: they come from other connections, and each is routed by the
//! table in force when it arrives.
//!
//! # Switching tables
//!
//! Tables therefore change only at *barriers*: the source publishes a marker on a private
//! channel (`__switchyard:barrier:<id>`) once every new subscription is confirmed, and the
//! router switches to the staged table when the marker comes through the stream, between two
//! published messages. Subscriptions that the new table no longer needs are dropped only
//! after that. At every point of the stream, then, the table in force refers only to
//! subscriptions the connection has, and no message is lost or doubled for a plugin that is
//! in both tables.

mod table;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use bytes::Bytes;
use tokio::sync::oneshot;

use crate::message::{Delivery, RESERVED_PREFIX, Via, is_reserved};

pub use table::{FLUSH, INVALIDATE, Route, RoutingTable, StreamTarget};

/// Routes deliveries through the table in force and switches tables at barriers.
pub struct Router {
    table: ArcSwap<RoutingTable>,
    barrier_channel: Bytes,
    staged: Mutex<VecDeque<Staged>>,
    next_barrier: AtomicU64,
    received: AtomicU64,
    unrouted: AtomicU64,
    oversize: AtomicU64,
    max_payload: usize,
    oversize_gate: crate::rate::TokenBucket,
}

/// A table waiting for its barrier.
struct Staged {
    barrier: u64,
    table: Arc<RoutingTable>,
    applied: oneshot::Sender<()>,
}

/// A staged table: publish `payload` on `channel` through the stream, then await `applied`.
pub struct Barrier {
    /// The router's private barrier channel.
    pub channel: Bytes,
    /// The barrier's sequence number, as the marker's payload.
    pub payload: Bytes,
    /// Fires once the table is in force.
    pub applied: oneshot::Receiver<()>,
}

impl Router {
    /// A router with an empty table. `instance` makes the barrier channel unique to this host,
    /// so that hosts sharing a Redis do not see each other's markers.
    /// Payloads over `max_payload` bytes are dropped before any plugin sees them.
    pub fn new(instance: &str, max_payload: usize) -> Self {
        let mut channel = RESERVED_PREFIX.to_vec();
        channel.extend_from_slice(b"barrier:");
        channel.extend_from_slice(instance.as_bytes());
        Self {
            table: ArcSwap::from_pointee(RoutingTable::default()),
            barrier_channel: channel.into(),
            staged: Mutex::new(VecDeque::new()),
            next_barrier: AtomicU64::new(1),
            received: AtomicU64::new(0),
            unrouted: AtomicU64::new(0),
            oversize: AtomicU64::new(0),
            max_payload,
            // One warning a second about oversize messages is plenty.
            oversize_gate: crate::rate::TokenBucket::new(1.0, 1.0),
        }
    }

    /// The channel the source must keep subscribed for barriers to come through.
    pub fn barrier_channel(&self) -> &Bytes {
        &self.barrier_channel
    }

    /// Routes one delivery. Called by the source, in stream order, on its reading task.
    pub fn deliver(&self, delivery: Delivery) {
        if is_reserved(&delivery.channel) {
            if delivery.channel == self.barrier_channel && delivery.via == Via::Channel {
                self.reach_barrier(&delivery.payload);
            }
            return;
        }
        self.received.fetch_add(1, Ordering::Relaxed);
        if delivery.payload.len() > self.max_payload {
            self.oversize.fetch_add(1, Ordering::Relaxed);
            if self.oversize_gate.admit() {
                tracing::warn!(
                    channel = %String::from_utf8_lossy(&delivery.channel),
                    bytes = delivery.payload.len(),
                    limit = self.max_payload,
                    "dropping a message over the payload limit"
                );
            }
            return;
        }
        if self.table.load().dispatch(delivery) == 0 {
            self.unrouted.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Hands an invalidation of client-side caching (`Some(key)`) or a flush (`None`) to the
    /// plugins tracking it, through the table in force (see
    /// [`RoutingTable::dispatch_invalidation`]).
    pub fn invalidate_tracked(&self, key: Option<&Bytes>) {
        self.table.load().dispatch_invalidation(key);
    }

    /// Stages `table` to take over at the returned barrier.
    pub fn stage(&self, table: RoutingTable) -> Barrier {
        let barrier = self.next_barrier.fetch_add(1, Ordering::Relaxed);
        let (applied, applied_rx) = oneshot::channel();
        self.lock_staged().push_back(Staged {
            barrier,
            table: Arc::new(table),
            applied,
        });
        Barrier {
            channel: self.barrier_channel.clone(),
            payload: Bytes::from(barrier.to_string()),
            applied: applied_rx,
        }
    }

    /// Puts the newest staged table (or `table`, if given) in force now. For moments when no
    /// message can be in flight: before the connection subscribes, or under the embedded
    /// broker's lock.
    pub fn apply_now(&self, table: Option<RoutingTable>) {
        let staged: Vec<Staged> = self.lock_staged().drain(..).collect();
        let newest = table
            .map(Arc::new)
            .or_else(|| staged.last().map(|s| s.table.clone()));
        if let Some(table) = newest {
            self.table.store(table);
        }
        for s in staged {
            let _ = s.applied.send(());
        }
    }

    /// The table in force.
    pub fn table(&self) -> Arc<RoutingTable> {
        self.table.load_full()
    }

    /// Deliveries seen (barriers excluded).
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Deliveries dropped for a payload over the limit.
    pub fn oversize(&self) -> u64 {
        self.oversize.load(Ordering::Relaxed)
    }

    /// Deliveries no plugin wanted (for example, a pattern's messages just before it is
    /// unsubscribed).
    pub fn unrouted(&self) -> u64 {
        self.unrouted.load(Ordering::Relaxed)
    }

    fn reach_barrier(&self, payload: &[u8]) {
        let Some(reached) = std::str::from_utf8(payload)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
        else {
            return;
        };
        let mut staged = self.lock_staged();
        let mut done = Vec::new();
        while staged.front().is_some_and(|s| s.barrier <= reached) {
            done.extend(staged.pop_front());
        }
        drop(staged);
        if let Some(last) = done.last() {
            self.table.store(last.table.clone());
        }
        for s in done {
            let _ = s.applied.send(());
        }
    }

    fn lock_staged(&self) -> std::sync::MutexGuard<'_, VecDeque<Staged>> {
        // The queue stays consistent even if a holder panicked: every operation on it is a
        // single push or pop.
        self.staged.lock().unwrap_or_else(|e| e.into_inner())
    }
}
