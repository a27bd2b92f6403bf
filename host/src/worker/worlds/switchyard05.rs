//! Plugins built for `switchyard:plugin@0.5.0`, the contract before key and tracking
//! subscriptions. They load and run unchanged beside plugins of the current version.
//!
//! Mapping: its host calls convert their arguments and go to the current version's
//! implementations ([`crate::worker::host`]), under the same grants, limits and spans;
//! `describe` answers in the current types; `handle` gets the current message with a key
//! subscription named by its pattern on the wire (`__keyspace@DB__:KEYS`) and a tracked
//! prefix as `PREFIX*` (see [`super::earlier`]). A 0.5.0 plugin takes key and tracking
//! subscriptions from its manifest only.
//!
//! The WIT is frozen in `wit/hosts/switchyard-0.5.0`, byte for byte the `wit/plugin.wit` of
//! that release.

use super::super::state::HostState;
use super::earlier::earlier_contract;
use crate::worker::bindings::switchyard::plugin::host::Host as Current;
use crate::worker::bindings::switchyard::plugin::types as current;

/// Generated from `wit/hosts/switchyard-0.5.0`.
#[allow(missing_docs)]
mod generated {
    wasmtime::component::bindgen!({
        world: "switchyard:plugin/plugin@0.5.0",
        path: "../wit/hosts/switchyard-0.5.0",
    });
}

use generated::switchyard::plugin::types;
pub use generated::{Plugin, PluginPre};

earlier_contract!(generated, "0.5.0");

impl From<current::Message> for types::Message {
    fn from(message: current::Message) -> Self {
        types::Message {
            channel: message.channel,
            subscription: subscription(message.subscription),
            payload: message.payload,
            received_at: message.received_at,
            entry_id: message.entry_id,
            fields: message.fields,
            trace: message.trace.map(|trace| types::TraceContext {
                traceparent: trace.traceparent,
                tracestate: trace.tracestate,
            }),
        }
    }
}
