//! The circuit breaker: a plugin that keeps failing is parked instead of burning its deadline
//! on every message.
//!
//! It trips when `failures` of the last `window` messages failed. A parked plugin's messages
//! are shed (counted) until the back-off has passed; the next message is then a trial: a
//! success closes the breaker and resets the back-off, a failure parks the plugin again for
//! twice as long (up to [`MAX_BACKOFF`]). A new version of the plugin starts with a closed
//! breaker.
//!
//! A plugin with several workers has one breaker for all of them (the K of M are the
//! plugin's messages). Calls already running when it trips finish, and their outcomes are
//! not counted while it is parked; after the back-off every worker's next message goes
//! through, and the first outcome recorded is the trial's.
//!
//! That shared record is about one version at a time ([`VersionedBreaker`]): a swap does not
//! wait for calls in flight, and an outcome of a call on a replaced version is not about its
//! replacement.

use std::collections::VecDeque;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crate::config::BreakerPolicy;

/// The longest a plugin stays parked.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// One plugin's breaker.
#[derive(Debug)]
pub struct Breaker {
    policy: BreakerPolicy,
    recent: VecDeque<bool>,
    backoff: Duration,
    parked_until: Option<Instant>,
    trial: bool,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(policy: BreakerPolicy) -> Self {
        Self {
            policy,
            recent: VecDeque::with_capacity(policy.window),
            backoff: policy.backoff,
            parked_until: None,
            trial: false,
        }
    }

    /// Whether messages must be shed now. Once the back-off has passed, the breaker lets one
    /// trial message through.
    pub fn parked(&mut self, now: Instant) -> bool {
        match self.parked_until {
            Some(until) if now < until => true,
            Some(_) => {
                self.parked_until = None;
                self.trial = true;
                false
            }
            None => false,
        }
    }

    /// Records a message's outcome; returns the parking period if the breaker tripped.
    pub fn record(&mut self, ok: bool, now: Instant) -> Option<Duration> {
        if self.parked_until.is_some_and(|until| now < until) {
            // A call that started before another worker's outcome parked the plugin: the
            // park already answered for it.
            return None;
        }
        if self.trial {
            self.trial = false;
            if ok {
                self.backoff = self.policy.backoff;
                self.recent.clear();
                return None;
            }
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
            return Some(self.park(now));
        }
        if self.recent.len() == self.policy.window {
            self.recent.pop_front();
        }
        self.recent.push_back(ok);
        let failed = self.recent.iter().filter(|ok| !**ok).count();
        (failed >= self.policy.failures).then(|| self.park(now))
    }

    fn park(&mut self, now: Instant) -> Duration {
        self.recent.clear();
        self.parked_until = Some(now + self.backoff);
        self.backoff
    }

    /// Closes the breaker (a new version was loaded).
    pub fn reset(&mut self) {
        *self = Self::new(self.policy);
    }
}

/// A breaker whose record is about one version of a plugin, for the workers of the plugin to
/// share.
///
/// The first worker to take a message of a new version starts the record over for it, while
/// other workers may still be inside calls of the old version. Those calls' outcomes are not
/// recorded, and neither park nor admit on the new version's behalf: a failing old version
/// must not park its replacement at once, nor a healthy one hide the replacement's failures.
/// Whose record it is and the record itself change together, under the caller's one lock, so
/// no outcome slips in between a new start and the comparison.
pub struct VersionedBreaker<V> {
    /// The version the record is about; weak, so the record keeps no old version alive.
    version: Weak<V>,
    breaker: Breaker,
}

impl<V> std::fmt::Debug for VersionedBreaker<V> {
    /// The version's address (a version need not be `Debug`) and the record.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VersionedBreaker")
            .field("version", &self.version.as_ptr())
            .field("breaker", &self.breaker)
            .finish()
    }
}

impl<V> VersionedBreaker<V> {
    /// A closed breaker about no version yet.
    pub fn new(policy: BreakerPolicy) -> Self {
        Self {
            version: Weak::new(),
            breaker: Breaker::new(policy),
        }
    }

    /// Whether the record is about `version`. The weak handle keeps the allocation, so its
    /// address cannot be reused by a later version while the record points at it.
    pub fn is_about(&self, version: &Arc<V>) -> bool {
        std::ptr::eq(self.version.as_ptr(), Arc::as_ptr(version))
    }

    /// Makes the record about `version`, with a closed breaker, unless it already is; returns
    /// whether it started over.
    pub fn start(&mut self, version: &Arc<V>) -> bool {
        if self.is_about(version) {
            return false;
        }
        self.version = Arc::downgrade(version);
        self.breaker.reset();
        true
    }

    /// Whether a message about to run on `version` must be shed now (see
    /// [`Breaker::parked`]); `None` when the record is about another version, which neither
    /// sheds the message nor spends its trial on it.
    pub fn parked(&mut self, version: &Arc<V>, now: Instant) -> Option<bool> {
        self.is_about(version).then(|| self.breaker.parked(now))
    }

