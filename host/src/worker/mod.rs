//! Workers: where Wasm runs.
//!
//! Each plugin has one bounded queue and, by default, one worker thread that owns a
//! long-lived `Store` and instance, so plugin state survives between messages and no message
//! pays for an instantiation. The worker takes messages in queue order (FIFO per plugin), runs
//! `handle` under the plugin's deadline and memory cap, and rebuilds the instance after a
//! trap.
//!
//! A plugin whose manifest sets `limits.concurrency = N` gets N worker threads ([`Workers`]),
//! all taking from its one queue, each with its own instance: per-instance state is not
//! shared between them, the memory cap applies to each instance, and messages are no longer
//! handled in order. Its circuit breaker is still one for the plugin.
//!
//! Workers are OS threads, not tokio tasks: a call may run until its deadline, and it must not
//! hold a reactor thread while it does. Host imports that wait (publish, and WASI's poll and
//! blocking stream calls: a guest's `sleep`) block this thread, bounded by the same deadline;
//! a wait cut short by it fails the message as `deadline`, like an interrupt in Wasm.
//!
//! Hot reload: before each message a worker checks which version of its plugin is current
//! and, if it changed, instantiates the new one. A message is handled once, by whichever
//! version is current when a worker takes it; a call in flight during a swap finishes on the
//! old version. When the plugin is removed its [`queue`] is closed; the workers finish what
//! is queued and exit.
//!
//! Containment: a trap (a panic, the deadline, the memory cap) fails that message only and
//! that worker's next message gets a fresh instance; a plugin that keeps failing is parked by
//! its [`breaker`]. Every message the router offers ends up handled, failed or shed, and
//! failures and sheds are counted by a fixed set of reasons ([`outcome`](crate::stats::outcome)).

#[allow(missing_docs)]
pub mod bindings;
pub mod breaker;
pub mod engine;
pub mod host;
pub mod instance;
pub mod queue;
pub mod state;
pub mod version;
pub mod wasi;
pub mod worlds;

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use opentelemetry::KeyValue;

use crate::PluginName;
use crate::config::BreakerPolicy;
use crate::message::Heard;
use crate::stats::PluginStats;
use crate::stats::millis_now;
use crate::stats::outcome::{Failure, FailureReason, ShedReason};
use crate::stream_entry::StreamEntry;
use crate::text;
use breaker::{Breaker, VersionedBreaker};
use instance::Instance;
use queue::{HostBudget, Limits, Queue};
use version::LoadedPlugin;

/// One message waiting in a plugin's queue.
#[derive(Debug)]
pub struct Envelope {
    /// The channel it was published on.
    pub channel: Bytes,
    /// The plugin's subscription that matched.
    pub subscription: Heard,
    /// The payload as published.
    pub payload: Bytes,
    /// When the source read it.
    pub received_at: SystemTime,
    /// For a stream entry: its id, its fields, and the ticket its reader awaits. Boxed: most
    /// messages are pub/sub ones, and every byte of an envelope counts against the queue
    /// budgets (about 60 bytes less per message than inline).
    pub entry: Option<Box<StreamEntry>>,
}

/// The sending side of a plugin's queue, held by the routing table.
#[derive(Clone, Debug)]
pub struct Inbox {
    plugin: PluginName,
    queue: Arc<Queue>,
    stats: Arc<PluginStats>,
}

/// Creates a plugin's queue within `limits`, sharing the host's `budget`.
pub fn inbox(
    plugin: PluginName,
    limits: Limits,
    budget: Arc<HostBudget>,
    stats: Arc<PluginStats>,
) -> Inbox {
    let owner = queue::Owner {
        plugin: plugin.clone(),
        stats: stats.clone(),
    };
    Inbox {
        plugin,
        queue: Queue::new(limits, budget, owner),
        stats,
    }
}

impl Inbox {
    /// Queues `envelope` if the budgets allow; otherwise sheds by the queue's policy and
    /// counts. Never waits: the caller is the reading task, and Redis drops a subscriber that
    /// stops reading.
    pub fn offer(&self, envelope: Envelope) {
        self.queue.offer(envelope);
    }

