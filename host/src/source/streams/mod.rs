//! Streams: at-least-once delivery through Redis consumer groups.
//!
//! Every (plugin, stream) pair gets a reader task. The reader creates the group if it is
//! missing (`XGROUP CREATE ... MKSTREAM`), then loops:
//!
//! 1. entries whose retry is due are claimed again by this consumer (`XCLAIM`, which counts a
//!    delivery);
//! 2. every so often, entries another consumer left idle for longer than `claim_idle` are
//!    taken over (`XAUTOCLAIM`), so a replica that died does not strand its work;
//! 3. otherwise new entries are read in batches (`XREADGROUP ... >`).
//!
//! A batch goes into the plugin's queue (beyond its capacity: the reader bounds what is in
//! flight, and nothing read is shed), each entry with a [`Ticket`](crate::stream_entry::Ticket) the worker finishes.
//! The reader keeps up to two batches there: while the plugin handles one, the reader reads
//! the next, so the plugin does not wait a round trip between batches. That read ahead does
//! not block: when it finds nothing new, the reader lets the batches in flight finish, then
//! blocks in `XREADGROUP`. Batches are queued in the order they were read, so a plugin with
//! one worker sees the stream in order (retried entries come again later).
//!
//! Once every ticket of the oldest batch is in, the reader acknowledges what succeeded
//! (`XACK`), in one pipeline with the next read ahead, or on its own when no such read
//! follows. An entry is acknowledged only after its `handle` succeeded. A failed entry
//! is retried after a backoff that doubles per delivery; once it has been delivered
//! `max_deliveries` times and fails again, it is added to `<stream>:dead` with the plugin,
//! version and error, and acknowledged. An entry the plugin rejects as `invalid` (retrying
//! the same input will fail again) goes to the dead-letter stream at once, and so does an
//! entry larger than `plugins.max_payload_bytes` (its fields, names and values together),
//! which no plugin is given: retrying it would only read it again, and the dead letter keeps
//! it for whoever can deal with it. An entry the
//! plugin could not take (parked, stopping) is retried without counting against it. A
//! claim waits until no batch is in flight, so that it never takes this consumer's own
//! queued entries.
//!
//! After a lost connection the reader reconnects, waits for the batches it had in flight and
//! acknowledges what they handled, then starts over with the entries still pending for its
//! own consumer name, so a restart with the same name (a Kubernetes pod keeps its name across
//! a container restart) resumes where it stopped. Delivery is at least once: an entry can be
//! handled again after a crash between `handle` and `XACK` (at most the two batches in
//! flight), or when it was claimed from a consumer that was only slow: an entry can wait in
//! the queue for two batches' handling time, and `claim_idle` must stay above that. Plugins
//! use the entry id as their idempotency key.

mod batch;
mod connection;
mod reader;
mod reply;

use std::sync::Arc;
use std::sync::Mutex;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::router::StreamTarget;
use crate::trace::Tracing;
use reader::Reader;

/// How readers connect: to one server, or to a cluster (commands routed by key).
#[derive(Clone)]
pub enum StreamBackend {
    /// One Redis server.
    Single(Arc<redis::Client>),
    /// A Redis Cluster.
    Cluster(Arc<redis::cluster::ClusterClient>),
}

/// The readers of every plugin's streams.
pub struct StreamReaders {
    backend: StreamBackend,
    shutdown: CancellationToken,
    /// Entries larger than this (`plugins.max_payload_bytes`) are dead-lettered unhandled.
    max_entry_bytes: usize,
    /// Where reads, acknowledgements, retries and dead letters are traced.
    tracing: Arc<Tracing>,
    running: Mutex<Vec<Running>>,
    /// Readers told to stop, still acknowledging their last batches.
    stopping: Mutex<Vec<JoinHandle<()>>>,
}

struct Running {
    target: StreamTarget,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl StreamReaders {
    /// Readers connecting through `backend`, all stopped by `shutdown`.
    pub fn new(backend: StreamBackend, shutdown: CancellationToken) -> Self {
        Self {
            backend,
            shutdown,
            max_entry_bytes: crate::effects::DEFAULT_MAX_PAYLOAD_BYTES,
            tracing: Arc::new(Tracing::off()),
            running: Mutex::new(Vec::new()),
            stopping: Mutex::new(Vec::new()),
        }
    }

    /// Dead-letters, unhandled, every entry whose fields (names and values) together are
    /// larger than `bytes` (`plugins.max_payload_bytes`), as the router drops a pub/sub
    /// message with a larger payload.
    pub fn with_max_entry_bytes(mut self, bytes: usize) -> Self {
        self.max_entry_bytes = bytes;
        self
    }

    /// Traces each read, and what becomes of each traced entry, with `tracing`.
    pub fn with_tracing(mut self, tracing: Arc<Tracing>) -> Self {
        self.tracing = tracing;
        self
    }

    /// Runs exactly one reader per target: starts the new, stops the gone. A reader being
    /// stopped finishes its batches in flight (acknowledging what was handled) first.
    pub fn update(&self, targets: Vec<StreamTarget>) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let (keep, stop): (Vec<_>, Vec<_>) = std::mem::take(&mut *running)
            .into_iter()
            .partition(|r| !r.task.is_finished() && targets.iter().any(|t| t.same(&r.target)));
        *running = keep;
        let mut stopping = self.stopping.lock().unwrap_or_else(|e| e.into_inner());
        stopping.retain(|task| !task.is_finished());
        for reader in stop {
            reader.stop.cancel();
            stopping.push(reader.task);
        }
        drop(stopping);
        for target in targets {
            if running.iter().any(|r| r.target.same(&target)) {
                continue;
            }
            let stop = self.shutdown.child_token();
            let reader = Reader {
                target: target.clone(),
                backend: self.backend.clone(),
                max_entry_bytes: self.max_entry_bytes,
                tracing: self.tracing.clone(),
                stop: stop.clone(),
                stats: target.inbox.stats().streams.clone(),
            };
            tracing::info!(
                plugin = %target.inbox.plugin(),
                stream = %String::from_utf8_lossy(&target.key),
                group = %target.settings.group,
                consumer = %target.settings.consumer,
                "reading stream"
            );
            running.push(Running {
                target,
                stop,
                task: tokio::spawn(reader.run()),
            });
        }
    }

    /// How many streams are being read.
    pub fn count(&self) -> usize {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Stops every reader and waits for them (and those stopped earlier) to finish their
    /// batches.
    pub async fn stop(&self) {
        let tasks: Vec<_> = {
            let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            let mut stopping = self.stopping.lock().unwrap_or_else(|e| e.into_inner());
            let mut tasks: Vec<_> = running
                .drain(..)
                .map(|r| {
                    r.stop.cancel();
                    r.task
                })
                .collect();
            tasks.append(&mut stopping);
            tasks
        };
        for task in tasks {
            let _ = task.await;
        }
    }
}
