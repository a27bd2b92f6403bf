//! A reader's batches on their way through the plugin and back: queued with a ticket per
//! entry, settled once every outcome is in (acknowledged, scheduled for a retry, or
//! dead-lettered), and acknowledged in one `XACK`. Nothing here reads the stream; the loop
//! in [`reader`](super::reader) decides when each step runs.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use opentelemetry::trace::SpanKind;
use opentelemetry::{Context, KeyValue};

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

/// An entry on its way to `<stream>:dead`.
#[derive(Clone, Copy)]
struct DeadLetter<'a> {
    id: &'a str,
    /// Deliveries so far.
    deliveries: u64,
    /// Why it failed.
    error: &'a str,
    /// The plugin version that failed on it; none for an entry the host refused
    /// unhandled, whose `dead.version` is then `none`.
    version: Option<&'a ContentHash>,
}
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
                subscription: Subscription::Stream(self.target.key.clone()).into(),
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
        for (id, (outcome, trace)) in batch.ids.into_iter().zip(outcomes) {
            let deliveries = batch.counts.get(&id).copied().unwrap_or(1);
            match outcome {
                Outcome::Handled => {}
                // `invalid` says retrying the same input will fail again: no point waiting.
                Outcome::Failed { error, version }
                    if deliveries >= settings.max_deliveries
                        || error.starts_with(INVALID_PREFIX) =>
                {
                    let dead = DeadLetter {
                        id: &id,
                        deliveries,
                        error: &error,
                        version: Some(&version),
                    };
                    self.dead_letter(conn, dead, trace.as_ref()).await?;
                }
                Outcome::Oversize(error) => {
                    let dead = DeadLetter {
                        id: &id,
                        deliveries,
                        error: &error,
                        version: None,
                    };
                    self.dead_letter(conn, dead, trace.as_ref()).await?;
                }
                Outcome::Failed { .. } | Outcome::Skipped => {
                    self.stats.retried.fetch_add(1, Ordering::Relaxed);
                    let exponent = deliveries.saturating_sub(1).min(16) as u32;
                    let wait = settings
                        .retry_backoff
                        .saturating_mul(1 << exponent)
                        .min(RETRY_MAX);
                    if let Some(cx) = &trace {
                        self.trace_retry(cx, deliveries, wait);
                    }
                    retries.push(Retry {
                        id,
                        due: batch.queued + wait,
                        deliveries,
                    });
                    continue;
                }
            }
            // Handled, or dead-lettered: done with.
            in_flight.done.push(id);
            in_flight.done_traces.extend(trace);
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
        self.flush(conn, in_flight).await
    }

    /// Acknowledges the entries done with now, if any are.
    pub(super) async fn flush(
        &self,
        conn: &mut Connection,
        in_flight: &mut InFlight,
    ) -> redis::RedisResult<()> {
        if in_flight.done.is_empty() {
            return Ok(());
        }
        let started = SystemTime::now();
        conn.query(&self.ack_cmd(&in_flight.done)).await?;
        self.acked(in_flight, started);
        Ok(())
    }

    /// Counts the entries done with as acknowledged by an `XACK` sent at `started`, and
    /// forgets them; each traced one gets an `ack` span in its trace.
    pub(super) fn acked(&self, in_flight: &mut InFlight, started: SystemTime) {
        self.stats
            .acked
            .fetch_add(in_flight.done.len() as u64, Ordering::Relaxed);
        in_flight.done.clear();
        for cx in in_flight.done_traces.drain(..) {
            let span = self.tracing.since(&cx, SpanKind::Client, started, &[], || {
                let mut attributes = self.span_attributes("settle", self.key_text());
                attributes.push(KeyValue::new("messaging.operation.name", "XACK"));
                (format!("ack {}", self.key_text()), attributes)
            });
            if let Some(span) = span {
                crate::trace::end(&span, Ok(()));
            }
        }
    }

    /// Records the span of a read (`command`) begun at `started` that returned `entries`:
    /// a new trace, linked to the traces the entries carry.
    pub(super) fn trace_read(&self, started: SystemTime, command: &str, entries: &[RawEntry]) {
        if !self.tracing.is_on() || entries.is_empty() {
            return;
        }
        let links: Vec<Context> = entries
            .iter()
            .map(|entry| self.tracing.parent_of(&entry.fields, b""))
            .collect();
        let span = self
            .tracing
            .since(&Context::new(), SpanKind::Consumer, started, &links, || {
                let mut attributes = self.span_attributes("receive", self.key_text());
                attributes.extend([
                    KeyValue::new("messaging.operation.name", command.to_owned()),
                    KeyValue::new("messaging.batch.message_count", entries.len() as i64),
                ]);
                (format!("receive {}", self.key_text()), attributes)
            });
        if let Some(span) = span {
            crate::trace::end(&span, Ok(()));
        }
    }

    /// Records, in the trace of an entry that failed or was not handled, that it will be
    /// delivered again after `wait`.
    fn trace_retry(&self, cx: &Context, deliveries: u64, wait: Duration) {
        let span = self
            .tracing
            .since(cx, SpanKind::Internal, SystemTime::now(), &[], || {
                let mut attributes = self.span_attributes("settle", self.key_text());
                attributes.extend([
                    KeyValue::new("switchyard.deliveries", deliveries as i64),
                    KeyValue::new("switchyard.retry_in_ms", wait.as_secs_f64() * 1e3),
                ]);
                (format!("retry {}", self.key_text()), attributes)
            });
        if let Some(span) = span {
            crate::trace::end(&span, Ok(()));
        }
    }

    /// The attributes every span of this reader has, for an operation of `kind` on the
    /// stream `destination`.
    fn span_attributes(&self, kind: &'static str, destination: String) -> Vec<KeyValue> {
        vec![
            KeyValue::new("messaging.system", "redis"),
            KeyValue::new("messaging.operation.type", kind),
            KeyValue::new("messaging.destination.name", destination),
            KeyValue::new(
                "messaging.consumer.group.name",
                self.settings().group.clone(),
            ),
            KeyValue::new(
                "switchyard.plugin",
                self.target.inbox.plugin().as_str().to_owned(),
            ),
        ]
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

    /// Adds the entry to `<stream>:dead`: `dead.*` fields saying where it came from and why
    /// it failed, then its own fields, in a span of the entry's trace `cx` if traced. It is
    /// acknowledged by the caller.
    async fn dead_letter(
        &self,
        conn: &mut Connection,
        dead: DeadLetter<'_>,
        cx: Option<&Context>,
    ) -> redis::RedisResult<()> {
        let started = SystemTime::now();
        let result = self.move_to_dead(conn, &dead).await;
        if let Some(cx) = cx {
            let span = self
                .tracing
                .since(cx, SpanKind::Producer, started, &[], || {
                    let mut attributes =
                        self.span_attributes("send", format!("{}:dead", self.key_text()));
                    attributes.extend([
                        KeyValue::new("messaging.operation.name", "XADD"),
                        KeyValue::new("switchyard.deliveries", dead.deliveries as i64),
                        KeyValue::new("switchyard.dead.error", dead.error.to_owned()),
                    ]);
                    (format!("dead-letter {}", self.key_text()), attributes)
                });
            if let Some(span) = span {
                match &result {
                    Ok(()) => crate::trace::end(&span, Ok(())),
                    Err(error) => crate::trace::end(&span, Err(&error.to_string())),
                }
            }
        }
        result
    }

    async fn move_to_dead(
        &self,
        conn: &mut Connection,
        dead: &DeadLetter<'_>,
    ) -> redis::RedisResult<()> {
        let DeadLetter {
            id,
            deliveries,
            error,
            version,
        } = *dead;
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
