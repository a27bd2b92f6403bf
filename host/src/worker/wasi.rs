//! The WASI imports a plugin sees: wasmtime-wasi's own, with every import that can wait
//! bounded by the deadline of the call in progress.
//!
//! Epoch interruption stops a plugin only while it runs Wasm. A host function that blocks
//! its thread (`std::thread::sleep` in a Rust guest is `wasi:clocks` `subscribe-duration`
//! followed by `wasi:io/poll` `pollable.block`) would hold the worker for as long as the
//! guest asked: past the deadline, past a reload, past the drain. In wasmtime-wasi's synchronous
//! bindings the imports that can wait are exactly those that block on a future:
//!
//! - `wasi:io/poll`: `poll` and `pollable.block` (clock subscriptions, streams, sockets);
//! - `wasi:io/streams`: `blocking-read`, `blocking-skip`, `blocking-write-and-flush`,
//!   `blocking-write-zeroes-and-flush`, `blocking-flush`, `blocking-splice`, and the drop of
//!   a stream, which waits for its background task to stop.
//!
//! Everything else either answers at once or is unreachable from the sealed context of
//! [`super::state`]: the filesystem's blocking calls need a descriptor and there are no
//! preopened directories; socket calls fail before any wait because no address is allowed
//! and name lookup is off; `pollable.ready` looks once and never waits. `random` does not
//! wait but works in proportion to what it is asked for; the sealed context caps one call at
//! [`super::state::MAX_RANDOM_BYTES`]. `poll` also works in proportion to its list, which
//! wasmtime bounds by the handles one call may borrow: a guest's call with 65,536 pollables
//! took 19 ms in a test build (its own work included) and one with 131,072 was refused with a
//! trap ("store handle limit exceeded"), so the list needs no cap of its own.
//!
//! This module replaces `wasi:io/poll` and `wasi:io/streams` in the linker with versions that
//! wait for at most what is left of the call's deadline, and then trap with
//! [`DeadlineReached`], which the worker counts exactly like an epoch interrupt (reason
//! `deadline`). The rest is wasmtime-wasi's own code: the replacement methods call it.
//!
//! # Frozen clocks and waiting
//!
//! The plugin's clocks are frozen at zero (its "now" is its message's `received-at`), but a
//! clock subscription still waits in real time: `subscribe-duration(d)`, and
//! `subscribe-instant(t)` read as `t` after the frozen zero, are ready once that much wall
//! time has passed. The alternatives were worse. Ready at once would make a sleep lie (a
//! plugin pacing itself would spin, taking a core from every other plugin until its deadline,
//! and a `sleep` of 100,000 s would "succeed" at once); never ready would fail a 1 ms back-off
//! in some library after the whole deadline. Waiting is not reading the time: the plugin
//! still cannot tell how long anything took, and a wait, like computing, spends the deadline
//! that bounds the whole call. A wait that the deadline cannot cover traps when the deadline
//! is reached (not earlier: what a pollable waits for is not visible from here).

use std::future::Future;
use std::time::Instant;

use wasmtime::component::{HasData, Linker, Resource, ResourceTable};
use wasmtime_wasi::WasiView;
use wasmtime_wasi::p2::bindings::io::poll::{Host as AsyncPoll, HostPollable as AsyncHostPollable};
use wasmtime_wasi::p2::bindings::io::streams::{
    HostInputStream as AsyncHostInputStream, HostOutputStream as AsyncHostOutputStream,
};
use wasmtime_wasi::p2::bindings::sync::io::{poll, streams};
use wasmtime_wasi::p2::{DynInputStream, DynOutputStream, DynPollable, StreamError, StreamResult};
use wasmtime_wasi::runtime::in_tokio;

/// A host call that waited until the call's deadline. Raised as a trap; the worker counts it
/// as a `deadline` failure, like an epoch interrupt.
#[derive(Debug, thiserror::Error)]
#[error("deadline reached while waiting in {import}")]
pub struct DeadlineReached {
    /// The WASI import that was waiting (`wasi:io/poll.poll`, ...).
    pub import: &'static str,
}

