//! Plugins built for `switchyard:plugin@0.4.0`, the contract before the message carried its
//! trace context. They load and run unchanged beside plugins of the current version.
//!
//! Mapping: the 0.4.0 world is the current one less `message.trace`, so nothing here has
//! behaviour of its own. Its host calls convert their arguments and go to the current
//! version's implementations ([`crate::worker::host`]), under the same grants, limits and
//! spans; `describe` answers in the current types; `handle` gets the current message without
//! its `trace` field (the fields move, nothing is copied).
//!
//! The WIT is frozen in `wit/hosts/switchyard-0.4.0`, byte for byte the `wit/plugin.wit` of
//! that release.

use super::super::state::HostState;
use crate::worker::bindings::switchyard::plugin::host::Host as Current;
use crate::worker::bindings::switchyard::plugin::types as current;

/// Generated from `wit/hosts/switchyard-0.4.0`.
#[allow(missing_docs)]
mod generated {
    wasmtime::component::bindgen!({
        world: "switchyard:plugin/plugin@0.4.0",
        path: "../wit/hosts/switchyard-0.4.0",
    });
}

use generated::switchyard::plugin::types;
pub use generated::{Plugin, PluginPre};

impl types::Host for HostState {}

impl generated::switchyard::plugin::host::Host for HostState {
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

impl From<current::Message> for types::Message {
    /// The message less its trace context, which this version has no field for.
    fn from(message: current::Message) -> Self {
        types::Message {
            channel: message.channel,
            subscription: match message.subscription {
                current::Subscription::Channel(name) => types::Subscription::Channel(name),
                current::Subscription::Pattern(name) => types::Subscription::Pattern(name),
                current::Subscription::Sharded(name) => types::Subscription::Sharded(name),
                current::Subscription::Stream(name) => types::Subscription::Stream(name),
            },
            payload: message.payload,
            received_at: message.received_at,
            entry_id: message.entry_id,
            fields: message.fields,
        }
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
                .map(|subscription| match subscription {
                    types::Subscription::Channel(name) => current::Subscription::Channel(name),
                    types::Subscription::Pattern(name) => current::Subscription::Pattern(name),
                    types::Subscription::Sharded(name) => current::Subscription::Sharded(name),
                    types::Subscription::Stream(name) => current::Subscription::Stream(name),
                })
                .collect(),
            capabilities: current::Capabilities {
                publish: info.capabilities.publish,
                invalidate: info.capabilities.invalidate,
                outputs: info.capabilities.outputs,
            },
        }
    }
}

/// Calls `handle` of a 0.4.0 plugin with `message`; its error, if any, rendered as the
/// current version's would be.
pub fn handle(
    bindings: &Plugin,
    store: &mut wasmtime::Store<HostState>,
    message: current::Message,
) -> wasmtime::Result<Result<(), String>> {
    bindings
        .switchyard_plugin_handler()
        .call_handle(store, &types::Message::from(message))
        .map(|answer| answer.map_err(|error| crate::worker::host::render_error(&error.into())))
}

/// Calls `describe` of a 0.4.0 plugin; its answer in the current version's types.
pub fn describe(
    bindings: &Plugin,
    store: &mut wasmtime::Store<HostState>,
) -> wasmtime::Result<current::PluginInfo> {
    bindings
        .switchyard_plugin_handler()
        .call_describe(store)
        .map(current::PluginInfo::from)
}
