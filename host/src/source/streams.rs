//! Streams: at-least-once delivery through Redis consumer groups.
//!
//! Every (plugin, stream) pair gets a reader task. The reader creates the group if it is
//! missing (`XGROUP CREATE ... MKSTREAM`), then loops:
//!
//! 1. entries whose retry is due are claimed again by this consumer (`XCLAIM`, which counts a
//!    delivery);
//! 2. every so often, entries another consumer left idle for longer than `claim_idle` are
//!    taken over (`XAUTOCLAIM`), so a replica that died does not strand its work;
//! 3. otherwise new entries are read in batches (`XREADGROUP ... >`, blocking).
//!
//! A batch goes into the plugin's queue (beyond its capacity: the batch size bounds what is in
//! flight, and nothing read is shed), each entry with a [`Ticket`] the worker finishes. The
//! reader waits for every ticket, then acknowledges what succeeded (`XACK`). A failed entry
//! is retried after a backoff that doubles per delivery; once it has been delivered
//! `max_deliveries` times and fails again, it is added to `<stream>:dead` with the plugin,
//! version and error, and acknowledged. An entry the plugin rejects as `invalid` (retrying
//! the same input will fail again) goes to the dead-letter stream at once. An entry the plugin could not take (parked, stopping)
//! is retried without counting against it.
//!
//! After a lost connection the reader starts over with the entries still pending for its own
//! consumer name, so a restart with the same name (a Kubernetes pod keeps its name across a
//! container restart) resumes where it stopped. Delivery is at least once: an entry can be
//! handled again after a crash between `handle` and `XACK`, or when it was claimed from a
//! consumer that was only slow. Plugins use the entry id as their idempotency key.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use redis::Value;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::Subscription;
use super::redis::{BACKOFF_MAX, BACKOFF_MIN, Backoff, HEALTHY_SESSION};
use crate::ContentHash;
use crate::worker::instance::INVALID_PREFIX;
use crate::worker::{Envelope, Inbox};

/// Longest wait before an entry's next retry.
const RETRY_MAX: Duration = Duration::from_secs(60);
/// Extra time a blocking read may take on the wire beyond its `BLOCK` time.
const READ_MARGIN: Duration = Duration::from_secs(5);

/// Where a new group starts reading.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StartFrom {
    /// Entries added after the group was created (`$`).
    #[default]
    New,
    /// Every entry already in the stream (`0`).
    All,
}

/// How one plugin reads its streams, resolved from the host's `[streams]` and the plugin's
/// manifest.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StreamSettings {
    /// The consumer group (default: the plugin's name).
    pub group: String,
    /// This host's name within the group (default: the host name).
    pub consumer: String,
    /// Entries read per `XREADGROUP`, and at most in flight.
    pub batch: usize,
    /// How long one read waits for new entries.
    pub block: Duration,
    /// Deliveries after which a failing entry goes to the dead-letter stream.
    pub max_deliveries: u64,
    /// Wait before the first retry; doubled per delivery, up to a minute.
    pub retry_backoff: Duration,
    /// Entries pending this long with another consumer are claimed.
    pub claim_idle: Duration,
    /// Where a group created by the host starts.
    pub start: StartFrom,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            group: String::new(),
            consumer: default_consumer(),
            batch: 64,
            block: Duration::from_secs(2),
            max_deliveries: 5,
            retry_backoff: Duration::from_millis(500),
            claim_idle: Duration::from_secs(60),
            start: StartFrom::New,
        }
    }
}

/// The consumer name a host uses unless configured: `HOSTNAME` (a Kubernetes pod's name),
/// else the kernel's host name, else `switchyard`.
pub fn default_consumer() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|name| !name.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|name| name.trim().to_owned())
                .filter(|name| !name.is_empty())
        })
        .unwrap_or_else(|| "switchyard".to_owned())
}

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
    fn same(&self, other: &StreamTarget) -> bool {
        self.key == other.key
            && self.inbox.same_queue(&other.inbox)
            && self.settings == other.settings
    }
}

/// One entry read from a stream, on its way to a plugin.
#[derive(Debug)]
pub struct StreamEntry {
    /// The entry id.
    pub id: String,
    /// Its fields, in order.
    pub fields: Vec<(String, Bytes)>,
    /// Reports the outcome to the reader.
    pub ticket: Ticket,
}

/// What became of one entry.
#[derive(Debug)]
enum Outcome {
    Handled,
    Failed {
        error: String,
        version: ContentHash,
    },
    /// The plugin did not run it (parked, stopping, its queue shed it).
    Skipped,
}

/// Reports an entry's outcome to its reader exactly once: when finished, or when dropped
/// unfinished (the entry was not handled).
#[derive(Debug, Default)]
pub struct Ticket {
    report: Option<(usize, mpsc::UnboundedSender<(usize, Outcome)>)>,
}

