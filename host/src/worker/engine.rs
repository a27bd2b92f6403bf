//! The process-wide Wasm engine, its linker, and the epoch ticker that enforces deadlines.
//!
//! One [`Runtime`] per host: the `Engine` compiles every component, the `Linker` (with the
//! host imports and an empty WASI) is shared by every instance, and one background thread
//! advances the engine's epoch so that a plugin call past its deadline traps instead of
//! holding its worker forever.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wasmtime::component::{HasSelf, Linker};
use wasmtime::{Config, Engine};

use super::bindings::Plugin;
use super::state::HostState;

/// How often the epoch advances. Deadlines are rounded up to whole ticks, so this is their
/// resolution; at 5 ms the ticker thread wakes 200 times a second, which costs nothing
/// measurable, and a 100 ms deadline overshoots by at most one tick.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// The engine, the linker and the ticker that keeps time for deadlines.
#[derive(Clone)]
pub struct Runtime {
    engine: Engine,
    linker: Arc<Linker<HostState>>,
    _ticker: Arc<Ticker>,
}

impl Runtime {
    /// Builds the engine and linker and starts the epoch ticker.
    pub fn new() -> anyhow::Result<Self> {
        let mut config = Config::new();
        // Deadlines: a call traps once the epoch passes the store's deadline.
        config.epoch_interruption(true);
        config.wasm_component_model(true);
        let engine = Engine::new(&config).map_err(anyhow::Error::from)?;

        let mut linker = Linker::new(&engine);
        // Guests built for wasm32-wasip2 import wasi:cli and wasi:io even when unused; the
        // WASI context behind them grants nothing (see `HostState::new`).
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(anyhow::Error::from)?;
        Plugin::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |state| state)
            .map_err(anyhow::Error::from)?;

        let ticker = Ticker::start(engine.clone())?;
        Ok(Self {
            engine,
            linker: Arc::new(linker),
            _ticker: Arc::new(ticker),
        })
    }

    /// The engine every component is compiled with.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The linker every instance is created through.
    pub fn linker(&self) -> &Linker<HostState> {
        &self.linker
    }
}

/// Converts a deadline to the number of epoch ticks a store may run for.
pub fn deadline_ticks(deadline: Duration) -> u64 {
    let ticks = deadline.as_nanos().div_ceil(EPOCH_TICK.as_nanos());
    u64::try_from(ticks).unwrap_or(u64::MAX).max(1)
}

/// The thread that advances the epoch; stops when the last `Runtime` clone is dropped.
struct Ticker {
    stop: Arc<AtomicBool>,
}

impl Ticker {
    fn start(engine: Engine) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::Builder::new()
            .name("switchyard-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })?;
        Ok(Self { stop })
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_round_up_to_whole_ticks() {
        assert_eq!(deadline_ticks(Duration::from_millis(100)), 20);
        assert_eq!(deadline_ticks(Duration::from_millis(101)), 21);
        assert_eq!(deadline_ticks(Duration::ZERO), 1);
    }
}
