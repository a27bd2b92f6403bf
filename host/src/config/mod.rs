//! The host's configuration: one TOML file, overridden by command-line flags.
//!
//! Everything is resolved and validated here, before any task starts, so that a mistake is
//! reported once, naming the key and the file, instead of surfacing as a runtime failure.
//! Unknown keys are errors.

use std::collections::BTreeMap;
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
}

/// `[gateway]`: WebSocket and Server-Sent Events for browsers, with their pages.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Address of the gateway's HTTP listener; the gateway is off when unset.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Origins (`https://app.example.com`) whose pages may connect, besides the gateway's own.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// The gateway's own origins: where browsers load its pages from (`https://gw.example.com`
    /// behind an Ingress). When unset, a page's origin counts as the gateway's own only if it
    /// names the request's `Host` by IP address or as `localhost`, which DNS rebinding cannot
    /// forge; a DNS name must be listed here (or in `allowed_origins`).
    #[serde(default)]
    pub public_origins: Vec<String>,
    /// Secret for signed tokens (`${VAR}` reads the environment); signed tokens are refused
    /// when unset.
    #[serde(default)]
    pub hmac_secret: Option<String>,
    /// Static tokens by name.
    #[serde(default)]
    pub tokens: BTreeMap<String, GatewayToken>,
    /// Messages one subscription keeps for clients that have not read them yet; a client
    /// further behind loses the oldest.
    #[serde(default = "default_client_buffer")]
    pub client_buffer: usize,
    /// Bytes (of rendered messages) one subscription keeps for clients that have not read
    /// them yet; a client further behind loses the oldest.
    #[serde(default = "default_client_buffer_bytes")]
    pub client_buffer_bytes: usize,
    /// Bytes all subscriptions together keep for clients that have not read them; beyond it,
    /// a subscription receiving a message gives up its own oldest first.
    #[serde(default = "default_buffer_bytes_total")]
    pub buffer_bytes_total: usize,
    /// Larger payloads from Redis are not sent to browsers (counted and logged).
    #[serde(default = "default_gateway_max_payload_bytes")]
    pub max_payload_bytes: usize,
    /// What a slow client gets: `drop` (the messages it cannot take, counted and announced)
    /// or `disconnect`.
    #[serde(default)]
    pub slow_clients: SlowClients,
    /// Largest WebSocket message a client may send, in bytes.
    #[serde(default = "default_gateway_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Requests (publish, subscribe) per second one connection may make; bursts of twice that.
    #[serde(default = "default_gateway_rate")]
    pub max_messages_per_sec: f64,
    /// WebSocket and SSE streams served at once; more are refused with 503.
    #[serde(default = "default_gateway_max_connections")]
    pub max_connections: usize,
    /// Connections that are not (yet) a stream at once: opened but no request yet, between
    /// requests, fetching a page. More are refused as they connect.
    #[serde(default = "default_max_pending_connections")]
    pub max_pending_connections: usize,
    /// Time a connection that is not a stream gets to send a complete request head (from
    /// opening, or from its previous response) and may leave a response unread; then it is
    /// closed.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Channels and patterns one connection may watch at once.
    #[serde(default = "default_max_subscriptions_per_connection")]
    pub max_subscriptions_per_connection: usize,
    /// Redis subscriptions (distinct channels and patterns) the gateway holds for all
    /// browsers together.
    #[serde(default = "default_gateway_max_subscriptions")]
    pub max_subscriptions: usize,
    /// Whether `/`, the dashboard and the chat pages are served.
    #[serde(default = "default_true")]
    pub pages: bool,
}

/// `[gateway.tokens.NAME]`: a static token and what it may read and write.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayToken {
    /// The token (`${VAR}` reads the environment).
    pub token: String,
    /// Channels (Redis glob patterns) the holder may receive.
    #[serde(default)]
    pub read: Vec<String>,
    /// Channels (Redis glob patterns) the holder may publish to over WebSocket.
    #[serde(default)]
    pub write: Vec<String>,
}

