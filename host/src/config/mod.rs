//! The host's configuration: one TOML file, overridden by command-line flags.
//!
//! Everything is resolved and validated here, before any task starts, so that a mistake is
//! reported once, naming the key and the file, instead of surfacing as a runtime failure.
//! Unknown keys are errors.
//!
//! This module holds the root [`Config`], its loading, the validation driver and the helpers
//! the sections share ([`expand_env`], [`mask_url`]). Each section of the file has a module
//! of its own, whose public types are re-exported here: `redis`, `plugins` (with the
//! `[grants.PLUGIN]` tables), `streams`, `outputs`, `effects`, `invalidation`, `gateway` and
//! `admin`; `env` maps `SWITCHYARD_<SECTION>_<KEY>` variables onto keys. Configuration is a
//! leaf: it reads no stage of the host.

mod admin;
mod effects;
mod env;
mod gateway;
mod invalidation;
mod outputs;
mod plugins;
mod redis;
mod streams;
mod traces;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

pub use admin::{AdminConfig, DEFAULT_ADMIN_ADDR};
pub use effects::{EffectsConfig, MIN_OUTGOING_BYTES};
pub use env::ENV_PREFIX;
pub use gateway::{GatewayConfig, GatewayToken, SlowClients};
pub use invalidation::InvalidationConfig;
pub use outputs::{
    HttpMethod, MAX_REPLY_BYTES_LIMIT, MIN_OUTPUT_RESERVE, OUTPUT_RESERVE_PERCENT, OutputConfig,
    output_budget,
};
pub use plugins::{
    BreakerPolicy, DEFAULT_DESCRIBE_DEADLINE_MS, DEFAULT_PLUGINS_DIR, DEFAULT_QUEUE_BYTES_TOTAL,
    GrantsConfig, MAX_WASM_MIB, MIN_QUEUE_BYTES, PluginsConfig, Policy, WhenFull,
};
pub use redis::{DEFAULT_REDIS_URL, RedisConfig, RedisUrl};
pub use streams::{StartFrom, StreamOverride, StreamSettings, StreamsConfig, default_consumer};
pub use traces::{OtlpProtocol, TracingConfig, TracingSettings};

use env::{ENV_KEYS, EnvType, env_value, misspelt_env_key, redact, set};
use outputs::check_output_tables;

/// The whole configuration of a host.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The Redis server messages come from and plugins publish to.
    #[serde(default)]
    pub redis: RedisConfig,
    /// The plugins folder and how plugins run.
    #[serde(default)]
    pub plugins: PluginsConfig,
    /// The admin HTTP endpoint.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Named outputs plugins may call (`[outputs.NAME]`).
    #[serde(default)]
    pub outputs: BTreeMap<String, OutputConfig>,
    /// What each plugin may do (`[grants.PLUGIN]`), added to its own `NAME.toml` grants.
    #[serde(default)]
    pub grants: BTreeMap<String, GrantsConfig>,
    /// Cache invalidation.
    #[serde(default)]
    pub invalidation: InvalidationConfig,
    /// What plugins' effects may hold in the host.
    #[serde(default)]
    pub effects: EffectsConfig,
    /// How stream subscriptions are read.
    #[serde(default)]
    pub streams: StreamsConfig,
    /// The browser gateway (off unless `listen` is set).
    #[serde(default)]
    pub gateway: GatewayConfig,
    /// OpenTelemetry trace export (off unless an OTLP endpoint is set).
    #[serde(default)]
    pub tracing: TracingConfig,
}

/// A configuration that could not be used, with every problem found.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .problems.join("\n  - "))]
pub struct ConfigError {
    /// One line per problem, each naming the key and, when there is one, the file.
    pub problems: Vec<String>,
}

impl ConfigError {
    fn one(problem: String) -> Self {
        Self {
            problems: vec![problem],
        }
    }
}

