//! `NAME.toml`, the operator's manifest beside `NAME.wasm`.
//!
//! ```toml
//! [grants]              # what the plugin may do (added to the host config's [grants.NAME])
//! publish = ["chat:*"]
//! invalidate = ["cache:*"]
//! outputs = ["email"]
//!
//! [subscriptions]       # replaces what `describe` lists
//! channels = ["orders"]
//! patterns = ["orders:*"]
//! sharded = ["room:{42}"]  # SSUBSCRIBE
//! streams = ["jobs"]       # XREADGROUP, at least once
//! keys = ["user:*"]        # changes of keys: PSUBSCRIBE __keyspace@DB__:user:*
//! events = ["set", "del"]  # which key events (every event when left out)
//! database = 0             # the keys' database (that of redis.url when left out)
//! tracking = ["cache:"]    # invalidations of keys with these prefixes: CLIENT TRACKING BCAST
//!
//! [stream]              # how its streams are read (overrides the host's [streams])
//! group = "billing"
//! max_deliveries = 3
//!
//! [limits]              # overrides the host's defaults for this plugin
//! deadline_ms = 2000
//! memory_mib = 32      # per instance
//! concurrency = 4       # workers, each with its own instance; order is no longer kept
//! queue_bytes = 8388608 # bytes of messages waiting before the plugin sheds
//!
//! [config]              # values the plugin reads with `config(key)`
//! limit = 280
//! banned = ["spam", "scam"]
//! ```
//!
//! Unknown keys are errors naming the file, like everywhere in the host's configuration.
//!
//! A manifest is a few dozen lines; one over [`MAX_MANIFEST_BYTES`] is refused unread. Errors
//! about a manifest quote it (TOML errors show the offending line) only when the file lies in
//! the plugins folder: one reached through a symlink out of the folder may be any file the
//! host can read, and its errors are shown in `/plugins` and the gateway's `/api/plugins`
//! (see [`Disclosure`]).

use std::collections::BTreeMap;
use std::path::Path;

use bytes::Bytes;
use serde::Deserialize;

use crate::config::{GrantsConfig, StreamOverride};
use crate::grants::Settings;
use crate::keyspace::{Events, KeySubscription};

/// The largest manifest the host reads, in bytes: a manifest is grants, subscriptions, limits
/// and a few settings, a few hundred bytes to a few KiB. Settings too large for this belong in
/// a file or a store the plugin's outputs reach, not in the manifest.
pub const MAX_MANIFEST_BYTES: u64 = 64 << 10;

/// What errors about a manifest may show of its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disclosure {
    /// The file is in the plugins folder (directly, or through symlinks that stay inside it,
    /// as a Kubernetes ConfigMap's `..data` links do): it is the operator's manifest, and an
    /// error may quote the line at fault.
    Quote,
    /// The file lies outside the plugins folder (or where it lies is unknown): it may be any
    /// file the host can read, a secret included, so errors say where the problem is (line
    /// and column, the keys at fault) but quote nothing.
    PositionOnly,
}

/// A parsed manifest.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Capabilities granted to the plugin.
    #[serde(default)]
    pub grants: GrantsConfig,
    /// Subscriptions that replace the plugin's own.
    pub subscriptions: Option<SubscriptionsOverride>,
    /// Per-plugin limits.
    #[serde(default)]
    pub limits: LimitsOverride,
    /// How its streams are read.
    #[serde(default)]
    pub stream: StreamOverride,
    /// The plugin's settings.
    #[serde(default)]
    pub config: BTreeMap<String, toml::Value>,
}

