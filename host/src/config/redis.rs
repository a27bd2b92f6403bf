//! `[redis]`: the Redis server (or cluster) messages come from and plugins publish to, its
//! TLS files and cluster seeds, and [`RedisUrl`], the URL whose password is never shown.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::mask_url;

/// Where to find Redis when nothing says otherwise.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

/// `[redis]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`, or `rediss://` for TLS.
    #[serde(default = "default_redis_url")]
    pub url: RedisUrl,
    /// PEM file with the certificate authority that signed the server's certificate, for a
    /// `rediss://` server the system's trust store does not know (a private CA).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for servers that require one (`tls-auth-clients yes`).
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Whether `url` is a seed node of a Redis Cluster (also implied by a
    /// `redis+cluster://` or `rediss+cluster://` URL, whose host list are the seeds).
    #[serde(default)]
    pub cluster: bool,
    /// Further seed nodes of the cluster, as URLs.
    #[serde(default)]
    pub cluster_nodes: Vec<RedisUrl>,
    /// Channels (Redis glob patterns) that plugins' `publish` and `send` reach with
    /// `SPUBLISH`, besides those some loaded plugin subscribes to as sharded.
    #[serde(default)]
    pub sharded_channels: Vec<String>,
    /// How long a health-check PING of the subscriber connection may go unanswered (with
    /// nothing else arriving) before the connection is given up and made again. A server
    /// busy that long (a `SAVE`, a slow script) is treated as gone.
    #[serde(default = "default_health_timeout_ms")]
    pub health_timeout_ms: u64,
    /// Whether the host may turn on the keyspace notifications its plugins' key subscriptions
    /// need (`CONFIG SET notify-keyspace-events`, adding the missing flags to those set).
    /// Off, the host only reads the setting, and is not ready while flags are missing.
    #[serde(default)]
    pub set_keyspace_events: bool,
}

impl RedisConfig {
    /// [`RedisConfig::health_timeout_ms`].
    pub fn health_timeout(&self) -> Duration {
        Duration::from_millis(self.health_timeout_ms)
    }

    /// The database `url` selects (`/N`), 0 when it names none. For a cluster, always 0.
    pub fn database(&self) -> u32 {
        if self.cluster_seeds().is_some() {
            return 0;
        }
        redis::Client::open(self.url.expose())
            .ok()
            .and_then(|client| {
                u32::try_from(client.get_connection_info().redis_settings().db()).ok()
            })
            .unwrap_or(0)
    }

    /// Whether any TLS file is set.
    fn has_tls_files(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some()
    }

    /// A client for this server (for a cluster, its first seed node alone), with the TLS
    /// files read when the URL is `rediss://`.
    pub fn client(&self) -> anyhow::Result<redis::Client> {
        use anyhow::Context as _;

        let first_seed = self
            .cluster_seeds()
            .and_then(|seeds| seeds.into_iter().next());
        let url = first_seed.as_deref().unwrap_or(self.url.expose());
        match self.tls_certificates()? {
            None => redis::Client::open(url)
                .with_context(|| format!("redis.url {} is not a usable Redis URL", self.url)),
            Some(certificates) => {
                redis::Client::build_with_tls(url, certificates).with_context(|| {
                    format!("redis.url {} with its TLS files is not usable", self.url)
                })
            }
        }
    }

