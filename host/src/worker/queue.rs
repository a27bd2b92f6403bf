//! A plugin's bounded queue: the router pushes without ever waiting, the plugin's worker
//! threads pop (one by default; `limits.concurrency` of them when its manifest asks).
//!
//! When the queue is full the router sheds, for that plugin only, either the message it is
//! pushing (`drop-newest`, the default: what was accepted stays accepted) or the oldest
//! waiting one (`drop-oldest`: a plugin that fell behind catches up on fresh data, as a
//! dashboard wants). A queue is closed when its plugin is removed; the workers drain what is
//! left and stop.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use super::Envelope;

/// Which message a full queue gives up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WhenFull {
    /// Refuse the new message.
    #[default]
    DropNewest,
    /// Drop the oldest waiting message to make room.
    DropOldest,
}

/// Why a push did not simply queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// The queue was full; the new message was dropped.
    Newest,
    /// The queue was full; the oldest message was dropped, the new one queued.
    Oldest,
    /// The plugin was removed or is stopping.
    Closed,
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
    capacity: usize,
    when_full: WhenFull,
}

#[derive(Debug, Default)]
struct State {
    items: VecDeque<Envelope>,
    closed: bool,
    /// Threads asleep in `pop`.
    waiters: usize,
}

impl Queue {
    /// A queue holding at most `capacity` messages.
    pub fn new(capacity: usize, when_full: WhenFull) -> Self {
        Self {
            state: Mutex::new(State::default()),
            ready: Condvar::new(),
            capacity: capacity.max(1),
            when_full,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section is a single push, pop or flag: the state stays consistent
        // even if a holder panicked.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `envelope`, or sheds according to the policy. Never blocks beyond the lock.
    pub fn push(&self, envelope: Envelope) -> Result<(), Shed> {
        self.push_inner(envelope, true)
    }

    /// Queues `envelope` even when the queue is full: for stream entries, whose reader
    /// bounds what it has in flight itself and must not lose what it read.
    pub fn push_beyond_capacity(&self, envelope: Envelope) -> Result<(), Shed> {
        self.push_inner(envelope, false)
    }

    fn push_inner(&self, envelope: Envelope, bounded: bool) -> Result<(), Shed> {
        let mut state = self.lock();
        if state.closed {
            return Err(Shed::Closed);
        }
        let mut outcome = Ok(());
        if bounded && state.items.len() >= self.capacity {
            match self.when_full {
                WhenFull::DropNewest => return Err(Shed::Newest),
                WhenFull::DropOldest => {
                    state.items.pop_front();
                    outcome = Err(Shed::Oldest);
                }
            }
        }
        state.items.push_back(envelope);
        // Waking costs a system call: only when a worker is asleep on an empty queue. The
        // count includes sleepers already woken but not yet running; a `notify_one` then
        // reaches another sleeper or nobody, and never loses a message: a thread checks the
        // queue under the lock before it sleeps.
        let wake = state.waiters > 0;
        drop(state);
        if wake {
            self.ready.notify_one();
        }
        outcome
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
            if let Some(envelope) = state.items.pop_front() {
                return Some(envelope);
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
        self.lock().items.pop_front()
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
    use crate::source::Subscription;

    fn envelope(n: u8) -> Envelope {
        Envelope {
            channel: Bytes::from_static(b"c"),
            subscription: Subscription::Channel(Bytes::from_static(b"c")),
            entry: None,
            payload: Bytes::from(vec![n]),
            received_at: SystemTime::now(),
        }
    }

    fn drain(queue: &Queue) -> Vec<u8> {
        queue.close();
        std::iter::from_fn(|| queue.pop())
            .map(|e| e.payload[0])
            .collect()
    }

    #[test]
    fn drop_newest_keeps_what_was_accepted() {
        let queue = Queue::new(2, WhenFull::DropNewest);
        assert_eq!(queue.push(envelope(1)), Ok(()));
        assert_eq!(queue.push(envelope(2)), Ok(()));
        assert_eq!(queue.push(envelope(3)), Err(Shed::Newest));
        assert_eq!(drain(&queue), [1, 2]);
    }

    #[test]
    fn drop_oldest_keeps_the_freshest() {
        let queue = Queue::new(2, WhenFull::DropOldest);
        for n in 1..=4 {
            let _ = queue.push(envelope(n));
        }
        assert_eq!(drain(&queue), [3, 4]);
    }

    #[test]
    fn a_closed_queue_drains_then_ends_and_refuses_more() {
        let queue = Queue::new(4, WhenFull::DropNewest);
        let _ = queue.push(envelope(1));
        queue.close();
        assert_eq!(queue.push(envelope(2)), Err(Shed::Closed));
        assert_eq!(queue.pop().map(|e| e.payload[0]), Some(1));
        assert!(queue.pop().is_none());
    }

    #[test]
    fn pop_waits_for_a_push_from_another_thread() {
        let queue = std::sync::Arc::new(Queue::new(4, WhenFull::DropNewest));
        let worker = {
            let queue = queue.clone();
            std::thread::spawn(move || queue.pop().map(|e| e.payload[0]))
        };
        let _ = queue.push(envelope(7));
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
        let queue = std::sync::Arc::new(Queue::new(16, WhenFull::DropNewest));
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
            assert_eq!(queue.push(envelope(n as u8)), Ok(()));
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
        let queue = std::sync::Arc::new(Queue::new(4, WhenFull::DropNewest));
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
        let queue = std::sync::Arc::new(Queue::new(4, WhenFull::DropNewest));
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
        let _ = queue.push(envelope(5));
        assert_eq!(drain(&queue), [5], "the message stays for the others");
    }
}
