//! The worlds a plugin may be written for: Switchyard's own, in its current version and the
//! earlier ones it still runs, and message handlers written for other hosts, which run
//! unchanged. The loader tells them apart by what a component exports
//! and keeps a pre-instantiated component of the right kind; the worker calls each world's
//! handler through [`Bindings`].

mod earlier;
pub mod spin_redis;
pub mod spin_redis3;
pub mod switchyard04;
pub mod switchyard05;
pub mod wasi_messaging;
pub mod wasmcloud;

use wasmtime::Store;
use wasmtime::component::{Component, Linker};

use super::bindings::{Plugin, PluginPre};
use super::state::HostState;

/// The interface every version of Switchyard's own contract exports, up to its version.
const SWITCHYARD_HANDLER: &str = "switchyard:plugin/handler@";

/// A world Switchyard runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum World {
    /// `switchyard:plugin@0.6.0`, the current contract: `describe` and `handle`, with the
    /// host's calls.
    Switchyard,
    /// `switchyard:plugin@0.5.0`: the current contract without key and tracking
    /// subscriptions.
    Switchyard05,
    /// `switchyard:plugin@0.4.0`: 0.5.0 without the message's trace context.
    Switchyard04,
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
    pub const ALL: [World; 7] = [
        World::Switchyard,
        World::Switchyard05,
        World::Switchyard04,
        World::WasiMessaging,
        World::Wasmcloud,
        World::SpinRedis3,
        World::SpinRedis2,
    ];

    /// The interface whose export marks a component of this world: the whole name for
    /// Switchyard's own versions, whose exports differ in their types; a prefix for the
    /// other worlds, where any version it leaves open is recognised.
    fn export(self) -> &'static str {
        match self {
            World::Switchyard => "switchyard:plugin/handler@0.6.0",
            World::Switchyard05 => "switchyard:plugin/handler@0.5.0",
            World::Switchyard04 => "switchyard:plugin/handler@0.4.0",
            World::WasiMessaging => "wasi:messaging/incoming-handler@0.2.0-draft",
            World::Wasmcloud => "wasmcloud:messaging/handler@0.2.0",
            World::SpinRedis2 => "fermyon:spin/inbound-redis",
            World::SpinRedis3 => "spin:redis/inbound-redis@3.",
        }
    }

    /// The world's name in `/plugins`, `switchyard check` and errors.
    pub fn label(self) -> &'static str {
        match self {
            World::Switchyard => "switchyard:plugin@0.6.0",
            World::Switchyard05 => "switchyard:plugin@0.5.0",
            World::Switchyard04 => "switchyard:plugin@0.4.0",
            World::WasiMessaging => "wasi-messaging@0.2.0-draft",
            World::Wasmcloud => "wasmcloud-messaging@0.2.0",
            World::SpinRedis2 => "fermyon-spin-redis",
            World::SpinRedis3 => "spin-redis@3.0.0",
        }
    }

    /// The WIT world a component of Switchyard's own contract targets
    /// (`switchyard:plugin/plugin@VERSION`); `None` for other hosts' worlds.
    pub fn contract(self) -> Option<&'static str> {
        match self {
            World::Switchyard => Some("switchyard:plugin/plugin@0.6.0"),
            World::Switchyard05 => Some("switchyard:plugin/plugin@0.5.0"),
            World::Switchyard04 => Some("switchyard:plugin/plugin@0.4.0"),
            _ => None,
        }
    }

    /// Whether a component that exports `name` is of this world.
    fn exported_by(self, name: &str) -> bool {
        if self.contract().is_some() {
            name == self.export()
        } else {
            name.starts_with(self.export())
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
        self.contract().is_some()
    }

    /// The world a component exporting the interfaces `exports` is written for.
    pub fn of_exports(exports: &[String]) -> Result<World, String> {
        if let Some(world) = World::ALL
            .into_iter()
            .find(|world| exports.iter().any(|name| world.exported_by(name)))
        {
            return Ok(world);
        }
        // A version of Switchyard's own contract this host does not run: say so, rather
        // than list every world.
        if let Some(version) = exports
            .iter()
            .find_map(|name| name.strip_prefix(SWITCHYARD_HANDLER))
        {
            let runs: Vec<&str> = World::ALL
                .iter()
                .filter(|world| world.contract().is_some())
                .map(|world| world.label())
                .collect();
            return Err(format!(
                "built for switchyard:plugin@{}, a version of the contract this host does not \
                 run; it runs {}: rebuild it against one of them (the WIT in this release is \
                 the newest)",
                crate::text::loggable(version, crate::text::MAX_QUOTED_NAME),
                match runs.split_last() {
                    Some((last, [])) => (*last).to_owned(),
                    Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
                    None => String::new(),
                }
            ));
        }
        Err({
            let accepted: Vec<String> = World::ALL
                .iter()
                .map(|w| {
                    let open = if w.contract().is_some() { "" } else { "…" };
                    format!("{} (exports {}{open})", w.label(), w.export())
                })
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
    /// Switchyard's own world as of 0.5.0.
    Switchyard05(switchyard05::PluginPre<HostState>),
    /// Switchyard's own world as of 0.4.0.
    Switchyard04(switchyard04::PluginPre<HostState>),
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
            World::Switchyard05 => HandlerPre::Switchyard05(switchyard05::PluginPre::new(pre)?),
            World::Switchyard04 => HandlerPre::Switchyard04(switchyard04::PluginPre::new(pre)?),
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
            HandlerPre::Switchyard05(_) => World::Switchyard05,
            HandlerPre::Switchyard04(_) => World::Switchyard04,
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
            HandlerPre::Switchyard05(pre) => pre.engine(),
            HandlerPre::Switchyard04(pre) => pre.engine(),
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
            HandlerPre::Switchyard05(pre) => Bindings::Switchyard05(pre.instantiate(store)?),
            HandlerPre::Switchyard04(pre) => Bindings::Switchyard04(pre.instantiate(store)?),
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
    /// Switchyard's own world as of 0.5.0.
    Switchyard05(switchyard05::Plugin),
    /// Switchyard's own world as of 0.4.0.
    Switchyard04(switchyard04::Plugin),
    /// The WASI messaging draft.
    WasiMessaging(wasi_messaging::MessagingCore),
    /// wasmCloud messaging.
    Wasmcloud(wasmcloud::Handler),
    /// Spin 2's Redis trigger.
    SpinRedis2(spin_redis::RedisHandler),
    /// Spin 3's Redis trigger.
    SpinRedis3(spin_redis3::RedisHandler),
}

/// Adds the imports of every synchronous world other than Switchyard's current one to
/// `linker`.
pub fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    use wasmtime::component::HasSelf;
    switchyard05::Plugin::add_to_linker::<HostState, HasSelf<HostState>>(linker, |state| state)?;
    switchyard04::Plugin::add_to_linker::<HostState, HasSelf<HostState>>(linker, |state| state)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn exports(names: &[&str]) -> Vec<String> {
        names.iter().map(|name| (*name).to_owned()).collect()
    }

    #[test]
    fn each_version_of_the_contract_is_told_by_its_exact_export() {
        let of = |name: &str| World::of_exports(&exports(&["wasi:cli/run@0.2.0", name]));
        assert_eq!(of("switchyard:plugin/handler@0.6.0"), Ok(World::Switchyard));
        assert_eq!(
            of("switchyard:plugin/handler@0.5.0"),
            Ok(World::Switchyard05)
        );
        assert_eq!(
            of("switchyard:plugin/handler@0.4.0"),
            Ok(World::Switchyard04)
        );
        // A longer version is another version, not a prefix match.
        assert!(of("switchyard:plugin/handler@0.4.0-rc1").is_err());
        assert_eq!(World::Switchyard.label(), "switchyard:plugin@0.6.0");
        assert_eq!(World::Switchyard04.label(), "switchyard:plugin@0.4.0");
        assert!(World::Switchyard04.describes_itself());
    }

    #[test]
    fn the_current_contract_is_the_wit_in_the_repository() {
        assert_eq!(
            World::Switchyard.contract(),
            Some(crate::plugins::loader::WORLD)
        );
        let wit = include_str!("../../../../wit/plugin.wit");
        assert!(wit.contains("package switchyard:plugin@0.6.0;"));
        let frozen = include_str!("../../../../wit/hosts/switchyard-0.5.0/plugin.wit");
        assert!(frozen.contains("package switchyard:plugin@0.5.0;"));
        let frozen = include_str!("../../../../wit/hosts/switchyard-0.4.0/plugin.wit");
        assert!(frozen.contains("package switchyard:plugin@0.4.0;"));
    }

    #[test]
    fn a_version_this_host_does_not_run_is_refused_naming_those_it_runs() {
        for version in ["0.3.0", "0.7.0"] {
            let refused =
                World::of_exports(&exports(&[&format!("switchyard:plugin/handler@{version}")]))
                    .expect_err(version);
            assert!(
                refused.contains(&format!("built for switchyard:plugin@{version}")),
                "{refused}"
            );
            assert!(
                refused.contains(
                    "it runs switchyard:plugin@0.6.0, switchyard:plugin@0.5.0 and \
                     switchyard:plugin@0.4.0"
                ),
                "{refused}"
            );
        }
    }

    #[test]
    fn other_hosts_worlds_keep_their_version_prefixes() {
        let world = World::of_exports(&exports(&["spin:redis/inbound-redis@3.0.1"]));
        assert_eq!(world, Ok(World::SpinRedis3));
        let refused = World::of_exports(&exports(&["wasi:cli/run@0.2.0"])).expect_err("none");
        assert!(
            refused.contains("accepted: switchyard:plugin@0.6.0"),
            "{refused}"
        );
    }
}
