//! A plugin's bounded queue: the router pushes without ever waiting, the plugin's worker
//! threads pop (one by default; `limits.concurrency` of them when its manifest asks).
//!
//! Bounds are in bytes. A message costs its payload, channel and matched subscription plus a
//! fixed [`MESSAGE_OVERHEAD`] ([`Envelope::cost`]). Each queue has a byte budget
//! (`plugins.queue_bytes`, or the manifest's `[limits] queue_bytes`) and, optionally, a count
//! cap (`plugins.queue_capacity`); all queues of the host share one total ([`HostBudget`],
//! `plugins.queue_bytes_total`), so that a hundred plugins cannot hold a hundred budgets.
//!
//! When a queue's own budget is spent it sheds, for that plugin only, either the message it is
//! pushing (`drop-newest`, the default: what was accepted stays accepted) or its oldest waiting
//! ones (`drop-oldest`: a plugin that fell behind catches up on fresh data, as a dashboard
//! wants). When the host's total is spent, the plugin with the largest backlog sheds, not
//! whoever pushes next: a stuck plugin cannot make a healthy one lose messages. Every drop is
//! counted in the plugin's stats by reason.
//!
//! A queue is closed when its plugin is removed; the workers drain what is left and stop.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};

use crate::config::WhenFull;

use super::Envelope;
use crate::PluginName;
use crate::stats::PluginStats;
use crate::stats::outcome::ShedReason;

/// What a queued message costs beyond its payload, channel and subscription bytes: the
/// envelope itself in the queue's ring, and the heap blocks its payload and channel live in
/// (an allocator keeps about 16 bytes beside each).
pub const MESSAGE_OVERHEAD: usize = std::mem::size_of::<Queued>() + 2 * 16;

impl Envelope {
    /// What this message counts against queue budgets, in bytes. A payload shared by several
    /// plugins' queues is counted in each: an upper bound of what the host holds.
    pub fn cost(&self) -> usize {
        let entry = self.entry.as_ref().map_or(0, |entry| {
            entry.id.len()
                + entry
                    .fields
                    .iter()
                    .map(|(name, value)| name.len() + value.len() + 64)
                    .sum::<usize>()
        });
        MESSAGE_OVERHEAD
            + self.payload.len()
            + self.channel.len()
            + self.subscription.name().len()
            + entry
    }
}

/// How much one queue holds before it sheds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of waiting messages ([`Envelope::cost`]).
    pub bytes: usize,
    /// Waiting messages, if capped by count too.
    pub count: Option<usize>,
    /// What a full queue sheds.
    pub when_full: WhenFull,
}

/// The bytes every queue of the host may hold together, and the queues that share them.
#[derive(Debug)]
pub struct HostBudget {
    limit: usize,
    used: AtomicUsize,
    queues: Mutex<Vec<Weak<Queue>>>,
}

impl HostBudget {
    /// A budget of `limit` bytes for all queues together.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit: limit.max(1),
            used: AtomicUsize::new(0),
            queues: Mutex::new(Vec::new()),
        })
    }

    /// The total, in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes held by every queue now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Takes `cost` bytes if they fit.
    fn try_take(&self, cost: usize) -> bool {
        // Optimistic: two pushes racing for the last bytes may both back off, never both
        // overshoot by more than one message each.
        let before = self.used.fetch_add(cost, Ordering::Relaxed);
        if before + cost <= self.limit {
            return true;
        }
        self.used.fetch_sub(cost, Ordering::Relaxed);
        false
    }

    /// Takes `cost` bytes whether or not they fit (stream entries, which are never shed).
    fn take(&self, cost: usize) {
        self.used.fetch_add(cost, Ordering::Relaxed);
    }

    fn give_back(&self, cost: usize) {
        self.used.fetch_sub(cost, Ordering::Relaxed);
    }

    fn join(&self, queue: &Arc<Queue>) {
        let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        queues.retain(|q| q.strong_count() > 0);
        queues.push(Arc::downgrade(queue));
    }

    /// The queue holding the most bytes that may be shed.
    fn largest(&self) -> Option<Arc<Queue>> {
        let queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        queues
            .iter()
            .filter_map(Weak::upgrade)
            .max_by_key(|queue| queue.sheddable())
    }
}

/// The plugin a queue belongs to, whose stats count what the queue accepts and sheds.
#[derive(Debug, Clone)]
pub struct Owner {
    /// The plugin's name, for logs.
    pub plugin: PluginName,
    /// Its counters.
    pub stats: Arc<PluginStats>,
}

