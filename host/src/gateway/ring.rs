//! The ring of one gateway subscription: the messages its clients have not all read yet,
//! bounded in count and in bytes, each client reading at its own pace.
//!
//! A message is kept until every client that watched the subscription when it arrived has
//! read it, or until the ring is full: then the oldest messages go, whoever had not read them,
//! and a client that had not is told how many it lost when it next reads. The writer (the
//! gateway's Redis reader) never waits for a client.
//!
//! Rings also share one budget for the whole gateway ([`Budget`]): a ring that would take
//! the gateway past it gives up its own oldest messages first, so a few stalled clients cannot
//! make the gateway hold more than the budget, and a ring always keeps its newest message,
//! which is what a client that keeps up reads next.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::ws::Utf8Bytes;
use tokio::sync::Notify;

use super::GatewayStats;

/// One message on its way to browsers: the JSON object both protocols send,
/// `{"type":"message","channel":…,"pattern":…,"payload":…}`, rendered once and shared by
/// every client's frame (cloning it copies no bytes).
pub type Event = Utf8Bytes;

/// Bytes held by every ring of one gateway, against its total (`buffer_bytes_total`),
/// counted in its [`GatewayStats`].
#[derive(Debug)]
pub struct Budget {
    stats: Arc<GatewayStats>,
    total: usize,
}

impl Budget {
    /// A budget of `total` bytes, counted in `stats.buffered_bytes`.
    pub fn new(stats: Arc<GatewayStats>, total: usize) -> Self {
        Self { stats, total }
    }

    /// Bytes the rings hold now.
    pub fn held(&self) -> usize {
        usize::try_from(self.stats.buffered_bytes.load(Ordering::Relaxed)).unwrap_or(usize::MAX)
    }

    fn over_with(&self, bytes: usize) -> bool {
        self.held().saturating_add(bytes) > self.total
    }

    fn take(&self, bytes: usize) {
        self.stats
            .buffered_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    fn give_back(&self, bytes: usize) {
        self.stats
            .buffered_bytes
            .fetch_sub(bytes as u64, Ordering::Relaxed);
    }
}

/// How much one ring may hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Messages.
    pub messages: usize,
    /// Bytes of rendered messages.
    pub bytes: usize,
}

/// A client missed this many messages: the ring dropped them before it read them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lagged(pub u64);

/// One subscription's messages, shared by the clients that watch it.
pub struct Ring {
    state: Mutex<State>,
    arrived: Notify,
    limits: Limits,
    budget: Arc<Budget>,
}

struct State {
    entries: VecDeque<Entry>,
    /// The sequence number of `entries[0]`.
    first: u64,
    bytes: usize,
    readers: usize,
}

struct Entry {
    event: Event,
    /// Readers that were there when it arrived and have not read it yet.
    unread: usize,
}

impl State {
    fn end(&self) -> u64 {
        self.first + self.entries.len() as u64
    }

    fn pop_front(&mut self, budget: &Budget) {
        if let Some(entry) = self.entries.pop_front() {
            self.first += 1;
            self.bytes -= entry.event.len();
            budget.give_back(entry.event.len());
        }
    }

    /// Frees the messages every reader has read. Readers read in order, so these are always
    /// at the front.
    fn free_read(&mut self, budget: &Budget) {
        while self.entries.front().is_some_and(|entry| entry.unread == 0) {
            self.pop_front(budget);
        }
    }
}

impl Ring {
    /// An empty ring within `limits`, counting into `budget`.
    pub fn new(limits: Limits, budget: Arc<Budget>) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                entries: VecDeque::new(),
                first: 0,
                bytes: 0,
                readers: 0,
            }),
            arrived: Notify::new(),
            limits: Limits {
                messages: limits.messages.max(1),
                bytes: limits.bytes,
            },
            budget,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `event` for every current reader, dropping the oldest messages to make room; the
    /// number of readers it is for. Never waits.
    pub fn push(&self, event: Event) -> usize {
        let size = event.len();
        let mut state = self.lock();
        if state.readers == 0 {
            return 0;
        }
        while !state.entries.is_empty()
            && (state.entries.len() >= self.limits.messages
                || state.bytes + size > self.limits.bytes
                || self.budget.over_with(size))
        {
            state.pop_front(&self.budget);
        }
        let readers = state.readers;
        state.entries.push_back(Entry {
            event,
            unread: readers,
        });
        state.bytes += size;
        self.budget.take(size);
        drop(state);
        self.arrived.notify_waiters();
        readers
    }

    /// A reader that gets every message pushed from now on (unless it falls behind).
    pub fn reader(self: &Arc<Self>) -> Reader {
        let mut state = self.lock();
        state.readers += 1;
        let next = state.end();
        drop(state);
        Reader {
            ring: self.clone(),
            next,
        }
    }

    /// Bytes held now.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

/// The message at `next` in `ring`, moving `next` on; or how many were lost before it.
fn take(ring: &Ring, next: &mut u64) -> Option<Result<Event, Lagged>> {
    let mut state = ring.lock();
    if *next < state.first {
        let missed = state.first - *next;
        *next = state.first;
        return Some(Err(Lagged(missed)));
    }
    let at = usize::try_from(*next - state.first).ok()?;
    let entry = state.entries.get_mut(at)?;
    entry.unread -= 1;
    let event = entry.event.clone();
    *next += 1;
    state.free_read(&ring.budget);
    Some(Ok(event))
}

