//! Plugins built for `switchyard:plugin@0.4.0`, the contract before the message carried its
//! trace context (and before key and tracking subscriptions). They load and run unchanged
//! beside plugins of the current version.
//!
//! Mapping: its host calls convert their arguments and go to the current version's
//! implementations ([`crate::worker::host`]), under the same grants, limits and spans;
//! `describe` answers in the current types; `handle` gets the current message without its
//! `trace` field, a key subscription named by its pattern on the wire and a tracked prefix as
//! `PREFIX*` (see [`super::earlier`]).
//!
//! The WIT is frozen in `wit/hosts/switchyard-0.4.0`, byte for byte the `wit/plugin.wit` of
//! that release.

use super::super::state::HostState;
use super::earlier::earlier_contract;
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

earlier_contract!(generated, "0.4.0");

impl From<current::Message> for types::Message {
    /// The message less its trace context, which this version has no field for.
    fn from(message: current::Message) -> Self {
        types::Message {
            channel: message.channel,
            subscription: subscription(message.subscription),
            payload: message.payload,
            received_at: message.received_at,
            entry_id: message.entry_id,
            fields: message.fields,
        }
    }
}