impl Owner {
    fn shed(&self, reason: ShedReason, detail: &str) {
        self.stats.record_shed(&self.plugin, reason, detail);
    }

    /// A message accepted earlier is gone unhandled.
    fn discard(&self, reason: ShedReason, detail: &str) {
        self.stats.discarded.fetch_add(1, Ordering::Relaxed);
        self.shed(reason, detail);
    }
}

/// A bounded FIFO between the router and a plugin's workers.
///
/// Wakeups: every push wakes one sleeping worker if any sleeps, so with several sleepers
/// each of several quick pushes wakes a different one (a woken thread is no longer waiting
/// on the condition variable, so the next `notify_one` reaches another). `close` and
/// [`Queue::wake_all`] wake them all.
#[derive(Debug)]
pub struct Queue {
    state: Mutex<State>,
    ready: Condvar,
    owner: Owner,
    budget: Arc<HostBudget>,
    when_full: WhenFull,
    count_limit: usize,
    byte_limit: AtomicUsize,
    /// `state.bytes`, readable without the lock (metrics, reports).
    bytes: AtomicUsize,
    /// `state.sheddable()`, readable without the lock: the host budget's measure of the
    /// largest backlog.
    sheddable: AtomicUsize,
}

#[derive(Debug)]
struct Queued {
    envelope: Envelope,
    cost: usize,
}

impl Queued {
    /// Stream entries are never shed: their reader awaits each one's outcome and bounds
    /// what it has in flight itself.
    fn sheddable(&self) -> bool {
        self.envelope.entry.is_none()
    }
}

#[derive(Debug, Default)]
struct State {
    items: VecDeque<Queued>,
    /// Cost of everything waiting.
    bytes: usize,
    /// Cost of the stream entries waiting.
    entry_bytes: usize,
    closed: bool,
    /// Threads asleep in `pop`.
    waiters: usize,
}

impl State {
    fn sheddable(&self) -> usize {
        self.bytes - self.entry_bytes
    }

    fn push(&mut self, item: Queued) {
        self.bytes += item.cost;
        if !item.sheddable() {
            self.entry_bytes += item.cost;
        }
        self.items.push_back(item);
    }

    fn remove(&mut self, index: usize) -> Option<Queued> {
        let item = self.items.remove(index)?;
        self.bytes -= item.cost;
        if !item.sheddable() {
            self.entry_bytes -= item.cost;
        }
        Some(item)
    }

    fn take_front(&mut self) -> Option<Queued> {
        self.remove(0)
    }

    /// Removes the oldest (or newest) message that may be shed. Pub/sub messages all may,
    /// so the search only walks past stream entries.
    fn take_sheddable(&mut self, oldest: bool) -> Option<Queued> {
        let index = if oldest {
            self.items.iter().position(Queued::sheddable)?
        } else {
            self.items.iter().rposition(Queued::sheddable)?
        };
        self.remove(index)
    }
}

