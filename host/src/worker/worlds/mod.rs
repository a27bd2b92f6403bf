//! The worlds a plugin may be written for: Switchyard's own, and message handlers written for
//! other hosts, which run unchanged. The loader tells them apart by what a component exports
//! and keeps a pre-instantiated component of the right kind; the worker calls each world's
//! handler through [`Bindings`].

pub mod spin_redis;
pub mod spin_redis3;
pub mod wasi_messaging;
pub mod wasmcloud;

use wasmtime::Store;
use wasmtime::component::{Component, Linker};

use super::bindings::{Plugin, PluginPre};
use super::state::HostState;

/// A world Switchyard runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum World {
    /// `switchyard:plugin`: `describe` and `handle`, with the host's calls.
    Switchyard,
    /// `wasi:messaging@0.2.0-draft`, world `messaging-core`.
    WasiMessaging,
    /// `wasmcloud:messaging@0.2.0`, world `handler`.
    Wasmcloud,
    /// Spin 2's Redis trigger, `fermyon:spin/inbound-redis`.
    SpinRedis2,
    /// Spin 3's Redis trigger, `spin:redis/inbound-redis@3.0.0`: an async export.
    SpinRedis3,
}

impl World {
    /// Every world, in the order a component's exports are tried.
    pub const ALL: [World; 5] = [
        World::Switchyard,
        World::WasiMessaging,
        World::Wasmcloud,
        World::SpinRedis3,
        World::SpinRedis2,
    ];

    /// The interface whose export marks a component of this world (without its version
    /// when any version is recognised).
    fn export(self) -> &'static str {
        match self {
            World::Switchyard => "switchyard:plugin/handler@",
            World::WasiMessaging => "wasi:messaging/incoming-handler@0.2.0-draft",
            World::Wasmcloud => "wasmcloud:messaging/handler@0.2.0",
            World::SpinRedis2 => "fermyon:spin/inbound-redis",
            World::SpinRedis3 => "spin:redis/inbound-redis@3.",
        }
    }

    /// The world's name in `/plugins`, `switchyard check` and errors.
    pub fn label(self) -> &'static str {
        match self {
            World::Switchyard => "switchyard:plugin",
            World::WasiMessaging => "wasi-messaging@0.2.0-draft",
            World::Wasmcloud => "wasmcloud-messaging@0.2.0",
            World::SpinRedis2 => "fermyon-spin-redis",
            World::SpinRedis3 => "spin-redis@3.0.0",
        }
    }

    /// Whether its handler is an `async func`, which runs on the runtime's engine with
    /// component-model async.
    pub fn is_async(self) -> bool {
        self == World::SpinRedis3
    }

    /// Whether components of this world answer `describe`; the others take their
    /// subscriptions from their manifest.
    pub fn describes_itself(self) -> bool {
        self == World::Switchyard
    }

    /// The world a component exporting the interfaces `exports` is written for.
    pub fn of_exports(exports: &[String]) -> Result<World, String> {
        World::ALL
            .into_iter()
            .find(|world| exports.iter().any(|name| name.starts_with(world.export())))
            .ok_or_else(|| {
                let accepted: Vec<String> = World::ALL
                    .iter()
                    .map(|w| format!("{} (exports {}…)", w.label(), w.export()))
                    .collect();
                format!(
                    "exports none of the accepted worlds (it exports: {}); accepted: {}",
                    if exports.is_empty() {
                        "nothing".to_owned()
                    } else {
                        exports.join(", ")
                    },
                    accepted.join("; ")
                )
            })
    }
}

/// A component linked and type-checked against its world, ready to instantiate.
#[derive(Clone)]
pub enum HandlerPre {
    /// Switchyard's own world.
    Switchyard(PluginPre<HostState>),
    /// The WASI messaging draft.
    WasiMessaging(wasi_messaging::MessagingCorePre<HostState>),
    /// wasmCloud messaging.
    Wasmcloud(wasmcloud::HandlerPre<HostState>),
    /// Spin 2's Redis trigger.
    SpinRedis2(spin_redis::RedisHandlerPre<HostState>),
    /// Spin 3's Redis trigger.
    SpinRedis3(spin_redis3::RedisHandlerPre<HostState>),
}