    /// Queues a stream entry, even beyond the queue's budgets (its reader bounds what it
    /// has in flight). Returns false if the plugin has stopped; the entry's ticket then
    /// reports it as not handled.
    pub fn offer_entry(&self, envelope: Envelope) -> bool {
        self.queue.offer_unbounded(envelope)
    }

    /// Sets the plugin's queue budget in bytes (its current version's).
    pub fn set_byte_limit(&self, bytes: usize) {
        self.queue.set_byte_limit(bytes);
    }

    /// Bytes waiting, and the plugin's queue budget.
    pub fn bytes(&self) -> (usize, usize) {
        (self.queue.bytes(), self.queue.byte_limit())
    }

    /// The plugin's name.
    pub fn plugin(&self) -> &PluginName {
        &self.plugin
    }

    /// The plugin's counters.
    pub fn stats(&self) -> &Arc<PluginStats> {
        &self.stats
    }

    /// Whether this and `other` feed the same queue (the same plugin, not reloaded from
    /// scratch in between).
    pub fn same_queue(&self, other: &Inbox) -> bool {
        Arc::ptr_eq(&self.queue, &other.queue)
    }

    /// Whether the plugin has stopped taking messages.
    pub fn is_closed(&self) -> bool {
        self.queue.is_closed()
    }

    /// Messages waiting.
    pub fn depth(&self) -> usize {
        self.queue.len()
    }

    /// Takes the next waiting message, as a worker would (for tests of routing).
    #[cfg(test)]
    pub(crate) fn try_take(&self) -> Option<Envelope> {
        self.queue.try_pop()
    }

    /// Stops accepting messages; the workers drain the rest and exit.
    pub fn close(&self) {
        self.queue.close();
    }
}

/// The most workers a plugin may ask for (`limits.concurrency`): each holds its own
/// instance, up to the plugin's memory cap, and its own OS thread, so the cap bounds what one
/// manifest can take from the host.
pub const MAX_CONCURRENCY: usize = 64;

/// The worker threads of one plugin, held by the registry.
///
/// As many threads as the current version's `concurrency` take from the plugin's one queue.
/// When a new version wants fewer, the surplus threads finish the call they are in and stop
/// before taking another message; when it wants more, [`Workers::staff`] starts them.
pub struct Workers {
    plugin: PluginName,
    current: Arc<ArcSwap<LoadedPlugin>>,
    queue: Arc<Queue>,
    stats: Arc<PluginStats>,
    policy: BreakerPolicy,
    crew: Arc<Crew>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Threads started so far, to name the next one.
    started: usize,
}

/// What a plugin's workers share.
#[derive(Debug)]
struct Crew {
    roster: Mutex<Roster>,
    /// `running - wanted` when positive, mirrored out of `roster` so that a worker's check
    /// before each message is one atomic load, not a lock.
    surplus: AtomicUsize,
    /// The plugin's breaker while its version has several workers. Whichever seat a version
    /// has, this names the newest version a worker has started, and the plugin's parked
    /// mark (`parked_until_ms` of its stats) is written under its lock, on behalf of that
    /// version only.
    breaker: Mutex<VersionedBreaker<LoadedPlugin>>,
}

#[derive(Debug, Default)]
struct Roster {
    /// Workers the current version asks for.
    wanted: usize,
    /// Workers that have not decided to stop for being surplus.
    running: usize,
}

impl Crew {
    fn breaker(&self) -> std::sync::MutexGuard<'_, VersionedBreaker<LoadedPlugin>> {
        self.breaker.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_surplus(&self, roster: &Roster) {
        self.surplus.store(
            roster.running.saturating_sub(roster.wanted),
            Ordering::Relaxed,
        );
    }

    /// Whether the calling worker is surplus; if so, it is counted out and must stop.
    fn leaving(&self) -> bool {
        if self.surplus.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let mut roster = self.roster.lock().unwrap_or_else(|e| e.into_inner());
        if roster.running <= roster.wanted {
            return false;
        }
        roster.running -= 1;
        self.set_surplus(&roster);
        true
    }
}

