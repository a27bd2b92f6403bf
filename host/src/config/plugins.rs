//! `[plugins]`: the plugins folder and how plugins run (queues, deadlines, memory, the
//! circuit breaker), with the capability policy and `[grants.PLUGIN]`, and the settings the
//! stages read from them ([`WhenFull`], [`BreakerPolicy`]).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// The plugins folder, relative to the working directory.
pub const DEFAULT_PLUGINS_DIR: &str = "plugins";
/// What all plugins' queues may hold together when the host runs without a memory limit it
/// can read (no cgroup limit): room for sixteen plugins' default budgets.
pub const DEFAULT_QUEUE_BYTES_TOTAL: u64 = 1 << 30;
/// The smallest queue budget accepted: a few messages.
pub const MIN_QUEUE_BYTES: u64 = 4096;
/// How long instantiating a new plugin version and calling its `describe` may take together
/// (`plugins.describe_deadline_ms`'s default). They run once per version, and a guest with a
/// large runtime (Python, JavaScript) does more at instantiation than in a call, so this is
/// far above a message's deadline. Files load one at a time, so it is also how long one bad
/// file can hold back the files after it and readiness: a few seconds, not more.
pub const DEFAULT_DESCRIBE_DEADLINE_MS: u64 = 5_000;

/// `[plugins]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginsConfig {
    /// The folder watched for `NAME.wasm` (and optional `NAME.toml`) files.
    #[serde(default = "default_plugins_dir")]
    pub dir: PathBuf,
    /// Bytes of messages waiting per plugin before that plugin sheds (a message costs its
    /// payload, channel and subscription plus a fixed overhead of about 170 bytes). A
    /// manifest's `[limits] queue_bytes` overrides it for its plugin.
    #[serde(default = "default_queue_bytes")]
    pub queue_bytes: u64,
    /// Bytes waiting in all plugins' queues together; when spent, the plugin with the
    /// largest backlog sheds. Default: a quarter of the host's memory limit (its cgroup's),
    /// or 1 GiB without one.
    #[serde(default)]
    pub queue_bytes_total: Option<u64>,
    /// Messages waiting per plugin, if they should be capped by count as well as by bytes.
    #[serde(default)]
    pub queue_capacity: Option<usize>,
    /// Wall-clock limit of one `handle` call, in milliseconds, host calls (and waits in
    /// them) included.
    #[serde(default = "default_deadline_ms")]
    pub deadline_ms: u64,
    /// Wall-clock limit of instantiating a new plugin version and calling its `describe`,
    /// together, in milliseconds. A plugin that takes longer is rejected.
    #[serde(default = "default_describe_deadline_ms")]
    pub describe_deadline_ms: u64,
    /// Linear-memory cap of one plugin instance, in MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// How long the folder must be quiet before changes are loaded, in milliseconds.
    #[serde(default = "default_settle_ms")]
    pub settle_ms: u64,
    /// `deny` (default): plugins get only what the operator grants. `trust-describe`: also
    /// what they ask for in `describe`.
    #[serde(default)]
    pub policy: Policy,
    /// What a full queue sheds: `drop-newest` (default) or `drop-oldest`.
    #[serde(default)]
    pub when_full: WhenFull,
    /// The circuit breaker parks a plugin when this many of its last `breaker_window`
    /// messages failed.
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: usize,
    /// How many recent messages the circuit breaker looks at.
    #[serde(default = "default_breaker_window")]
    pub breaker_window: usize,
    /// The first parking period, in milliseconds; doubled while trials fail, up to a minute.
    #[serde(default = "default_breaker_backoff_ms")]
    pub breaker_backoff_ms: u64,
    /// Messages with a larger payload are dropped before reaching any plugin (and counted);
    /// stream entries larger than this (their fields together) go to the dead-letter stream
    /// unhandled; `publish` and `send` refuse larger payloads.
    #[serde(default = "default_max_payload_bytes")]
    pub max_payload_bytes: usize,
    /// Larger `.wasm` files are rejected without being read (and no more than this is read
    /// of a file that grows meanwhile). From 1 to [`MAX_WASM_MIB`].
    #[serde(default = "default_max_wasm_mib")]
    pub max_wasm_mib: u64,
    /// On SIGTERM, how long queued messages may take to drain before the host exits anyway.
    #[serde(default = "default_drain_ms")]
    pub drain_ms: u64,
    /// A folder for compiled components, so that restarts and reloads of files seen before
    /// skip compilation (seconds for Python and JavaScript plugins). Off when unset. The host
    /// creates it with mode 0700; an existing folder that others may write to, or that another
    /// user owns, is refused with a warning and the host runs without the cache.
    #[serde(default)]
    pub compile_cache: Option<PathBuf>,
    /// Plugins pulled from registries into the folder: `oci://REGISTRY/REPOSITORY:TAG`
    /// (followed: polled every `poll_s`) or `oci://REGISTRY/REPOSITORY@sha256:DIGEST`
    /// (pinned). Each lands as `NAME.wasm` (and `NAME.toml`), NAME being the repository's
    /// last segment. Readiness waits for all of them.
    #[serde(default)]
    pub sources: Vec<String>,
    /// How often tags in `sources` are looked up, in seconds.
    #[serde(default = "default_poll_s")]
    pub poll_s: u64,
    /// Where pulled components are kept by digest, so a restart does not download them
    /// again. Default: `.oci-cache` in the plugins folder (the folder's scan skips it).
    #[serde(default)]
    pub oci_cache: Option<PathBuf>,
    /// Registries (`HOST:PORT`) spoken to over plain HTTP although they are not on this
    /// machine (those on it always are).
    #[serde(default)]
    pub insecure_registries: Vec<String>,
    /// Component digests (`sha256:HEX`) that may load without a signature: pinning by hash.
    /// With `verify.keys` as well, either suffices.
    #[serde(default)]
    pub allowed_digests: Vec<String>,
    /// Signature checks: when keys are set, only components signed by one of them (or listed
    /// in `allowed_digests`) load, pulled or dropped in the folder.
    #[serde(default)]
    pub verify: VerifyConfig,
}

