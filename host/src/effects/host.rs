//! The `switchyard:plugin/host` interface: what a plugin may ask of the host.
//!
//! Each call checks the plugin's grants first. Everything a plugin should expect to go wrong
//! (a missing grant, Redis away, a deadline) comes back as a WIT `error` value; nothing here
//! traps.

use tracing::Level as TraceLevel;

use crate::worker::bindings::switchyard::plugin::host::Host;
use crate::worker::bindings::switchyard::plugin::types::{self, Error, Level};
use crate::worker::state::HostState;

use super::EffectError;

/// Longest `log` line kept; the rest is cut, so a plugin cannot flood the host's log with one
/// call.
pub const MAX_LOG_LINE: usize = 4096;

impl types::Host for HostState {}

impl Host for HostState {
    fn publish(&mut self, channel: String, payload: Vec<u8>) -> Result<u32, Error> {
        let plugin = &self.plugin;
        if !plugin.grants.may_publish(channel.as_bytes()) {
            return Err(Error::Denied(format!(
                "plugin {} has no publish grant for channel {channel:?} (granted: {})",
                plugin.name,
                plugin.grants.describe_publish()
            )));
        }
        if crate::router::is_reserved(channel.as_bytes()) {
            return Err(Error::Invalid(format!(
                "channel {channel:?} is reserved for the host"
            )));
        }
        plugin
            .effects
            .publish(&plugin.name, channel.as_bytes(), &payload, self.remaining())
            .map_err(|e| match e {
                EffectError::Unavailable(why) => Error::Unavailable(why),
                timeout @ EffectError::Timeout(_) => Error::Unavailable(timeout.to_string()),
            })
    }

    fn config(&mut self, key: String) -> Option<String> {
        self.plugin.settings.get(&key).map(str::to_owned)
    }

    fn log(&mut self, level: Level, text: String) {
        let text = truncate(&text, MAX_LOG_LINE);
        let plugin = &self.plugin.name;
        let version = &self.plugin.version;
        macro_rules! emit {
            ($level:expr) => {
                tracing::event!(target: "switchyard::plugin", $level, %plugin, %version, "{text}")
            };
        }
        match level {
            Level::Trace => emit!(TraceLevel::TRACE),
            Level::Debug => emit!(TraceLevel::DEBUG),
            Level::Info => emit!(TraceLevel::INFO),
            Level::Warn => emit!(TraceLevel::WARN),
            Level::Error => emit!(TraceLevel::ERROR),
        }
    }
}

/// Cuts `text` to at most `max` bytes on a character boundary.
fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::truncate;

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