impl Config {
    /// The configuration from `file` (or the defaults), overridden by the environment `env`:
    /// `REDIS_URL`, or `REDIS_HOST` (and `REDIS_PORT`), as Redis deployments set them, then
    /// `SWITCHYARD_<SECTION>_<KEY>` for every key of `[redis]`, `[plugins]`, `[admin]`,
    /// `[invalidation]`, `[streams]` and `[gateway]` (but its `tokens`), and the standard
    /// `OTEL_*` variables for what `[tracing]` leaves unset
    /// (`SWITCHYARD_PLUGINS_QUEUE_CAPACITY=8192`); a variable naming one of these sections
    /// but none of its keys is logged as ignored. Values of string-typed
    /// keys are text as they are; the others are read as TOML when they parse as such
    /// (numbers, booleans, arrays) and as text otherwise. Errors never repeat the value of a
    /// secret (`redis.url`, `gateway.hmac_secret`) set this way.
    ///
    /// Logs a warning for each [`Config::output_warnings`].
    pub fn load(file: Option<&Path>, env: &[(String, String)]) -> Result<Self, ConfigError> {
        let (text, origin) = match file {
            Some(path) => (
                std::fs::read_to_string(path).map_err(|e| {
                    ConfigError::one(format!("{}: cannot read: {e}", path.display()))
                })?,
                path.display().to_string(),
            ),
            None => (String::new(), "defaults".to_owned()),
        };
        let mut table: toml::Table = toml::from_str(&text)
            .map_err(|e| ConfigError::one(format!("{origin}: {}", e.to_string().trim_end())))?;
        let var = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let mut overrides = Vec::new();
        let mut secrets = Vec::new();
        let conventional = var("REDIS_URL").map(|url| ("REDIS_URL", url)).or_else(|| {
            var("REDIS_HOST").map(|host| {
                // A Kubernetes Service named `redis` sets REDIS_PORT=tcp://IP:PORT.
                let port = var("REDIS_PORT")
                    .map(|port| port.rsplit(':').next().unwrap_or_default().to_owned())
                    .filter(|port| !port.is_empty())
                    .unwrap_or_else(|| "6379".to_owned());
                ("REDIS_HOST/REDIS_PORT", format!("redis://{host}:{port}"))
            })
        });
        if let Some((source, url)) = conventional {
            secrets.push(url.clone());
            set(&mut table, "redis", "url", toml::Value::String(url));
            overrides.push(format!("redis.url from {source}"));
        }
        for (name, value) in env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let rest = rest.to_lowercase();
            let Some((section, key, kind)) = ENV_KEYS.iter().find_map(|(section, keys)| {
                let key = rest.strip_prefix(section)?.strip_prefix('_')?;
                let (key, kind) = keys.iter().find(|(known, _)| *known == key)?;
                Some((*section, *key, *kind))
            }) else {
                if let Some(near) = misspelt_env_key(&rest) {
                    tracing::warn!("{name} is ignored: {near}");
                }
                continue;
            };
            if kind == EnvType::Secret {
                secrets.push(value.clone());
            }
            set(&mut table, section, key, env_value(value, kind));
            overrides.push(format!("{section}.{key} from {name}"));
        }
        let origin = if overrides.is_empty() {
            origin
        } else {
            format!("{origin} with {}", overrides.join(", "))
        };
        let secret_free = |error: ConfigError| ConfigError {
            problems: redact(error.problems, &secrets),
        };
        let shape = check_output_tables(&table, &origin);
        if !shape.is_empty() {
            return Err(secret_free(ConfigError { problems: shape }));
        }
        let mut config: Config = table.try_into().map_err(|e: toml::de::Error| {
            secret_free(ConfigError::one(format!(
                "{origin}: {}",
                e.to_string().trim_end()
            )))
        })?;
        config.tracing.resolve(env);
        config.validate(&origin).map_err(secret_free)?;
        config.warn_about_outputs();
        Ok(config)
    }

    /// Logs each of [`Config::output_warnings`].
    fn warn_about_outputs(&self) {
        for (output, warning) in self.output_warnings() {
            tracing::warn!(output, "{warning}");
        }
    }

    /// Outputs whose settings defeat themselves, by name: an `http` output with `retries`
    /// whose first backoff alone (`backoff_ms`) is as long as what a plugin's default deadline
    /// leaves for output calls ([`output_budget`] of `plugins.deadline_ms`), so that no retry is
    /// ever made, even after an attempt that fails at once. (A slow attempt is cut short by the
    /// deadline anyway; that is the deadline's job, not a misconfiguration.)
    ///
    /// [`output_budget`]: output_budget
    pub fn output_warnings(&self) -> Vec<(String, String)> {
        let budget = output_budget(self.deadline());
        let mut warnings = Vec::new();
        for (name, output) in &self.outputs {
            let OutputConfig::Http {
                retries,
                backoff_ms,
                ..
            } = output
            else {
                continue;
            };
            if *retries > 0 && Duration::from_millis(*backoff_ms) >= budget {
                warnings.push((
                    name.clone(),
                    format!(
                        "output {name}: retries = {retries} are never made under the default deadline: \
                         backoff_ms = {backoff_ms} is not shorter than the {} ms that plugins.deadline_ms = {} \
                         leaves for output calls; raise the deadline of the plugins that call it \
                         ([limits] deadline_ms in their manifests) or lower backoff_ms",
                        budget.as_millis(),
                        self.plugins.deadline_ms
                    ),
                ));
            }
        }
        warnings
    }

    /// Reads and validates a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::one(format!("{}: cannot read: {e}", path.display())))?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        // Output tables first: serde's messages for a tagged enum name neither the output
        // nor the key.
        if let Ok(table) = toml::from_str::<toml::Table>(text) {
            let shape = check_output_tables(&table, origin);
            if !shape.is_empty() {
                return Err(ConfigError { problems: shape });
            }
        }
        let config: Config = toml::from_str(text)
            .map_err(|e| ConfigError::one(format!("{origin}: {}", e.to_string().trim_end())))?;
        config.validate(origin)?;
        Ok(config)
    }

    /// Checks what types alone cannot, returning every problem at once: each section its own
    /// keys, then what spans sections (the outputs that grants name).
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        self.redis.check(origin, &mut problems);
        self.plugins.check(origin, &mut problems);
        self.gateway.check(origin, &mut problems);
        self.streams.check(origin, &mut problems);
        self.tracing.check(origin, &mut problems);
        self.effects.check(origin, &self.plugins, &mut problems);
        for (name, output) in &self.outputs {
            for (key, problem) in output.check() {
                problems.push(format!("{origin}: outputs.{name}.{key}: {problem}"));
            }
        }
        for (plugin, grants) in &self.grants {
            for output in &grants.outputs {
                if !self.outputs.contains_key(output) {
                    problems.push(format!(
                        "{origin}: grants.{plugin}.outputs: output {output:?} is not defined (no [outputs.{output}])"
                    ));
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems })
        }
    }

    /// The per-call deadline.
    pub fn deadline(&self) -> Duration {
        Duration::from_millis(self.plugins.deadline_ms)
    }

    /// How long instantiation and `describe` of a new plugin version may take together.
    pub fn describe_deadline(&self) -> Duration {
        Duration::from_millis(self.plugins.describe_deadline_ms)
    }

    /// The circuit breaker's settings.
    pub fn breaker(&self) -> BreakerPolicy {
        BreakerPolicy {
            failures: self.plugins.breaker_failures,
            window: self.plugins.breaker_window,
            backoff: Duration::from_millis(self.plugins.breaker_backoff_ms),
        }
    }

    /// The bytes all plugins' queues may hold together: `plugins.queue_bytes_total`, or a
    /// quarter of the memory limit of the host's cgroup, or [`DEFAULT_QUEUE_BYTES_TOTAL`].
    pub fn queue_bytes_total(&self) -> u64 {
        self.plugins.queue_bytes_total.unwrap_or_else(|| {
            cgroup_memory_limit()
                .map_or(DEFAULT_QUEUE_BYTES_TOTAL, |limit| limit / 4)
                .max(MIN_QUEUE_BYTES)
        })
    }

    /// How long the plugins folder must be quiet before a reload.
    pub fn settle(&self) -> Duration {
        Duration::from_millis(self.plugins.settle_ms)
    }
}

