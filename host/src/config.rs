//! The host's configuration: one TOML file, overridden by command-line flags.
//!
//! Everything is resolved and validated here, before any task starts, so that a mistake is
//! reported once, naming the key and the file, instead of surfacing as a runtime failure.
//! Unknown keys are errors.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Where to find Redis when nothing says otherwise.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
/// The admin HTTP listener: loopback only unless the operator opens it.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:9090";
/// The plugins folder, relative to the working directory.
pub const DEFAULT_PLUGINS_DIR: &str = "plugins";

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
}

/// `[redis]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`.
    #[serde(default = "default_redis_url")]
    pub url: RedisUrl,
}

/// `[plugins]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginsConfig {
    /// The folder watched for `NAME.wasm` (and optional `NAME.toml`) files.
    #[serde(default = "default_plugins_dir")]
    pub dir: PathBuf,
    /// Messages waiting per plugin before that plugin sheds new ones.
    #[serde(default = "default_queue_capacity")]
    pub queue_capacity: usize,
    /// Wall-clock limit of one `handle` or `describe` call, in milliseconds.
    #[serde(default = "default_deadline_ms")]
    pub deadline_ms: u64,
    /// Linear-memory cap of one plugin instance, in MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// How long the folder must be quiet before changes are loaded, in milliseconds.
    #[serde(default = "default_settle_ms")]
    pub settle_ms: u64,
}

/// `[admin]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin HTTP listener (`/healthz`, `/readyz`, `/plugins`).
    #[serde(default = "default_admin_addr")]
    pub listen: SocketAddr,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: default_redis_url(),
        }
    }
}

impl Default for PluginsConfig {
    fn default() -> Self {
        Self {
            dir: default_plugins_dir(),
            queue_capacity: default_queue_capacity(),
            deadline_ms: default_deadline_ms(),
            memory_mib: default_memory_mib(),
            settle_ms: default_settle_ms(),
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_admin_addr(),
        }
    }
}

fn default_redis_url() -> RedisUrl {
    RedisUrl(DEFAULT_REDIS_URL.to_owned())
}

fn default_plugins_dir() -> PathBuf {
    PathBuf::from(DEFAULT_PLUGINS_DIR)
}

/// Enough to absorb a burst of a few milliseconds at full speed without letting one stuck
/// plugin hold much memory.
fn default_queue_capacity() -> usize {
    4096
}

fn default_deadline_ms() -> u64 {
    100
}

fn default_memory_mib() -> u64 {
    64
}

/// Long enough for `cp` of a multi-megabyte file to finish its writes, short enough that a
/// deploy by atomic rename is live well within a second.
fn default_settle_ms() -> u64 {
    50
}

fn default_admin_addr() -> SocketAddr {
    DEFAULT_ADMIN_ADDR
        .parse()
        .expect("the default admin address is valid")
}

/// A Redis URL; its `Debug` and `Display` hide the password.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct RedisUrl(String);

impl RedisUrl {
    /// Wraps a URL given on the command line.
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL with its secret, for the Redis client only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any password replaced by `***`.
    pub fn masked(&self) -> String {
        let url = &self.0;
        let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
            return url.clone();
        };
        let authority_end = url[scheme_end..]
            .find('/')
            .map_or(url.len(), |i| scheme_end + i);
        match url[scheme_end..authority_end].rfind('@') {
            Some(at) => {
                let userinfo = &url[scheme_end..scheme_end + at];
                let user = userinfo.split(':').next().unwrap_or_default();
                let masked = if userinfo.contains(':') {
                    format!("{user}:***")
                } else {
                    "***".to_owned()
                };
                format!("{}{masked}{}", &url[..scheme_end], &url[scheme_end + at..])
            }
            None => url.clone(),
        }
    }
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.masked())
    }
}

impl std::fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.masked())
    }
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
    /// Reads and validates a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::one(format!("{}: cannot read: {e}", path.display())))?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text)
            .map_err(|e| ConfigError::one(format!("{origin}: {}", e.to_string().trim_end())))?;
        config.validate(origin)?;
        Ok(config)
    }

    /// Checks what types alone cannot, returning every problem at once.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let url = self.redis.url.expose();
        if let Err(e) = redis::Client::open(url) {
            problems.push(format!(
                "{origin}: redis.url {}: not a usable Redis URL: {e}",
                self.redis.url
            ));
        }
        if self.plugins.queue_capacity == 0 {
            problems.push(format!(
                "{origin}: plugins.queue_capacity must be at least 1"
            ));
        }
        if self.plugins.deadline_ms == 0 {
            problems.push(format!("{origin}: plugins.deadline_ms must be at least 1"));
        }
        if self.plugins.memory_mib == 0 || self.plugins.memory_mib > 4096 {
            problems.push(format!(
                "{origin}: plugins.memory_mib must be between 1 and 4096 (a 32-bit Wasm memory), got {}",
                self.plugins.memory_mib
            ));
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

    /// How long the plugins folder must be quiet before a reload.
    pub fn settle(&self) -> Duration {
        Duration::from_millis(self.plugins.settle_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn password_is_masked() {
        let url = RedisUrl::new("redis://app:s3cret@cache:6379/2");
        assert_eq!(url.masked(), "redis://app:***@cache:6379/2");
        assert!(!format!("{url:?}").contains("s3cret"));
        assert_eq!(
            RedisUrl::new("redis://:s3cret@cache").masked(),
            "redis://:***@cache"
        );
        assert_eq!(RedisUrl::new("redis://cache:1").masked(), "redis://cache:1");
    }
}