/// Starts the workers of `plugin`, which run whichever version `current` holds: as many as
/// that version's `concurrency`.
pub fn spawn(
    plugin: PluginName,
    current: Arc<ArcSwap<LoadedPlugin>>,
    inbox: &Inbox,
    breaker: BreakerPolicy,
) -> std::io::Result<Workers> {
    let mut workers = Workers {
        plugin,
        current,
        queue: inbox.queue.clone(),
        stats: inbox.stats.clone(),
        policy: breaker,
        crew: Arc::new(Crew {
            roster: Mutex::new(Roster::default()),
            surplus: AtomicUsize::new(0),
            breaker: Mutex::new(VersionedBreaker::new(breaker)),
        }),
        threads: Vec::new(),
        started: 0,
    };
    workers.staff()?;
    Ok(workers)
}

impl Workers {
    /// Matches the number of threads to the current version's `concurrency`: starts the
    /// missing ones, or tells the surplus to stop after their call in progress. Call it after
    /// every swap of the version.
    pub fn staff(&mut self) -> std::io::Result<()> {
        let wanted = self.current.load().concurrency.clamp(1, MAX_CONCURRENCY);
        self.threads.retain(|thread| !thread.is_finished());
        let mut result = Ok(());
        let crew = self.crew.clone();
        let surplus = {
            let mut roster = crew.roster.lock().unwrap_or_else(|e| e.into_inner());
            roster.wanted = wanted;
            while roster.running < roster.wanted {
                match self.start_one() {
                    Ok(thread) => {
                        self.threads.push(thread);
                        roster.running += 1;
                    }
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            crew.set_surplus(&roster);
            roster.running > roster.wanted
        };
        if surplus {
            // Idle surplus workers sleep in the queue: wake them to leave.
            self.queue.wake_all();
        }
        result
    }

    fn start_one(&mut self) -> std::io::Result<std::thread::JoinHandle<()>> {
        let name = match self.started {
            0 => format!("plugin-{}", self.plugin),
            n => format!("plugin-{}#{n}", self.plugin),
        };
        let worker = Worker {
            plugin: self.plugin.clone(),
            current: self.current.clone(),
            queue: self.queue.clone(),
            stats: self.stats.clone(),
            crew: self.crew.clone(),
            seat: Seat::Shared,
            policy: self.policy,
            live: None,
            version: None,
        };
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || worker.run())?;
        self.started += 1;
        Ok(thread)
    }

    /// Whether every thread has stopped (after the queue was closed and drained).
    pub fn is_finished(&self) -> bool {
        self.threads
            .iter()
            .all(std::thread::JoinHandle::is_finished)
    }

    /// Threads taking messages now (surplus ones that are still finishing a call included).
    pub fn count(&self) -> usize {
        self.threads.iter().filter(|t| !t.is_finished()).count()
    }

    /// Waits for every thread to stop. Close the queue first.
    pub fn join(self) {
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

/// Where a worker keeps its breaker record: its own when its version has one worker (no
/// lock on the path of an ordered plugin), the crew's shared one otherwise.
///
/// Either way, an outcome counts for the plugin only while the version it ran on is the one
/// the crew's record is about: a call that was in flight when a newer version started
/// neither records into the newer version's breaker nor marks the plugin parked.
enum Seat {
    Own(Breaker),
    Shared,
}

impl Seat {
    /// Whether a message about to run on `version` must be shed. One that goes through
    /// clears the plugin's parked mark, if the mark is its version's to clear.
    fn parked(
        &mut self,
        crew: &Crew,
        version: &Arc<LoadedPlugin>,
        now: Instant,
        stats: &PluginStats,
    ) -> bool {
        match self {
            Seat::Own(breaker) => {
                let parked = breaker.parked(now);
                // The lock only when there is a mark to clear: after a park, not per message.
                if !parked
                    && stats.parked_until_ms.load(Ordering::Relaxed) != 0
                    && crew.breaker().is_about(version)
                {
                    stats.parked_until_ms.store(0, Ordering::Relaxed);
                }
                parked
            }
            Seat::Shared => {
                let mut shared = crew.breaker();
                match shared.parked(version, now) {
                    Some(true) => true,
                    Some(false) => {
                        stats.parked_until_ms.store(0, Ordering::Relaxed);
                        false
                    }
                    // A newer version's record: it neither sheds nor admits for this one.
                    None => false,
                }
            }
        }
    }

    /// Records the outcome of a call that ran on `version`; returns the parking period if
    /// it parked the plugin.
    fn record(
        &mut self,
        crew: &Crew,
        version: &Arc<LoadedPlugin>,
        ok: bool,
        finished: Instant,
        stats: &PluginStats,
    ) -> Option<Duration> {
        let backoff = match self {
            Seat::Own(breaker) => {
                let backoff = breaker.record(ok, finished)?;
                // The same lock as a newer version's start, so the mark cannot land after it.
                let shared = crew.breaker();
                if !shared.is_about(version) {
                    return None;
                }
                mark_parked(stats, backoff);
                backoff
            }
            Seat::Shared => {
                let mut shared = crew.breaker();
                let backoff = shared.record(version, ok, finished)?;
                mark_parked(stats, backoff);
                backoff
            }
        };
        stats.parks.fetch_add(1, Ordering::Relaxed);
        Some(backoff)
    }
}

/// Marks the plugin parked for `backoff` from now. Call it under the crew's breaker lock.
fn mark_parked(stats: &PluginStats, backoff: Duration) {
    let until = millis_now() + u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX);
    stats.parked_until_ms.store(until, Ordering::Relaxed);
}

/// The consumer span of `envelope` for `version`, when the host traces: under the context
/// the message carries, begun when it was read, with the messaging attributes.
fn consumer_span(version: &LoadedPlugin, envelope: &Envelope) -> Option<opentelemetry::Context> {
    let tracing = version.context.effects.tracing();
    if !tracing.is_on() {
        return None;
    }
    let fields = envelope.entry.as_ref().map_or(&[][..], |e| &e.fields[..]);
    let parent = tracing.parent_of(fields, &envelope.payload);
    tracing.consumer(&parent, envelope.received_at, || {
        let channel = String::from_utf8_lossy(&envelope.channel).into_owned();
        let queue_wait = SystemTime::now()
            .duration_since(envelope.received_at)
            .unwrap_or_default();
        let mut attributes = vec![
            KeyValue::new("messaging.system", "redis"),
            KeyValue::new("messaging.operation.type", "process"),
            KeyValue::new("messaging.destination.name", channel.clone()),
            KeyValue::new("messaging.message.body.size", envelope.payload.len() as i64),
            KeyValue::new(
                "switchyard.plugin",
                version.context.name.as_str().to_owned(),
            ),
            KeyValue::new("switchyard.plugin.version", version.context.version.clone()),
            KeyValue::new("switchyard.plugin.hash", version.context.hash.to_string()),
            KeyValue::new("switchyard.subscription", envelope.subscription.to_string()),
            KeyValue::new("switchyard.queue_wait_ms", queue_wait.as_secs_f64() * 1e3),
        ];
        if let Some(entry) = &envelope.entry {
            attributes.push(KeyValue::new("messaging.message.id", entry.id.clone()));
        }
        (format!("process {channel}"), attributes)
    })
}

struct Worker {
    plugin: PluginName,
    current: Arc<ArcSwap<LoadedPlugin>>,
    queue: Arc<Queue>,
    stats: Arc<PluginStats>,
    crew: Arc<Crew>,
    seat: Seat,
    policy: BreakerPolicy,
    live: Option<Instance>,
    /// The version the breaker's record is about.
    version: Option<Arc<LoadedPlugin>>,
}

impl Worker {
    fn run(mut self) {
        let (queue, crew) = (self.queue.clone(), self.crew.clone());
        while let Some(mut envelope) = queue.pop_unless(|| crew.leaving()) {
            // A stream entry's ticket reports the outcome; dropped unfinished (the plugin
            // parked), it reports the entry as not handled.
            let ticket = envelope.entry.as_mut().map(|e| e.ticket.take());
            let version = self.current.load_full();
            if !self
                .version
                .as_ref()
                .is_some_and(|v| Arc::ptr_eq(v, &version))
            {
                // A new version gets a fresh start, and its own instance; the old store is
                // dropped first so that its memory goes before the new one's arrives.
                self.live = None;
                self.take_seat(&version);
                self.version = Some(version.clone());
            }
            let now = Instant::now();
            if self.seat.parked(&self.crew, &version, now, &self.stats) {
                self.stats.discarded.fetch_add(1, Ordering::Relaxed);
                self.stats.record_shed(&self.plugin, ShedReason::Parked, "");
                continue;
            }
            let (outcome, finished, span) = self.handle(&version, envelope, now);
            let ok = outcome.is_ok();
            if let Some(ticket) = ticket {
                ticket.finish(outcome, &version.hash, span);
            }
            if let Some(backoff) = self
                .seat
                .record(&self.crew, &version, ok, finished, &self.stats)
            {
                tracing::error!(plugin = %text::escaped(self.plugin.as_str()), ?backoff, "plugin keeps failing; parked");
            }
        }
        tracing::debug!(plugin = %text::escaped(self.plugin.as_str()), "worker done (queue closed and drained, or surplus)");
    }

    /// Picks where the breaker record of `version` lives, and starts the crew's record over
    /// for a version seen for the first time.
    fn take_seat(&mut self, version: &Arc<LoadedPlugin>) {
        {
            let mut shared = self.crew.breaker();
            // The first of the plugin's workers to see the version starts the record over;
            // the others join it. Only while the version is still current: a worker that
            // took its message just before a swap must not take the record back from the
            // newer version another worker already started.
            if Arc::ptr_eq(&self.current.load(), version) && shared.start(version) {
                self.stats.parked_until_ms.store(0, Ordering::Relaxed);
            }
        }
        self.seat = if version.concurrency <= 1 {
            Seat::Own(Breaker::new(self.policy))
        } else {
            Seat::Shared
        };
    }

    /// Handles one message on a live instance (built if needed), taken from the queue at
    /// `now`; whether it succeeded (or why not), when it was over, and its consumer span
    /// when traced.
    fn handle(
        &mut self,
        version: &Arc<LoadedPlugin>,
        envelope: Envelope,
        mut now: Instant,
    ) -> (Result<(), String>, Instant, Option<opentelemetry::Context>) {
        if self.live.is_none() {
            match Instance::new(version.clone(), self.stats.clone()) {
                Ok(instance) => {
                    tracing::debug!(plugin = %text::escaped(self.plugin.as_str()), version = %version.hash, "instance ready");
                    self.live = Some(instance);
                }
                Err(e) => {
                    let failure = Failure {
                        reason: FailureReason::NoInstance,
                        message: format!("cannot instantiate: {e:#}"),
                    };
                    self.stats.record_failure(&self.plugin, &failure);
                    return (Err(failure.message), Instant::now(), None);
                }
            }
            // The handle time leaves instantiation out.
            now = Instant::now();
        }
        let Some(instance) = self.live.as_mut() else {
            // Unreachable (built just above), but a message that reaches here must still be
            // counted, or the plugin would never look settled.
            let failure = Failure {
                reason: FailureReason::NoInstance,
                message: "no instance".to_owned(),
            };
            self.stats.record_failure(&self.plugin, &failure);
            return (Err(failure.message), now, None);
        };
        let span = consumer_span(version, &envelope);
        let outcome = instance.handle(envelope, span.clone());
        let finished = Instant::now();
        self.stats
            .handle_times
            .observe((finished - now).as_secs_f64(), span.as_ref());
        if let Some(span) = &span {
            match &outcome {
                Ok(()) => crate::trace::end(span, Ok(())),
                Err(failure) => {
                    crate::trace::annotate(
                        span,
                        vec![KeyValue::new("error.type", failure.reason.as_str())],
                    );
                    crate::trace::end(span, Err(&failure.message));
                }
            }
        }
        let outcome = match outcome {
            Ok(()) => {
                self.stats.handled.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(mut failure) => {
                // The text may be the plugin's own, of any length: it is kept (last error,
                // dead letter) only up to a bound.
                if failure.message.len() > text::MAX_ERROR_TEXT {
                    failure.message =
                        text::bounded(&failure.message, text::MAX_ERROR_TEXT).into_owned();
                }
                if failure.reason.poisons_instance() {
                    // A trap poisons the store: the next message gets a fresh instance.
                    self.live = None;
                }
                self.stats.record_failure(&self.plugin, &failure);
                Err(failure.message)
            }
        };
        (outcome, finished, span)
    }
}