/// One client's place in a [`Ring`].
pub struct Reader {
    ring: Arc<Ring>,
    /// Sequence number of the next message it reads.
    next: u64,
}

impl Reader {
    /// The next message, or how many it lost since the last one it read, if any is there.
    pub fn try_recv(&mut self) -> Option<Result<Event, Lagged>> {
        take(&self.ring, &mut self.next)
    }

    /// Waits for the next message, or for news of lost ones.
    pub async fn recv(&mut self) -> Result<Event, Lagged> {
        loop {
            // Registered before looking, so a push between the look and the wait wakes it.
            let arrived = self.ring.arrived.notified();
            let mut arrived = std::pin::pin!(arrived);
            arrived.as_mut().enable();
            if let Some(item) = take(&self.ring, &mut self.next) {
                return item;
            }
            arrived.await;
        }
    }

    /// The reader as a stream that never ends.
    pub fn into_stream(self) -> futures::stream::BoxStream<'static, Result<Event, Lagged>> {
        Box::pin(futures::stream::unfold(self, |mut reader| async move {
            let item = reader.recv().await;
            Some((item, reader))
        }))
    }
}

impl Drop for Reader {
    /// What it had not read yet no longer waits for it.
    fn drop(&mut self) {
        let mut state = self.ring.lock();
        let first = state.first;
        let from = usize::try_from(self.next.saturating_sub(first)).unwrap_or(usize::MAX);
        for entry in state.entries.iter_mut().skip(from) {
            entry.unread -= 1;
        }
        state.readers -= 1;
        state.free_read(&self.ring.budget);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(text: &str) -> Event {
        Event::from(text.to_owned())
    }

    fn new_ring(messages: usize, bytes: usize, total: usize) -> (Arc<Ring>, Arc<Budget>) {
        let budget = Arc::new(Budget::new(Arc::default(), total));
        (
            Ring::new(Limits { messages, bytes }, budget.clone()),
            budget,
        )
    }

    #[test]
    fn a_message_is_freed_once_every_reader_has_read_it() {
        let (ring, budget) = new_ring(16, 1 << 20, 1 << 20);
        assert_eq!(ring.push(event("nobody")), 0, "no reader, nothing kept");
        let mut a = ring.reader();
        let mut b = ring.reader();
        assert_eq!(ring.push(event("one")), 2);
        assert_eq!(budget.held(), 3);
        assert_eq!(a.try_recv(), Some(Ok(event("one"))));
        assert_eq!(a.try_recv(), None);
        assert_eq!(ring.bytes(), 3, "b has not read it");
        assert_eq!(b.try_recv(), Some(Ok(event("one"))));
        assert_eq!(ring.bytes(), 0);
        assert_eq!(budget.held(), 0);

        ring.push(event("two"));
        drop(b);
        assert_eq!(ring.bytes(), 3, "a has not read it");
        drop(a);
        assert_eq!(ring.bytes(), 0);
    }

    #[test]
    fn a_slow_reader_loses_the_oldest_by_count_or_bytes_and_is_told_how_many() {
        let (ring, _) = new_ring(3, 1 << 20, 1 << 20);
        let mut slow = ring.reader();
        for text in ["a", "b", "c", "d"] {
            ring.push(event(text));
        }
        assert_eq!(slow.try_recv(), Some(Err(Lagged(1))));
        assert_eq!(slow.try_recv(), Some(Ok(event("b"))));

        let (ring, _) = new_ring(16, 10, 1 << 20);
        let mut slow = ring.reader();
        for text in ["aaaa", "bbbb", "cccc"] {
            ring.push(event(text));
        }
        assert_eq!(ring.bytes(), 8, "three would be 12 bytes");
        assert_eq!(slow.try_recv(), Some(Err(Lagged(1))));
        assert_eq!(slow.try_recv(), Some(Ok(event("bbbb"))));
        // A message bigger than the ring is kept alone: the newest is always there.
        ring.push(event("a message of more than ten bytes"));
        assert_eq!(slow.try_recv(), Some(Err(Lagged(1))));
        assert_eq!(
            slow.try_recv(),
            Some(Ok(event("a message of more than ten bytes")))
        );
        assert_eq!(ring.bytes(), 0);
    }

    #[test]
    fn the_shared_budget_makes_a_ring_give_up_its_own_oldest_first() {
        let budget = Arc::new(Budget::new(Arc::default(), 8));
        let limits = Limits {
            messages: 16,
            bytes: 1 << 20,
        };
        let stalled = Ring::new(limits, budget.clone());
        let busy = Ring::new(limits, budget.clone());
        let _stalled_reader = stalled.reader();
        let mut reader = busy.reader();
        stalled.push(event("12345678"));
        assert_eq!(budget.held(), 8);
        busy.push(event("x"));
        busy.push(event("y"));
        assert_eq!(budget.held(), 9, "one message over: the newest is kept");
        assert_eq!(reader.try_recv(), Some(Err(Lagged(1))));
        assert_eq!(reader.try_recv(), Some(Ok(event("y"))));
        assert_eq!(budget.held(), 8);
    }

    #[tokio::test]
    async fn a_waiting_reader_is_woken_by_a_push() {
        let (ring, _) = new_ring(4, 1 << 20, 1 << 20);
        let mut reader = ring.reader();
        let waiting = tokio::spawn(async move { reader.recv().await });
        tokio::task::yield_now().await;
        ring.push(event("hello"));
        assert_eq!(waiting.await.unwrap(), Ok(event("hello")));
    }
}
