//! A plugin's bounded queue: the router pushes without ever waiting, the worker thread pops.
//!
//! When the queue is full the router sheds, for that plugin only, either the message it is
//! pushing (`drop-newest`, the default: what was accepted stays accepted) or the oldest
//! waiting one (`drop-oldest`: a plugin that fell behind catches up on fresh data, as a
//! dashboard wants). A queue is closed when its plugin is removed; the worker drains what is
//! left and stops.

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

/// A bounded FIFO between the router and one worker.
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
        // Waking costs a system call: only when the worker is asleep on an empty queue.
        let wake = state.waiters > 0;
        drop(state);
        if wake {
            self.ready.notify_one();
        }
        outcome
    }

    /// The next message, waiting for one; `None` once the queue is closed and empty.
    pub fn pop(&self) -> Option<Envelope> {
        let mut state = self.lock();
        loop {
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

    /// The next message if one is waiting.
    pub fn try_pop(&self) -> Option<Envelope> {
        self.lock().items.pop_front()
    }

    /// Refuses further pushes; the worker drains what is queued, then stops.
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
}