/// Adds WASI to `linker`: wasmtime-wasi's synchronous bindings, then this module's bounded
/// `wasi:io/poll` and `wasi:io/streams` in place of theirs, which work on what `bounded_io`
/// takes from a store's data.
pub fn add_to_linker<T: WasiView + 'static>(
    linker: &mut Linker<T>,
    bounded_io: fn(&mut T) -> BoundedIo<'_>,
) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_sync(linker)?;
    linker.allow_shadowing(true);
    let replaced = poll::add_to_linker::<T, BoundedWaits>(linker, bounded_io)
        .and_then(|()| streams::add_to_linker::<T, BoundedWaits>(linker, bounded_io));
    linker.allow_shadowing(false);
    replaced
}

/// The data the bounded imports work on: the store's resource table and when the call in
/// progress must be over.
pub struct BoundedIo<'a> {
    /// The store's resources (pollables, streams).
    pub(crate) table: &'a mut ResourceTable,
    /// The call's deadline.
    pub(crate) deadline: Instant,
}

/// Marks [`BoundedIo`] as the data of the bounded imports.
pub struct BoundedWaits;

impl HasData for BoundedWaits {
    type Data<'a> = BoundedIo<'a>;
}

impl BoundedIo<'_> {
    /// Runs `wait` for at most what is left of the deadline. A future that is ready at once
    /// finishes even when nothing is left: only an actual wait is cut short.
    fn wait<F: Future>(
        deadline: Instant,
        import: &'static str,
        wait: F,
    ) -> wasmtime::Result<F::Output> {
        let left = deadline.saturating_duration_since(Instant::now());
        // The timer is made inside the runtime `in_tokio` enters: a worker thread has none.
        in_tokio(async move { tokio::time::timeout(left, wait).await })
            .map_err(|_| wasmtime::Error::new(DeadlineReached { import }))
    }

    /// [`BoundedIo::wait`] for a stream operation, whose errors are stream errors.
    fn wait_stream<T>(
        deadline: Instant,
        import: &'static str,
        wait: impl Future<Output = StreamResult<T>>,
    ) -> StreamResult<T> {
        Self::wait(deadline, import, wait).map_err(StreamError::Trap)?
    }
}

impl poll::Host for BoundedIo<'_> {
    fn poll(&mut self, pollables: Vec<Resource<DynPollable>>) -> wasmtime::Result<Vec<u32>> {
        let deadline = self.deadline;
        Self::wait(
            deadline,
            "wasi:io/poll.poll",
            AsyncPoll::poll(self.table, pollables),
        )?
    }
}

impl poll::HostPollable for BoundedIo<'_> {
    fn ready(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<bool> {
        // Looks once, never waits.
        poll::HostPollable::ready(self.table, pollable)
    }

    fn block(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        let deadline = self.deadline;
        Self::wait(
            deadline,
            "wasi:io/poll.pollable.block",
            AsyncHostPollable::block(self.table, pollable),
        )?
    }

    fn drop(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        poll::HostPollable::drop(self.table, pollable)
    }
}

impl streams::Host for BoundedIo<'_> {
    fn convert_stream_error(
        &mut self,
        error: StreamError,
    ) -> wasmtime::Result<streams::StreamError> {
        streams::Host::convert_stream_error(self.table, error)
    }
}

