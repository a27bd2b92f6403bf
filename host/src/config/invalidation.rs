//! `[invalidation]`: where cache invalidations are announced.

use serde::Deserialize;

/// `[invalidation]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InvalidationConfig {
    /// Channel on which every `invalidate` call is announced as
    /// `{"keys":[...],"source":"<plugin>"}`; empty to announce nothing.
    #[serde(default = "default_broadcast")]
    pub broadcast: String,
}

impl Default for InvalidationConfig {
    fn default() -> Self {
        Self {
            broadcast: default_broadcast(),
        }
    }
}

fn default_broadcast() -> String {
    "cache:invalidate".to_owned()
}
