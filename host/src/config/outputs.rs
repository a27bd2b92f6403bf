//! `[outputs.NAME]`: where `call-output` sends a payload (a webhook, a file, standard
//! output, another Redis), the shape check of these tables, and [`output_budget`], the time
//! an output call may take out of the calling plugin's deadline.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::{expand_env, mask_url};

/// `[outputs.NAME]`: where `call-output(NAME, payload)` sends the payload. String values may
/// reference environment variables as `${VAR}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum OutputConfig {
    /// An HTTP webhook.
    Http {
        /// `http://` or `https://` URL.
        url: String,
        /// `POST` (default) or `PUT`.
        #[serde(default)]
        method: HttpMethod,
        /// Extra request headers.
        #[serde(default)]
        headers: BTreeMap<String, String>,
        /// Timeout of one attempt, in milliseconds.
        #[serde(default = "default_http_timeout_ms")]
        timeout_ms: u64,
        /// Further attempts after a connection error or a 5xx answer.
        #[serde(default = "default_http_retries")]
        retries: u32,
        /// Wait before the first retry, doubled for each further one, in milliseconds.
        #[serde(default = "default_http_backoff_ms")]
        backoff_ms: u64,
        /// The longest reply body handed back to the plugin, in bytes: the body is read as
        /// it arrives and the connection dropped once this much is in.
        #[serde(default = "default_max_reply_bytes")]
        max_reply_bytes: u64,
    },
    /// Appends one JSON line per call to a file.
    File {
        /// The file; created if missing.
        path: String,
    },
    /// Writes one JSON line per call to the host's standard output.
    Stdout {},
    /// Publishes on a channel of another Redis server.
    Redis {
        /// `redis://` or `rediss://` URL of that server.
        url: String,
        /// The channel to publish on.
        channel: String,
    },
}

/// HTTP methods a webhook may use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    /// `POST`
    #[default]
    Post,
    /// `PUT`
    Put,
}

fn default_http_timeout_ms() -> u64 {
    5000
}

fn default_http_retries() -> u32 {
    2
}

fn default_http_backoff_ms() -> u64 {
    100
}

/// Enough for any status document or API answer a plugin acts on; the body is copied into
/// the plugin's memory (64 MiB by default), so a larger one would mostly crowd it.
fn default_max_reply_bytes() -> u64 {
    1 << 20
}

/// The largest `max_reply_bytes` accepted: the body must fit in a plugin's memory, at most
/// 4 GiB (a 32-bit Wasm memory), next to the plugin's own data.
pub const MAX_REPLY_BYTES_LIMIT: u64 = 1 << 30;

/// The keys each output kind takes, `kind` included.
const OUTPUT_KEYS: &[(&str, &[&str])] = &[
    (
        "http",
        &[
            "kind",
            "url",
            "method",
            "headers",
            "timeout_ms",
            "retries",
            "backoff_ms",
            "max_reply_bytes",
        ],
    ),
    ("file", &["kind", "path"]),
    ("stdout", &["kind"]),
    ("redis", &["kind", "url", "channel"]),
];

/// Checks the shape of every `[outputs.NAME]` table before it is deserialised: a known
/// `kind`, and only the keys that kind takes. Each problem names its key path
/// (`outputs.x.kind`); types and values are left to serde and [`Config::validate`](super::Config::validate).
pub(super) fn check_output_tables(table: &toml::Table, origin: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let Some(toml::Value::Table(outputs)) = table.get("outputs") else {
        return problems;
    };
    let kinds: Vec<&str> = OUTPUT_KEYS.iter().map(|(kind, _)| *kind).collect();
    for (name, output) in outputs {
        let toml::Value::Table(output) = output else {
            problems.push(format!("{origin}: outputs.{name}: must be a table"));
            continue;
        };
        let kind = match output.get("kind") {
            None => {
                problems.push(format!(
                    "{origin}: outputs.{name}.kind: missing (one of {})",
                    kinds.join(", ")
                ));
                continue;
            }
            Some(toml::Value::String(kind)) => kind.as_str(),
            Some(other) => {
                problems.push(format!(
                    "{origin}: outputs.{name}.kind: must be a string (one of {}), got a {}",
                    kinds.join(", "),
                    other.type_str()
                ));
                continue;
            }
        };
        let Some((_, keys)) = OUTPUT_KEYS.iter().find(|(known, _)| *known == kind) else {
            problems.push(format!(
                "{origin}: outputs.{name}.kind: unknown output kind {kind:?} (one of {})",
                kinds.join(", ")
            ));
            continue;
        };
        for key in output.keys().filter(|key| !keys.contains(&key.as_str())) {
            problems.push(format!(
                "{origin}: outputs.{name}.{key}: unknown field for a {kind} output (it takes {})",
                keys.join(", ")
            ));
        }
    }
    problems
}