impl Ticket {
    /// Moves the ticket out, leaving an inert one.
    pub fn take(&mut self) -> Ticket {
        std::mem::take(self)
    }

    /// Reports how `handle` went, by `version`.
    pub fn finish(mut self, result: Result<(), String>, version: &ContentHash) {
        if let Some((index, report)) = self.report.take() {
            let outcome = match result {
                Ok(()) => Outcome::Handled,
                Err(error) => Outcome::Failed {
                    error,
                    version: *version,
                },
            };
            let _ = report.send((index, outcome));
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some((index, report)) = self.report.take() {
            let _ = report.send((index, Outcome::Skipped));
        }
    }
}

/// Counters of one plugin's stream reading, shown in `/plugins` and `/metrics`.
#[derive(Debug, Default)]
pub struct StreamStats {
    /// Entries acknowledged after a successful `handle`.
    pub acked: AtomicU64,
    /// Failed or skipped entries scheduled for another delivery.
    pub retried: AtomicU64,
    /// Entries moved to the dead-letter stream.
    pub dead_lettered: AtomicU64,
    /// Entries taken over from another consumer.
    pub claimed: AtomicU64,
}

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
    running: Mutex<Vec<Running>>,
    /// Readers told to stop, still acknowledging their last batch.
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
            running: Mutex::new(Vec::new()),
            stopping: Mutex::new(Vec::new()),
        }
    }

    /// Runs exactly one reader per target: starts the new, stops the gone. A reader being
    /// stopped finishes its batch (acknowledging what was handled) first.
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

struct Reader {
    target: StreamTarget,
    backend: StreamBackend,
    stop: CancellationToken,
    stats: Arc<StreamStats>,
}

/// Why a session ended without an error.
struct Stopped;

