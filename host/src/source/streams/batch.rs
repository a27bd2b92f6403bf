//! A reader's batches on their way through the plugin and back: queued with a ticket per
//! entry, settled once every outcome is in (acknowledged, scheduled for a retry, or
//! dead-lettered), and acknowledged in one `XACK`. Nothing here reads the stream; the loop
//! in [`reader`](super::reader) decides when each step runs.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use super::connection::Connection;
use super::reader::{Batch, InFlight, Reader, Retry};
use super::reply::{RawEntry, entries_of};
use crate::ContentHash;
use crate::message::Subscription;
use crate::stream_entry::{Outcome, StreamEntry, Tally, Ticket};
use crate::worker::Envelope;
use crate::worker::host::INVALID_PREFIX;

/// Longest wait before an entry's next retry.
const RETRY_MAX: Duration = Duration::from_secs(60);
impl Reader {
    /// Hands `entries` to the plugin as one batch, after those in flight (a plugin with one
    /// worker takes them in that order). Entries deleted meanwhile are only acknowledged.
    pub(super) fn queue(
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
    pub(super) async fn settle_oldest(
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
    pub(super) async fn finish_all(
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
    pub(super) async fn flush(
        &self,
        conn: &mut Connection,
        done: &mut Vec<String>,
    ) -> redis::RedisResult<()> {
        if done.is_empty() {
            return Ok(());
        }
        conn.query(&self.ack_cmd(done)).await?;
        self.count_acked(done.len());
        done.clear();
        Ok(())
    }

    /// `XACK key group id...`.
    pub(super) fn ack_cmd(&self, ids: &[String]) -> redis::Cmd {
        let mut cmd = redis::cmd("XACK");
        cmd.arg(self.target.key.as_ref())
            .arg(&self.settings().group);
        for id in ids {
            cmd.arg(id);
        }
        cmd
    }

    pub(super) fn count_acked(&self, entries: usize) {
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
