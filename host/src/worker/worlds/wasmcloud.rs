//! wasmCloud messaging handlers (`wasmcloud:messaging@0.2.0`, world `messaging-handler`): a component
//! that exports `handler.handle-message` gets every message of its subscriptions as a
//! `broker-message`, and publishes through `consumer`.
//!
//! Mapping:
//! - in: the channel is the `subject`, the payload the `body`; `reply-to` is the reply
//!   channel of a request (see [`crate::effects::replies`]), else none;
//! - out: `consumer.publish(msg)` is a `send` of `msg.body` on the channel `msg.subject`,
//!   under the plugin's publish grants, loop guard and limits (`reply-to` is not carried).
//!   Publishing on the `reply-to` of the message in hand needs no grant;
//! - `consumer.request(subject, body, timeout-ms)` sends `body` on `subject` as a request,
//!   under the same grants, with a reply channel of the host's, and waits for the first
//!   message on it for `timeout-ms`, or what is left of the call's deadline if that is less.
//!   No reply in that time is an error the component sees.

use std::time::{Duration, Instant};

use super::super::state::HostState;
use crate::effects::replies;
use crate::text::quoted;
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
        body: Vec<u8>,
        timeout_ms: u32,
    ) -> Result<BrokerMessage, String> {
        let effects = self.plugin.effects.clone();
        let awaited = effects
            .open_reply_channel(self.call_deadline)
            .map_err(|error| render_error(&self.refused(error)))?;
        let reply_to = awaited.channel().to_owned();
        self.out_on_channel(
            "request",
            subject.clone(),
            body,
            |effects, from, stats, channel, body, deadline| {
                effects.send(
                    from,
                    stats,
                    channel,
                    replies::wrap(&reply_to, &body),
                    deadline,
                )
            },
        )
        .map_err(|error| render_error(&error))?;
        let within = Duration::from_millis(timeout_ms.into())
            .min(self.call_deadline.saturating_duration_since(Instant::now()));
        match effects.await_reply(awaited, within) {
            Some(body) => Ok(BrokerMessage {
                subject: reply_to,
                body: Vec::from(body),
                reply_to: None,
            }),
            None => Err(format!(
                "no reply to the request on {} within {} ms",
                quoted(&subject),
                within.as_millis()
            )),
        }
    }

    fn publish(&mut self, msg: BrokerMessage) -> Result<(), String> {
        crate::worker::bindings::switchyard::plugin::host::Host::send(self, msg.subject, msg.body)
            .map_err(|error| render_error(&error))
    }
}