/// What the gateway does with a client that does not keep up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SlowClients {
    /// Drop what it cannot take, count it, and tell it how many it missed.
    #[default]
    Drop,
    /// Close its connection.
    Disconnect,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: None,
            allowed_origins: Vec::new(),
            public_origins: Vec::new(),
            hmac_secret: None,
            tokens: BTreeMap::new(),
            client_buffer: default_client_buffer(),
            client_buffer_bytes: default_client_buffer_bytes(),
            buffer_bytes_total: default_buffer_bytes_total(),
            max_payload_bytes: default_gateway_max_payload_bytes(),
            slow_clients: SlowClients::default(),
            max_message_bytes: default_gateway_max_message_bytes(),
            max_messages_per_sec: default_gateway_rate(),
            max_connections: default_gateway_max_connections(),
            max_pending_connections: default_max_pending_connections(),
            request_timeout_ms: default_request_timeout_ms(),
            max_subscriptions_per_connection: default_max_subscriptions_per_connection(),
            max_subscriptions: default_gateway_max_subscriptions(),
            pages: true,
        }
    }
}

fn default_client_buffer() -> usize {
    256
}

fn default_gateway_max_message_bytes() -> usize {
    64 << 10
}

fn default_gateway_rate() -> f64 {
    20.0
}

fn default_gateway_max_connections() -> usize {
    10_000
}

/// A ring of 256 messages of up to 16 KiB each; a larger message takes the room of several.
fn default_client_buffer_bytes() -> usize {
    4 << 20
}

/// What stalled clients may make the gateway hold, whatever the number of subscriptions.
fn default_buffer_bytes_total() -> usize {
    256 << 20
}

/// The same as `plugins.max_payload_bytes`.
fn default_gateway_max_payload_bytes() -> usize {
    1 << 20
}

/// Room for a burst of page loads (a browser opens up to six connections per page), small
/// enough that clients that never send a request hold few descriptors.
fn default_max_pending_connections() -> usize {
    1024
}

/// A browser sends its request at once; a client that has not within 10 s is not a browser
/// on a working network (nginx's `client_header_timeout` is 60 s; Go advises a few seconds).
fn default_request_timeout_ms() -> u64 {
    10_000
}

/// A dashboard or chat page watches a handful of channels.
fn default_max_subscriptions_per_connection() -> usize {
    100
}

fn default_gateway_max_subscriptions() -> usize {
    10_000
}

fn default_true() -> bool {
    true
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

/// The smallest `effects.outgoing_bytes` accepted: room for a few small messages.
pub const MIN_OUTGOING_BYTES: u64 = 4096;

/// Sets `section.key` in a parsed configuration.
fn set(table: &mut toml::Table, section: &str, key: &str, value: toml::Value) {
    let entry = table
        .entry(section)
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let toml::Value::Table(section) = entry {
        section.insert(key.to_owned(), value);
    }
}

/// How an environment variable's value is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EnvType {
    /// As text, always: for string-typed keys (URLs, paths, names, secrets), so that a value
    /// that happens to look like a number (`SWITCHYARD_GATEWAY_HMAC_SECRET=1234567890123456`)
    /// stays the string it is.
    Text,
    /// As a TOML value when it parses as one (numbers, booleans, arrays), as text otherwise.
    Toml,
    /// Text, and a secret: its value is never repeated in an error.
    Secret,
}

/// An environment value, read as its key's type says.
fn env_value(text: &str, kind: EnvType) -> toml::Value {
    let parsed = match kind {
        EnvType::Text | EnvType::Secret => None,
        EnvType::Toml => toml::from_str::<toml::Table>(&format!("v = {text}"))
            .ok()
            .and_then(|mut table| table.remove("v")),
    };
    parsed.unwrap_or_else(|| toml::Value::String(text.to_owned()))
}