    /// The TLS files, read, if any is set.
    pub fn tls_certificates(&self) -> anyhow::Result<Option<redis::TlsCertificates>> {
        use anyhow::Context as _;

        if !self.has_tls_files() {
            return Ok(None);
        }
        let read = |key: &str, path: &Path| {
            std::fs::read(path)
                .with_context(|| format!("cannot read redis.{key} {}", path.display()))
        };
        let client_tls = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
                client_cert: read("cert_file", cert)?,
                client_key: read("key_file", key)?,
            }),
            _ => None,
        };
        let root_cert = self
            .ca_file
            .as_deref()
            .map(|path| read("ca_file", path))
            .transpose()?;
        Ok(Some(redis::TlsCertificates {
            client_tls,
            root_cert,
        }))
    }

    /// The cluster's seed node URLs, if this is a cluster: the hosts of a
    /// `redis+cluster://a:1,b:2` URL (its credentials and database apply to each), or `url`
    /// when `cluster = true`; then `cluster_nodes`.
    pub fn cluster_seeds(&self) -> Option<Vec<String>> {
        let url = self.url.expose();
        let mut seeds = Vec::new();
        let scheme = ["redis+cluster://", "rediss+cluster://"]
            .into_iter()
            .find(|scheme| url.starts_with(*scheme));
        if let Some(scheme) = scheme {
            let plain = scheme.replace("+cluster", "");
            let rest = &url[scheme.len()..];
            let (credentials, hosts) = match rest.rsplit_once('@') {
                Some((credentials, hosts)) => (format!("{credentials}@"), hosts),
                None => (String::new(), rest),
            };
            let (hosts, path) = hosts.split_at(hosts.find('/').unwrap_or(hosts.len()));
            for host in hosts.split(',').filter(|h| !h.is_empty()) {
                seeds.push(format!("{plain}{credentials}{host}{path}"));
            }
        } else if self.cluster {
            seeds.push(url.to_owned());
        } else {
            return None;
        }
        seeds.extend(self.cluster_nodes.iter().map(|u| u.expose().to_owned()));
        Some(seeds)
    }

    /// Adds to `problems` what is wrong with `[redis]`.
    pub(super) fn check(&self, origin: &str, problems: &mut Vec<String>) {
        let url = self.url.expose();
        let seeds = self.cluster_seeds();
        for seed in seeds.clone().unwrap_or_else(|| vec![url.to_owned()]) {
            if let Err(e) = redis::Client::open(seed.as_str()) {
                problems.push(format!(
                    "{origin}: redis.url {}: not a usable Redis URL: {e}",
                    RedisUrl::new(seed)
                ));
            }
        }
        if seeds.as_ref().is_some_and(Vec::is_empty) {
            problems.push(format!(
                "{origin}: redis.url: a cluster URL needs at least one host"
            ));
        }
        let tls = seeds
            .as_ref()
            .and_then(|s| s.first())
            .map_or(url, String::as_str)
            .starts_with("rediss://");
        if self.has_tls_files() && !tls {
            problems.push(format!(
                "{origin}: redis.ca_file, cert_file and key_file need a rediss:// redis.url"
            ));
        }
        if self.health_timeout_ms == 0 {
            problems.push(format!(
                "{origin}: redis.health_timeout_ms must be at least 1"
            ));
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            problems.push(format!(
                "{origin}: redis.cert_file and redis.key_file must be set together"
            ));
        }
        for (key, path) in [
            ("ca_file", &self.ca_file),
            ("cert_file", &self.cert_file),
            ("key_file", &self.key_file),
        ] {
            if let Some(path) = path.as_deref().filter(|path| !path.is_file()) {
                problems.push(format!(
                    "{origin}: redis.{key} {}: no such file",
                    path.display()
                ));
            }
        }
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: default_redis_url(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            cluster: false,
            cluster_nodes: Vec::new(),
            sharded_channels: Vec::new(),
            health_timeout_ms: default_health_timeout_ms(),
            set_keyspace_events: false,
        }
    }
}

fn default_health_timeout_ms() -> u64 {
    10_000
}

fn default_redis_url() -> RedisUrl {
    RedisUrl(DEFAULT_REDIS_URL.to_owned())
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

    /// The URL with its credentials replaced by `***` (see [`mask_url`]).
    pub fn masked(&self) -> String {
        mask_url(&self.0)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn cluster_urls_list_their_seeds_with_shared_credentials() {
        let config = Config::from_toml(
            "[redis]\nurl = \"redis+cluster://app:pw@a:7000,b:7001/0\"\ncluster_nodes = [\"redis://c:7002\"]\n",
            "c.toml",
        )
        .unwrap();
        assert_eq!(
            config.redis.cluster_seeds().unwrap(),
            [
                "redis://app:pw@a:7000/0",
                "redis://app:pw@b:7001/0",
                "redis://c:7002"
            ]
        );
        let single = Config::from_toml("[redis]\nurl = \"redis://a:1\"\n", "s.toml").unwrap();
        assert!(single.redis.cluster_seeds().is_none());
        let flagged =
            Config::from_toml("[redis]\nurl = \"redis://a:1\"\ncluster = true\n", "f.toml")
                .unwrap();
        assert_eq!(flagged.redis.cluster_seeds().unwrap(), ["redis://a:1"]);
    }

    #[test]
    fn tls_files_need_a_tls_url_and_each_other() {
        let err = Config::from_toml(
            "[redis]\nurl = \"redis://cache:6379\"\ncert_file = \"/nonexistent/client.pem\"\n",
            "c.toml",
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("need a rediss:// redis.url"), "{text}");
        assert!(text.contains("must be set together"), "{text}");
        assert!(
            text.contains("redis.cert_file /nonexistent/client.pem: no such file"),
            "{text}"
        );
        let config =
            Config::from_toml("[redis]\nurl = \"rediss://cache:6380\"\n", "c.toml").unwrap();
        assert!(config.redis.client().is_ok());
    }

    #[test]
    fn the_database_is_the_urls() {
        let config = |url: &str| {
            Config::from_toml(&format!("[redis]\nurl = {url:?}\n"), "c.toml")
                .unwrap()
                .redis
        };
        assert_eq!(config("redis://a:1/3").database(), 3);
        assert_eq!(config("redis://a:1").database(), 0);
        let keys = Config::from_toml("[redis]\nset_keyspace_events = true\n", "c.toml").unwrap();
        assert!(keys.redis.set_keyspace_events);
        let err =
            Config::from_toml("[redis]\nset_keyspace_events = \"yes\"\n", "c.toml").unwrap_err();
        assert!(err.to_string().contains("set_keyspace_events"), "{err}");
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
