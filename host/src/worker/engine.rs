//! The process-wide Wasm engine, its linker, and the epoch ticker that enforces deadlines.
//!
//! One [`Runtime`] per host: an `Engine` compiles every component, a `Linker` (with the host
//! imports and an empty WASI whose waits are bounded) is shared by every instance, and one
//! background thread advances the engines' epoch so that a plugin call past its deadline
//! traps instead of holding its worker forever. There are two engines, and a linker for each:
//! one for components whose exports are plain functions, and one with component-model async
//! for those whose exports are `async func` (Spin 3's handlers), which would make every call
//! of the first kind slower.
//!
//! The engine keeps the machine code of every function it compiled ([`FunctionCache`]), so
//! a new version of a plugin compiles only the functions that changed: most of a component
//! (its language's runtime, its libraries) is the same from one version to the next, and a
//! hot swap costs a fraction of a first compile.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wasmtime::component::{HasSelf, Linker};
use wasmtime::{CacheStore, Config, Engine};

use super::bindings::Plugin;
use super::state::HostState;

/// How often the epoch advances. Deadlines are rounded up to whole ticks, so this is their
/// resolution; at 5 ms the ticker thread wakes 200 times a second, which costs nothing
/// measurable, and a 100 ms deadline overshoots by at most one tick.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// The engines, their linkers and the ticker that keeps time for deadlines.
#[derive(Clone)]
pub struct Runtime {
    engine: Engine,
    linker: Arc<Linker<HostState>>,
    async_engine: Engine,
    async_linker: Arc<Linker<HostState>>,
    _ticker: Arc<Ticker>,
}

impl Runtime {
    /// Builds the engines and linkers and starts the epoch ticker.
    pub fn new() -> anyhow::Result<Self> {
        // Every synchronous call is about twice as slow on an engine that supports
        // component-model concurrency, so the worlds whose exports are plain functions (all
        // but Spin 3's) run on one without it.
        let engine = new_engine(false)?;
        let mut linker = Linker::new(&engine);
        add_common(&mut linker)?;
        Plugin::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |state| state)
            .map_err(anyhow::Error::from)?;
        super::worlds::add_to_linker(&mut linker).map_err(anyhow::Error::from)?;

        let async_engine = new_engine(true)?;
        let mut async_linker = Linker::new(&async_engine);
        add_common(&mut async_linker)?;
        super::worlds::add_async_to_linker(&mut async_linker).map_err(anyhow::Error::from)?;

        let ticker = Ticker::start(vec![engine.clone(), async_engine.clone()])?;
        Ok(Self {
            engine,
            linker: Arc::new(linker),
            async_engine,
            async_linker: Arc::new(async_linker),
            _ticker: Arc::new(ticker),
        })
    }

    /// The engine components with synchronous exports are compiled with.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The linker their instances are created through.
    pub fn linker(&self) -> &Linker<HostState> {
        &self.linker
    }

    /// The engine components of `world` are compiled with.
    pub fn engine_for(&self, world: super::worlds::World) -> &Engine {
        if world.is_async() {
            &self.async_engine
        } else {
            &self.engine
        }
    }

    /// The linker instances of `world` are created through.
    pub fn linker_for(&self, world: super::worlds::World) -> &Linker<HostState> {
        if world.is_async() {
            &self.async_linker
        } else {
            &self.linker
        }
    }
}

/// An engine with deadlines and the function cache, and with component-model async when
/// `concurrent`.
fn new_engine(concurrent: bool) -> anyhow::Result<Engine> {
    let mut config = Config::new();
    // Deadlines: a call traps once the epoch passes the store's deadline.
    config.epoch_interruption(true);
    config.wasm_component_model(true);
    config.concurrency_support(concurrent);
    config.wasm_component_model_async(concurrent);
    config
        .enable_incremental_compilation(Arc::new(FunctionCache::new(FUNCTION_CACHE_BYTES)))
        .map_err(anyhow::Error::from)?;
    Engine::new(&config).map_err(anyhow::Error::from)
}

