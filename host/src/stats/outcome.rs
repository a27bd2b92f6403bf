//! Why a message failed or was shed: two small fixed sets, so that each reason can be a
//! metric label and a field of `/plugins` without ever growing with traffic.
//!
//! The worker decides a failure's reason where the call ends (see `worker::instance`); the
//! router and the worker decide a shed's reason where the message is dropped. Totals are the
//! sums of the reasons, so the two can never disagree.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Why one message failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    /// `handle` returned an `error` value; the instance is kept.
    Error,
    /// The call trapped (a panic, `unreachable`, a failed host call that traps); the
    /// instance is rebuilt.
    Trap,
    /// The call ran past the plugin's deadline and was interrupted; the instance is rebuilt.
    Deadline,
    /// The call tried to grow the plugin's memory past its cap; the instance is rebuilt.
    Memory,
    /// No instance could be built to run the message on.
    NoInstance,
}

impl FailureReason {
    /// Every reason, in the order metrics list them.
    pub const ALL: [Self; 5] = [
        Self::Error,
        Self::Trap,
        Self::Deadline,
        Self::Memory,
        Self::NoInstance,
    ];

    /// The reason as a metric label and JSON key.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::Trap => "trap",
            Self::Deadline => "deadline",
            Self::Memory => "memory",
            Self::NoInstance => "no_instance",
        }
    }

    /// Whether the store is unusable after a failure of this kind (every trap poisons it).
    pub fn poisons_instance(self) -> bool {
        !matches!(self, Self::Error)
    }
}

/// Why one message was shed: dropped without being handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShedReason {
    /// The plugin's queue was full: its byte budget (or its optional count cap) was spent.
    /// With `drop-oldest`, the message dropped is an older one.
    QueueFull,
    /// The host's total queue budget was spent and this plugin had the largest backlog.
    HostBudget,
    /// The circuit breaker had parked the plugin.
    Parked,
    /// The plugin had been removed or the host was stopping.
    Stopped,
}

impl ShedReason {
    /// Every reason, in the order metrics list them.
    pub const ALL: [Self; 4] = [
        Self::QueueFull,
        Self::HostBudget,
        Self::Parked,
        Self::Stopped,
    ];

    /// The reason as a metric label and JSON key.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::HostBudget => "host_budget",
            Self::Parked => "parked",
            Self::Stopped => "stopped",
        }
    }

    /// The reason as a log line says it.
    pub fn describe(self) -> &'static str {
        match self {
            Self::QueueFull => "queue full",
            Self::HostBudget => {
                "the host's total queue budget is spent and this plugin has the largest backlog"
            }
            Self::Parked => "plugin parked by its circuit breaker",
            Self::Stopped => "plugin stopped",
        }
    }
}

/// Live failure counters, one per [`FailureReason`].
#[derive(Debug, Default)]
pub(crate) struct FailureCounters([AtomicU64; FailureReason::ALL.len()]);

impl FailureCounters {
    /// Counts one failure. Release: whatever was written before (the last error) is visible
    /// to a reader that sees the count.
    pub(crate) fn add(&self, reason: FailureReason) {
        self.0[reason as usize].fetch_add(1, Ordering::Release);
    }

    pub(crate) fn snapshot(&self) -> FailureCounts {
        let read = |reason: FailureReason| self.0[reason as usize].load(Ordering::Acquire);
        FailureCounts {
            error: read(FailureReason::Error),
            trap: read(FailureReason::Trap),
            deadline: read(FailureReason::Deadline),
            memory: read(FailureReason::Memory),
            no_instance: read(FailureReason::NoInstance),
        }
    }

    pub(crate) fn total(&self) -> u64 {
        self.snapshot().total()
    }
}

/// Live shed counters, one per [`ShedReason`].
#[derive(Debug, Default)]
pub(crate) struct ShedCounters([AtomicU64; ShedReason::ALL.len()]);

impl ShedCounters {
    pub(crate) fn add(&self, reason: ShedReason) {
        self.0[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> ShedCounts {
        let read = |reason: ShedReason| self.0[reason as usize].load(Ordering::Relaxed);
        ShedCounts {
            queue_full: read(ShedReason::QueueFull),
            host_budget: read(ShedReason::HostBudget),
            parked: read(ShedReason::Parked),
            stopped: read(ShedReason::Stopped),
        }
    }
}

/// Failed messages of one plugin by reason, as `/plugins` shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FailureCounts {
    /// `handle` returned an error value.
    pub error: u64,
    /// The call trapped.
    pub trap: u64,
    /// The call ran past its deadline.
    pub deadline: u64,
    /// The call hit the memory cap.
    pub memory: u64,
    /// No instance could be built.
    pub no_instance: u64,
}

impl FailureCounts {
    /// The count for `reason`.
    pub fn get(&self, reason: FailureReason) -> u64 {
        match reason {
            FailureReason::Error => self.error,
            FailureReason::Trap => self.trap,
            FailureReason::Deadline => self.deadline,
            FailureReason::Memory => self.memory,
            FailureReason::NoInstance => self.no_instance,
        }
    }

    /// Every failure, whatever its reason.
    pub fn total(&self) -> u64 {
        FailureReason::ALL.iter().map(|r| self.get(*r)).sum()
    }
}

/// Shed messages of one plugin by reason, as `/plugins` shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ShedCounts {
    /// Its queue was full.
    pub queue_full: u64,
    /// The host's total queue budget was spent and it had the largest backlog.
    pub host_budget: u64,
    /// It was parked by its circuit breaker.
    pub parked: u64,
    /// It had stopped.
    pub stopped: u64,
}

impl ShedCounts {
    /// The count for `reason`.
    pub fn get(&self, reason: ShedReason) -> u64 {
        match reason {
            ShedReason::QueueFull => self.queue_full,
            ShedReason::HostBudget => self.host_budget,
            ShedReason::Parked => self.parked,
            ShedReason::Stopped => self.stopped,
        }
    }

    /// Every shed message, whatever its reason.
    pub fn total(&self) -> u64 {
        ShedReason::ALL.iter().map(|r| self.get(*r)).sum()
    }
}

/// Why a call failed, and the error as `last_error` (or a load error) shows it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    /// The kind of failure; every reason but [`FailureReason::Error`] costs the instance.
    pub reason: FailureReason,
    /// What happened, for logs and `/plugins`.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_are_the_sums_of_the_reasons() {
        let failures = FailureCounters::default();
        for reason in FailureReason::ALL {
            failures.add(reason);
        }
        failures.add(FailureReason::Deadline);
        let counts = failures.snapshot();
        assert_eq!(counts.deadline, 2);
        assert_eq!(counts.total(), 6);
        assert_eq!(failures.total(), 6);

        let shed = ShedCounters::default();
        shed.add(ShedReason::QueueFull);
        shed.add(ShedReason::Parked);
        assert_eq!(shed.snapshot().total(), 2);
        assert_eq!(shed.snapshot().get(ShedReason::Stopped), 0);
    }

    #[test]
    fn labels_are_distinct() {
        let mut labels: Vec<_> = FailureReason::ALL.iter().map(|r| r.as_str()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), FailureReason::ALL.len());
        let mut labels: Vec<_> = ShedReason::ALL.iter().map(|r| r.as_str()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), ShedReason::ALL.len());
    }
}