/// `[plugins.verify]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyConfig {
    /// Public keys (PEM files, as `cosign generate-key-pair` writes `cosign.pub`), or the
    /// PEM text itself. A component pulled from a registry must carry a cosign signature
    /// (`cosign sign --key`) of its manifest digest by one of them; one dropped in the folder,
    /// a `NAME.wasm.sig` beside it (`cosign sign-blob --key`).
    #[serde(default)]
    pub keys: Vec<String>,
}

impl PluginsConfig {
    /// Adds to `problems` what is wrong with `[plugins]`.
    pub(super) fn check(&self, origin: &str, problems: &mut Vec<String>) {
        if self.queue_capacity == Some(0) {
            problems.push(format!(
                "{origin}: plugins.queue_capacity must be at least 1 (or left out: no count cap)"
            ));
        }
        if self.queue_bytes < MIN_QUEUE_BYTES {
            problems.push(format!(
                "{origin}: plugins.queue_bytes must be at least {MIN_QUEUE_BYTES} (one message), got {}",
                self.queue_bytes
            ));
        }
        if let Some(total) = self
            .queue_bytes_total
            .filter(|total| *total < MIN_QUEUE_BYTES)
        {
            problems.push(format!(
                "{origin}: plugins.queue_bytes_total must be at least {MIN_QUEUE_BYTES} (one message), got {total}"
            ));
        }
        if self.deadline_ms == 0 {
            problems.push(format!("{origin}: plugins.deadline_ms must be at least 1"));
        }
        if self.describe_deadline_ms == 0 {
            problems.push(format!(
                "{origin}: plugins.describe_deadline_ms must be at least 1"
            ));
        }
        if self.memory_mib == 0 || self.memory_mib > 4096 {
            problems.push(format!(
                "{origin}: plugins.memory_mib must be between 1 and 4096 (a 32-bit Wasm memory), got {}",
                self.memory_mib
            ));
        }
        if self.breaker_window == 0
            || self.breaker_failures == 0
            || self.breaker_failures > self.breaker_window
        {
            problems.push(format!(
                "{origin}: plugins.breaker_failures ({}) must be between 1 and plugins.breaker_window ({})",
                self.breaker_failures, self.breaker_window
            ));
        }
        if self.max_payload_bytes == 0 {
            problems.push(format!(
                "{origin}: plugins.max_payload_bytes must be at least 1"
            ));
        }
        if !(1..=MAX_WASM_MIB).contains(&self.max_wasm_mib) {
            problems.push(format!(
                "{origin}: plugins.max_wasm_mib must be between 1 and {MAX_WASM_MIB}, got {}",
                self.max_wasm_mib
            ));
        }
        if self.poll_s == 0 {
            problems.push(format!("{origin}: plugins.poll_s must be at least 1"));
        }
        let mut names = std::collections::HashSet::new();
        for (i, source) in self.sources.iter().enumerate() {
            match source.parse::<crate::oci::PluginRef>() {
                Err(error) => problems.push(format!("{origin}: plugins.sources[{i}]: {error}")),
                Ok(reference) if !source.starts_with(crate::oci::reference::SCHEME) => {
                    problems.push(format!(
                        "{origin}: plugins.sources[{i}]: {source:?} must start with oci:// \
                         ({reference})"
                    ));
                }
                Ok(reference) => {
                    if !names.insert(reference.default_name().to_owned()) {
                        problems.push(format!(
                            "{origin}: plugins.sources[{i}]: a second source for the plugin \
                             name {:?} (the repository's last segment)",
                            reference.default_name()
                        ));
                    }
                }
            }
        }
        for (i, digest) in self.allowed_digests.iter().enumerate() {
            if !crate::oci::reference::is_sha256(digest) {
                problems.push(format!(
                    "{origin}: plugins.allowed_digests[{i}]: {digest:?} is not sha256: followed \
                     by 64 lowercase hexadecimal digits"
                ));
            }
        }
    }
}

