//! `[effects]`: what plugins' effects may hold in the host while they are carried out.

use serde::Deserialize;

use super::PluginsConfig;

/// `[effects]`: bounds on what plugins' effects may hold in the host while they are carried
/// out. (Payloads of `publish` and `send` are bounded by `plugins.max_payload_bytes`, webhook
/// replies by each output's `max_reply_bytes`.)
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EffectsConfig {
    /// Bytes that every plugin's `send`s and `publish`es together may have waiting to be
    /// written to Redis (payload, channel and 128 bytes per message). When it is
    /// spent, a call waits for room until its plugin's deadline, then fails with
    /// `error::unavailable`.
    #[serde(default = "default_outgoing_bytes")]
    pub outgoing_bytes: u64,
}

impl Default for EffectsConfig {
    fn default() -> Self {
        Self {
            outgoing_bytes: default_outgoing_bytes(),
        }
    }
}

/// As much as one plugin's incoming queue holds by default (`plugins.queue_bytes`): a local
/// Redis takes that much in well under a second, so a burst of `send`s waits for room only
/// while Redis is slow or away, and the host never holds more than this for them.
fn default_outgoing_bytes() -> u64 {
    64 << 20
}

/// The smallest `effects.outgoing_bytes` accepted: room for a few small messages.
pub const MIN_OUTGOING_BYTES: u64 = 4096;

impl EffectsConfig {
    /// Adds to `problems` what is wrong with `[effects]`, whose budget must hold the largest
    /// message `plugins` allows.
    pub(super) fn check(&self, origin: &str, plugins: &PluginsConfig, problems: &mut Vec<String>) {
        let outgoing = self.outgoing_bytes;
        let largest_message = (plugins.max_payload_bytes as u64).max(MIN_OUTGOING_BYTES);
        if outgoing < largest_message {
            problems.push(format!(
                "{origin}: effects.outgoing_bytes must be at least plugins.max_payload_bytes ({}) and at least {MIN_OUTGOING_BYTES}, so that the largest message plugins may publish fits, got {outgoing}",
                plugins.max_payload_bytes
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn the_outgoing_budget_must_hold_the_largest_message() {
        let config = Config::from_toml("[effects]\noutgoing_bytes = 2097152\n", "e.toml").unwrap();
        assert_eq!(config.effects.outgoing_bytes, 2 << 20);
        assert_eq!(Config::default().effects.outgoing_bytes, 64 << 20);
        let err = Config::from_toml(
            "[plugins]\nmax_payload_bytes = 4194304\n[effects]\noutgoing_bytes = 2097152\n",
            "e.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(
                "effects.outgoing_bytes must be at least plugins.max_payload_bytes (4194304)"
            ),
            "{err}"
        );
    }
}
