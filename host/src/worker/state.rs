//! What a plugin's `Store` holds: the plugin's identity, grants and settings, the effects it
//! may cause, its resource limits, and a WASI context that grants nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::{ResourceLimiter, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{ResourceTable, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::effects::Effects;
use crate::effects::loop_guard::LoopGuard;
use crate::effects::rate::TokenBucket;
use crate::plugins::Grants;
use crate::plugins::manifest::Settings;
use crate::worker::PluginStats;
use crate::{ContentHash, PluginName};

/// Core instances one plugin store may hold. A Rust component is made of a handful (its
/// module, the WASI adapter, shims); guests from other languages need a few more.
pub const MAX_INSTANCES: usize = 64;
/// Tables one plugin store may hold.
pub const MAX_TABLES: usize = 64;
/// Elements one table may grow to: far beyond any real guest's function tables, low enough
/// that a hostile `table.grow` cannot take the host's memory.
pub const MAX_TABLE_ELEMENTS: usize = 1 << 20;
/// Linear memories one plugin store may hold.
pub const MAX_MEMORIES: usize = 16;

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
    /// When the current call must be over; host imports that wait (publish) wait no longer.
    pub(crate) call_deadline: Instant,
    limits: StoreLimits,
    wasi: WasiCtx,
    table: ResourceTable,
}

impl HostState {
    /// A fresh state for one store of `plugin`, counting into `stats`.
    pub fn new(plugin: Arc<PluginContext>, stats: Arc<PluginStats>) -> Self {
        let limits = StoreLimitsBuilder::new()
            .memory_size(plugin.memory_limit)
            // A failed `memory.grow` traps with a clear message instead of letting the guest's
            // allocator abort in some less legible way.
            .trap_on_grow_failure(true)
            .instances(MAX_INSTANCES)
            .tables(MAX_TABLES)
            .table_elements(MAX_TABLE_ELEMENTS)
            .memories(MAX_MEMORIES)
            .build();
        Self {
            plugin,
            stats,
            call_deadline: Instant::now(),
            limits,
            wasi: sealed_wasi(),
            table: ResourceTable::new(),
        }
    }

    /// Starts the clock of one call.
    pub fn begin_call(&mut self) {
        self.call_deadline = Instant::now() + self.plugin.deadline;
    }

    /// What is left of the current call's deadline.
    pub fn remaining(&self) -> Duration {
        self.call_deadline.saturating_duration_since(Instant::now())
    }

    /// The limiter a store must install (`store.limiter(HostState::limiter)`).
    pub fn limiter(&mut self) -> &mut dyn ResourceLimiter {
        &mut self.limits
    }
}

/// A WASI context with no arguments, environment, preopened directories, network, stdio or
/// clock. Clocks are frozen at zero: a plugin's notion of "now" is the `received-at` of its
/// message, so that time is a grant like any other and replays are deterministic.
fn sealed_wasi() -> WasiCtx {
    WasiCtxBuilder::new()
        .wall_clock(FrozenClock)
        .monotonic_clock(FrozenClock)
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
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