    /// Records the outcome of a call that ran on `version` (see [`Breaker::record`]); an
    /// outcome of another version is left out.
    pub fn record(&mut self, version: &Arc<V>, ok: bool, now: Instant) -> Option<Duration> {
        if !self.is_about(version) {
            return None;
        }
        self.breaker.record(ok, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(BreakerPolicy {
            failures: 3,
            window: 5,
            backoff: Duration::from_secs(1),
        })
    }

    #[test]
    fn trips_on_k_failures_of_the_last_m() {
        let mut b = breaker();
        let t = Instant::now();
        assert_eq!(b.record(false, t), None);
        assert_eq!(b.record(true, t), None);
        assert_eq!(b.record(false, t), None);
        assert_eq!(b.record(true, t), None);
        assert_eq!(b.record(false, t), Some(Duration::from_secs(1)));
        assert!(b.parked(t));
        assert!(b.parked(t + Duration::from_millis(999)));
    }

    #[test]
    fn old_failures_fall_out_of_the_window() {
        let mut b = breaker();
        let t = Instant::now();
        for ok in [false, false, true, true, true, true, false] {
            assert_eq!(b.record(ok, t), None);
        }
    }

    #[test]
    fn a_failed_trial_doubles_the_backoff_and_a_good_one_resets_it() {
        let mut b = breaker();
        let t = Instant::now();
        for _ in 0..3 {
            b.record(false, t);
        }
        let later = t + Duration::from_secs(1);
        assert!(!b.parked(later), "the trial goes through");
        assert_eq!(b.record(false, later), Some(Duration::from_secs(2)));
        let much_later = later + Duration::from_secs(2);
        assert!(!b.parked(much_later));
        assert_eq!(b.record(true, much_later), None);
        for _ in 0..3 {
            b.record(false, much_later);
        }
        assert!(b.parked(much_later + Duration::from_millis(999)));
        assert!(
            !b.parked(much_later + Duration::from_secs(1)),
            "back to the first back-off"
        );
    }

    #[test]
    fn outcomes_recorded_while_parked_do_not_count() {
        let mut b = breaker();
        let t = Instant::now();
        for _ in 0..3 {
            b.record(false, t);
        }
        // Calls that were running on other workers when it tripped.
        for _ in 0..5 {
            assert_eq!(b.record(false, t + Duration::from_millis(10)), None);
        }
        let later = t + Duration::from_secs(1);
        assert!(!b.parked(later));
        assert_eq!(b.record(true, later), None, "the trial closes it");
        assert!(!b.parked(later));
    }

    fn versioned() -> VersionedBreaker<&'static str> {
        VersionedBreaker::new(BreakerPolicy {
            failures: 2,
            window: 2,
            backoff: Duration::from_secs(1),
        })
    }

    #[test]
    fn failures_of_a_replaced_version_do_not_park_its_replacement() {
        let mut b = versioned();
        let t = Instant::now();
        let (old, new) = (Arc::new("v1"), Arc::new("v2"));
        assert!(b.start(&old));
        assert_eq!(b.parked(&old, t), Some(false));
        // Calls on `old` are in flight when a worker takes the first message of `new`.
        assert!(b.start(&new));
        assert!(!b.start(&new), "the other workers join the record");
        assert_eq!(b.record(&old, false, t), None);
        assert_eq!(b.record(&old, false, t), None);
        assert_eq!(
            b.parked(&new, t),
            Some(false),
            "the old failures did not count"
        );
        assert_eq!(b.record(&new, false, t), None);
        assert_eq!(b.record(&new, false, t), Some(Duration::from_secs(1)));
        assert_eq!(b.parked(&new, t), Some(true));
        assert_eq!(
            b.parked(&old, t),
            None,
            "not shed by the new version's record"
        );
    }

    #[test]
    fn successes_of_a_replaced_version_do_not_hide_the_replacements_failures() {
        let mut b = versioned();
        let t = Instant::now();
        let (old, new) = (Arc::new("v1"), Arc::new("v2"));
        b.start(&old);
        b.start(&new);
        assert_eq!(b.record(&new, false, t), None);
        assert_eq!(b.record(&old, true, t), None);
        assert_eq!(
            b.record(&new, false, t),
            Some(Duration::from_secs(1)),
            "two failures of the last two of its own messages"
        );
    }

    #[test]
    fn a_trial_is_spent_only_on_the_version_it_is_for() {
        let mut b = versioned();
        let t = Instant::now();
        let (old, new) = (Arc::new("v1"), Arc::new("v2"));
        b.start(&new);
        b.record(&new, false, t);
        b.record(&new, false, t);
        let later = t + Duration::from_secs(1);
        assert_eq!(b.parked(&new, later), Some(false), "the trial goes through");
        // An old call ends first: it is not the trial.
        assert_eq!(b.record(&old, false, later), None);
        assert_eq!(b.record(&new, true, later), None, "the trial closes it");
        assert_eq!(b.parked(&new, later), Some(false));
    }
}