impl Default for PluginsConfig {
    fn default() -> Self {
        Self {
            dir: default_plugins_dir(),
            queue_bytes: default_queue_bytes(),
            queue_bytes_total: None,
            queue_capacity: None,
            deadline_ms: default_deadline_ms(),
            describe_deadline_ms: default_describe_deadline_ms(),
            memory_mib: default_memory_mib(),
            settle_ms: default_settle_ms(),
            policy: Policy::default(),
            when_full: WhenFull::default(),
            breaker_failures: default_breaker_failures(),
            breaker_window: default_breaker_window(),
            breaker_backoff_ms: default_breaker_backoff_ms(),
            max_payload_bytes: default_max_payload_bytes(),
            max_wasm_mib: default_max_wasm_mib(),
            drain_ms: default_drain_ms(),
            compile_cache: None,
            sources: Vec::new(),
            poll_s: default_poll_s(),
            oci_cache: None,
            insecure_registries: Vec::new(),
            allowed_digests: Vec::new(),
            verify: VerifyConfig::default(),
        }
    }
}

fn default_plugins_dir() -> PathBuf {
    PathBuf::from(DEFAULT_PLUGINS_DIR)
}

/// Of the order of what Redis itself buffers for a subscriber that falls behind (its
/// `client-output-buffer-limit pubsub` cuts at 32 MiB, about 330,000 messages of 64 bytes): a
/// burst that a bare client survives is not shed. At 64 bytes a message costs about 240 bytes
/// here, so this holds about 275,000 of them.
fn default_queue_bytes() -> u64 {
    64 << 20
}