impl streams::HostInputStream for BoundedIo<'_> {
    fn drop(&mut self, stream: Resource<DynInputStream>) -> wasmtime::Result<()> {
        let deadline = self.deadline;
        Self::wait(
            deadline,
            "wasi:io/streams.input-stream (drop)",
            AsyncHostInputStream::drop(self.table, stream),
        )?
    }

    fn read(&mut self, stream: Resource<DynInputStream>, len: u64) -> StreamResult<Vec<u8>> {
        streams::HostInputStream::read(self.table, stream, len)
    }

    fn blocking_read(
        &mut self,
        stream: Resource<DynInputStream>,
        len: u64,
    ) -> StreamResult<Vec<u8>> {
        let deadline = self.deadline;
        Self::wait_stream(
            deadline,
            "wasi:io/streams.input-stream.blocking-read",
            AsyncHostInputStream::blocking_read(self.table, stream, len),
        )
    }

    fn skip(&mut self, stream: Resource<DynInputStream>, len: u64) -> StreamResult<u64> {
        streams::HostInputStream::skip(self.table, stream, len)
    }

    fn blocking_skip(&mut self, stream: Resource<DynInputStream>, len: u64) -> StreamResult<u64> {
        let deadline = self.deadline;
        Self::wait_stream(
            deadline,
            "wasi:io/streams.input-stream.blocking-skip",
            AsyncHostInputStream::blocking_skip(self.table, stream, len),
        )
    }

    fn subscribe(
        &mut self,
        stream: Resource<DynInputStream>,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        streams::HostInputStream::subscribe(self.table, stream)
    }
}

