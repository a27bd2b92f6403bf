//! What a plugin's `Store` holds: the plugin's identity, grants and settings, the effects it
//! may cause, its resource limits, and a WASI context that grants nothing.
//!
//! The memory cap is a budget for the whole store: a component may hold several linear
//! memories (its own module, the WASI adapter, shims, a guest built with multi-memory), and
//! their sizes together must stay under the cap. Wasmtime's own `StoreLimits` caps each memory
//! separately, which would let a plugin with `MAX_MEMORIES` memories take that many times its
//! cap; [`StoreCaps`] counts them together.

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::ResourceLimiter;
use wasmtime_wasi::{ResourceTable, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::effects::Effects;
use crate::effects::loop_guard::LoopGuard;
use crate::grants::{Grants, Settings};
use crate::rate::TokenBucket;
use crate::stats::PluginStats;
use crate::worker::wasi::BoundedIo;
use crate::{ContentHash, PluginName};

/// Core instances one plugin store may hold. A Rust component is made of a handful (its
/// module, the WASI adapter, shims); guests from other languages need a few more.
pub const MAX_INSTANCES: usize = 64;
/// Tables one plugin store may hold.
pub const MAX_TABLES: usize = 64;
/// Elements all tables of one plugin store may hold together: far beyond any real guest's
/// function tables, low enough that a hostile `table.grow` cannot take the host's memory.
pub const MAX_TABLE_ELEMENTS: usize = 1 << 20;
/// Linear memories one plugin store may hold.
pub const MAX_MEMORIES: usize = 16;
/// The most bytes one `wasi:random` call may ask for; a larger request traps. The host makes
/// them in its own code, where the deadline cannot interrupt it, and holds them outside the
/// plugin's memory cap: wasmtime-wasi's default (64 MiB) took 0.6-0.7 s of host CPU in a test
/// build (dependencies at opt-level 1) on 2 cores, six times the default deadline, and 1 MiB
/// under 10 ms. Guests ask for a few bytes at a time (a hash seed, a UUID).
pub const MAX_RANDOM_BYTES: u64 = 1 << 20;

/// Everything about one loaded plugin version that its host imports need.
#[derive(Debug)]
pub struct PluginContext {
    /// The plugin's identity (its file name without `.wasm`).
    pub name: PluginName,
    /// The version the plugin describes itself as.
    pub version: String,
    /// The content hash of the component.
    pub hash: ContentHash,
    /// What the plugin may do.
    pub grants: Grants,
    /// Limits publishes into the plugin's own subscriptions.
    pub loop_guard: LoopGuard,
    /// Limits the plugin's `log` lines.
    pub log_limit: TokenBucket,
    /// Its `config` values.
    pub settings: Settings,
    /// Where its effects go.
    pub effects: Effects,
    /// Per-call wall-clock limit.
    pub deadline: Duration,
    /// Linear-memory cap in bytes.
    pub memory_limit: usize,
}

/// The data of a plugin's `Store`.
pub struct HostState {
    /// The plugin this store runs.
    pub(crate) plugin: Arc<PluginContext>,
    /// The plugin's counters (denials are counted where they happen).
    pub(crate) stats: Arc<PluginStats>,
    /// When the current call must be over; host imports that wait (publish, WASI poll and
    /// streams) wait no longer.
    pub(crate) call_deadline: Instant,
    limits: StoreCaps,
    wasi: WasiCtx,
    table: ResourceTable,
    /// Bytes held in host resources the plugin made (other hosts' worlds: messages, clients,
    /// connections), counted against its memory cap.
    held: usize,
    /// The span of the message being handled, when traced: the parent of its effects' spans.
    pub(crate) trace: Option<opentelemetry::Context>,
    /// The reply channel of the request being handled, if it is one: the plugin may publish
    /// its answer there without a grant, during this call only.
    pub(crate) reply_to: Option<String>,
}

impl HostState {
    /// A fresh state for one store of `plugin`, counting into `stats`.
    pub fn new(plugin: Arc<PluginContext>, stats: Arc<PluginStats>) -> Self {
        let limits = StoreCaps::new(plugin.memory_limit);
        Self {
            plugin,
            stats,
            call_deadline: Instant::now(),
            limits,
            wasi: sealed_wasi(),
            table: ResourceTable::new(),
            held: 0,
            trace: None,
            reply_to: None,
        }
    }

    /// Counts `bytes` more held in host resources for the plugin; traps when they and its
    /// linear memories together would pass its memory cap.
    pub(crate) fn hold(&mut self, bytes: usize) -> wasmtime::Result<()> {
        let held = self.held.saturating_add(bytes);
        if held.saturating_add(self.limits.memory_used()) > self.plugin.memory_limit {
            return Err(wasmtime::Error::msg(format!(
                "the plugin's host resources ({held} bytes) and memory would pass its memory \
                 cap of {} bytes",
                self.plugin.memory_limit
            )));
        }
        self.held = held;
        Ok(())
    }

    /// Counts `bytes` no longer held.
    pub(crate) fn release(&mut self, bytes: usize) {
        self.held = self.held.saturating_sub(bytes);
    }

    /// Starts the clock of one call.
    pub fn begin_call(&mut self) {
        self.call_deadline = Instant::now() + self.plugin.deadline;
        self.reply_to = None;
    }

    /// What is left of the current call's deadline.
    pub fn remaining(&self) -> Duration {
        self.call_deadline.saturating_duration_since(Instant::now())
    }

    /// The limiter a store must install (`store.limiter(HostState::limiter)`).
    pub fn limiter(&mut self) -> &mut dyn ResourceLimiter {
        &mut self.limits
    }

    /// The store's resources, for the worlds whose imports hold some.
    pub(crate) fn table(&self) -> &ResourceTable {
        &self.table
    }

    /// The store's resources, to change.
    pub(crate) fn table_mut(&mut self) -> &mut ResourceTable {
        &mut self.table
    }

    /// What the bounded WASI waits of [`super::wasi`] work on.
    pub(crate) fn bounded_io(&mut self) -> BoundedIo<'_> {
        BoundedIo {
            table: &mut self.table,
            deadline: self.call_deadline,
        }
    }
}