impl Queue {
    /// An empty queue of `owner`'s within `limits`, sharing `budget` with the host's others.
    pub fn new(limits: Limits, budget: Arc<HostBudget>, owner: Owner) -> Arc<Self> {
        let queue = Arc::new(Self {
            state: Mutex::new(State::default()),
            ready: Condvar::new(),
            owner,
            when_full: limits.when_full,
            count_limit: limits.count.unwrap_or(usize::MAX).max(1),
            byte_limit: AtomicUsize::new(limits.bytes.max(1)),
            bytes: AtomicUsize::new(0),
            sheddable: AtomicUsize::new(0),
            budget: budget.clone(),
        });
        budget.join(&queue);
        queue
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section is a single push, pop or flag: the state stays consistent
        // even if a holder panicked.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the byte budget (a new version's manifest may change it). Messages already
    /// queued stay; pushes see the new budget.
    pub fn set_byte_limit(&self, bytes: usize) {
        self.byte_limit.store(bytes.max(1), Ordering::Relaxed);
    }

    /// The byte budget.
    pub fn byte_limit(&self) -> usize {
        self.byte_limit.load(Ordering::Relaxed)
    }

    /// Bytes of the messages waiting.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Bytes of the messages waiting that may be shed (all but stream entries).
    fn sheddable(&self) -> usize {
        self.sheddable.load(Ordering::Relaxed)
    }

    /// Mirrors `state`'s sizes for readers that do not take the lock.
    fn publish_sizes(&self, state: &State) {
        self.bytes.store(state.bytes, Ordering::Relaxed);
        self.sheddable.store(state.sheddable(), Ordering::Relaxed);
    }

    /// Queues `envelope`, or sheds according to the budgets and the policy, counting what it
    /// accepts and drops in the owner's stats. Never blocks beyond the locks of a push (this
    /// queue's, and another's when the host budget makes that one shed). Returns whether
    /// `envelope` was queued.
    pub fn offer(&self, envelope: Envelope) -> bool {
        let cost = envelope.cost();
        if cost > self.byte_limit().min(self.budget.limit()) {
            // No amount of waiting makes room for it.
            self.owner.shed(
                ShedReason::QueueFull,
                ", larger than the plugin's whole queue budget",
            );
            return false;
        }
        // The plugin's own budget first: a message it must shed anyway never takes room from
        // the host's total (which could make another plugin shed for it).
        if !self.make_room(cost) {
            return false;
        }
        if !self.reserve(cost) {
            return false;
        }
        let mut state = self.lock();
        if state.closed {
            drop(state);
            self.budget.give_back(cost);
            self.owner.shed(ShedReason::Stopped, "");
            return false;
        }
        let byte_limit = self.byte_limit();
        let mut dropped = 0usize;
        while state.items.len() >= self.count_limit || state.bytes + cost > byte_limit {
            match self.when_full {
                WhenFull::DropOldest if let Some(old) = state.take_sheddable(true) => {
                    self.budget.give_back(old.cost);
                    dropped += 1;
                }
                // drop-newest, or nothing older may be shed (stream entries fill the queue).
                _ => {
                    self.publish_sizes(&state);
                    drop(state);
                    self.budget.give_back(cost);
                    for _ in 0..dropped {
                        self.owner
                            .discard(ShedReason::QueueFull, ", dropped the oldest");
                    }
                    self.owner
                        .shed(ShedReason::QueueFull, ", dropped the newest");
                    return false;
                }
            }
        }
        self.push_locked(state, envelope, cost);
        for _ in 0..dropped {
            self.owner
                .discard(ShedReason::QueueFull, ", dropped the oldest");
        }
        true
    }

    /// Makes room for `cost` more bytes within this queue's own limits, by its policy:
    /// `drop-oldest` sheds older messages, `drop-newest` sheds the new one (false). The
    /// common case, room to spare and no count cap, takes no lock.
    fn make_room(&self, cost: usize) -> bool {
        let byte_limit = self.byte_limit();
        if self.count_limit == usize::MAX && self.bytes() + cost <= byte_limit {
            return true;
        }
        let mut state = self.lock();
        let mut dropped = 0usize;
        let fits = loop {
            if state.items.len() < self.count_limit && state.bytes + cost <= byte_limit {
                break true;
            }
            match self.when_full {
                WhenFull::DropOldest if let Some(old) = state.take_sheddable(true) => {
                    self.budget.give_back(old.cost);
                    dropped += 1;
                }
                _ => break false,
            }
        };
        self.publish_sizes(&state);
        drop(state);
        for _ in 0..dropped {
            self.owner
                .discard(ShedReason::QueueFull, ", dropped the oldest");
        }
        if !fits {
            self.owner
                .shed(ShedReason::QueueFull, ", dropped the newest");
        }
        fits
    }

    /// Takes `cost` bytes of the host's budget; when it is spent, the largest backlog sheds
    /// until they fit. False if this queue's new message is the one to shed.
    fn reserve(&self, cost: usize) -> bool {
        loop {
            if self.budget.try_take(cost) {
                return true;
            }
            let largest = self.budget.largest();
            let victim = match &largest {
                // Another queue holds more than this one would with the new message.
                Some(other)
                    if !std::ptr::eq(Arc::as_ptr(other), self)
                        && other.sheddable() > self.sheddable() + cost =>
                {
                    other
                }
                _ => {
                    // This plugin has the largest backlog: it sheds by its own policy.
                    if self.when_full == WhenFull::DropOldest && self.evict() {
                        continue;
                    }
                    self.owner.shed(ShedReason::HostBudget, "");
                    return false;
                }
            };
            // Nothing evicted means it emptied meanwhile: its sizes say so now, look again.
            victim.evict();
        }
    }

    /// Drops one waiting message to free host budget: the oldest with `drop-oldest`, the
    /// newest with `drop-newest` (the last accepted is the first given up); never a stream
    /// entry. Whether one was.
    fn evict(&self) -> bool {
        let mut state = self.lock();
        let item = state.take_sheddable(self.when_full == WhenFull::DropOldest);
        self.publish_sizes(&state);
        drop(state);
        let Some(item) = item else { return false };
        self.budget.give_back(item.cost);
        self.owner.discard(
            ShedReason::HostBudget,
            ", to make room in the host's total queue budget",
        );
        true
    }

    /// Queues a stream entry whatever the budgets say: its reader bounds what it has in
    /// flight itself and must not lose what it read. Its bytes count all the same. Returns
    /// false if the queue is closed.
    pub fn offer_unbounded(&self, envelope: Envelope) -> bool {
        let cost = envelope.cost();
        let state = self.lock();
        if state.closed {
            return false;
        }
        self.budget.take(cost);
        self.push_locked(state, envelope, cost);
        true
    }

    fn push_locked(&self, mut state: MutexGuard<'_, State>, envelope: Envelope, cost: usize) {
        state.push(Queued { envelope, cost });
        self.publish_sizes(&state);
        self.owner.stats.accepted.fetch_add(1, Ordering::Relaxed);
        // Waking costs a system call: only when a worker is asleep on an empty queue. The
        // count includes sleepers already woken but not yet running; a `notify_one` then
        // reaches another sleeper or nobody, and never loses a message: a thread checks the
        // queue under the lock before it sleeps.
        let wake = state.waiters > 0;
        drop(state);
        if wake {
            self.ready.notify_one();
        }
    }

    /// The next message, waiting for one; `None` once the queue is closed and empty.
    pub fn pop(&self) -> Option<Envelope> {
        self.pop_unless(|| false)
    }

    /// Like [`Queue::pop`], but `None` as soon as `leave` says so: it is asked before every
    /// take and after every wakeup, under the queue's lock, and a `true` is final (the
    /// caller's commitment to stop taking messages). A caller that changes what `leave`
    /// answers calls [`Queue::wake_all`] so that sleepers ask again.
    pub fn pop_unless(&self, mut leave: impl FnMut() -> bool) -> Option<Envelope> {
        let mut state = self.lock();
        loop {
            if leave() {
                return None;
            }
            if let Some(item) = state.take_front() {
                self.publish_sizes(&state);
                drop(state);
                self.budget.give_back(item.cost);
                return Some(item.envelope);
            }
            if state.closed {
                return None;
            }
            state.waiters += 1;
            state = self.ready.wait(state).unwrap_or_else(|e| e.into_inner());
            state.waiters -= 1;
        }
    }

    /// Wakes every sleeping worker, so that each asks its `leave` again.
    pub fn wake_all(&self) {
        // Taking the lock orders this after whatever changed `leave`'s answer, so a worker
        // about to sleep either sees the change or is asleep when the notification comes.
        drop(self.lock());
        self.ready.notify_all();
    }

    /// Threads asleep in `pop`, for tests of the wakeups.
    #[cfg(test)]
    fn sleepers(&self) -> usize {
        self.lock().waiters
    }

    /// The next message if one is waiting.
    pub fn try_pop(&self) -> Option<Envelope> {
        let mut state = self.lock();
        let item = state.take_front()?;
        self.publish_sizes(&state);
        drop(state);
        self.budget.give_back(item.cost);
        Some(item.envelope)
    }

    /// Refuses further pushes; the workers drain what is queued, then stop.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    /// Whether the queue refuses pushes.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        self.lock().items.len()
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use bytes::Bytes;

    use super::*;
    use crate::message::Subscription;

    fn envelope(n: u8) -> Envelope {
        sized(n, 1)
    }

    /// Message `n` with a payload of `len` bytes.
    fn sized(n: u8, len: usize) -> Envelope {
        Envelope {
            channel: Bytes::from_static(b"c"),
            subscription: Subscription::Channel(Bytes::from_static(b"c")).into(),
            entry: None,
            payload: Bytes::from(vec![n; len]),
            received_at: SystemTime::now(),
        }
    }

    const LARGE: usize = 1 << 30;

    fn owner(name: &str) -> Owner {
        Owner {
            plugin: name.parse().unwrap(),
            stats: PluginStats::new(),
        }
    }

    /// A queue capped at `count` messages, with ample byte budgets.
    fn counted(count: usize, when_full: WhenFull) -> Arc<Queue> {
        let limits = Limits {
            bytes: LARGE,
            count: Some(count),
            when_full,
        };
        Queue::new(limits, HostBudget::new(LARGE), owner("p"))
    }

    /// A queue of `bytes` in a host budget of `total`.
    fn budgeted(
        name: &str,
        bytes: usize,
        when_full: WhenFull,
        budget: &Arc<HostBudget>,
    ) -> Arc<Queue> {
        let limits = Limits {
            bytes,
            count: None,
            when_full,
        };
        Queue::new(limits, budget.clone(), owner(name))
    }

    fn shed(queue: &Queue) -> crate::stats::outcome::ShedCounts {
        queue.owner.stats.snapshot().shed_by
    }

    fn drain(queue: &Queue) -> Vec<u8> {
        queue.close();
        std::iter::from_fn(|| queue.pop())
            .map(|e| e.payload[0])
            .collect()
    }

    #[test]
    fn drop_newest_keeps_what_was_accepted() {
        let queue = counted(2, WhenFull::DropNewest);
        assert!(queue.offer(envelope(1)));
        assert!(queue.offer(envelope(2)));
        assert!(!queue.offer(envelope(3)));
        assert_eq!(drain(&queue), [1, 2]);
        assert_eq!(shed(&queue).queue_full, 1);
    }

    #[test]
    fn drop_oldest_keeps_the_freshest() {
        let queue = counted(2, WhenFull::DropOldest);
        for n in 1..=4 {
            assert!(queue.offer(envelope(n)));
        }
        assert_eq!(drain(&queue), [3, 4]);
        assert_eq!(shed(&queue).queue_full, 2);
        assert_eq!(queue.owner.stats.snapshot().accepted, 4);
    }

    #[test]
    fn a_closed_queue_drains_then_ends_and_refuses_more() {
        let queue = counted(4, WhenFull::DropNewest);
        assert!(queue.offer(envelope(1)));
        queue.close();
        assert!(!queue.offer(envelope(2)));
        assert_eq!(shed(&queue).stopped, 1);
        assert_eq!(queue.pop().map(|e| e.payload[0]), Some(1));
        assert!(queue.pop().is_none());
    }

    #[test]
    fn pop_waits_for_a_push_from_another_thread() {
        let queue = counted(4, WhenFull::DropNewest);
        let worker = {
            let queue = queue.clone();
            std::thread::spawn(move || queue.pop().map(|e| e.payload[0]))
        };
        assert!(queue.offer(envelope(7)));
        assert_eq!(worker.join().unwrap(), Some(7));
    }

    /// Waits (bounded) until `n` threads sleep in `pop`.
    fn until_sleeping(queue: &Queue, n: usize) {
        let started = std::time::Instant::now();
        while queue.sleepers() != n {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(10),
                "{} of {n} threads asleep",
                queue.sleepers()
            );
            std::thread::yield_now();
        }
    }

