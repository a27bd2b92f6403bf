//! What every earlier version of Switchyard's own contract shares: host calls with the same
//! signatures as the current ones, in that version's types. [`earlier_contract!`] implements
//! them by converting their arguments and calling the current implementations (so the same
//! grants, limits and spans apply), and defines `handle` and `describe` over the version's
//! own conversions of the message and the plugin's description, which each version's module
//! writes (`From<current::Message>` and `From<types::PluginInfo>`).

/// How a version before 0.6.0, which has no `keys` or `tracking` subscription, names one of
/// the current subscriptions: `keys` as the pattern Redis matched (`__keyspace@DB__:KEYS`),
/// `tracking` as `PREFIX*`; the others as they are. Returns the kind (`channel`, `pattern`,
/// `sharded`, `stream`) and the name.
pub(super) fn before_keys(
    subscription: crate::worker::bindings::switchyard::plugin::types::Subscription,
) -> (&'static str, String) {
    use crate::worker::bindings::switchyard::plugin::types::Subscription as S;
    match subscription {
        S::Channel(name) => ("channel", name),
        S::Pattern(name) => ("pattern", name),
        S::Sharded(name) => ("sharded", name),
        S::Stream(name) => ("stream", name),
        S::Keys(keys) => (
            "pattern",
            format!(
                "{}{}",
                crate::keyspace::KeySubscription::prefix(keys.database.unwrap_or_default()),
                keys.keys
            ),
        ),
        S::Tracking(prefix) => ("pattern", format!("{prefix}*")),
    }
}

/// Implements an earlier contract's host calls and `handle`/`describe` callers, for the
/// bindings module `$generated` (whose `types` the caller has imported as `types`).
macro_rules! earlier_contract {
    ($generated:ident, $version:literal) => {
        impl types::Host for HostState {}

        impl $generated::switchyard::plugin::host::Host for HostState {
            fn publish(&mut self, channel: String, payload: Vec<u8>) -> Result<u32, types::Error> {
                Current::publish(self, channel, payload).map_err(types::Error::from)
            }

            fn send(&mut self, channel: String, payload: Vec<u8>) -> Result<(), types::Error> {
                Current::send(self, channel, payload).map_err(types::Error::from)
            }

            fn invalidate(&mut self, keys: Vec<String>) -> Result<u32, types::Error> {
                Current::invalidate(self, keys).map_err(types::Error::from)
            }

            fn call_output(
                &mut self,
                name: String,
                payload: Vec<u8>,
            ) -> Result<types::OutputReply, types::Error> {
                Current::call_output(self, name, payload)
                    .map(|reply| types::OutputReply {
                        status: reply.status,
                        body: reply.body,
                    })
                    .map_err(types::Error::from)
            }

            fn config(&mut self, key: String) -> Option<String> {
                Current::config(self, key)
            }

            fn log(&mut self, level: types::Level, text: String) {
                let level = match level {
                    types::Level::Trace => current::Level::Trace,
                    types::Level::Debug => current::Level::Debug,
                    types::Level::Info => current::Level::Info,
                    types::Level::Warn => current::Level::Warn,
                    types::Level::Error => current::Level::Error,
                };
                Current::log(self, level, text)
            }
        }

        impl From<current::Error> for types::Error {
            fn from(error: current::Error) -> Self {
                match error {
                    current::Error::Denied(why) => types::Error::Denied(why),
                    current::Error::Invalid(why) => types::Error::Invalid(why),
                    current::Error::Unavailable(why) => types::Error::Unavailable(why),
                    current::Error::Failed(why) => types::Error::Failed(why),
                }
            }
        }

        impl From<types::Error> for current::Error {
            fn from(error: types::Error) -> Self {
                match error {
                    types::Error::Denied(why) => current::Error::Denied(why),
                    types::Error::Invalid(why) => current::Error::Invalid(why),
                    types::Error::Unavailable(why) => current::Error::Unavailable(why),
                    types::Error::Failed(why) => current::Error::Failed(why),
                }
            }
        }

        /// The version's name for one of the current subscriptions (see
        /// [`super::earlier::before_keys`]).
        fn subscription(subscription: current::Subscription) -> types::Subscription {
            match super::earlier::before_keys(subscription) {
                ("channel", name) => types::Subscription::Channel(name),
                ("sharded", name) => types::Subscription::Sharded(name),
                ("stream", name) => types::Subscription::Stream(name),
                (_, name) => types::Subscription::Pattern(name),
            }
        }

        /// The version's subscriptions, as the current ones.
        fn current_subscription(subscription: types::Subscription) -> current::Subscription {
            match subscription {
                types::Subscription::Channel(name) => current::Subscription::Channel(name),
                types::Subscription::Pattern(name) => current::Subscription::Pattern(name),
                types::Subscription::Sharded(name) => current::Subscription::Sharded(name),
                types::Subscription::Stream(name) => current::Subscription::Stream(name),
            }
        }

        impl From<types::PluginInfo> for current::PluginInfo {
            fn from(info: types::PluginInfo) -> Self {
                current::PluginInfo {
                    name: info.name,
                    version: info.version,
                    subscriptions: info
                        .subscriptions
                        .into_iter()
                        .map(current_subscription)
                        .collect(),
                    capabilities: current::Capabilities {
                        publish: info.capabilities.publish,
                        invalidate: info.capabilities.invalidate,
                        outputs: info.capabilities.outputs,
                    },
                }
            }
        }

        #[doc = concat!("Calls `handle` of a ", $version, " plugin with `message`; its error, if any, rendered as the current version's would be.")]
        pub fn handle(
            bindings: &Plugin,
            store: &mut wasmtime::Store<HostState>,
            message: current::Message,
        ) -> wasmtime::Result<Result<(), String>> {
            bindings
                .switchyard_plugin_handler()
                .call_handle(store, &types::Message::from(message))
                .map(|answer| {
                    answer.map_err(|error| crate::worker::host::render_error(&error.into()))
                })
        }

        #[doc = concat!("Calls `describe` of a ", $version, " plugin; its answer in the current version's types.")]
        pub fn describe(
            bindings: &Plugin,
            store: &mut wasmtime::Store<HostState>,
        ) -> wasmtime::Result<current::PluginInfo> {
            bindings
                .switchyard_plugin_handler()
                .call_describe(store)
                .map(current::PluginInfo::from)
        }
    };
}

pub(super) use earlier_contract;