impl streams::HostOutputStream for BoundedIo<'_> {
    fn drop(&mut self, stream: Resource<DynOutputStream>) -> wasmtime::Result<()> {
        let deadline = self.deadline;
        Self::wait(
            deadline,
            "wasi:io/streams.output-stream (drop)",
            AsyncHostOutputStream::drop(self.table, stream),
        )?
    }

    fn check_write(&mut self, stream: Resource<DynOutputStream>) -> StreamResult<u64> {
        streams::HostOutputStream::check_write(self.table, stream)
    }

    fn write(&mut self, stream: Resource<DynOutputStream>, bytes: Vec<u8>) -> StreamResult<()> {
        streams::HostOutputStream::write(self.table, stream, bytes)
    }

    fn blocking_write_and_flush(
        &mut self,
        stream: Resource<DynOutputStream>,
        bytes: Vec<u8>,
    ) -> StreamResult<()> {
        let deadline = self.deadline;
        Self::wait_stream(
            deadline,
            "wasi:io/streams.output-stream.blocking-write-and-flush",
            AsyncHostOutputStream::blocking_write_and_flush(self.table, stream, bytes),
        )
    }

    fn blocking_write_zeroes_and_flush(
        &mut self,
        stream: Resource<DynOutputStream>,
        len: u64,
    ) -> StreamResult<()> {
        let deadline = self.deadline;
        Self::wait_stream(
            deadline,
            "wasi:io/streams.output-stream.blocking-write-zeroes-and-flush",
            AsyncHostOutputStream::blocking_write_zeroes_and_flush(self.table, stream, len),
        )
    }

    fn subscribe(
        &mut self,
        stream: Resource<DynOutputStream>,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        streams::HostOutputStream::subscribe(self.table, stream)
    }

    fn write_zeroes(&mut self, stream: Resource<DynOutputStream>, len: u64) -> StreamResult<()> {
        streams::HostOutputStream::write_zeroes(self.table, stream, len)
    }

    fn flush(&mut self, stream: Resource<DynOutputStream>) -> StreamResult<()> {
        streams::HostOutputStream::flush(self.table, stream)
    }

    fn blocking_flush(&mut self, stream: Resource<DynOutputStream>) -> StreamResult<()> {
        let deadline = self.deadline;
        Self::wait_stream(
            deadline,
            "wasi:io/streams.output-stream.blocking-flush",
            AsyncHostOutputStream::blocking_flush(self.table, stream),
        )
    }

    fn splice(
        &mut self,
        destination: Resource<DynOutputStream>,
        source: Resource<DynInputStream>,
        len: u64,
    ) -> StreamResult<u64> {
        streams::HostOutputStream::splice(self.table, destination, source, len)
    }

    fn blocking_splice(
        &mut self,
        destination: Resource<DynOutputStream>,
        source: Resource<DynInputStream>,
        len: u64,
    ) -> StreamResult<u64> {
        let deadline = self.deadline;
        Self::wait_stream(
            deadline,
            "wasi:io/streams.output-stream.blocking-splice",
            AsyncHostOutputStream::blocking_splice(self.table, destination, source, len),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use wasmtime_wasi::clocks::{WasiClocksCtx, WasiClocksCtxView};
    use wasmtime_wasi::p2::bindings::clocks::monotonic_clock::Host as _;
    use wasmtime_wasi::p2::pipe::AsyncReadStream;

    use super::*;

    /// Room for a busy machine between a deadline and the end of a wait cut short by it.
    const MARGIN: Duration = Duration::from_secs(2);

    /// A clock subscription ready after `duration`, as a guest's `sleep` makes.
    fn sleep(table: &mut ResourceTable, duration: Duration) -> Resource<DynPollable> {
        let mut clocks = WasiClocksCtx::default();
        let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        WasiClocksCtxView {
            ctx: &mut clocks,
            table,
        }
        .subscribe_duration(nanos)
        .expect("a clock subscription")
    }

    fn io(table: &mut ResourceTable, left: Duration) -> BoundedIo<'_> {
        BoundedIo {
            table,
            deadline: Instant::now() + left,
        }
    }

    fn assert_deadline(error: &wasmtime::Error, import: &str) {
        let reached = error
            .downcast_ref::<DeadlineReached>()
            .unwrap_or_else(|| panic!("not a deadline: {error:#}"));
        assert_eq!(reached.import, import);
    }

    #[test]
    fn a_poll_longer_than_the_deadline_traps_when_the_deadline_is_reached() {
        let mut table = ResourceTable::new();
        let forever = sleep(&mut table, Duration::from_secs(100_000));
        let left = Duration::from_millis(50);
        let started = Instant::now();
        let error = poll::Host::poll(&mut io(&mut table, left), vec![forever])
            .expect_err("the deadline comes first");
        let waited = started.elapsed();
        assert_deadline(&error, "wasi:io/poll.poll");
        assert!(waited >= left && waited < left + MARGIN, "{waited:?}");
    }

    #[test]
    fn a_block_longer_than_the_deadline_traps_too() {
        let mut table = ResourceTable::new();
        let forever = sleep(&mut table, Duration::from_secs(100_000));
        let error =
            poll::HostPollable::block(&mut io(&mut table, Duration::from_millis(20)), forever)
                .expect_err("the deadline comes first");
        assert_deadline(&error, "wasi:io/poll.pollable.block");
    }

    #[test]
    fn a_wait_within_the_deadline_takes_its_time_and_succeeds() {
        let mut table = ResourceTable::new();
        let short = sleep(&mut table, Duration::from_millis(30));
        let forever = sleep(&mut table, Duration::from_secs(100_000));
        let started = Instant::now();
        let ready = poll::Host::poll(&mut io(&mut table, MARGIN * 5), vec![forever, short])
            .expect("ready before the deadline");
        assert_eq!(ready, [1]);
        assert!(started.elapsed() >= Duration::from_millis(30));
    }

    #[test]
    fn what_is_ready_at_once_is_answered_even_with_no_time_left() {
        let mut table = ResourceTable::new();
        let now = sleep(&mut table, Duration::ZERO);
        let ready = poll::Host::poll(&mut io(&mut table, Duration::ZERO), vec![now])
            .expect("ready at once");
        assert_eq!(ready, [0]);
    }

    #[test]
    fn a_blocking_read_of_a_silent_stream_ends_at_the_deadline() {
        let mut table = ResourceTable::new();
        // A pipe whose writer stays open and silent: a read would wait for ever.
        let (_writer, reader) = tokio::io::duplex(64);
        let stream: DynInputStream = Box::new(AsyncReadStream::new(reader));
        let stream = table.push(stream).expect("a stream");
        let error = streams::HostInputStream::blocking_read(
            &mut io(&mut table, Duration::from_millis(20)),
            stream,
            16,
        )
        .expect_err("the deadline comes first");
        match error {
            StreamError::Trap(trap) => {
                assert_deadline(&trap, "wasi:io/streams.input-stream.blocking-read")
            }
            other => panic!("not a trap: {other:?}"),
        }
    }
}
