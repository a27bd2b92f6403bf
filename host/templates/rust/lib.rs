//! `{{name}}`: republishes every message on `{{name}}:in` on `{{name}}:out`.
//!
//! A starting point: change `describe` and `handle`, then the manifest and the test files.

use switchyard_plugin::{Error, Level, Message, Plugin, PluginInfo};

const INPUT: &str = "{{name}}:in";
const OUTPUT: &str = "{{name}}:out";

#[derive(Default)]
struct Starter {
    /// State lives as long as the instance: messages seen so far.
    seen: u64,
}

impl Plugin for Starter {
    fn describe(&self) -> PluginInfo {
        PluginInfo::new("{{name}}", env!("CARGO_PKG_VERSION"))
            .channel(INPUT)
            .publishes(OUTPUT)
    }

    fn handle(&mut self, message: Message) -> Result<(), Error> {
        if message.payload.is_empty() {
            return Err(Error::Invalid("empty payload".to_owned()));
        }
        self.seen += 1;
        switchyard_plugin::log(Level::Debug, &format!("message {} on {}", self.seen, message.channel));
        // `send` queues the message and returns; `publish` would wait for Redis's reply.
        switchyard_plugin::send(OUTPUT, &message.payload)?;
        Ok(())
    }
}

switchyard_plugin::export!(Starter);