/// A growth of linear memory refused because the store's memories together would pass the
/// plugin's cap (or the memory's own maximum, or the system refused the pages). Raised as a
/// trap, so that the message fails with a reason instead of the guest's allocator aborting in
/// some less legible way.
#[derive(Debug, thiserror::Error)]
#[error("growing linear memory to {wanted} bytes in total refused (cap {cap} bytes){detail}")]
pub struct MemoryExhausted {
    /// What the store's memories would have held together, in bytes.
    pub wanted: usize,
    /// The plugin's cap, in bytes.
    pub cap: usize,
    /// Why, when not the cap itself.
    detail: String,
}

/// The resource limiter of a plugin store: one memory budget for all its linear memories,
/// one element budget for all its tables, and fixed counts of instances, tables and memories.
///
/// Memories and tables never shrink and live as long as the store, so the sums only grow. A
/// refused or failed growth traps, and the worker drops a trapped store, so
/// no sum needs to be taken back after a failure.
#[derive(Debug)]
pub struct StoreCaps {
    memory_cap: usize,
    memory_used: usize,
    table_elements: usize,
}

impl StoreCaps {
    /// A limiter allowing `memory_cap` bytes of linear memory in total.
    pub fn new(memory_cap: usize) -> Self {
        Self {
            memory_cap,
            memory_used: 0,
            table_elements: 0,
        }
    }

    /// Bytes of linear memory the store's memories hold together.
    pub fn memory_used(&self) -> usize {
        self.memory_used
    }
}

impl ResourceLimiter for StoreCaps {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // `current` is 0 when a memory is created: its initial size counts like a growth.
        let wanted = self
            .memory_used
            .saturating_add(desired.saturating_sub(current));
        let detail = if maximum.is_some_and(|max| desired > max) {
            ", beyond the memory's own maximum"
        } else if wanted > self.memory_cap {
            ""
        } else {
            self.memory_used = wanted;
            return Ok(true);
        };
        Err(wasmtime::Error::new(MemoryExhausted {
            wanted,
            cap: self.memory_cap,
            detail: detail.to_owned(),
        }))
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        Err(wasmtime::Error::new(MemoryExhausted {
            wanted: self.memory_used,
            cap: self.memory_cap,
            detail: format!(": {error:#}"),
        }))
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let wanted = self
            .table_elements
            .saturating_add(desired.saturating_sub(current));
        if wanted > MAX_TABLE_ELEMENTS || maximum.is_some_and(|max| desired > max) {
            wasmtime::bail!(
                "growing tables to {wanted} elements in total refused (cap {MAX_TABLE_ELEMENTS})"
            );
        }
        self.table_elements = wanted;
        Ok(true)
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        Err(error.context("growing a table failed"))
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }
}