/// The memory limit of the host's cgroup (v2 `memory.max`, else v1
/// `memory.limit_in_bytes`), if it has one: in a container, what it may use before it is
/// killed.
fn cgroup_memory_limit() -> Option<u64> {
    const FILES: [&str; 2] = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ];
    // v1 reports "no limit" as a number near 2^63; anything above 1 PiB is no limit.
    const NO_LIMIT: u64 = 1 << 50;
    FILES.iter().find_map(|file| {
        let text = std::fs::read_to_string(file).ok()?;
        text.trim()
            .parse::<u64>()
            .ok()
            .filter(|limit| *limit < NO_LIMIT)
    })
}

/// `url` with its credentials replaced by `***`: the password of the userinfo (the whole
/// userinfo for schemes other than Redis's, where a lone user name is often a token), and
/// the value of every query-string parameter (webhooks take `?token=`, Redis socket URLs
/// `?pass=`). Text that is not a URL comes back unchanged.
///
/// Redis passwords are often written unencoded, with `/`, `?`, `#` or `@` in them, so for
/// Redis URLs the userinfo runs to the last `@`. For other URLs it ends with the authority,
/// since their query strings often carry an `@` (`?to=ops@example.com`).
pub fn mask_url(url: &str) -> String {
    let Some(scheme_len) = url.find("://") else {
        return url.to_owned();
    };
    let scheme = &url[..scheme_len];
    if scheme.is_empty()
        || !scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    {
        return url.to_owned();
    }
    let rest = &url[scheme_len + 3..];
    let redis = scheme.starts_with("redis");
    let at = if redis {
        rest.rfind('@')
    } else {
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        rest[..authority_end].rfind('@')
    };
    let mut out = String::with_capacity(url.len());
    out.push_str(&url[..scheme_len + 3]);
    let location = match at {
        Some(at) => {
            match rest[..at].split_once(':') {
                // A Redis ACL user name says which account, and is no secret.
                Some((user, _)) if redis => {
                    out.push_str(user);
                    out.push_str(":***");
                }
                _ => out.push_str("***"),
            }
            &rest[at..]
        }
        None => rest,
    };
    let (before_fragment, fragment) =
        location.split_at(location.find('#').unwrap_or(location.len()));
    match before_fragment.split_once('?') {
        Some((path, query)) => {
            out.push_str(path);
            out.push('?');
            let masked: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((key, _)) => format!("{key}=***"),
                    None if pair.is_empty() => String::new(),
                    None => "***".to_owned(),
                })
                .collect();
            out.push_str(&masked.join("&"));
        }
        None => out.push_str(before_fragment),
    }
    out.push_str(fragment);
    out
}

