//! wasmCloud messaging handlers (`wasmcloud:messaging@0.2.0`, world `messaging-handler`): a component
//! that exports `handler.handle-message` gets every message of its subscriptions as a
//! `broker-message`, and publishes through `consumer`.
//!
//! Mapping:
//! - in: the channel is the `subject`, the payload the `body`; `reply-to` is none (pub/sub
//!   carries no reply address);
//! - out: `consumer.publish(msg)` is a `send` of `msg.body` on the channel `msg.subject`,
//!   under the plugin's publish grants, loop guard and limits (`reply-to` is not carried);
//!   `consumer.request` is refused with an error saying so.

use super::super::state::HostState;
use crate::worker::host::render_error;

/// Generated from `wit/hosts/wasmcloud-messaging`.
#[allow(missing_docs)]
mod generated {
    wasmtime::component::bindgen!({
        world: "wasmcloud:messaging/messaging-handler",
        path: "../wit/hosts/wasmcloud-messaging",
    });
}

pub use generated::wasmcloud::messaging::types::BrokerMessage;
pub use generated::{MessagingHandler as Handler, MessagingHandlerPre as HandlerPre};

impl generated::wasmcloud::messaging::types::Host for HostState {}

impl generated::wasmcloud::messaging::consumer::Host for HostState {
    fn request(
        &mut self,
        subject: String,
        _body: Vec<u8>,
        _timeout_ms: u32,
    ) -> Result<BrokerMessage, String> {
        Err(format!(
            "request to {} is not supported: Redis pub/sub has no replies; publish and \
             subscribe to the answer's channel instead",
            crate::text::quoted(&subject)
        ))
    }

    fn publish(&mut self, msg: BrokerMessage) -> Result<(), String> {
        crate::worker::bindings::switchyard::plugin::host::Host::send(self, msg.subject, msg.body)
            .map_err(|error| render_error(&error))
    }
}