impl OutputConfig {
    /// Checks values, URLs and environment references without connecting to anything;
    /// returns each problem with the key it is about. URLs are quoted masked.
    pub(super) fn check(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let mut check = |key: &str, result: Result<(), String>| {
            if let Err(problem) = result {
                problems.push((key.to_owned(), problem));
            }
        };
        match self {
            OutputConfig::Http {
                url,
                headers,
                timeout_ms,
                max_reply_bytes,
                ..
            } => {
                check(
                    "url",
                    expand_env(url).and_then(|expanded| {
                        let parsed = reqwest::Url::parse(&expanded)
                            .map_err(|e| format!("{:?} is not a valid URL: {e}", mask_url(url)))?;
                        if matches!(parsed.scheme(), "http" | "https") {
                            Ok(())
                        } else {
                            Err(format!("{:?} must be http:// or https://", mask_url(url)))
                        }
                    }),
                );
                for (header, value) in headers {
                    check(&format!("headers.{header}"), expand_env(value).map(drop));
                }
                if *timeout_ms == 0 {
                    check("timeout_ms", Err("must be at least 1".to_owned()));
                }
                if *max_reply_bytes > MAX_REPLY_BYTES_LIMIT {
                    check(
                        "max_reply_bytes",
                        Err(format!(
                            "must be at most {MAX_REPLY_BYTES_LIMIT} (the body is copied into the plugin's memory), got {max_reply_bytes}"
                        )),
                    );
                }
            }
            OutputConfig::File { path } => check("path", expand_env(path).map(drop)),
            OutputConfig::Stdout {} => {}
            OutputConfig::Redis { url, channel } => {
                check(
                    "url",
                    expand_env(url).and_then(|expanded| {
                        redis::Client::open(expanded.as_str())
                            .map(drop)
                            .map_err(|e| {
                                format!("{:?} is not a usable Redis URL: {e}", mask_url(url))
                            })
                    }),
                );
                check("channel", expand_env(channel).map(drop));
            }
        }
        problems
    }
}

/// The share of a plugin's remaining deadline an output call leaves to the plugin.
pub const OUTPUT_RESERVE_PERCENT: u32 = 10;

/// The least time an output call leaves to the plugin. The epoch interruption that enforces
/// deadlines may fire up to one epoch tick (5 ms) before the wall-clock deadline, and the
/// plugin needs a few milliseconds more to act on the outcome (publish a dead letter, log):
/// four ticks cover both with room for a busy machine.
pub const MIN_OUTPUT_RESERVE: Duration = Duration::from_millis(20);