/// Replaces every `${VAR}` in `text` with the environment variable's value.
pub fn expand_env(text: &str) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unterminated ${{ in {text:?}"))?;
        let name = &after[..end];
        let value =
            std::env::var(name).map_err(|_| format!("environment variable {name} is not set"))?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn empty_file_gives_defaults() {
        let config = Config::from_toml("", "test.toml").unwrap();
        assert_eq!(config.redis.url.expose(), DEFAULT_REDIS_URL);
        assert_eq!(config.admin.listen.to_string(), DEFAULT_ADMIN_ADDR);
        assert_eq!(config.plugins.dir, PathBuf::from("plugins"));
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml("[redis]\nurl = \"redis://x\"\nport = 1\n", "a.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("a.toml"), "{err}");
        assert!(err.contains("unknown field `port`"), "{err}");
    }

    #[test]
    fn wrong_type_is_named() {
        let err = Config::from_toml("[plugins]\nqueue_capacity = \"big\"\n", "b.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("queue_capacity"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let err = Config::from_toml(
            "[redis]\nurl = \"http://nope\"\n[plugins]\nqueue_capacity = 0\nmemory_mib = 0\n",
            "c.toml",
        )
        .unwrap_err();
        assert_eq!(err.problems.len(), 3, "{err}");
    }

    #[test]
    fn outputs_and_grants_are_checked_together() {
        let text = r#"
[outputs.email]
kind = "http"
url = "http://127.0.0.1:8025/email"
headers = { Authorization = "Bearer x" }

[outputs.audit]
kind = "file"
path = "/tmp/audit.jsonl"

[outputs.console]
kind = "stdout"

[outputs.mirror]
kind = "redis"
url = "redis://127.0.0.1:6380"
channel = "mirror"

[grants.notify-router]
publish = ["notifications:dead"]
outputs = ["email", "audit"]
"#;
        let config = Config::from_toml(text, "ok.toml").unwrap();
        assert_eq!(config.outputs.len(), 4);
        assert_eq!(config.grants["notify-router"].outputs, ["email", "audit"]);
        assert_eq!(config.plugins.policy, Policy::Deny);
    }

    #[test]
    fn undefined_output_in_a_grant_is_named() {
        let err = Config::from_toml("[grants.p]\noutputs = [\"sms\"]\n", "g.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("grants.p.outputs") && err.contains("\"sms\""),
            "{err}"
        );
    }

    #[test]
    fn unknown_output_field_and_bad_policy_are_errors() {
        assert!(
            Config::from_toml("[outputs.x]\nkind = \"stdout\"\nurl = \"y\"\n", "f.toml").is_err()
        );
        let err = Config::from_toml("[plugins]\npolicy = \"allow-all\"\n", "p.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("allow-all"), "{err}");
    }

    #[test]
    fn env_references_expand() {
        // SAFETY: tests in this module do not read this variable concurrently.
        unsafe { std::env::set_var("SWITCHYARD_TEST_TOKEN", "t0k") };
        assert_eq!(
            expand_env("Bearer ${SWITCHYARD_TEST_TOKEN}!").unwrap(),
            "Bearer t0k!"
        );
        assert_eq!(expand_env("plain").unwrap(), "plain");
        assert!(expand_env("${UNTERMINATED").is_err());
    }

    pub(super) fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn the_environment_overrides_the_file_and_names_itself_in_errors() {
        let config = Config::load(
            None,
            &env(&[
                ("REDIS_HOST", "cache"),
                ("REDIS_PORT", "6380"),
                ("SWITCHYARD_PLUGINS_QUEUE_CAPACITY", "8192"),
                ("SWITCHYARD_PLUGINS_DIR", "/plugins"),
                ("SWITCHYARD_ADMIN_LISTEN", "0.0.0.0:9090"),
                ("SWITCHYARD_GATEWAY_TOKEN", "not a key: ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(config.redis.url.expose(), "redis://cache:6380");
        assert_eq!(config.plugins.queue_capacity, Some(8192));
        assert_eq!(config.plugins.dir, PathBuf::from("/plugins"));
        assert_eq!(config.admin.listen.to_string(), "0.0.0.0:9090");

        let config = Config::load(
            None,
            &env(&[
                ("REDIS_URL", "redis://a:1"),
                ("SWITCHYARD_REDIS_URL", "redis://b:2"),
            ]),
        )
        .unwrap();
        assert_eq!(config.redis.url.expose(), "redis://b:2", "SWITCHYARD_ wins");

        let err = Config::load(None, &env(&[("SWITCHYARD_PLUGINS_QUEUE_CAPACITY", "lots")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("SWITCHYARD_PLUGINS_QUEUE_CAPACITY"), "{err}");
        // Kubernetes service links and other unrelated variables are left alone.
        let config = Config::load(
            None,
            &env(&[
                ("SWITCHYARD_ADMIN_PORT", "tcp://10.0.0.7:9090"),
                ("SWITCHYARD_PLUGINS_SERVICE_HOST", "10.0.0.8"),
                ("REDIS_HOST", "redis"),
                ("REDIS_PORT", "tcp://10.0.0.9:6379"),
            ]),
        )
        .unwrap();
        assert_eq!(config.redis.url.expose(), "redis://redis:6379");
    }

    #[test]
    fn unencoded_redis_passwords_are_masked_whatever_they_hold() {
        for (url, shown) in [
            ("redis://:ab/cd@h:6379", "redis://:***@h:6379"),
            ("redis://:p#ss@h", "redis://:***@h"),
            ("redis://:p?ss@h/0", "redis://:***@h/0"),
            ("rediss://app:a@b/c=@h:6380", "rediss://app:***@h:6380"),
        ] {
            assert_eq!(mask_url(url), shown, "{url}");
        }
        // Not a URL where it looks like one: returned as it is, never a panic.
        assert_eq!(mask_url("a?b://c"), "a?b://c");
        assert_eq!(mask_url("#://x"), "#://x");
        assert_eq!(mask_url("://x"), "://x");
    }

    #[test]
    fn webhook_urls_are_masked_in_userinfo_and_query() {
        assert_eq!(
            mask_url("https://user:pw@hooks.example/send?token=abc&v=1#top"),
            "https://***@hooks.example/send?token=***&v=***#top"
        );
        assert_eq!(
            mask_url("https://t0ken@hooks.example/"),
            "https://***@hooks.example/"
        );
        assert_eq!(
            mask_url("http://hooks.example/send?s3cret"),
            "http://hooks.example/send?***"
        );
        assert_eq!(
            mask_url("http://hooks.example:8080/send"),
            "http://hooks.example:8080/send"
        );
        // A `@` or `/` in the query is not mistaken for userinfo or a path.
        assert_eq!(
            mask_url("https://h.example/x?to=a@b/c"),
            "https://h.example/x?to=***"
        );
        // `config check` prints webhook URLs through `RedisUrl::masked`.
        let hidden = RedisUrl::new("https://bot:hunter2@h.example/?key=s3cret").masked();
        assert!(
            !hidden.contains("hunter2") && !hidden.contains("s3cret") && !hidden.contains("bot"),
            "{hidden}"
        );
    }

    #[test]
    fn string_settings_from_the_environment_stay_strings() {
        let config = Config::load(
            None,
            &env(&[
                ("SWITCHYARD_GATEWAY_HMAC_SECRET", "1234567890123456"),
                ("SWITCHYARD_INVALIDATION_BROADCAST", "42"),
                ("SWITCHYARD_STREAMS_CONSUMER", "7"),
                ("SWITCHYARD_PLUGINS_DIR", "2024"),
                ("SWITCHYARD_PLUGINS_DEADLINE_MS", "250"),
                ("SWITCHYARD_GATEWAY_PAGES", "false"),
            ]),
        )
        .unwrap();
        assert_eq!(
            config.gateway.hmac_secret.as_deref(),
            Some("1234567890123456")
        );
        assert_eq!(config.invalidation.broadcast, "42");
        assert_eq!(config.streams.consumer.as_deref(), Some("7"));
        assert_eq!(config.plugins.dir, PathBuf::from("2024"));
        assert_eq!(config.plugins.deadline_ms, 250);
        assert!(!config.gateway.pages);
    }

    #[test]
    fn errors_never_repeat_secrets_from_the_environment() {
        let err = Config::load(None, &env(&[("SWITCHYARD_GATEWAY_HMAC_SECRET", "98765")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("gateway.hmac_secret"), "{err}");
        assert!(!err.contains("98765"), "{err}");
        let err = Config::load(
            None,
            &env(&[("SWITCHYARD_REDIS_URL", "http://admin:pa55word@cache:6379")]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("redis.url"), "{err}");
        assert!(!err.contains("pa55word"), "{err}");
        // Whatever quotes a secret's value, it is blanked before anyone sees it.
        assert_eq!(
            redact(
                vec!["invalid type: integer `98765`, expected a string".to_owned()],
                &["98765".to_owned(), String::new()]
            ),
            ["invalid type: integer `***`, expected a string"]
        );
    }

    #[test]
    fn outputs_whose_retries_cannot_fit_the_default_deadline_are_warned_about() {
        let config = Config::from_toml(
            "[plugins]\ndeadline_ms = 1000\n\
             [outputs.fits]\nkind = \"http\"\nurl = \"http://h/\"\ntimeout_ms = 250\nretries = 1\n\
             [outputs.once]\nkind = \"http\"\nurl = \"http://h/\"\nretries = 0\nbackoff_ms = 5000\n\
             [outputs.never]\nkind = \"http\"\nurl = \"http://h/\"\nbackoff_ms = 900\n\
             [outputs.log]\nkind = \"stdout\"\n",
            "w.toml",
        )
        .unwrap();
        let warnings = config.output_warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(warnings[0].0, "never");
        assert!(
            warnings[0].1.contains("output never") && warnings[0].1.contains("900 ms"),
            "{warnings:?}"
        );
    }
}
