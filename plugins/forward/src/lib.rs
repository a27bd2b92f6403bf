//! `forward`: republishes every message on `fwd:REST` unchanged to `fwded:REST`.
//!
//! The smallest useful plugin, and the one the benchmarks race against a bare Redis relay.

use switchyard_plugin::{Error, Message, Plugin, PluginInfo};

#[derive(Default)]
struct Forward;

impl Plugin for Forward {
    fn describe(&self) -> PluginInfo {
        PluginInfo::new("forward", env!("CARGO_PKG_VERSION"))
            .pattern("fwd:*")
            .publishes("fwded:*")
    }

    fn handle(&mut self, message: Message) -> Result<(), Error> {
        let rest = message
            .channel
            .strip_prefix("fwd:")
            .ok_or_else(|| Error::Invalid(format!("{} is not a fwd: channel", message.channel)))?;
        // No use for the receiver count: `send` lets the host batch the writes.
        switchyard_plugin::send(&format!("fwded:{rest}"), &message.payload)?;
        Ok(())
    }
}

switchyard_plugin::export!(Forward);