impl HandlerPre {
    /// Links `component`, written for `world`, with `linker`: the one of the engine that
    /// compiled it (an async world's engine for an async world).
    pub fn new(
        world: World,
        linker: &Linker<HostState>,
        component: &Component,
    ) -> wasmtime::Result<Self> {
        let pre = linker.instantiate_pre(component)?;
        Ok(match world {
            World::Switchyard => HandlerPre::Switchyard(PluginPre::new(pre)?),
            World::WasiMessaging => {
                HandlerPre::WasiMessaging(wasi_messaging::MessagingCorePre::new(pre)?)
            }
            World::Wasmcloud => HandlerPre::Wasmcloud(wasmcloud::HandlerPre::new(pre)?),
            World::SpinRedis2 => HandlerPre::SpinRedis2(spin_redis::RedisHandlerPre::new(pre)?),
            World::SpinRedis3 => HandlerPre::SpinRedis3(spin_redis3::RedisHandlerPre::new(pre)?),
        })
    }

    /// The world it was linked for.
    pub fn world(&self) -> World {
        match self {
            HandlerPre::Switchyard(_) => World::Switchyard,
            HandlerPre::WasiMessaging(_) => World::WasiMessaging,
            HandlerPre::Wasmcloud(_) => World::Wasmcloud,
            HandlerPre::SpinRedis2(_) => World::SpinRedis2,
            HandlerPre::SpinRedis3(_) => World::SpinRedis3,
        }
    }

    /// The engine its component was compiled with, which its stores must belong to.
    pub fn engine(&self) -> &wasmtime::Engine {
        match self {
            HandlerPre::Switchyard(pre) => pre.engine(),
            HandlerPre::WasiMessaging(pre) => pre.engine(),
            HandlerPre::Wasmcloud(pre) => pre.engine(),
            HandlerPre::SpinRedis2(pre) => pre.engine(),
            HandlerPre::SpinRedis3(pre) => pre.engine(),
        }
    }

    /// Instantiates it in `store`.
    pub fn instantiate(&self, store: &mut Store<HostState>) -> wasmtime::Result<Bindings> {
        Ok(match self {
            HandlerPre::Switchyard(pre) => Bindings::Switchyard(pre.instantiate(store)?),
            HandlerPre::WasiMessaging(pre) => Bindings::WasiMessaging(pre.instantiate(store)?),
            HandlerPre::Wasmcloud(pre) => Bindings::Wasmcloud(pre.instantiate(store)?),
            HandlerPre::SpinRedis2(pre) => Bindings::SpinRedis2(pre.instantiate(store)?),
            // Its imports are async host functions: the store must be entered the async way,
            // here on the calling thread, as its calls are (see `spin_redis3::call`).
            HandlerPre::SpinRedis3(pre) => {
                Bindings::SpinRedis3(futures::executor::block_on(pre.instantiate_async(store))?)
            }
        })
    }
}

/// An instantiated component's exports, per world.
pub enum Bindings {
    /// Switchyard's own world.
    Switchyard(Plugin),
    /// The WASI messaging draft.
    WasiMessaging(wasi_messaging::MessagingCore),
    /// wasmCloud messaging.
    Wasmcloud(wasmcloud::Handler),
    /// Spin 2's Redis trigger.
    SpinRedis2(spin_redis::RedisHandler),
    /// Spin 3's Redis trigger.
    SpinRedis3(spin_redis3::RedisHandler),
}

/// Adds the imports of every synchronous world other than Switchyard's own to `linker`.
pub fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    use wasmtime::component::HasSelf;
    wasi_messaging::MessagingCore::add_to_linker::<HostState, HasSelf<HostState>>(
        linker,
        |state| state,
    )?;
    wasmcloud::Handler::add_to_linker::<HostState, HasSelf<HostState>>(linker, |state| state)?;
    spin_redis::RedisHandler::add_to_linker::<HostState, HasSelf<HostState>>(linker, |state| state)
}

/// Adds the imports of the async worlds to `linker`, whose engine has concurrency support.
pub fn add_async_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    spin_redis3::add_to_linker(linker)
}