    #[test]
    fn quick_pushes_wake_as_many_sleeping_workers() {
        const WORKERS: usize = 4;
        let queue = counted(16, WhenFull::DropNewest);
        // Each worker takes one message and then waits at the barrier, so a message can only
        // be taken by a worker that a push woke: a lost wakeup leaves one stranded.
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(WORKERS + 1));
        let (took, taken) = std::sync::mpsc::channel();
        let workers: Vec<_> = (0..WORKERS)
            .map(|_| {
                let (queue, barrier, took) = (queue.clone(), barrier.clone(), took.clone());
                std::thread::spawn(move || {
                    let got = queue.pop().map(|e| e.payload[0]);
                    let _ = took.send(got);
                    barrier.wait();
                })
            })
            .collect();
        until_sleeping(&queue, WORKERS);
        for n in 0..WORKERS {
            assert!(queue.offer(envelope(n as u8)));
        }
        let mut got: Vec<u8> = (0..WORKERS)
            .map(|_| {
                taken
                    .recv_timeout(std::time::Duration::from_secs(10))
                    .expect("every sleeper was woken")
                    .expect("a message")
            })
            .collect();
        got.sort_unstable();
        assert_eq!(got, [0, 1, 2, 3]);
        barrier.wait();
        for worker in workers {
            worker.join().unwrap();
        }
    }

    #[test]
    fn close_wakes_every_sleeper() {
        let queue = counted(4, WhenFull::DropNewest);
        let workers: Vec<_> = (0..3)
            .map(|_| {
                let queue = queue.clone();
                std::thread::spawn(move || queue.pop().is_none())
            })
            .collect();
        until_sleeping(&queue, 3);
        queue.close();
        for worker in workers {
            assert!(worker.join().unwrap(), "a closed empty queue ends");
        }
    }

    #[test]
    fn a_woken_sleeper_leaves_when_told_and_leaves_the_messages() {
        let queue = counted(4, WhenFull::DropNewest);
        let leave = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let worker = {
            let (queue, leave) = (queue.clone(), leave.clone());
            std::thread::spawn(move || {
                queue
                    .pop_unless(|| leave.load(std::sync::atomic::Ordering::Relaxed))
                    .is_none()
            })
        };
        until_sleeping(&queue, 1);
        leave.store(true, std::sync::atomic::Ordering::Relaxed);
        queue.wake_all();
        assert!(worker.join().unwrap(), "left without a message");
        assert!(queue.offer(envelope(5)));
        assert_eq!(drain(&queue), [5], "the message stays for the others");
    }

    #[test]
    fn a_small_message_costs_what_the_defaults_promise() {
        // plugins.queue_bytes's documentation: a 64-byte message on `fwd:x` matched by
        // `fwd:*` costs under 250 bytes, so 64 MiB hold more than 270,000 of them.
        let message = Envelope {
            channel: Bytes::from_static(b"fwd:x"),
            subscription: Subscription::Pattern(Bytes::from_static(b"fwd:*")).into(),
            entry: None,
            payload: Bytes::from(vec![0; 64]),
            received_at: SystemTime::now(),
        };
        let cost = message.cost();
        assert!((200..250).contains(&cost), "{cost}");
        assert!((64 << 20) / cost > 270_000);
    }

    #[test]
    fn a_queue_holds_as_many_bytes_as_its_budget_whatever_the_count() {
        let budget = HostBudget::new(LARGE);
        let cost = sized(0, 1000).cost();
        let queue = budgeted("p", 10 * cost, WhenFull::DropNewest, &budget);
        for n in 0..10 {
            assert!(queue.offer(sized(n, 1000)), "message {n} fits");
        }
        assert!(!queue.offer(sized(10, 1000)), "the eleventh does not");
        assert_eq!(queue.bytes(), 10 * cost);
        assert_eq!(budget.used(), 10 * cost);
        // Small messages still fit beside them in what is left.
        let _ = queue.pop();
        assert!(queue.offer(sized(11, 10)));
        assert!(queue.offer(sized(12, 10)));
        assert_eq!(shed(&queue).queue_full, 1);
        while queue.try_pop().is_some() {}
        assert_eq!(
            (queue.bytes(), budget.used()),
            (0, 0),
            "popping gives bytes back"
        );
    }

    #[test]
    fn drop_oldest_makes_room_by_bytes() {
        let budget = HostBudget::new(LARGE);
        let small = sized(0, 10).cost();
        let queue = budgeted("p", 3 * small + 5, WhenFull::DropOldest, &budget);
        for n in 1..=3 {
            assert!(queue.offer(sized(n, 10)));
        }
        // A message twice as big pushes the two oldest out.
        assert!(queue.offer(sized(4, 10 + small - MESSAGE_OVERHEAD)));
        assert_eq!(drain(&queue), [3, 4]);
        assert_eq!(shed(&queue).queue_full, 2);
    }

    #[test]
    fn a_message_larger_than_the_budget_is_shed_at_once() {
        let budget = HostBudget::new(LARGE);
        let queue = budgeted("p", 1000, WhenFull::DropOldest, &budget);
        assert!(queue.offer(sized(1, 10)));
        assert!(!queue.offer(sized(2, 2000)));
        assert_eq!(drain(&queue), [1], "what was queued stays");
    }

    #[test]
    fn a_spent_host_budget_sheds_from_the_largest_backlog() {
        let cost = sized(0, 100).cost();
        let budget = HostBudget::new(10 * cost);
        let stuck = budgeted("stuck", LARGE, WhenFull::DropNewest, &budget);
        let healthy = budgeted("healthy", LARGE, WhenFull::DropNewest, &budget);
        for n in 0..8 {
            assert!(stuck.offer(sized(n, 100)));
        }
        for n in 0..2 {
            assert!(healthy.offer(sized(n, 100)));
        }
        assert_eq!(budget.used(), 10 * cost);
        // The healthy plugin's next messages are taken; the stuck one gives up its newest.
        assert!(healthy.offer(sized(2, 100)));
        assert!(healthy.offer(sized(3, 100)));
        assert_eq!(shed(&healthy).total(), 0);
        assert_eq!(shed(&stuck).host_budget, 2);
        assert_eq!(drain(&stuck), [0, 1, 2, 3, 4, 5]);
        assert_eq!(drain(&healthy), [0, 1, 2, 3]);
    }

    #[test]
    fn the_largest_backlog_sheds_its_own_new_message() {
        let cost = sized(0, 100).cost();
        let budget = HostBudget::new(4 * cost);
        let stuck = budgeted("stuck", LARGE, WhenFull::DropNewest, &budget);
        let other = budgeted("other", LARGE, WhenFull::DropNewest, &budget);
        assert!(other.offer(sized(9, 100)));
        for n in 0..3 {
            assert!(stuck.offer(sized(n, 100)));
        }
        assert!(!stuck.offer(sized(3, 100)));
        assert_eq!(shed(&stuck).host_budget, 1);
        assert_eq!(shed(&other).total(), 0);
        // With drop-oldest, the largest backlog gives up its oldest for its newest.
        let fresh = budgeted("fresh", LARGE, WhenFull::DropOldest, &budget);
        drop(drain(&stuck));
        for n in 0..4 {
            assert!(fresh.offer(sized(n, 100)));
        }
        assert_eq!(drain(&fresh), [1, 2, 3]);
        assert_eq!(shed(&fresh).host_budget, 1);
    }

    fn entry(n: u8, len: usize) -> Envelope {
        let mut envelope = sized(n, len);
        envelope.entry = Some(Box::new(crate::stream_entry::StreamEntry {
            id: format!("{n}-0"),
            fields: Vec::new(),
            ticket: Default::default(),
        }));
        envelope
    }

    #[test]
    fn a_plugin_over_its_own_budget_never_makes_another_shed() {
        let cost = sized(0, 100).cost();
        let budget = HostBudget::new(6 * cost);
        let big = budgeted("big", LARGE, WhenFull::DropNewest, &budget);
        let capped = budgeted("capped", 2 * cost, WhenFull::DropNewest, &budget);
        for n in 0..4 {
            assert!(big.offer(sized(n, 100)));
        }
        assert!(capped.offer(sized(0, 100)));
        assert!(capped.offer(sized(1, 100)));
        // The total is spent and big has the largest backlog, but capped's own budget is
        // full: its message is refused before it takes anything from big.
        assert!(!capped.offer(sized(2, 100)));
        assert_eq!(shed(&capped).queue_full, 1);
        assert_eq!(shed(&big).total(), 0);
        assert_eq!(drain(&big), [0, 1, 2, 3]);
    }

    #[test]
    fn stream_entries_are_never_shed_for_a_budget() {
        let cost = entry(0, 100).cost();
        let budget = HostBudget::new(4 * cost);
        let reader = budgeted("reader", 2 * cost, WhenFull::DropOldest, &budget);
        for n in 0..3 {
            assert!(reader.offer_unbounded(entry(n, 100)));
        }
        // Its own budget is spent by entries: a pub/sub message is refused, no entry dropped.
        assert!(!reader.offer(sized(9, 10)));
        // The host's total is nearly spent and the reader's backlog is the largest, but all
        // entries: another plugin's message sheds itself rather than an entry.
        let other = budgeted("other", LARGE, WhenFull::DropNewest, &budget);
        assert!(other.offer(sized(1, 10)));
        assert!(!other.offer(sized(2, 100)));
        assert_eq!(shed(&other).host_budget, 1);
        assert_eq!(drain(&reader), [0, 1, 2]);
    }

    #[test]
    fn stream_entries_are_queued_beyond_every_budget_and_counted() {
        let cost = sized(0, 100).cost();
        let budget = HostBudget::new(cost);
        let queue = budgeted("p", cost, WhenFull::DropNewest, &budget);
        for n in 0..3 {
            assert!(queue.offer_unbounded(sized(n, 100)));
        }
        assert_eq!((queue.bytes(), budget.used()), (3 * cost, 3 * cost));
        assert_eq!(drain(&queue), [0, 1, 2]);
    }
}