/// `[subscriptions]`: the operator decides what the plugin listens to.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionsOverride {
    /// Exact channels, first in order of preference.
    #[serde(default)]
    pub channels: Vec<String>,
    /// Redis glob patterns, after the channels.
    #[serde(default)]
    pub patterns: Vec<String>,
    /// Sharded channels (`SSUBSCRIBE`).
    #[serde(default)]
    pub sharded: Vec<String>,
    /// Streams, read through the plugin's consumer group.
    #[serde(default)]
    pub streams: Vec<String>,
    /// Redis glob patterns of keys whose changes the plugin hears of, through keyspace
    /// notifications (see [`crate::keyspace`]).
    #[serde(default)]
    pub keys: Vec<String>,
    /// The key events that reach the plugin (`set`, `hset`, `del`, `expired`, ...); every
    /// event when absent.
    pub events: Option<Vec<String>>,
    /// The database of `keys`; the one `redis.url` selects when absent.
    pub database: Option<u32>,
    /// Key prefixes whose invalidations of client-side caching the plugin hears of
    /// (`CLIENT TRACKING ... BCAST PREFIX`); `""` is every key.
    #[serde(default)]
    pub tracking: Vec<String>,
}

impl SubscriptionsOverride {
    /// The key subscriptions listed, in `database_default` unless `database` says otherwise;
    /// or what is wrong with them, as (key, problem) pairs.
    pub fn key_subscriptions(
        &self,
        database_default: u32,
    ) -> Result<Vec<KeySubscription>, Vec<(&'static str, String)>> {
        let mut problems = Vec::new();
        if self.keys.is_empty() {
            for (key, set) in [
                ("subscriptions.events", self.events.is_some()),
                ("subscriptions.database", self.database.is_some()),
            ] {
                if set {
                    problems.push((
                        key,
                        format!(
                            "{key} applies to key subscriptions, but subscriptions.keys is empty"
                        ),
                    ));
                }
            }
            return if problems.is_empty() {
                Ok(Vec::new())
            } else {
                Err(problems)
            };
        }
        let events = match &self.events {
            None => Events::all(),
            Some(names) => Events::only(names).unwrap_or_else(|problem| {
                problems.push((
                    "subscriptions.events",
                    format!("subscriptions.events: {problem}"),
                ));
                Events::all()
            }),
        };
        let database = self.database.unwrap_or(database_default);
        let mut keys = Vec::new();
        for pattern in &self.keys {
            if pattern.is_empty() {
                problems.push((
                    "subscriptions.keys",
                    "subscriptions.keys: an empty pattern matches no key".to_owned(),
                ));
                continue;
            }
            let subscription = KeySubscription {
                database,
                keys: Bytes::from(pattern.clone()),
                events: events.clone(),
            };
            // The router tells a key subscription from a pattern by the subscription, so one
            // plugin cannot have the same pattern both ways.
            let channels = subscription.pattern();
            if self
                .patterns
                .iter()
                .any(|p| p.as_bytes() == channels.as_ref())
            {
                problems.push((
                    "subscriptions.keys",
                    format!(
                        "subscriptions.keys: {pattern:?} is also in subscriptions.patterns as {:?}: \
                         list it once",
                        String::from_utf8_lossy(&channels)
                    ),
                ));
            }
            keys.push(subscription);
        }
        if problems.is_empty() {
            Ok(keys)
        } else {
            Err(problems)
        }
    }
}

/// `[limits]`
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsOverride {
    /// Wall-clock limit of one call, in milliseconds.
    pub deadline_ms: Option<u64>,
    /// Linear-memory cap, in MiB: for all the plugin's linear memories together (a
    /// component may have several), not for each. With `concurrency` above 1 each worker's
    /// instance has this cap.
    pub memory_mib: Option<u64>,
    /// Workers handling the plugin's messages at once, from 1 (the default: one instance,
    /// messages in the order Redis delivered them) to
    /// [`MAX_CONCURRENCY`](crate::worker::MAX_CONCURRENCY). Each worker has its own instance,
    /// so state a plugin keeps between messages is per worker, and messages are handled in no
    /// particular order.
    pub concurrency: Option<usize>,
    /// Bytes of messages waiting in the plugin's queue before it sheds (the host's
    /// `plugins.queue_bytes` otherwise). The host's total budget still applies.
    pub queue_bytes: Option<u64>,
}