/// Adds what every world's components import: WASI, sealed.
fn add_common(linker: &mut Linker<HostState>) -> anyhow::Result<()> {
    // Guests built for wasm32-wasip2 import wasi:cli and wasi:io even when unused; the
    // WASI context behind them grants nothing (see `HostState::new`), and its imports
    // that can wait wait no longer than the call's deadline (see `super::wasi`).
    super::wasi::add_to_linker(linker, HostState::bounded_io).map_err(anyhow::Error::from)
}

/// Converts a deadline to the number of epoch ticks a store may run for.
pub fn deadline_ticks(deadline: Duration) -> u64 {
    let ticks = deadline.as_nanos().div_ceil(EPOCH_TICK.as_nanos());
    u64::try_from(ticks).unwrap_or(u64::MAX).max(1)
}

/// What the engine keeps of compiled functions: enough for the machine code of a few dozen
/// plugins the size of the examples, or one interpreter-sized component (a Python plugin's
/// runtime compiles to tens of megabytes).
pub const FUNCTION_CACHE_BYTES: usize = 64 << 20;

/// Compiled functions by Cranelift's key (a hash of the function's code and the compiler's
/// settings), kept in memory within a byte limit. When an insert would pass the limit the
/// cache starts over: the functions compiled since are the ones the next version will most
/// likely share.
#[derive(Debug)]
pub struct FunctionCache {
    limit: usize,
    entries: Mutex<Entries>,
}

#[derive(Debug, Default)]
struct Entries {
    code: HashMap<Vec<u8>, Vec<u8>>,
    /// Bytes of keys and code held.
    bytes: usize,
}

impl FunctionCache {
    /// An empty cache holding at most `limit` bytes of keys and code.
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            entries: Mutex::default(),
        }
    }
}

impl CacheStore for FunctionCache {
    fn get(&self, key: &[u8]) -> Option<Cow<'_, [u8]>> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.code.get(key).map(|code| Cow::Owned(code.clone()))
    }

    fn insert(&self, key: &[u8], value: Vec<u8>) -> bool {
        let size = key.len() + value.len();
        if size > self.limit {
            return false;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.bytes + size > self.limit {
            *entries = Entries::default();
        }
        if let Some(old) = entries.code.insert(key.to_vec(), value) {
            entries.bytes -= key.len() + old.len();
        }
        entries.bytes += size;
        true
    }
}

/// The thread that advances the engines' epoch; stops when the last `Runtime` clone is
/// dropped.
struct Ticker {
    stop: Arc<AtomicBool>,
}

impl Ticker {
    fn start(engines: Vec<Engine>) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::Builder::new()
            .name("switchyard-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    for engine in &engines {
                        engine.increment_epoch();
                    }
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
    fn the_function_cache_stays_within_its_limit() {
        let cache = FunctionCache::new(100);
        assert!(cache.insert(b"a", vec![1; 40]));
        assert!(cache.insert(b"b", vec![2; 40]));
        assert_eq!(cache.get(b"a").as_deref(), Some(&[1; 40][..]));
        // A third entry would pass the limit: the cache starts over with it.
        assert!(cache.insert(b"c", vec![3; 40]));
        assert!(cache.get(b"a").is_none() && cache.get(b"b").is_none());
        assert_eq!(cache.get(b"c").map(|code| code.len()), Some(40));
        assert!(
            !cache.insert(b"d", vec![4; 200]),
            "larger than the whole cache"
        );
        // Replacing an entry counts its new size only.
        assert!(cache.insert(b"c", vec![5; 50]));
        assert!(cache.insert(b"e", vec![6; 40]));
        assert!(cache.get(b"c").is_some());
    }

    #[test]
    fn deadlines_round_up_to_whole_ticks() {
        assert_eq!(deadline_ticks(Duration::from_millis(100)), 20);
        assert_eq!(deadline_ticks(Duration::from_millis(101)), 21);
        assert_eq!(deadline_ticks(Duration::ZERO), 1);
    }
}
