//! A stream entry on its way to a plugin, and the ticket that reports what became of it to
//! the reader that read it (`source::streams`), which acknowledges, retries or dead-letters
//! it. The ground floor: workers finish tickets without knowing the readers.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::ContentHash;

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
pub(crate) enum Outcome {
    Handled,
    Failed {
        error: String,
        version: ContentHash,
    },
    /// The plugin did not run it (parked, stopping, its queue shed it).
    Skipped,
    /// The host refused it before any plugin saw it: it is over `plugins.max_payload_bytes`.
    Oversize(String),
}

/// An entry's outcome, and the consumer span it was handled in when traced.
pub(crate) type Settled = (Outcome, Option<opentelemetry::Context>);

/// Reports an entry's outcome to its reader exactly once: when finished, or when dropped
/// unfinished (the entry was not handled).
#[derive(Debug, Default)]
pub struct Ticket {
    report: Option<(usize, Arc<Tally>)>,
}

impl Ticket {
    /// The ticket of the entry at `index` of the batch `tally` collects.
    pub(crate) fn new(index: usize, tally: Arc<Tally>) -> Ticket {
        Ticket {
            report: Some((index, tally)),
        }
    }

    /// Moves the ticket out, leaving an inert one.
    pub fn take(&mut self) -> Ticket {
        std::mem::take(self)
    }

    /// Reports how `handle` went, by `version`, in the consumer span `trace` if traced:
    /// what the reader does next with the entry (acknowledge, retry, dead-letter) joins it.
    pub fn finish(
        mut self,
        result: Result<(), String>,
        version: &ContentHash,
        trace: Option<opentelemetry::Context>,
    ) {
        if let Some((index, tally)) = self.report.take() {
            let outcome = match result {
                Ok(()) => Outcome::Handled,
                Err(error) => Outcome::Failed {
                    error,
                    version: *version,
                },
            };
            tally.report_traced(index, outcome, trace);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some((index, tally)) = self.report.take() {
            tally.report(index, Outcome::Skipped);
        }
    }
}

/// The outcomes of one batch, filled in by its tickets. Only the last report wakes the
/// reader: one wake-up per batch, not one per entry, since every wake-up of the reader's
/// task from a worker thread is a cross-thread hand-off.
#[derive(Debug)]
pub(crate) struct Tally {
    /// By the entry's index in its batch, with the entry's consumer span when traced.
    outcomes: Mutex<Vec<Option<Settled>>>,
    /// Tickets that have not reported yet.
    open: AtomicUsize,
    settled: Notify,
}

impl Tally {
    pub(crate) fn new(entries: usize) -> Self {
        Self {
            outcomes: Mutex::new((0..entries).map(|_| None).collect()),
            open: AtomicUsize::new(entries),
            settled: Notify::new(),
        }
    }

    pub(crate) fn report(&self, index: usize, outcome: Outcome) {
        self.report_traced(index, outcome, None);
    }

    fn report_traced(&self, index: usize, outcome: Outcome, trace: Option<opentelemetry::Context>) {
        if let Some(slot) = self
            .outcomes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(index)
        {
            *slot = Some((outcome, trace));
        }
        if self.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            // Keeps a permit if the reader is not waiting yet.
            self.settled.notify_one();
        }
    }

    /// Waits until every ticket has reported (each does, when finished or dropped), then
    /// gives the outcomes in entry order.
    pub(crate) async fn settled(&self) -> Vec<Settled> {
        while self.open.load(Ordering::Acquire) > 0 {
            self.settled.notified().await;
        }
        std::mem::take(&mut *self.outcomes.lock().unwrap_or_else(|e| e.into_inner()))
            .into_iter()
            .map(|settled| settled.unwrap_or((Outcome::Skipped, None)))
            .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_ticket_reports_the_entry_skipped() {
        let tally = Arc::new(Tally::new(2));
        drop(Ticket::new(0, tally.clone()));
        Ticket::new(1, tally.clone()).finish(Ok(()), &ContentHash::of(b""), None);
        let outcomes: Vec<Outcome> = futures::executor::block_on(tally.settled())
            .into_iter()
            .map(|(outcome, _)| outcome)
            .collect();
        assert!(matches!(
            outcomes.as_slice(),
            [Outcome::Skipped, Outcome::Handled]
        ));
    }

    #[test]
    fn a_batch_is_settled_only_when_its_last_ticket_reports() {
        use futures::FutureExt as _;
        let tally = Arc::new(Tally::new(3));
        let mut tickets: Vec<Ticket> = (0..3)
            .map(|index| Ticket::new(index, tally.clone()))
            .collect();
        let mut settled = Box::pin(tally.settled());
        // Out of order, as workers of a plugin with concurrency > 1 finish them.
        tickets
            .remove(2)
            .finish(Err("no".into()), &ContentHash::of(b""), None);
        tickets
            .remove(0)
            .finish(Ok(()), &ContentHash::of(b""), None);
        assert!(settled.as_mut().now_or_never().is_none(), "one still open");
        drop(tickets);
        let outcomes: Vec<Outcome> = settled
            .now_or_never()
            .expect("every ticket reported")
            .into_iter()
            .map(|(outcome, _)| outcome)
            .collect();
        assert!(matches!(
            outcomes.as_slice(),
            [Outcome::Handled, Outcome::Skipped, Outcome::Failed { .. }]
        ));
    }
}