impl Manifest {
    /// Parses manifest text; `path` names the file in errors, which may quote the text.
    pub fn parse(text: &str, path: &Path) -> Result<Self, String> {
        Self::parse_disclosing(text, path, Disclosure::Quote)
    }

    /// Parses manifest text; `path` names the file in errors, which quote the text only if
    /// `disclosure` allows it. Serde's messages quote values too ("invalid type: string
    /// \"...\""), so without it an error gives only the position.
    pub fn parse_disclosing(
        text: &str,
        path: &Path,
        disclosure: Disclosure,
    ) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| match disclosure {
            Disclosure::Quote => format!("{}: {}", path.display(), e.to_string().trim_end()),
            Disclosure::PositionOnly => {
                let position = e.span().map_or_else(String::new, |span| {
                    let (line, column) = line_and_column(text, span.start);
                    format!(" at line {line}, column {column}")
                });
                format!(
                    "{}: not a valid manifest{position} (the file lies outside the plugins \
                     folder, so its content is not quoted)",
                    path.display()
                )
            }
        })
    }

    /// The settings as the plugin sees them: strings stay as they are, numbers, booleans and
    /// dates take their TOML spelling, arrays and tables become JSON.
    pub fn settings(&self) -> Settings {
        Settings::new(
            self.config
                .iter()
                .map(|(key, value)| {
                    let text = match value {
                        toml::Value::String(s) => s.clone(),
                        toml::Value::Array(_) | toml::Value::Table(_) => {
                            serde_json::to_string(value).unwrap_or_default()
                        }
                        other => other.to_string(),
                    };
                    (key.clone(), text)
                })
                .collect(),
        )
    }
}

