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
//! flight, and nothing read is shed), each entry with a [`Ticket`] the worker finishes.
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

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use redis::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::redis::{BACKOFF_MAX, BACKOFF_MIN, Backoff, HEALTHY_SESSION};
use crate::ContentHash;
use crate::config::{StartFrom, StreamSettings};
use crate::message::Subscription;
use crate::router::StreamTarget;
use crate::stream_entry::{Outcome, StreamEntry, StreamStats, Tally, Ticket};
use crate::worker::Envelope;
use crate::worker::instance::INVALID_PREFIX;

/// Longest wait before an entry's next retry.
const RETRY_MAX: Duration = Duration::from_secs(60);
/// Extra time a blocking read may take on the wire beyond its `BLOCK` time.
const READ_MARGIN: Duration = Duration::from_secs(5);
/// Batches a reader keeps in its plugin's queue. Two are enough to keep the plugin busy:
/// the next batch is read while the plugin handles the current one, so it is queued before
/// the plugin runs out, whenever one read takes less time than handling one batch. A third
/// would help only a reader whose round trip to Redis outlasts a whole batch (a larger
/// `batch` is the remedy there), and every batch queued ahead adds to what a crash makes
/// handled again and to how long an entry waits, pending, before its turn (`claim_idle`
/// must stay above that wait, or another consumer claims the entry meanwhile).
const BATCHES_IN_FLIGHT: usize = 2;

/// How readers connect: to one server, or to a cluster (commands routed by key).
#[derive(Clone)]
pub enum StreamBackend {
    /// One Redis server.
    Single(Arc<redis::Client>),
    /// A Redis Cluster.
    Cluster(Arc<redis::cluster::ClusterClient>),
}

/// A reader's own connection: a blocking `XREADGROUP` must not hold up anyone else's
/// commands, so readers share nothing.
enum Connection {
    Single(redis::aio::MultiplexedConnection),
    Cluster(Box<redis::cluster_async::ClusterConnection>),
}

impl Connection {
    async fn query(&mut self, cmd: &redis::Cmd) -> redis::RedisResult<Value> {
        match self {
            Connection::Single(c) => cmd.query_async(c).await,
            Connection::Cluster(c) => cmd.query_async(c.as_mut()).await,
        }
    }

    /// Sends `pipe` as one write; the replies of the commands not ignored, in order.
    async fn query_pipe(&mut self, pipe: &redis::Pipeline) -> redis::RedisResult<Vec<Value>> {
        match self {
            Connection::Single(c) => pipe.query_async(c).await,
            Connection::Cluster(c) => pipe.query_async(c.as_mut()).await,
        }
    }
}

impl StreamBackend {
    async fn connect(&self, block: Duration) -> redis::RedisResult<Connection> {
        let timeout = block + READ_MARGIN;
        match self {
            StreamBackend::Single(client) => {
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(5)))
                    .set_response_timeout(Some(timeout));
                Ok(Connection::Single(
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?,
                ))
            }
            StreamBackend::Cluster(client) => {
                let config = redis::cluster::ClusterConfig::new()
                    .set_connection_timeout(Duration::from_secs(5))
                    .set_response_timeout(timeout);
                Ok(Connection::Cluster(Box::new(
                    client.get_async_connection_with_config(config).await?,
                )))
            }
        }
    }
}

