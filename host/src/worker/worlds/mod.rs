//! The worlds a plugin may be written for: Switchyard's own, and message handlers written for
//! other hosts, which run unchanged. The loader tells them apart by what a component exports
//! and keeps a pre-instantiated component of the right kind; the worker calls each world's
//! handler through [`Bindings`].

pub mod spin_redis;
pub mod wasi_messaging;
pub mod wasmcloud;

use wasmtime::component::{Component, Linker};
use wasmtime::{Engine, Store};

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
}

impl World {
    /// Every world, in the order a component's exports are tried.
    pub const ALL: [World; 4] = [
        World::Switchyard,
        World::WasiMessaging,
        World::Wasmcloud,
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
        }
    }

    /// The world's name in `/plugins`, `switchyard check` and errors.
    pub fn label(self) -> &'static str {
        match self {
            World::Switchyard => "switchyard:plugin",
            World::WasiMessaging => "wasi-messaging@0.2.0-draft",
            World::Wasmcloud => "wasmcloud-messaging@0.2.0",
            World::SpinRedis2 => "fermyon-spin-redis",
        }
    }

    /// Whether components of this world answer `describe`; the others take their
    /// subscriptions from their manifest.
    pub fn describes_itself(self) -> bool {
        self == World::Switchyard
    }

    /// The world `component` is written for, from its exports; the error lists what it
    /// exports and the worlds accepted.
    pub fn of(component: &Component, engine: &Engine) -> Result<World, String> {
        let exports: Vec<String> = component
            .component_type()
            .exports(engine)
            .map(|(name, _)| name.to_owned())
            .collect();
        World::of_exports(&exports)
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
}

impl HandlerPre {
    /// Links `component`, written for `world`, with `linker`.
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
        })
    }

    /// The world it was linked for.
    pub fn world(&self) -> World {
        match self {
            HandlerPre::Switchyard(_) => World::Switchyard,
            HandlerPre::WasiMessaging(_) => World::WasiMessaging,
            HandlerPre::Wasmcloud(_) => World::Wasmcloud,
            HandlerPre::SpinRedis2(_) => World::SpinRedis2,
        }
    }

    /// Instantiates it in `store`.
    pub fn instantiate(&self, store: &mut Store<HostState>) -> wasmtime::Result<Bindings> {
        Ok(match self {
            HandlerPre::Switchyard(pre) => Bindings::Switchyard(pre.instantiate(store)?),
            HandlerPre::WasiMessaging(pre) => Bindings::WasiMessaging(pre.instantiate(store)?),
            HandlerPre::Wasmcloud(pre) => Bindings::Wasmcloud(pre.instantiate(store)?),
            HandlerPre::SpinRedis2(pre) => Bindings::SpinRedis2(pre.instantiate(store)?),
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
}

/// Adds the imports of every world other than Switchyard's own to `linker`.
pub fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    use wasmtime::component::HasSelf;
    wasi_messaging::MessagingCore::add_to_linker::<HostState, HasSelf<HostState>>(
        linker,
        |state| state,
    )?;
    wasmcloud::Handler::add_to_linker::<HostState, HasSelf<HostState>>(linker, |state| state)?;
    spin_redis::RedisHandler::add_to_linker::<HostState, HasSelf<HostState>>(linker, |state| state)
}
