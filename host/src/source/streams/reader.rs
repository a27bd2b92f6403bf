//! One reader's loop, for one (plugin, stream) pair: a session per connection that creates
//! the group, reads again what this consumer left pending, then reads new entries (ahead,
//! while the plugin works), claims idle ones and claims due retries again. A lost connection
//! starts a new session after a backoff.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;

use super::StreamBackend;
use super::connection::Connection;
use super::reply::{RawEntry, entries_of, integer, into_array, read_reply_entries, text};
use crate::config::{StartFrom, StreamSettings};
use crate::router::StreamTarget;
use crate::source::redis::{BACKOFF_MAX, BACKOFF_MIN, Backoff, HEALTHY_SESSION};
use crate::stream_entry::{StreamStats, Tally};
use crate::trace::Tracing;

/// Batches a reader keeps in its plugin's queue. Two are enough to keep the plugin busy:
/// the next batch is read while the plugin handles the current one, so it is queued before
/// the plugin runs out, whenever one read takes less time than handling one batch. A third
/// would help only a reader whose round trip to Redis outlasts a whole batch (a larger
/// `batch` is the remedy there), and every batch queued ahead adds to what a crash makes
/// handled again and to how long an entry waits, pending, before its turn (`claim_idle`
/// must stay above that wait, or another consumer claims the entry meanwhile).
pub(super) const BATCHES_IN_FLIGHT: usize = 2;

/// An entry scheduled for another delivery.
pub(super) struct Retry {
    pub(super) id: String,
    pub(super) due: Instant,
    /// Deliveries so far, as Redis counts them.
    pub(super) deliveries: u64,
}

/// A batch in the plugin's queue, its outcomes still coming in.
pub(super) struct Batch {
    /// Its entries' ids, in the order queued (a ticket's index).
    pub(super) ids: Vec<String>,
    /// Deliveries so far, by id, where Redis said (an entry read for the first time: 1).
    pub(super) counts: HashMap<String, u64>,
    pub(super) tally: Arc<Tally>,
    /// When it was queued: its retries are scheduled from here.
    pub(super) queued: Instant,
}

/// What a reader has handed to the plugin and not yet acknowledged. It outlives a session:
/// after a lost connection, the next session first waits for these batches and
/// acknowledges what they handled, then reads again what is still pending.
#[derive(Default)]
pub(super) struct InFlight {
    /// Batches in the plugin's queue, oldest first; at most [`BATCHES_IN_FLIGHT`].
    pub(super) batches: VecDeque<Batch>,
    /// Entries done with (handled, dead-lettered, deleted meanwhile) whose `XACK` is still
    /// to be sent.
    pub(super) done: Vec<String>,
    /// The consumer spans of the traced ones among them, whose acknowledgement joins them.
    pub(super) done_traces: Vec<opentelemetry::Context>,
}

/// The reader of one (plugin, stream) pair.
pub(super) struct Reader {
    pub(super) target: StreamTarget,
    pub(super) backend: StreamBackend,
    pub(super) max_entry_bytes: usize,
    pub(super) tracing: Arc<Tracing>,
    pub(super) stop: CancellationToken,
    pub(super) stats: Arc<StreamStats>,
}

/// Why a session ended without an error.
struct Stopped;

impl Reader {
    pub(super) async fn run(self) {
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

    pub(super) fn key_text(&self) -> String {
        String::from_utf8_lossy(&self.target.key).into_owned()
    }

    pub(super) fn settings(&self) -> &StreamSettings {
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
                self.flush(&mut conn, in_flight).await?;
                self.retry(&mut conn, due, in_flight).await?;
            } else if busy && (!room || caught_up || claim_due) {
                // A claim waits for the batches in flight too: `XAUTOCLAIM` would take this
                // consumer's own queued entries once they idled past `claim_idle`.
                self.flush(&mut conn, in_flight).await?;
                self.settle_oldest(&mut conn, in_flight, retries).await?;
            } else if claim_due {
                self.flush(&mut conn, in_flight).await?;
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
                let entries = self.ack_and_read_ahead(&mut conn, in_flight).await?;
                caught_up = entries.is_empty();
                self.queue(entries, HashMap::new(), in_flight);
            } else {
                self.flush(&mut conn, in_flight).await?;
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
        let started = SystemTime::now();
        let reply = conn.query(&self.read_cmd(id, block)).await?;
        let entries = read_reply_entries(reply);
        self.trace_read(started, "XREADGROUP", &entries);
        Ok(entries)
    }

    /// Acknowledges `done` and reads new entries without blocking, in one pipeline: one
    /// write and one round trip for both.
    async fn ack_and_read_ahead(
        &self,
        conn: &mut Connection,
        in_flight: &mut InFlight,
    ) -> redis::RedisResult<Vec<RawEntry>> {
        if in_flight.done.is_empty() {
            return self.read_group(conn, ">", None).await;
        }
        let started = SystemTime::now();
        let mut pipe = redis::pipe();
        pipe.add_command(self.ack_cmd(&in_flight.done))
            .ignore()
            .add_command(self.read_cmd(">", None));
        // An error reply to either command fails the whole pipeline.
        let reply = conn.query_pipe(&pipe).await?.into_iter().next();
        self.acked(in_flight, started);
        let entries = reply.map(read_reply_entries).unwrap_or_default();
        self.trace_read(started, "XREADGROUP", &entries);
        Ok(entries)
    }

    /// `XAUTOCLAIM key group consumer min-idle cursor COUNT n`: entries and the next cursor.
    async fn auto_claim(
        &self,
        conn: &mut Connection,
        cursor: &str,
    ) -> redis::RedisResult<(Vec<RawEntry>, String)> {
        let settings = self.settings();
        let started = SystemTime::now();
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
        self.trace_read(started, "XAUTOCLAIM", &entries);
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
}