/// The 1-based line and column (in characters) of byte `offset` of `text`.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    (
        before.matches('\n').count() + 1,
        before[line_start..].chars().count() + 1,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_text_whatever_the_toml_type() {
        let manifest = Manifest::parse(
            "[config]\nname = \"x\"\nlimit = 280\nratio = 0.5\non = true\nlist = [\"a\", \"b\"]\n",
            Path::new("p.toml"),
        )
        .unwrap();
        let settings = manifest.settings();
        assert_eq!(settings.get("name"), Some("x"));
        assert_eq!(settings.get("limit"), Some("280"));
        assert_eq!(settings.get("ratio"), Some("0.5"));
        assert_eq!(settings.get("on"), Some("true"));
        assert_eq!(settings.get("list"), Some("[\"a\",\"b\"]"));
        assert_eq!(settings.get("missing"), None);
    }

    #[test]
    fn limits_override_the_host_defaults_only_where_set() {
        let manifest = Manifest::parse("[limits]\nmemory_mib = 8\n", Path::new("p.toml")).unwrap();
        assert_eq!(manifest.limits.memory_mib, Some(8));
        assert_eq!(manifest.limits.deadline_ms, None);
        let err = Manifest::parse("[limits]\ntables = 3\n", Path::new("p.toml")).unwrap_err();
        assert!(err.contains("tables"), "{err}");
    }

    #[test]
    fn unknown_section_names_the_file() {
        let err = Manifest::parse("[permissions]\n", Path::new("dir/p.toml")).unwrap_err();
        assert!(
            err.contains("dir/p.toml") && err.contains("grants"),
            "{err}"
        );
    }

    #[test]
    fn key_subscriptions_take_events_and_a_database() {
        let manifest = Manifest::parse(
            "[subscriptions]\nkeys = [\"user:*\"]\nevents = [\"del\"]\ndatabase = 2\n",
            Path::new("p.toml"),
        )
        .unwrap();
        let subscriptions = manifest.subscriptions.unwrap();
        assert_eq!(subscriptions.keys, ["user:*"]);
        assert_eq!(
            subscriptions.events.as_deref(),
            Some(&["del".to_owned()][..])
        );
        assert_eq!(subscriptions.database, Some(2));
        let err =
            Manifest::parse("[subscriptions]\ndatabase = -1\n", Path::new("p.toml")).unwrap_err();
        assert!(err.contains("database"), "{err}");

        let keys = subscriptions.key_subscriptions(0).unwrap();
        assert_eq!(keys[0].pattern().as_ref(), b"__keyspace@2__:user:*");
        assert!(keys[0].events.admits(b"del") && !keys[0].events.admits(b"set"));
    }

    #[test]
    fn key_subscriptions_default_to_every_event_in_the_urls_database() {
        let manifest =
            Manifest::parse("[subscriptions]\nkeys = [\"a:*\"]\n", Path::new("p.toml")).unwrap();
        let keys = manifest
            .subscriptions
            .unwrap()
            .key_subscriptions(5)
            .unwrap();
        assert_eq!(keys[0].database, 5);
        assert_eq!(keys[0].events, Events::all());
    }

    #[test]
    fn key_subscription_problems_name_the_field() {
        let problems = |text: &str| {
            let manifest = Manifest::parse(text, Path::new("p.toml")).unwrap();
            manifest
                .subscriptions
                .unwrap()
                .key_subscriptions(0)
                .unwrap_err()
                .into_iter()
                .map(|(key, problem)| {
                    assert!(problem.starts_with(key), "{problem}");
                    key
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            problems("[subscriptions]\nkeys = [\"a\"]\nevents = [\"sett\"]\n"),
            ["subscriptions.events"]
        );
        assert_eq!(
            problems("[subscriptions]\nchannels = [\"c\"]\nevents = [\"del\"]\ndatabase = 1\n"),
            ["subscriptions.events", "subscriptions.database"]
        );
        assert_eq!(
            problems("[subscriptions]\nkeys = [\"\"]\n"),
            ["subscriptions.keys"]
        );
        assert_eq!(
            problems("[subscriptions]\nkeys = [\"u:*\"]\npatterns = [\"__keyspace@0__:u:*\"]\n"),
            ["subscriptions.keys"]
        );
    }

    #[test]
    fn concurrency_is_a_limit_and_absent_by_default() {
        let manifest = Manifest::parse("[limits]\nconcurrency = 4\n", Path::new("p.toml")).unwrap();
        assert_eq!(manifest.limits.concurrency, Some(4));
        let manifest = Manifest::parse("", Path::new("p.toml")).unwrap();
        assert_eq!(manifest.limits.concurrency, None);
        let err = Manifest::parse("[limits]\nconcurrency = -1\n", Path::new("p.toml")).unwrap_err();
        assert!(err.contains("concurrency"), "{err}");
    }

    #[test]
    fn a_manifest_from_outside_the_folder_is_never_quoted() {
        let secret = "password = \"hunter2\"\n";
        let err = Manifest::parse_disclosing(secret, Path::new("p.toml"), Disclosure::PositionOnly)
            .unwrap_err();
        assert!(
            !err.contains("hunter2") && !err.contains("password"),
            "{err}"
        );
        assert!(err.contains("p.toml") && err.contains("line 1"), "{err}");

        let typed = "[limits]\ndeadline_ms = \"s3cr3t\"\n";
        let err = Manifest::parse_disclosing(typed, Path::new("p.toml"), Disclosure::PositionOnly)
            .unwrap_err();
        assert!(!err.contains("s3cr3t"), "{err}");
        assert!(err.contains("line 2, column 15"), "{err}");

        let not_toml = "root:$6$salt$hash:19000:0:99999:7:::\n";
        let err =
            Manifest::parse_disclosing(not_toml, Path::new("p.toml"), Disclosure::PositionOnly)
                .unwrap_err();
        assert!(!err.contains("salt") && !err.contains("root"), "{err}");

        // In the folder the line at fault is shown, as operators need it.
        let err = Manifest::parse(typed, Path::new("p.toml")).unwrap_err();
        assert!(err.contains("s3cr3t"), "{err}");
    }
}