impl Reader {
    async fn run(self) {
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        let mut retries = Vec::new();
        loop {
            let started = Instant::now();
            match self.session(&mut retries).await {
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
    async fn session(&self, retries: &mut Vec<Retry>) -> redis::RedisResult<Stopped> {
        let settings = self.settings();
        let mut conn = self.backend.connect(settings.block).await?;
        self.create_group(&mut conn).await?;

        // What this consumer read before (a restart, a lost connection) and never acked.
        retries.clear();
        let mut after = "0".to_owned();
        loop {
            let entries = self.read_group(&mut conn, &after, None).await?;
            let Some(last) = entries.last() else { break };
            after = last.id.clone();
            let counts = self.delivery_counts(&mut conn, &entries).await?;
            if self.process(&mut conn, entries, &counts, retries).await? {
                return Ok(Stopped);
            }
        }

        let claim_every = (settings.claim_idle / 2).max(Duration::from_millis(100));
        let mut next_claim = Instant::now();
        let mut claim_cursor = "0-0".to_owned();
        loop {
            if self.stop.is_cancelled() || self.target.inbox.is_closed() {
                return Ok(Stopped);
            }
            let now = Instant::now();
            let due: Vec<Retry> = {
                let (due, later) = std::mem::take(retries)
                    .into_iter()
                    .partition::<Vec<_>, _>(|r| r.due <= now);
                *retries = later;
                due
            };
            let stopped = if !due.is_empty() {
                self.retry(&mut conn, due, retries).await?
            } else if now >= next_claim {
                let (entries, cursor) = self.auto_claim(&mut conn, &claim_cursor).await?;
                if cursor == "0-0" {
                    next_claim = now + claim_every;
                }
                claim_cursor = cursor;
                if entries.is_empty() {
                    false
                } else {
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
                    self.process(&mut conn, entries, &counts, retries).await?
                }
            } else {
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
                let counts = HashMap::new();
                self.process(&mut conn, entries, &counts, retries).await?
            };
            if stopped {
                return Ok(Stopped);
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
    async fn read_group(
        &self,
        conn: &mut Connection,
        id: &str,
        block: Option<Duration>,
    ) -> redis::RedisResult<Vec<RawEntry>> {
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
        let reply = conn.query(&cmd).await?;
        Ok(read_reply_entries(reply))
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
    /// handles them. Entries deleted meanwhile are acknowledged away.
    async fn retry(
        &self,
        conn: &mut Connection,
        due: Vec<Retry>,
        retries: &mut Vec<Retry>,
    ) -> redis::RedisResult<bool> {
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
        let counts: HashMap<String, u64> = due
            .iter()
            .map(|r| (r.id.clone(), r.deliveries + 1))
            .collect();
        let gone: Vec<&str> = due
            .iter()
            .filter(|r| !entries.iter().any(|e| e.id == r.id))
            .map(|r| r.id.as_str())
            .collect();
        if !gone.is_empty() {
            self.ack(conn, &gone).await?;
        }
        self.process(conn, entries, &counts, retries).await
    }

    /// Hands `entries` to the plugin, waits for every outcome, then acknowledges, schedules
    /// retries and dead-letters. Returns whether the reader was told to stop meanwhile.
    async fn process(
        &self,
        conn: &mut Connection,
        entries: Vec<RawEntry>,
        counts: &HashMap<String, u64>,
        retries: &mut Vec<Retry>,
    ) -> redis::RedisResult<bool> {
        if entries.is_empty() {
            return Ok(self.stop.is_cancelled());
        }
        let (report, mut outcomes) = mpsc::unbounded_channel();
        let received_at = SystemTime::now();
        let (gone, entries): (Vec<_>, Vec<_>) = entries.into_iter().partition(|e| e.deleted);
        if !gone.is_empty() {
            // Nothing left to handle: only the pending record remains.
            let gone: Vec<&str> = gone.iter().map(|e| e.id.as_str()).collect();
            self.ack(conn, &gone).await?;
        }
        let mut ids = Vec::with_capacity(entries.len());
        for (index, entry) in entries.into_iter().enumerate() {
            ids.push(entry.id.clone());
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
                entry: Some(StreamEntry {
                    id: entry.id,
                    fields: entry.fields,
                    ticket: Ticket {
                        report: Some((index, report.clone())),
                    },
                }),
            });
        }
        drop(report);

        let mut acked = Vec::new();
        let now = Instant::now();
        let settings = self.settings();
        // Every ticket reports exactly once, when handled or dropped: this ends.
        while let Some((index, outcome)) = outcomes.recv().await {
            let id = &ids[index];
            let deliveries = counts.get(id).copied().unwrap_or(1);
            match outcome {
                Outcome::Handled => acked.push(id.as_str()),
                // `invalid` says retrying the same input will fail again: no point waiting.
                Outcome::Failed { error, version }
                    if deliveries >= settings.max_deliveries
                        || error.starts_with(INVALID_PREFIX) =>
                {
                    self.dead_letter(conn, id, deliveries, &error, &version)
                        .await?;
                    acked.push(id.as_str());
                }
                Outcome::Failed { .. } | Outcome::Skipped => {
                    self.stats.retried.fetch_add(1, Ordering::Relaxed);
                    let exponent = deliveries.saturating_sub(1).min(16) as u32;
                    let wait = settings
                        .retry_backoff
                        .saturating_mul(1 << exponent)
                        .min(RETRY_MAX);
                    retries.push(Retry {
                        id: id.clone(),
                        due: now + wait,
                        deliveries,
                    });
                }
            }
        }
        if !acked.is_empty() {
            self.ack(conn, &acked).await?;
        }
        Ok(self.stop.is_cancelled())
    }

    async fn ack(&self, conn: &mut Connection, ids: &[&str]) -> redis::RedisResult<()> {
        let mut cmd = redis::cmd("XACK");
        cmd.arg(self.target.key.as_ref())
            .arg(&self.settings().group);
        for id in ids {
            cmd.arg(*id);
        }
        conn.query(&cmd).await?;
        self.stats
            .acked
            .fetch_add(ids.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Adds the entry to `<stream>:dead`: `dead.*` fields saying where it came from and why
    /// it failed, then its own fields. It is acknowledged by the caller.
    async fn dead_letter(
        &self,
        conn: &mut Connection,
        id: &str,
        deliveries: u64,
        error: &str,
        version: &ContentHash,
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
            .arg(version.to_string())
            .arg("dead.deliveries")
            .arg(deliveries)
            .arg("dead.error")
            .arg(error);
        for (name, value) in &fields {
            cmd.arg(name).arg(value.as_ref());
        }
        conn.query(&cmd).await?;
        self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            plugin = %self.target.inbox.plugin(),
            stream = %self.key_text(),
            entry = id,
            deliveries,
            "entry failed too often; moved to the dead-letter stream: {error}"
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

fn text(value: Value) -> Option<String> {
    bytes(value).map(|b| String::from_utf8_lossy(&b).into_owned())
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

    #[test]
    fn a_dropped_ticket_reports_the_entry_skipped() {
        let (report, mut outcomes) = mpsc::unbounded_channel();
        drop(Ticket {
            report: Some((3, report.clone())),
        });
        Ticket {
            report: Some((4, report)),
        }
        .finish(Ok(()), &ContentHash::of(b""));
        assert!(matches!(outcomes.try_recv(), Ok((3, Outcome::Skipped))));
        assert!(matches!(outcomes.try_recv(), Ok((4, Outcome::Handled))));
        assert!(outcomes.try_recv().is_err(), "one report per ticket");
    }
}