/// The readers of every plugin's streams.
pub struct StreamReaders {
    backend: StreamBackend,
    shutdown: CancellationToken,
    /// Entries larger than this (`plugins.max_payload_bytes`) are dead-lettered unhandled.
    max_entry_bytes: usize,
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

/// One entry as Redis returned it.
struct RawEntry {
    id: String,
    fields: Vec<(String, Bytes)>,
    /// Deleted from the stream while pending: Redis returns its id without fields.
    deleted: bool,
}

/// An entry scheduled for another delivery.
struct Retry {
    id: String,
    due: Instant,
    /// Deliveries so far, as Redis counts them.
    deliveries: u64,
}

/// A batch in the plugin's queue, its outcomes still coming in.
struct Batch {
    /// Its entries' ids, in the order queued (a ticket's index).
    ids: Vec<String>,
    /// Deliveries so far, by id, where Redis said (an entry read for the first time: 1).
    counts: HashMap<String, u64>,
    tally: Arc<Tally>,
    /// When it was queued: its retries are scheduled from here.
    queued: Instant,
}

/// What a reader has handed to the plugin and not yet acknowledged. It outlives a session:
/// after a lost connection, the next session first waits for these batches and
/// acknowledges what they handled, then reads again what is still pending.
#[derive(Default)]
struct InFlight {
    /// Batches in the plugin's queue, oldest first; at most [`BATCHES_IN_FLIGHT`].
    batches: VecDeque<Batch>,
    /// Entries done with (handled, dead-lettered, deleted meanwhile) whose `XACK` is still
    /// to be sent.
    done: Vec<String>,
}

struct Reader {
    target: StreamTarget,
    backend: StreamBackend,
    max_entry_bytes: usize,
    stop: CancellationToken,
    stats: Arc<StreamStats>,
}

/// Why a session ended without an error.
struct Stopped;

impl Reader {
    async fn run(self) {
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        let mut retries = Vec::new();
        let mut in_flight = InFlight::default();
        loop {
            let started = Instant::now();
            match self.session(&mut retries, &mut in_flight).await {
                Ok(Stopped) => return,
                Err(e) => {
                    if started.elapsed() >= HEALTHY_SESSION {
                        backoff.reset();
                    }
                    let wait = backoff.next_wait();
                    tracing::warn!(
                        plugin = %self.target.inbox.plugin(),
                        stream = %self.key_text(),
                        retry_in = ?wait,
                        "stream reader lost Redis: {e}"
                    );
                    tokio::select! {
                        () = self.stop.cancelled() => return,
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    fn key_text(&self) -> String {
        String::from_utf8_lossy(&self.target.key).into_owned()
    }

    fn settings(&self) -> &StreamSettings {
        &self.target.settings
    }

    /// One connection's worth of reading; returns `Ok` only when told to stop.
    async fn session(
        &self,
        retries: &mut Vec<Retry>,
        in_flight: &mut InFlight,
    ) -> redis::RedisResult<Stopped> {
        let settings = self.settings();
        let mut conn = self.backend.connect(settings.block).await?;
        self.create_group(&mut conn).await?;
        // What the last session queued is acknowledged as far as it was handled; what
        // failed is read again below, like everything else this consumer never acked.
        self.finish_all(&mut conn, in_flight, retries).await?;

        // What this consumer read before (a restart, a lost connection) and never acked.
        retries.clear();
        let mut after = "0".to_owned();
        loop {
            let entries = self.read_group(&mut conn, &after, None).await?;
            let Some(last) = entries.last() else { break };
            after = last.id.clone();
            let counts = self.delivery_counts(&mut conn, &entries).await?;
            self.queue(entries, counts, in_flight);
            self.finish_all(&mut conn, in_flight, retries).await?;
            if self.stop.is_cancelled() {
                return Ok(Stopped);
            }
        }

        let claim_every = (settings.claim_idle / 2).max(Duration::from_millis(100));
        let mut next_claim = Instant::now();
        let mut claim_cursor = "0-0".to_owned();
        // The last read ahead found nothing waiting: no more reads until the batches in
        // flight are done, then a blocking one.
        let mut caught_up = false;
        loop {
            if self.stop.is_cancelled() || self.target.inbox.is_closed() {
                self.finish_all(&mut conn, in_flight, retries).await?;
                return Ok(Stopped);
            }
            let now = Instant::now();
            let busy = !in_flight.batches.is_empty();
            let room = in_flight.batches.len() < BATCHES_IN_FLIGHT;
            let claim_due = now >= next_claim;
            if room && retries.iter().any(|r| r.due <= now) {
                let due: Vec<Retry> = {
                    let (due, later) = std::mem::take(retries)
                        .into_iter()
                        .partition::<Vec<_>, _>(|r| r.due <= now);
                    *retries = later;
                    due
                };
                self.flush(&mut conn, &mut in_flight.done).await?;
                self.retry(&mut conn, due, in_flight).await?;
            } else if busy && (!room || caught_up || claim_due) {
                // A claim waits for the batches in flight too: `XAUTOCLAIM` would take this
                // consumer's own queued entries once they idled past `claim_idle`.
                self.flush(&mut conn, &mut in_flight.done).await?;
                self.settle_oldest(&mut conn, in_flight, retries).await?;
            } else if claim_due {
                self.flush(&mut conn, &mut in_flight.done).await?;
                let (entries, cursor) = self.auto_claim(&mut conn, &claim_cursor).await?;
                if cursor == "0-0" {
                    next_claim = now + claim_every;
                }
                claim_cursor = cursor;
                if !entries.is_empty() {
                    self.stats
                        .claimed
                        .fetch_add(entries.len() as u64, Ordering::Relaxed);
                    tracing::info!(
                        plugin = %self.target.inbox.plugin(),
                        stream = %self.key_text(),
                        entries = entries.len(),
                        "claimed entries left idle by another consumer"
                    );
                    let counts = self.delivery_counts(&mut conn, &entries).await?;
                    self.queue(entries, counts, in_flight);
                }
            } else if busy {
                // Read ahead while the plugin works, without blocking (a blocking read
                // would hold up retries falling due meanwhile); the acknowledgement of the
                // batch just done goes in the same round trip.
                let entries = self
                    .ack_and_read_ahead(&mut conn, &mut in_flight.done)
                    .await?;
                caught_up = entries.is_empty();
                self.queue(entries, HashMap::new(), in_flight);
            } else {
                self.flush(&mut conn, &mut in_flight.done).await?;
                caught_up = false;
                let wake = retries
                    .iter()
                    .map(|r| r.due)
                    .chain([next_claim])
                    .min()
                    .unwrap_or(next_claim);
                let block = wake
                    .saturating_duration_since(now)
                    .min(settings.block)
                    .max(Duration::from_millis(1));
                let entries = tokio::select! {
                    // Entries read by a cancelled read stay pending for this consumer and
                    // come back at its next start (or to another consumer by claim).
                    () = self.stop.cancelled() => return Ok(Stopped),
                    entries = self.read_group(&mut conn, ">", Some(block)) => entries?,
                };
                self.queue(entries, HashMap::new(), in_flight);
            }
        }
    }

    /// `XGROUP CREATE key group $|0 MKSTREAM`; an existing group is fine.
    async fn create_group(&self, conn: &mut Connection) -> redis::RedisResult<()> {
        let settings = self.settings();
        let start = match settings.start {
            StartFrom::New => "$",
            StartFrom::All => "0",
        };
        let created = conn
            .query(
                redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(self.target.key.as_ref())
                    .arg(&settings.group)
                    .arg(start)
                    .arg("MKSTREAM"),
            )
            .await;
        match created {
            Ok(_) => {
                tracing::info!(stream = %self.key_text(), group = %settings.group, "created consumer group");
                Ok(())
            }
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `XREADGROUP GROUP g c COUNT n [BLOCK ms] STREAMS key id`.
    fn read_cmd(&self, id: &str, block: Option<Duration>) -> redis::Cmd {
        let settings = self.settings();
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&settings.group)
            .arg(&settings.consumer)
            .arg("COUNT")
            .arg(settings.batch);
        if let Some(block) = block {
            cmd.arg("BLOCK").arg(block.as_millis().max(1) as u64);
        }
        cmd.arg("STREAMS").arg(self.target.key.as_ref()).arg(id);
        cmd
    }

    /// Reads after `id` (`>`: new entries; `0`: this consumer's pending ones).
    async fn read_group(
        &self,
        conn: &mut Connection,
        id: &str,
        block: Option<Duration>,
    ) -> redis::RedisResult<Vec<RawEntry>> {
        let reply = conn.query(&self.read_cmd(id, block)).await?;
        Ok(read_reply_entries(reply))
    }

    /// Acknowledges `done` and reads new entries without blocking, in one pipeline: one
    /// write and one round trip for both.
    async fn ack_and_read_ahead(
        &self,
        conn: &mut Connection,
        done: &mut Vec<String>,
    ) -> redis::RedisResult<Vec<RawEntry>> {
        if done.is_empty() {
            return self.read_group(conn, ">", None).await;
        }
        let mut pipe = redis::pipe();
        pipe.add_command(self.ack_cmd(done))
            .ignore()
            .add_command(self.read_cmd(">", None));
        // An error reply to either command fails the whole pipeline.
        let reply = conn.query_pipe(&pipe).await?.into_iter().next();
        self.count_acked(done.len());
        done.clear();
        Ok(reply.map(read_reply_entries).unwrap_or_default())
    }

    /// `XAUTOCLAIM key group consumer min-idle cursor COUNT n`: entries and the next cursor.
    async fn auto_claim(
        &self,
        conn: &mut Connection,
        cursor: &str,
    ) -> redis::RedisResult<(Vec<RawEntry>, String)> {
        let settings = self.settings();
        let reply = conn
            .query(
                redis::cmd("XAUTOCLAIM")
                    .arg(self.target.key.as_ref())
                    .arg(&settings.group)
                    .arg(&settings.consumer)
                    .arg(settings.claim_idle.as_millis() as u64)
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(settings.batch),
            )
            .await?;
        let mut parts = into_array(reply).into_iter();
        let next = parts.next().and_then(text).unwrap_or_else(|| "0-0".into());
        let entries = parts.next().map(entries_of).unwrap_or_default();
        Ok((entries, next))
    }

    /// Deliveries so far of `entries`, all pending for this consumer (`XPENDING`).
    async fn delivery_counts(
        &self,
        conn: &mut Connection,
        entries: &[RawEntry],
    ) -> redis::RedisResult<HashMap<String, u64>> {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Ok(HashMap::new());
        };
        let settings = self.settings();
        let reply = conn
            .query(
                redis::cmd("XPENDING")
                    .arg(self.target.key.as_ref())
                    .arg(&settings.group)
                    .arg(&first.id)
                    .arg(&last.id)
                    .arg(entries.len() * 2 + 16)
                    .arg(&settings.consumer),
            )
            .await?;
        Ok(into_array(reply)
            .into_iter()
            .filter_map(|row| {
                let mut row = into_array(row).into_iter();
                let id = row.next().and_then(text)?;
                let count = row.nth(2).and_then(integer)?;
                Some((id, count))
            })
            .collect())
    }

    /// Claims due retries again for this consumer (`XCLAIM`, which counts a delivery) and
    /// queues them. Entries deleted meanwhile are acknowledged away.
    async fn retry(
        &self,
        conn: &mut Connection,
        due: Vec<Retry>,
        in_flight: &mut InFlight,
    ) -> redis::RedisResult<()> {
        let settings = self.settings();
        let mut cmd = redis::cmd("XCLAIM");
        cmd.arg(self.target.key.as_ref())
            .arg(&settings.group)
            .arg(&settings.consumer)
            .arg(0);
        for retry in &due {
            cmd.arg(&retry.id);
        }
        let entries = entries_of(conn.query(&cmd).await?);
        let gone = due
            .iter()
            .filter(|r| !entries.iter().any(|e| e.id == r.id))
            .map(|r| r.id.clone());
        in_flight.done.extend(gone);
        let counts: HashMap<String, u64> =
            due.into_iter().map(|r| (r.id, r.deliveries + 1)).collect();
        self.queue(entries, counts, in_flight);
        Ok(())
    }

    /// Hands `entries` to the plugin as one batch, after those in flight (a plugin with one
    /// worker takes them in that order). Entries deleted meanwhile are only acknowledged.
    fn queue(
        &self,
        entries: Vec<RawEntry>,
        counts: HashMap<String, u64>,
        in_flight: &mut InFlight,
    ) {
        let (gone, entries): (Vec<_>, Vec<_>) = entries.into_iter().partition(|e| e.deleted);
        // Nothing left to handle: only the pending record remains.
        in_flight.done.extend(gone.into_iter().map(|e| e.id));
        if entries.is_empty() {
            return;
        }
        let tally = Arc::new(Tally::new(entries.len()));
        let received_at = SystemTime::now();
        let mut ids = Vec::with_capacity(entries.len());
        for (index, entry) in entries.into_iter().enumerate() {
            ids.push(entry.id.clone());
            let size: usize = entry
                .fields
                .iter()
                .map(|(name, value)| name.len() + value.len())
                .sum();
            if size > self.max_entry_bytes {
                tally.report(
                    index,
                    Outcome::Oversize(format!(
                        "entry of {size} bytes (fields and their names) is over plugins.max_payload_bytes ({} bytes); no plugin was given it",
                        self.max_entry_bytes
                    )),
                );
                continue;
            }
            let payload = entry
                .fields
                .iter()
                .find(|(name, _)| name == "payload")
                .map(|(_, value)| value.clone())
                .unwrap_or_default();
            // A closed queue drops the envelope, and its ticket reports it skipped.
            self.target.inbox.offer_entry(Envelope {
                channel: self.target.key.clone(),
                subscription: Subscription::Stream(self.target.key.clone()),
                payload,
                received_at,
                entry: Some(Box::new(StreamEntry {
                    id: entry.id,
                    fields: entry.fields,
                    ticket: Ticket::new(index, tally.clone()),
                })),
            });
        }
        in_flight.batches.push_back(Batch {
            ids,
            counts,
            tally,
            queued: Instant::now(),
        });
    }

    /// Waits for every outcome of the oldest batch in flight, then marks what succeeded as
    /// done, dead-letters what failed for good and schedules retries for the rest.
    async fn settle_oldest(
        &self,
        conn: &mut Connection,
        in_flight: &mut InFlight,
        retries: &mut Vec<Retry>,
    ) -> redis::RedisResult<()> {
        let Some(batch) = in_flight.batches.pop_front() else {
            return Ok(());
        };
        let outcomes = batch.tally.settled().await;
        let settings = self.settings();
        for (id, outcome) in batch.ids.into_iter().zip(outcomes) {
            let deliveries = batch.counts.get(&id).copied().unwrap_or(1);
            match outcome {
                Outcome::Handled => in_flight.done.push(id),
                // `invalid` says retrying the same input will fail again: no point waiting.
                Outcome::Failed { error, version }
                    if deliveries >= settings.max_deliveries
                        || error.starts_with(INVALID_PREFIX) =>
                {
                    self.dead_letter(conn, &id, deliveries, &error, Some(&version))
                        .await?;
                    in_flight.done.push(id);
                }
                Outcome::Oversize(error) => {
                    self.dead_letter(conn, &id, deliveries, &error, None)
                        .await?;
                    in_flight.done.push(id);
                }
                Outcome::Failed { .. } | Outcome::Skipped => {
                    self.stats.retried.fetch_add(1, Ordering::Relaxed);
                    let exponent = deliveries.saturating_sub(1).min(16) as u32;
                    let wait = settings
                        .retry_backoff
                        .saturating_mul(1 << exponent)
                        .min(RETRY_MAX);
                    retries.push(Retry {
                        id,
                        due: batch.queued + wait,
                        deliveries,
                    });
                }
            }
        }
        Ok(())
    }

    /// Settles every batch in flight and acknowledges what is done.
    async fn finish_all(
        &self,
        conn: &mut Connection,
        in_flight: &mut InFlight,
        retries: &mut Vec<Retry>,
    ) -> redis::RedisResult<()> {
        while !in_flight.batches.is_empty() {
            self.settle_oldest(conn, in_flight, retries).await?;
        }
        self.flush(conn, &mut in_flight.done).await
    }

    /// Acknowledges `done` now, if anything is.
    async fn flush(&self, conn: &mut Connection, done: &mut Vec<String>) -> redis::RedisResult<()> {
        if done.is_empty() {
            return Ok(());
        }
        conn.query(&self.ack_cmd(done)).await?;
        self.count_acked(done.len());
        done.clear();
        Ok(())
    }

    /// `XACK key group id...`.
    fn ack_cmd(&self, ids: &[String]) -> redis::Cmd {
        let mut cmd = redis::cmd("XACK");
        cmd.arg(self.target.key.as_ref())
            .arg(&self.settings().group);
        for id in ids {
            cmd.arg(id);
        }
        cmd
    }

    fn count_acked(&self, entries: usize) {
        self.stats
            .acked
            .fetch_add(entries as u64, Ordering::Relaxed);
    }

    /// Adds the entry to `<stream>:dead`: `dead.*` fields saying where it came from and why
    /// it failed, then its own fields. It is acknowledged by the caller. `version` is the
    /// plugin version that failed on it; none for an entry the host refused unhandled, whose
    /// `dead.version` is then `none`.
    async fn dead_letter(
        &self,
        conn: &mut Connection,
        id: &str,
        deliveries: u64,
        error: &str,
        version: Option<&ContentHash>,
    ) -> redis::RedisResult<()> {
        let mut dead = self.target.key.to_vec();
        dead.extend_from_slice(b":dead");
        // The entry's own fields, read again: the dead-letter copy must be whole.
        let range = conn
            .query(
                redis::cmd("XRANGE")
                    .arg(self.target.key.as_ref())
                    .arg(id)
                    .arg(id),
            )
            .await?;
        let fields = entries_of(range)
            .into_iter()
            .next()
            .map(|e| e.fields)
            .unwrap_or_default();
        let mut cmd = redis::cmd("XADD");
        cmd.arg(dead)
            .arg("*")
            .arg("dead.id")
            .arg(id)
            .arg("dead.plugin")
            .arg(self.target.inbox.plugin().as_str())
            .arg("dead.group")
            .arg(&self.settings().group)
            .arg("dead.version")
            .arg(version.map_or_else(|| "none".to_owned(), ContentHash::to_string))
            .arg("dead.deliveries")
            .arg(deliveries)
            .arg("dead.error")
            .arg(error);
        for (name, value) in &fields {
            cmd.arg(name).arg(value.as_ref());
        }
        conn.query(&cmd).await?;
        self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
        let why = if version.is_none() {
            "entry refused unhandled"
        } else if deliveries >= self.settings().max_deliveries {
            "entry failed too often"
        } else {
            "entry rejected as invalid"
        };
        tracing::warn!(
            plugin = %self.target.inbox.plugin(),
            stream = %self.key_text(),
            entry = id,
            deliveries,
            "{why}; moved to the dead-letter stream: {error}"
        );
        Ok(())
    }
}

/// The entries of an `XREADGROUP` reply: RESP2 `[[key, entries]]` or RESP3 `{key: entries}`.
fn read_reply_entries(reply: Value) -> Vec<RawEntry> {
    match reply {
        Value::Map(pairs) => pairs
            .into_iter()
            .flat_map(|(_, entries)| entries_of(entries))
            .collect(),
        Value::Array(streams) => streams
            .into_iter()
            .flat_map(|stream| {
                let mut parts = into_array(stream).into_iter();
                parts.nth(1).map(entries_of).unwrap_or_default()
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// `[[id, [field, value, ...]], ...]`. A nil entry is skipped; an id with nil fields (an
/// entry deleted while pending) is marked deleted.
fn entries_of(value: Value) -> Vec<RawEntry> {
    into_array(value)
        .into_iter()
        .filter_map(|entry| {
            let mut parts = into_array(entry).into_iter();
            let id = parts.next().and_then(text)?;
            let flat = parts.next().unwrap_or(Value::Nil);
            let deleted = matches!(flat, Value::Nil);
            let mut fields = Vec::new();
            let mut flat = into_array(flat).into_iter();
            while let (Some(name), Some(value)) = (flat.next(), flat.next()) {
                fields.push((text(name)?, bytes(value)?));
            }
            Some(RawEntry {
                id,
                fields,
                deleted,
            })
        })
        .collect()
}

fn into_array(value: Value) -> Vec<Value> {
    match value {
        Value::Array(items) | Value::Set(items) => items,
        _ => Vec::new(),
    }
}

fn bytes(value: Value) -> Option<Bytes> {
    match value {
        Value::BulkString(data) => Some(Bytes::from(data)),
        Value::SimpleString(text) => Some(Bytes::from(text)),
        Value::VerbatimString { text, .. } => Some(Bytes::from(text)),
        _ => None,
    }
}

/// A field name or id as text: the reply's own buffer when it is UTF-8 (Redis ids and the
/// usual field names are), a lossy copy otherwise.
fn text(value: Value) -> Option<String> {
    let data = match value {
        Value::BulkString(data) => data,
        Value::SimpleString(text) => return Some(text),
        Value::VerbatimString { text, .. } => return Some(text),
        _ => return None,
    };
    Some(
        String::from_utf8(data)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
    )
}

fn integer(value: Value) -> Option<u64> {
    match value {
        Value::Int(n) => u64::try_from(n).ok(),
        other => text(other)?.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn entries_keep_field_order_and_mark_deleted_ones() {
        let reply = Value::Array(vec![
            Value::Array(vec![
                bulk("1-0"),
                Value::Array(vec![bulk("z"), bulk("1"), bulk("a"), bulk("2")]),
            ]),
            Value::Nil,
            Value::Array(vec![bulk("2-0"), Value::Nil]),
        ]);
        let entries = entries_of(reply);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].id, "1-0");
        assert!(!entries[0].deleted);
        let names: Vec<_> = entries[0].fields.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["z", "a"]);
        assert_eq!(entries[1].id, "2-0");
        assert!(entries[1].deleted);
    }

    #[test]
    fn read_replies_in_both_protocols() {
        let entries = || {
            Value::Array(vec![Value::Array(vec![
                bulk("5-1"),
                Value::Array(vec![bulk("payload"), bulk("x")]),
            ])])
        };
        let resp2 = Value::Array(vec![Value::Array(vec![bulk("orders"), entries()])]);
        let resp3 = Value::Map(vec![(bulk("orders"), entries())]);
        for reply in [resp2, resp3] {
            let got = read_reply_entries(reply);
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].fields[0].1.as_ref(), b"x");
        }
        assert!(read_reply_entries(Value::Nil).is_empty());
    }
}