/// A WASI context with no arguments, environment, preopened directories, network, stdio or
/// clock. Clocks are frozen at zero: a plugin's notion of "now" is the `received-at` of its
/// message, so that time is a grant like any other and replays are deterministic. Waiting on
/// a clock still takes real time, bounded by the call's deadline (see [`super::wasi`]).
/// Standard input is closed (a read ends at once) and standard output and error discard what
/// they are given.
fn sealed_wasi() -> WasiCtx {
    WasiCtxBuilder::new()
        .wall_clock(FrozenClock)
        .monotonic_clock(FrozenClock)
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .max_random_size(MAX_RANDOM_BYTES)
        .build()
}

/// A clock that never moves.
struct FrozenClock;

impl wasmtime_wasi::HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }

    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl wasmtime_wasi::HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }

    fn now(&self) -> u64 {
        0
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

#[cfg(test)]
mod tests {
    use wasmtime::{Engine, Memory, MemoryType, Store};

    use super::*;

    const PAGE: usize = 64 << 10;

    /// A store limited by `StoreCaps` with a cap of `pages` Wasm pages.
    fn store(pages: usize) -> Store<StoreCaps> {
        let mut store = Store::new(&Engine::default(), StoreCaps::new(pages * PAGE));
        store.limiter(|caps| caps);
        store
    }

    fn memory(store: &mut Store<StoreCaps>, pages: u32) -> wasmtime::Result<Memory> {
        Memory::new(&mut *store, MemoryType::new(pages, None))
    }

    #[test]
    fn the_memory_cap_bounds_all_memories_of_a_store_together() {
        let mut store = store(10);
        let first = memory(&mut store, 4).expect("4 of 10 pages");
        let second = memory(&mut store, 4).expect("8 of 10 pages");
        assert_eq!(store.data().memory_used(), 8 * PAGE);
        // Each memory alone would be under the cap; together they are not.
        let error = memory(&mut store, 4).expect_err("12 of 10 pages");
        assert!(
            error.downcast_ref::<MemoryExhausted>().is_some(),
            "{error:#}"
        );
        // Growth of an existing memory counts against the same budget.
        assert!(second.grow(&mut store, 3).is_err(), "11 of 10 pages");
        first.grow(&mut store, 2).expect("10 of 10 pages");
        assert_eq!(store.data().memory_used(), 10 * PAGE);
        assert!(first.grow(&mut store, 1).is_err(), "11 of 10 pages");
    }

    #[test]
    fn one_random_call_is_capped() {
        use wasmtime_wasi::p2::bindings::random::random::Host as _;
        let mut wasi = sealed_wasi();
        let random = wasi.random();
        let most = random
            .get_random_bytes(MAX_RANDOM_BYTES)
            .expect("up to the cap");
        assert_eq!(most.len() as u64, MAX_RANDOM_BYTES);
        let error = random
            .get_random_bytes(MAX_RANDOM_BYTES + 1)
            .expect_err("past the cap");
        assert!(error.to_string().contains("exceeds limit"), "{error:#}");
    }

    #[test]
    fn refused_growth_names_the_cap() {
        let mut store = store(2);
        let error = memory(&mut store, 3).expect_err("3 of 2 pages");
        let exhausted = error
            .downcast_ref::<MemoryExhausted>()
            .expect("a memory error");
        assert_eq!(exhausted.cap, 2 * PAGE);
        assert_eq!(exhausted.wanted, 3 * PAGE);
    }

    #[test]
    fn a_memory_past_its_own_maximum_is_refused_as_memory() {
        let mut store = store(10);
        let bounded = Memory::new(&mut store, MemoryType::new(1, Some(2))).expect("1 page");
        let error = bounded.grow(&mut store, 2).expect_err("past its maximum");
        assert!(
            error.downcast_ref::<MemoryExhausted>().is_some(),
            "{error:#}"
        );
    }
}