/// How long an output call (all its attempts and backoffs) may take when the calling plugin
/// has `remaining` of its deadline left: `remaining` less the larger of
/// [`OUTPUT_RESERVE_PERCENT`] of it and [`MIN_OUTPUT_RESERVE`]. Zero when nothing would be
/// left: the call then fails at once with a timeout.
pub fn output_budget(remaining: Duration) -> Duration {
    let reserve = (remaining * OUTPUT_RESERVE_PERCENT / 100).max(MIN_OUTPUT_RESERVE);
    remaining.saturating_sub(reserve)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn output_calls_leave_the_plugin_a_share_of_its_deadline() {
        let ms = Duration::from_millis;
        assert_eq!(output_budget(ms(1000)), ms(900));
        assert_eq!(
            output_budget(ms(100)),
            ms(80),
            "at least MIN_OUTPUT_RESERVE is kept"
        );
        assert_eq!(output_budget(ms(15)), Duration::ZERO);
    }

    #[test]
    fn webhook_replies_are_capped_by_max_reply_bytes() {
        let hook = |extra: &str| {
            format!("[outputs.hook]\nkind = \"http\"\nurl = \"http://127.0.0.1:1/\"\n{extra}")
        };
        let config = Config::from_toml(&hook(""), "o.toml").unwrap();
        assert!(matches!(
            config.outputs["hook"],
            OutputConfig::Http {
                max_reply_bytes: 1_048_576,
                ..
            }
        ));
        let err = Config::from_toml(&hook("max_reply_bytes = 2147483648\n"), "o.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("outputs.hook.max_reply_bytes: must be at most"),
            "{err}"
        );
    }

    #[test]
    fn unknown_output_kind_is_named() {
        let err = Config::from_toml("[outputs.x]\nkind = \"smtp\"\n", "k.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("smtp") && err.contains("k.toml"), "{err}");
    }

    #[test]
    fn malformed_urls_and_missing_env_vars_are_named() {
        let err = Config::from_toml(
            "[outputs.a]\nkind = \"http\"\nurl = \"not a url\"\n\
             [outputs.b]\nkind = \"http\"\nurl = \"ftp://x\"\n\
             [outputs.c]\nkind = \"http\"\nurl = \"http://${SWITCHYARD_TEST_UNSET_VAR}/\"\n",
            "u.toml",
        )
        .unwrap_err();
        let text = err.to_string();
        assert_eq!(err.problems.len(), 3, "{text}");
        assert!(
            text.contains("outputs.a") && text.contains("not a valid URL"),
            "{text}"
        );
        assert!(
            text.contains("outputs.b") && text.contains("http://"),
            "{text}"
        );
        assert!(
            text.contains("SWITCHYARD_TEST_UNSET_VAR is not set"),
            "{text}"
        );
    }

    #[test]
    fn a_zero_timeout_is_rejected_naming_the_field() {
        let err = Config::from_toml(
            "[outputs.hook]\nkind = \"http\"\nurl = \"http://h.example/\"\ntimeout_ms = 0\n",
            "t.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("t.toml: outputs.hook.timeout_ms: must be at least 1"),
            "{err}"
        );
    }

    #[test]
    fn output_problems_name_their_key_path() {
        let err = Config::from_toml("[outputs.x]\nkind = \"smtp\"\n", "k.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("k.toml: outputs.x.kind:"), "{err}");
        assert!(err.contains("\"smtp\""), "{err}");

        let err = Config::from_toml("[outputs.x]\nkind = \"stdout\"\nurl = \"y\"\n", "f.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("f.toml: outputs.x.url: unknown field"),
            "{err}"
        );

        let err = Config::from_toml(
            "[outputs.m]\nkind = \"redis\"\nurl = \"mysql://u:s3cret@db\"\nchannel = \"c\"\n",
            "r.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("r.toml: outputs.m.url:"), "{err}");
        assert!(!err.contains("s3cret"), "{err}");

        let err = Config::from_toml(
            "[outputs.h]\nkind = \"http\"\nurl = \"https://u:s3cret@h.example/?key=s3cret\"\nmethod = \"GET\"\n",
            "h.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("GET"), "{err}");

        // The environment's overrides go through the same check.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.toml");
        std::fs::write(&path, "[outputs.y]\nkind = \"fax\"\n").unwrap();
        let err = Config::load(Some(&path), &[]).unwrap_err().to_string();
        assert!(err.contains("outputs.y.kind"), "{err}");
    }
}
