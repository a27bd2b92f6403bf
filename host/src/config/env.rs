//! Overrides from the environment: which `SWITCHYARD_<SECTION>_<KEY>` variables set which
//! keys, how their values are read, and keeping secrets set this way out of errors.

/// Environment variables that override configuration keys start with this.
pub const ENV_PREFIX: &str = "SWITCHYARD_";

/// The keys the environment may set, as `SWITCHYARD_<SECTION>_<KEY>`, by section. Other
/// `SWITCHYARD_*` variables are left alone: Kubernetes defines `SWITCHYARD_ADMIN_PORT` and the
/// like for a Service named `switchyard-admin`, and such a name must not stop the host.
pub(super) const ENV_KEYS: &[(&str, &[(&str, EnvType)])] = &[
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
            ("set_keyspace_events", EnvType::Toml),
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

/// How an environment variable's value is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum EnvType {
    /// As text, always: for string-typed keys (URLs, paths, names, secrets), so that a value
    /// that happens to look like a number (`SWITCHYARD_GATEWAY_HMAC_SECRET=1234567890123456`)
    /// stays the string it is.
    Text,
    /// As a TOML value when it parses as one (numbers, booleans, arrays), as text otherwise.
    Toml,
    /// Text, and a secret: its value is never repeated in an error.
    Secret,
}

/// Sets `section.key` in a parsed configuration.
pub(super) fn set(table: &mut toml::Table, section: &str, key: &str, value: toml::Value) {
    let entry = table
        .entry(section)
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let toml::Value::Table(section) = entry {
        section.insert(key.to_owned(), value);
    }
}

/// An environment value, read as its key's type says.
pub(super) fn env_value(text: &str, kind: EnvType) -> toml::Value {
    let parsed = match kind {
        EnvType::Text | EnvType::Secret => None,
        EnvType::Toml => toml::from_str::<toml::Table>(&format!("v = {text}"))
            .ok()
            .and_then(|mut table| table.remove("v")),
    };
    parsed.unwrap_or_else(|| toml::Value::String(text.to_owned()))
}

/// `problems` with every occurrence of a value in `secrets` replaced by `***`.
pub(super) fn redact(problems: Vec<String>, secrets: &[String]) -> Vec<String> {
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

/// Why a `SWITCHYARD_<SECTION>_<KEY>` variable (lower-cased, prefix removed) that names a
/// section but no key of it is probably a mistake, or `None` when it names no section or is
/// one of the variables Kubernetes defines for a Service (`SWITCHYARD_ADMIN_PORT`,
/// `SWITCHYARD_ADMIN_SERVICE_HOST`, `SWITCHYARD_ADMIN_PORT_9090_TCP_ADDR`, ...).
pub(super) fn misspelt_env_key(rest: &str) -> Option<String> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