/// `problems` with every occurrence of a value in `secrets` replaced by `***`.
fn redact(problems: Vec<String>, secrets: &[String]) -> Vec<String> {
    problems
        .into_iter()
        .map(|mut problem| {
            for secret in secrets.iter().filter(|secret| !secret.is_empty()) {
                problem = problem.replace(secret.as_str(), "***");
            }
            problem
        })
        .collect()
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
}

impl RedisConfig {
    /// [`RedisConfig::health_timeout_ms`].
    pub fn health_timeout(&self) -> Duration {
        Duration::from_millis(self.health_timeout_ms)
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
}

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
}

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
            ca_file: None,
            cert_file: None,
            key_file: None,
            cluster: false,
            cluster_nodes: Vec::new(),
            sharded_channels: Vec::new(),
            health_timeout_ms: default_health_timeout_ms(),
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

fn default_health_timeout_ms() -> u64 {
    10_000
}

fn default_redis_url() -> RedisUrl {
    RedisUrl(DEFAULT_REDIS_URL.to_owned())
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
fn default_drain_ms() -> u64 {
    10_000
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

/// Environment variables that override configuration keys start with this.
pub const ENV_PREFIX: &str = "SWITCHYARD_";

/// The keys the environment may set, as `SWITCHYARD_<SECTION>_<KEY>`, by section. Other
/// `SWITCHYARD_*` variables are left alone: Kubernetes defines `SWITCHYARD_ADMIN_PORT` and the
/// like for a Service named `switchyard-admin`, and such a name must not stop the host.
const ENV_KEYS: &[(&str, &[(&str, EnvType)])] = &[
    (
        "redis",
        &[
            ("url", EnvType::Secret),
            ("ca_file", EnvType::Text),
            ("cert_file", EnvType::Text),
            ("key_file", EnvType::Text),
            ("cluster", EnvType::Toml),
            ("cluster_nodes", EnvType::Toml),
            ("sharded_channels", EnvType::Toml),
            ("health_timeout_ms", EnvType::Toml),
        ],
    ),
    (
        "plugins",
        &[
            ("dir", EnvType::Text),
            ("queue_bytes", EnvType::Toml),
            ("queue_bytes_total", EnvType::Toml),
            ("queue_capacity", EnvType::Toml),
            ("deadline_ms", EnvType::Toml),
            ("describe_deadline_ms", EnvType::Toml),
            ("memory_mib", EnvType::Toml),
            ("settle_ms", EnvType::Toml),
            ("policy", EnvType::Text),
            ("when_full", EnvType::Text),
            ("breaker_failures", EnvType::Toml),
            ("breaker_window", EnvType::Toml),
            ("breaker_backoff_ms", EnvType::Toml),
            ("max_payload_bytes", EnvType::Toml),
            ("max_wasm_mib", EnvType::Toml),
            ("drain_ms", EnvType::Toml),
            ("compile_cache", EnvType::Text),
        ],
    ),
    ("admin", &[("listen", EnvType::Text)]),
    ("invalidation", &[("broadcast", EnvType::Text)]),
    ("effects", &[("outgoing_bytes", EnvType::Toml)]),
    (
        "gateway",
        &[
            ("listen", EnvType::Text),
            ("allowed_origins", EnvType::Toml),
            ("public_origins", EnvType::Toml),
            ("hmac_secret", EnvType::Secret),
            ("client_buffer", EnvType::Toml),
            ("client_buffer_bytes", EnvType::Toml),
            ("buffer_bytes_total", EnvType::Toml),
            ("max_payload_bytes", EnvType::Toml),
            ("slow_clients", EnvType::Text),
            ("max_message_bytes", EnvType::Toml),
            ("max_messages_per_sec", EnvType::Toml),
            ("max_connections", EnvType::Toml),
            ("max_pending_connections", EnvType::Toml),
            ("request_timeout_ms", EnvType::Toml),
            ("max_subscriptions_per_connection", EnvType::Toml),
            ("max_subscriptions", EnvType::Toml),
            ("pages", EnvType::Toml),
        ],
    ),
    (
        "streams",
        &[
            ("consumer", EnvType::Text),
            ("batch", EnvType::Toml),
            ("block_ms", EnvType::Toml),
            ("max_deliveries", EnvType::Toml),
            ("retry_backoff_ms", EnvType::Toml),
            ("claim_idle_ms", EnvType::Toml),
            ("start", EnvType::Text),
        ],
    ),
];

/// Why a `SWITCHYARD_<SECTION>_<KEY>` variable (lower-cased, prefix removed) that names a
/// section but no key of it is probably a mistake, or `None` when it names no section or is
/// one of the variables Kubernetes defines for a Service (`SWITCHYARD_ADMIN_PORT`,
/// `SWITCHYARD_ADMIN_SERVICE_HOST`, `SWITCHYARD_ADMIN_PORT_9090_TCP_ADDR`, ...).
fn misspelt_env_key(rest: &str) -> Option<String> {
    let (section, keys) = ENV_KEYS.iter().find(|(section, _)| {
        rest.strip_prefix(section)
            .is_some_and(|r| r.starts_with('_'))
    })?;
    let key = &rest[section.len() + 1..];
    let service_link = key == "port" || key.starts_with("port_") || key.starts_with("service_");
    if service_link {
        return None;
    }
    let known: Vec<&str> = keys.iter().map(|(key, _)| *key).collect();
    Some(format!(
        "[{section}] has no key {key:?} that the environment can set (it can set {})",
        known.join(", ")
    ))
}

impl Config {
    /// The configuration from `file` (or the defaults), overridden by the environment `env`:
    /// `REDIS_URL`, or `REDIS_HOST` (and `REDIS_PORT`), as Redis deployments set them, then
    /// `SWITCHYARD_<SECTION>_<KEY>` for every key of `[redis]`, `[plugins]`, `[admin]`,
    /// `[invalidation]`, `[streams]` and `[gateway]` (but its `tokens`)
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
        let config: Config = table.try_into().map_err(|e: toml::de::Error| {
            secret_free(ConfigError::one(format!(
                "{origin}: {}",
                e.to_string().trim_end()
            )))
        })?;
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

    /// Checks what types alone cannot, returning every problem at once.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let url = self.redis.url.expose();
        let seeds = self.redis.cluster_seeds();
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
        if self.redis.has_tls_files() && !tls {
            problems.push(format!(
                "{origin}: redis.ca_file, cert_file and key_file need a rediss:// redis.url"
            ));
        }
        if self.redis.health_timeout_ms == 0 {
            problems.push(format!(
                "{origin}: redis.health_timeout_ms must be at least 1"
            ));
        }
        if self.redis.cert_file.is_some() != self.redis.key_file.is_some() {
            problems.push(format!(
                "{origin}: redis.cert_file and redis.key_file must be set together"
            ));
        }
        for (key, path) in [
            ("ca_file", &self.redis.ca_file),
            ("cert_file", &self.redis.cert_file),
            ("key_file", &self.redis.key_file),
        ] {
            if let Some(path) = path.as_deref().filter(|path| !path.is_file()) {
                problems.push(format!(
                    "{origin}: redis.{key} {}: no such file",
                    path.display()
                ));
            }
        }
        if self.plugins.queue_capacity == Some(0) {
            problems.push(format!(
                "{origin}: plugins.queue_capacity must be at least 1 (or left out: no count cap)"
            ));
        }
        if self.plugins.queue_bytes < MIN_QUEUE_BYTES {
            problems.push(format!(
                "{origin}: plugins.queue_bytes must be at least {MIN_QUEUE_BYTES} (one message), got {}",
                self.plugins.queue_bytes
            ));
        }
        if let Some(total) = self
            .plugins
            .queue_bytes_total
            .filter(|total| *total < MIN_QUEUE_BYTES)
        {
            problems.push(format!(
                "{origin}: plugins.queue_bytes_total must be at least {MIN_QUEUE_BYTES} (one message), got {total}"
            ));
        }
        if self.plugins.deadline_ms == 0 {
            problems.push(format!("{origin}: plugins.deadline_ms must be at least 1"));
        }
        if self.plugins.describe_deadline_ms == 0 {
            problems.push(format!(
                "{origin}: plugins.describe_deadline_ms must be at least 1"
            ));
        }
        if self.plugins.memory_mib == 0 || self.plugins.memory_mib > 4096 {
            problems.push(format!(
                "{origin}: plugins.memory_mib must be between 1 and 4096 (a 32-bit Wasm memory), got {}",
                self.plugins.memory_mib
            ));
        }
        let plugins = &self.plugins;
        if plugins.breaker_window == 0
            || plugins.breaker_failures == 0
            || plugins.breaker_failures > plugins.breaker_window
        {
            problems.push(format!(
                "{origin}: plugins.breaker_failures ({}) must be between 1 and plugins.breaker_window ({})",
                plugins.breaker_failures, plugins.breaker_window
            ));
        }
        let gateway = &self.gateway;
        if let Some(secret) = &gateway.hmac_secret {
            match expand_env(secret) {
                Ok(secret) if secret.len() < 16 => problems.push(format!(
                    "{origin}: gateway.hmac_secret must be at least 16 bytes"
                )),
                Ok(_) => {}
                Err(e) => problems.push(format!("{origin}: gateway.hmac_secret: {e}")),
            }
        }
        for (name, token) in &gateway.tokens {
            match expand_env(&token.token) {
                Ok(value) if value.len() < 16 => problems.push(format!(
                    "{origin}: gateway.tokens.{name}.token must be at least 16 characters"
                )),
                Ok(_) => {}
                Err(e) => problems.push(format!("{origin}: gateway.tokens.{name}.token: {e}")),
            }
        }
        for (key, value) in [
            ("client_buffer", gateway.client_buffer),
            ("client_buffer_bytes", gateway.client_buffer_bytes),
            ("buffer_bytes_total", gateway.buffer_bytes_total),
            ("max_payload_bytes", gateway.max_payload_bytes),
            ("max_message_bytes", gateway.max_message_bytes),
            ("max_connections", gateway.max_connections),
            ("max_pending_connections", gateway.max_pending_connections),
            ("request_timeout_ms", gateway.request_timeout_ms as usize),
            (
                "max_subscriptions_per_connection",
                gateway.max_subscriptions_per_connection,
            ),
            ("max_subscriptions", gateway.max_subscriptions),
        ] {
            if value == 0 {
                problems.push(format!("{origin}: gateway.{key} must be at least 1"));
            }
        }
        if gateway.client_buffer_bytes > gateway.buffer_bytes_total {
            problems.push(format!(
                "{origin}: gateway.client_buffer_bytes ({}) must not exceed gateway.buffer_bytes_total ({})",
                gateway.client_buffer_bytes, gateway.buffer_bytes_total
            ));
        }
        if gateway.max_messages_per_sec.is_nan() || gateway.max_messages_per_sec <= 0.0 {
            problems.push(format!(
                "{origin}: gateway.max_messages_per_sec must be more than 0"
            ));
        }
        for (key, origins) in [
            ("allowed_origins", &gateway.allowed_origins),
            ("public_origins", &gateway.public_origins),
        ] {
            for allowed in origins {
                if !(allowed.starts_with("http://") || allowed.starts_with("https://"))
                    || allowed.trim_end_matches('/').matches('/').count() != 2
                {
                    problems.push(format!(
                        "{origin}: gateway.{key}: {allowed:?} is not an origin (scheme://host[:port])"
                    ));
                }
            }
        }
        if self.streams.batch == 0 {
            problems.push(format!("{origin}: streams.batch must be at least 1"));
        }
        if self.streams.max_deliveries == 0 {
            problems.push(format!(
                "{origin}: streams.max_deliveries must be at least 1"
            ));
        }
        if self.streams.consumer.as_deref() == Some("") {
            problems.push(format!("{origin}: streams.consumer must not be empty"));
        }
        if plugins.max_payload_bytes == 0 {
            problems.push(format!(
                "{origin}: plugins.max_payload_bytes must be at least 1"
            ));
        }
        if !(1..=MAX_WASM_MIB).contains(&plugins.max_wasm_mib) {
            problems.push(format!(
                "{origin}: plugins.max_wasm_mib must be between 1 and {MAX_WASM_MIB}, got {}",
                plugins.max_wasm_mib
            ));
        }
        let outgoing = self.effects.outgoing_bytes;
        let largest_message = (plugins.max_payload_bytes as u64).max(MIN_OUTGOING_BYTES);
        if outgoing < largest_message {
            problems.push(format!(
                "{origin}: effects.outgoing_bytes must be at least plugins.max_payload_bytes ({}) and at least {MIN_OUTGOING_BYTES}, so that the largest message plugins may publish fits, got {outgoing}",
                plugins.max_payload_bytes
            ));
        }
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
/// (`outputs.x.kind`); types and values are left to serde and [`Config::validate`].
fn check_output_tables(table: &toml::Table, origin: &str) -> Vec<String> {
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
    fn check(&self) -> Vec<(String, String)> {
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

// ---------------------------------------------------------------------------------------
// Settings the stages read, resolved from the sections above

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

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
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
    fn gateway_limits_are_validated_together_naming_each_key() {
        let err = Config::from_toml(
            "[gateway]\nmax_pending_connections = 0\nrequest_timeout_ms = 0\n\
             max_subscriptions_per_connection = 0\nclient_buffer_bytes = 2048\n\
             buffer_bytes_total = 1024\npublic_origins = [\"gw.example.com\"]\n",
            "t.toml",
        )
        .unwrap_err()
        .to_string();
        for expected in [
            "gateway.max_pending_connections must be at least 1",
            "gateway.request_timeout_ms must be at least 1",
            "gateway.max_subscriptions_per_connection must be at least 1",
            "gateway.client_buffer_bytes (2048) must not exceed gateway.buffer_bytes_total (1024)",
            "gateway.public_origins: \"gw.example.com\" is not an origin",
        ] {
            assert!(err.contains(expected), "{expected:?} missing from {err}");
        }
        let config = Config::load(
            None,
            &env(&[
                ("SWITCHYARD_GATEWAY_MAX_PENDING_CONNECTIONS", "64"),
                (
                    "SWITCHYARD_GATEWAY_PUBLIC_ORIGINS",
                    r#"["https://gw.example.com"]"#,
                ),
            ]),
        )
        .unwrap();
        assert_eq!(config.gateway.max_pending_connections, 64);
        assert_eq!(config.gateway.public_origins, ["https://gw.example.com"]);
        assert_eq!(config.gateway.request_timeout_ms, 10_000);
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

    #[test]
    fn misspelt_environment_keys_are_told_apart_from_service_links() {
        let near = misspelt_env_key("plugins_deadline").unwrap();
        assert!(
            near.contains("[plugins]") && near.contains("deadline_ms"),
            "{near}"
        );
        assert!(misspelt_env_key("admin_port").is_none());
        assert!(misspelt_env_key("admin_port_9090_tcp_addr").is_none());
        assert!(misspelt_env_key("admin_service_host").is_none());
        assert!(misspelt_env_key("token").is_none(), "no section: not ours");
        assert!(misspelt_env_key("redisish_url").is_none());
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
