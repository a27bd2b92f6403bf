//! `switchyard status`: what an operator checks by hand, in one table.
//!
//! It asks a running host's admin endpoint for its plugins (twice, to compute rates) and
//! asks Redis for its side of the story: `PUBSUB NUMSUB` for the host's channels,
//! `PUBSUB NUMPAT`, and the host's own entry in `CLIENT LIST`, found by the exact name the host
//! gave its subscriber connection (which the admin endpoint reports): other hosts on the same
//! Redis name theirs alike, and are not this host's business.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::{Value, json};

use crate::config::RedisConfig;

/// How long to wait for the admin endpoint or Redis.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Gathers the status of the host at `admin` and of `redis`, sampling rates over `interval`.
pub async fn gather(
    admin: SocketAddr,
    redis: &RedisConfig,
    interval: Duration,
) -> anyhow::Result<Value> {
    let http = reqwest::Client::builder().timeout(TIMEOUT).build()?;
    let get = |path: &'static str| {
        let http = http.clone();
        async move {
            let url = format!("http://{admin}{path}");
            let response = http
                .get(&url)
                .send()
                .await
                .with_context(|| format!("cannot reach the admin endpoint at {url}"))?;
            response
                .json::<Value>()
                .await
                .with_context(|| format!("{url} did not answer JSON"))
        }
    };
    let first = get("/plugins").await?;
    tokio::time::sleep(interval).await;
    let second = get("/plugins").await?;
    let ready = get("/readyz").await?;

    let seconds = interval.as_secs_f64().max(1e-3);
    let mut plugins = Vec::new();
    for plugin in second["plugins"].as_array().into_iter().flatten() {
        let name = &plugin["name"];
        let before = first["plugins"]
            .as_array()
            .and_then(|all| all.iter().find(|p| p["name"] == *name))
            .map_or(0, |p| p["stats"]["handled"].as_u64().unwrap_or(0));
        let handled = plugin["stats"]["handled"].as_u64().unwrap_or(0);
        let mut entry = plugin.clone();
        entry["handled_per_second"] = json!(handled.saturating_sub(before) as f64 / seconds);
        plugins.push(entry);
    }

    let channels: Vec<String> = plugins
        .iter()
        .flat_map(|p| {
            p["version"]["subscriptions"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|s| s.as_str()?.strip_prefix("channel ").map(str::to_owned))
        .collect();
    let client_name = second["redis_client_name"].as_str();
    let redis_side = match redis_facts(redis, &channels, client_name).await {
        Ok(facts) => facts,
        Err(e) => json!({ "error": format!("{e:#}") }),
    };
    Ok(json!({
        "admin": admin.to_string(),
        "ready": ready["ready"],
        "source": second["source"],
        "received": second["received"],
        "queue_bytes": second["queue_bytes"],
        "queue_bytes_total": second["queue_bytes_total"],
        "plugins": plugins,
        "outputs": second["outputs"],
        "redis": redis_side,
    }))
}

async fn redis_facts(
    redis: &RedisConfig,
    channels: &[String],
    client_name: Option<&str>,
) -> anyhow::Result<Value> {
    let client = redis.client()?;
    let mut connection = tokio::time::timeout(TIMEOUT, client.get_multiplexed_async_connection())
        .await
        .context("Redis did not answer in time")??;
    let numpat: i64 = redis::cmd("PUBSUB")
        .arg("NUMPAT")
        .query_async(&mut connection)
        .await?;
    let numsub: Vec<(String, i64)> = if channels.is_empty() {
        Vec::new()
    } else {
        redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(channels)
            .query_async(&mut connection)
            .await?
    };
    let hosts: Vec<String> = match client_name {
        // A host on a Redis Cluster (or the embedded broker) names no connection.
        None => Vec::new(),
        Some(name) => {
            let clients: String = redis::cmd("CLIENT")
                .arg("LIST")
                .query_async(&mut connection)
                .await?;
            own_clients(&clients, name)
        }
    };
    Ok(json!({
        "url": redis.url.masked(),
        "numpat": numpat,
        "numsub": numsub.into_iter().map(|(c, n)| (c, json!(n))).collect::<serde_json::Map<String, Value>>(),
        "client_name": client_name,
        "host_clients": hosts,
    }))
}

/// Bytes as MiB with one decimal, or `-` when not known.
fn mebibytes(bytes: &Value) -> String {
    bytes.as_u64().map_or_else(
        || "-".to_owned(),
        |bytes| format!("{:.1}", bytes as f64 / f64::from(1 << 20)),
    )
}

/// The lines of `CLIENT LIST` output whose `name` field is exactly `name`.
fn own_clients(list: &str, name: &str) -> Vec<String> {
    list.lines()
        .filter(|line| {
            line.split_ascii_whitespace()
                .any(|field| field.strip_prefix("name=") == Some(name))
        })
        .map(str::to_owned)
        .collect()
}

/// The status as a table for people.
pub fn render(status: &Value) -> String {
    let mut out = String::new();
    let source = &status["source"];
    let _ = writeln!(
        out,
        "host {}: {}; subscriber {} ({} channels, {} patterns, {} sharded, {} streams, {} reconnects); {} messages received",
        status["admin"].as_str().unwrap_or("?"),
        if status["ready"] == true {
            "ready"
        } else {
            "NOT READY"
        },
        if source["connected"] == true {
            "connected"
        } else {
            "DISCONNECTED"
        },
        source["channels"],
        source["patterns"],
        source["sharded"].as_u64().unwrap_or(0),
        source["streams"].as_u64().unwrap_or(0),
        source["reconnects"],
        status["received"],
    );
    let _ = writeln!(
        out,
        "queues: {} MiB of {} MiB held by all plugins",
        mebibytes(&status["queue_bytes"]),
        mebibytes(&status["queue_bytes_total"]),
    );
    let _ = writeln!(
        out,
        "\n{:<20} {:<8} {:<10} {:>10} {:>8} {:>8} {:>6} {:>10} {:>9}",
        "PLUGIN",
        "STATE",
        "VERSION",
        "HANDLED",
        "FAILED",
        "SHED",
        "QUEUE",
        "QUEUE MiB",
        "HANDLED/s"
    );
    for plugin in status["plugins"].as_array().into_iter().flatten() {
        let stats = &plugin["stats"];
        let _ = writeln!(
            out,
            "{:<20} {:<8} {:<10} {:>10} {:>8} {:>8} {:>6} {:>10} {:>9.1}",
            plugin["name"].as_str().unwrap_or("?"),
            plugin["state"].as_str().unwrap_or("?"),
            plugin["version"]["version"].as_str().unwrap_or("-"),
            stats["handled"].as_u64().unwrap_or(0),
            stats["failed"].as_u64().unwrap_or(0),
            stats["shed"].as_u64().unwrap_or(0),
            plugin["queue_depth"].as_u64().unwrap_or(0),
            mebibytes(&plugin["queue_bytes"]),
            plugin["handled_per_second"].as_f64().unwrap_or(0.0),
        );
        if let Some(error) = plugin["load_error"]["message"].as_str() {
            let _ = writeln!(out, "    newest file rejected: {error}");
        }
    }
    let redis = &status["redis"];
    let _ = writeln!(out, "\nRedis {}:", redis["url"].as_str().unwrap_or("?"));
    if let Some(error) = redis["error"].as_str() {
        let _ = writeln!(out, "  cannot ask Redis: {error}");
        return out;
    }
    let _ = writeln!(out, "  PUBSUB NUMPAT: {}", redis["numpat"]);
    for (channel, count) in redis["numsub"].as_object().into_iter().flatten() {
        let _ = writeln!(out, "  PUBSUB NUMSUB {channel}: {count}");
    }
    match redis["client_name"].as_str() {
        None => {
            let _ = writeln!(
                out,
                "  host connection: the host reports no name for it (a Redis Cluster source names none)"
            );
        }
        Some(name) => {
            let clients = redis["host_clients"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if clients.is_empty() {
                let _ = writeln!(out, "  host connection: {name} NOT CONNECTED");
            }
            for client in clients {
                let _ = writeln!(out, "  host connection: {}", client.as_str().unwrap_or("?"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::own_clients;

    #[test]
    fn own_clients_match_the_whole_name_only() {
        let list = "id=3 addr=127.0.0.1:1 fd=8 name=switchyard-00ab age=1 cmd=ssubscribe\n\
                    id=4 addr=127.0.0.1:2 fd=9 name=switchyard-00abcd age=1 cmd=subscribe\n\
                    id=5 addr=127.0.0.1:3 fd=10 name= age=1 cmd=client|list\n";
        let own = own_clients(list, "switchyard-00ab");
        assert_eq!(own.len(), 1);
        assert!(own[0].starts_with("id=3 "));
        assert!(own_clients(list, "switchyard-").is_empty());
    }
}
