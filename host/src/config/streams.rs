//! `[streams]`: how stream subscriptions are read, a manifest's `[stream]` overrides, and
//! the [`StreamSettings`] of one plugin resolved from both.

use std::time::Duration;

use serde::Deserialize;

/// `[streams]`: how stream subscriptions are read (a plugin's manifest may override all
/// but `consumer` in its `[stream]` table).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamsConfig {
    /// This host's consumer name in every group; replicas must differ. Default: the
    /// `HOSTNAME` environment variable (a Kubernetes pod's name), else the host name.
    #[serde(default)]
    pub consumer: Option<String>,
    /// Entries read at once; a reader has at most two such batches in flight per plugin and
    /// stream (it reads the next while the plugin handles one).
    #[serde(default = "default_stream_batch")]
    pub batch: usize,
    /// How long one read waits for new entries, in milliseconds.
    #[serde(default = "default_stream_block_ms")]
    pub block_ms: u64,
    /// Deliveries after which an entry that fails again goes to `<stream>:dead`.
    #[serde(default = "default_max_deliveries")]
    pub max_deliveries: u64,
    /// Wait before the first retry of a failed entry, in milliseconds; doubled per delivery.
    #[serde(default = "default_retry_backoff_ms")]
    pub retry_backoff_ms: u64,
    /// Entries left pending this long by another consumer are claimed, in milliseconds.
    #[serde(default = "default_claim_idle_ms")]
    pub claim_idle_ms: u64,
    /// Where a group the host creates starts: `new` (entries added from then on, as `$`)
    /// or `all` (the whole stream).
    #[serde(default)]
    pub start: StartFrom,
}

/// A plugin manifest's `[stream]` table: overrides of `[streams]` for that plugin.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOverride {
    /// The consumer group; default: the plugin's name.
    pub group: Option<String>,
    /// See [`StreamsConfig::batch`].
    pub batch: Option<usize>,
    /// See [`StreamsConfig::block_ms`].
    pub block_ms: Option<u64>,
    /// See [`StreamsConfig::max_deliveries`].
    pub max_deliveries: Option<u64>,
    /// See [`StreamsConfig::retry_backoff_ms`].
    pub retry_backoff_ms: Option<u64>,
    /// See [`StreamsConfig::claim_idle_ms`].
    pub claim_idle_ms: Option<u64>,
    /// See [`StreamsConfig::start`].
    pub start: Option<StartFrom>,
}

impl StreamsConfig {
    /// The settings of `plugin`'s streams, with its manifest's overrides.
    pub fn settings_for(&self, plugin: &str, overrides: &StreamOverride) -> StreamSettings {
        let millis = |over: Option<u64>, base: u64| Duration::from_millis(over.unwrap_or(base));
        StreamSettings {
            group: overrides.group.clone().unwrap_or_else(|| plugin.to_owned()),
            consumer: self.consumer.clone().unwrap_or_else(default_consumer),
            batch: overrides.batch.unwrap_or(self.batch).max(1),
            block: millis(overrides.block_ms, self.block_ms).max(Duration::from_millis(1)),
            max_deliveries: overrides
                .max_deliveries
                .unwrap_or(self.max_deliveries)
                .max(1),
            retry_backoff: millis(overrides.retry_backoff_ms, self.retry_backoff_ms),
            claim_idle: millis(overrides.claim_idle_ms, self.claim_idle_ms),
            start: overrides.start.unwrap_or(self.start),
        }
    }

    /// Adds to `problems` what is wrong with `[streams]`.
    pub(super) fn check(&self, origin: &str, problems: &mut Vec<String>) {
        if self.batch == 0 {
            problems.push(format!("{origin}: streams.batch must be at least 1"));
        }
        if self.max_deliveries == 0 {
            problems.push(format!(
                "{origin}: streams.max_deliveries must be at least 1"
            ));
        }
        if self.consumer.as_deref() == Some("") {
            problems.push(format!("{origin}: streams.consumer must not be empty"));
        }
    }
}

impl Default for StreamsConfig {
    fn default() -> Self {
        Self {
            consumer: None,
            batch: default_stream_batch(),
            block_ms: default_stream_block_ms(),
            max_deliveries: default_max_deliveries(),
            retry_backoff_ms: default_retry_backoff_ms(),
            claim_idle_ms: default_claim_idle_ms(),
            start: StartFrom::default(),
        }
    }
}

fn default_stream_batch() -> usize {
    64
}

fn default_stream_block_ms() -> u64 {
    2000
}

fn default_max_deliveries() -> u64 {
    5
}

fn default_retry_backoff_ms() -> u64 {
    500
}

/// Long enough that a slow entry (up to the plugin's deadline, retried a few times) is not
/// taken from a live replica, short enough that a dead one's work moves on within a minute.
fn default_claim_idle_ms() -> u64 {
    60_000
}

/// Where a new group starts reading.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StartFrom {
    /// Entries added after the group was created (`$`).
    #[default]
    New,
    /// Every entry already in the stream (`0`).
    All,
}

/// How one plugin reads its streams, resolved from the host's `[streams]` and the plugin's
/// manifest.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StreamSettings {
    /// The consumer group (default: the plugin's name).
    pub group: String,
    /// This host's name within the group (default: the host name).
    pub consumer: String,
    /// Entries read per `XREADGROUP`; a reader has at most two such batches in flight.
    pub batch: usize,
    /// How long one read waits for new entries.
    pub block: Duration,
    /// Deliveries after which a failing entry goes to the dead-letter stream.
    pub max_deliveries: u64,
    /// Wait before the first retry; doubled per delivery, up to a minute.
    pub retry_backoff: Duration,
    /// Entries pending this long with another consumer are claimed.
    pub claim_idle: Duration,
    /// Where a group created by the host starts.
    pub start: StartFrom,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            group: String::new(),
            consumer: default_consumer(),
            batch: 64,
            block: Duration::from_secs(2),
            max_deliveries: 5,
            retry_backoff: Duration::from_millis(500),
            claim_idle: Duration::from_secs(60),
            start: StartFrom::New,
        }
    }
}

/// The consumer name a host uses unless configured: `HOSTNAME` (a Kubernetes pod's name),
/// else the kernel's host name, else `switchyard`.
pub fn default_consumer() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|name| !name.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|name| name.trim().to_owned())
                .filter(|name| !name.is_empty())
        })
        .unwrap_or_else(|| "switchyard".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn stream_settings_take_the_manifest_over_the_host() {
        let config = Config::from_toml(
            "[streams]\nconsumer = \"pod-1\"\nmax_deliveries = 3\nstart = \"all\"\n",
            "s.toml",
        )
        .unwrap();
        let settings = config.streams.settings_for(
            "orders",
            &StreamOverride {
                max_deliveries: Some(7),
                ..StreamOverride::default()
            },
        );
        assert_eq!(settings.group, "orders");
        assert_eq!(settings.consumer, "pod-1");
        assert_eq!(settings.max_deliveries, 7);
        assert_eq!(settings.start, StartFrom::All);
        let err = Config::from_toml("[streams]\nbatch = 0\n", "b.toml").unwrap_err();
        assert!(err.to_string().contains("streams.batch"), "{err}");
    }
}