fn default_deadline_ms() -> u64 {
    100
}

fn default_describe_deadline_ms() -> u64 {
    DEFAULT_DESCRIBE_DEADLINE_MS
}

fn default_memory_mib() -> u64 {
    64
}

/// Long enough for `cp` of a multi-megabyte file to finish its writes, short enough that a
/// deploy by atomic rename is live well within a second.
fn default_settle_ms() -> u64 {
    50
}

fn default_breaker_failures() -> usize {
    5
}

fn default_breaker_window() -> usize {
    10
}

fn default_breaker_backoff_ms() -> u64 {
    1000
}

/// Redis allows 512 MB; a message router rarely should. Large enough for documents and
/// images, small enough that one message cannot exhaust a plugin's 64 MiB default memory.
fn default_max_payload_bytes() -> usize {
    1 << 20
}

/// Python components are about 18 MB and JavaScript ones about 13 MB; 128 MiB leaves room.
fn default_max_wasm_mib() -> u64 {
    128
}

/// The largest `plugins.max_wasm_mib`: a component is read whole into memory and compiled, and
/// one of gigabytes is a mistake, not a plugin.
pub const MAX_WASM_MIB: u64 = 4096;

/// Kubernetes' default grace period is 30 s; draining in 10 leaves room for the rest.
/// A tag moved is seen within half a minute, at one small request per source.
fn default_poll_s() -> u64 {
    30
}

fn default_drain_ms() -> u64 {
    10_000
}

/// How capabilities are granted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Only what the operator grants, in this file or in a plugin's `NAME.toml`.
    #[default]
    Deny,
    /// Also whatever a plugin's `describe` asks for. For local development.
    TrustDescribe,
}

/// Capabilities granted to one plugin (`[grants.PLUGIN]` here, `[grants]` in `NAME.toml`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct GrantsConfig {
    /// Channel patterns it may publish on.
    #[serde(default)]
    pub publish: Vec<String>,
    /// Key patterns it may invalidate.
    #[serde(default)]
    pub invalidate: Vec<String>,
    /// Outputs it may call.
    #[serde(default)]
    pub outputs: Vec<String>,
}

impl GrantsConfig {
    /// Everything in `self` or `other`, without repeats.
    pub fn union(&self, other: &GrantsConfig) -> GrantsConfig {
        fn merge(a: &[String], b: &[String]) -> Vec<String> {
            let mut out = a.to_vec();
            for item in b {
                if !out.contains(item) {
                    out.push(item.clone());
                }
            }
            out
        }
        GrantsConfig {
            publish: merge(&self.publish, &other.publish),
            invalidate: merge(&self.invalidate, &other.invalidate),
            outputs: merge(&self.outputs, &other.outputs),
        }
    }
}

/// Which message a full queue gives up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WhenFull {
    /// Refuse the new message.
    #[default]
    DropNewest,
    /// Drop the oldest waiting message to make room.
    DropOldest,
}

/// When the breaker trips and for how long it parks.
#[derive(Debug, Clone, Copy)]
pub struct BreakerPolicy {
    /// Failures among the last `window` messages that trip the breaker.
    pub failures: usize,
    /// How many recent messages are considered.
    pub window: usize,
    /// The first parking period.
    pub backoff: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn the_component_size_limit_is_checked() {
        for bad in ["0", "4097", "9223372036854775807"] {
            let err = Config::from_toml(&format!("[plugins]\nmax_wasm_mib = {bad}\n"), "w.toml")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("w.toml")
                    && err.contains("plugins.max_wasm_mib must be between 1 and 4096"),
                "{err}"
            );
        }
        let config = Config::from_toml("[plugins]\nmax_wasm_mib = 4096\n", "w.toml").unwrap();
        assert_eq!(config.plugins.max_wasm_mib, MAX_WASM_MIB);
    }
}
