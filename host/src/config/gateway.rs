//! `[gateway]`: the browser gateway (WebSocket and Server-Sent Events), its tokens, and its
//! limits on clients.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::Deserialize;

use super::expand_env;

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

impl GatewayConfig {
    /// Adds to `problems` what is wrong with `[gateway]`.
    pub(super) fn check(&self, origin: &str, problems: &mut Vec<String>) {
        if let Some(secret) = &self.hmac_secret {
            match expand_env(secret) {
                Ok(secret) if secret.len() < 16 => problems.push(format!(
                    "{origin}: gateway.hmac_secret must be at least 16 bytes"
                )),
                Ok(_) => {}
                Err(e) => problems.push(format!("{origin}: gateway.hmac_secret: {e}")),
            }
        }
        for (name, token) in &self.tokens {
            match expand_env(&token.token) {
                Ok(value) if value.len() < 16 => problems.push(format!(
                    "{origin}: gateway.tokens.{name}.token must be at least 16 characters"
                )),
                Ok(_) => {}
                Err(e) => problems.push(format!("{origin}: gateway.tokens.{name}.token: {e}")),
            }
        }
        for (key, value) in [
            ("client_buffer", self.client_buffer),
            ("client_buffer_bytes", self.client_buffer_bytes),
            ("buffer_bytes_total", self.buffer_bytes_total),
            ("max_payload_bytes", self.max_payload_bytes),
            ("max_message_bytes", self.max_message_bytes),
            ("max_connections", self.max_connections),
            ("max_pending_connections", self.max_pending_connections),
            ("request_timeout_ms", self.request_timeout_ms as usize),
            (
                "max_subscriptions_per_connection",
                self.max_subscriptions_per_connection,
            ),
            ("max_subscriptions", self.max_subscriptions),
        ] {
            if value == 0 {
                problems.push(format!("{origin}: gateway.{key} must be at least 1"));
            }
        }
        if self.client_buffer_bytes > self.buffer_bytes_total {
            problems.push(format!(
                "{origin}: gateway.client_buffer_bytes ({}) must not exceed gateway.buffer_bytes_total ({})",
                self.client_buffer_bytes, self.buffer_bytes_total
            ));
        }
        if self.max_messages_per_sec.is_nan() || self.max_messages_per_sec <= 0.0 {
            problems.push(format!(
                "{origin}: gateway.max_messages_per_sec must be more than 0"
            ));
        }
        for (key, origins) in [
            ("allowed_origins", &self.allowed_origins),
            ("public_origins", &self.public_origins),
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
    }
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

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::config::tests::env;

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
}
