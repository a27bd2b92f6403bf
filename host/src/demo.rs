//! `switchyard demo`: the example plugins, embedded in the binary, on the embedded broker.
//!
//! It runs the real host (loader, registry, router, workers, grants) against an in-process
//! broker, feeds each scenario's sample messages (and key writes) one at a time, and prints
//! what every plugin did in return: what it published, which outputs it called, which keys it
//! invalidated. Outputs are captured instead of sent anywhere. The broker's keyspace
//! notifications are on, so that a write to a key reaches key subscriptions as on a Redis
//! with `notify-keyspace-events` set.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use tokio::sync::mpsc;

use crate::app::{Broker, Host};
use crate::config::{Config, GatewayToken};
use crate::effects::outputs::{Captured, Outputs};
use crate::examples;
use crate::keyspace::CHANNEL_PREFIX;
use crate::source::embedded::{EmbeddedBroker, Published};

/// The manifest each example ships with (its grants and settings).
const MANIFESTS: &[(&str, &str)] = &[
    (
        "forward",
        include_str!("../../plugins/forward/forward.toml"),
    ),
    (
        "notify-router",
        include_str!("../../plugins/notify-router/notify-router.toml"),
    ),
    (
        "chat-moderator",
        include_str!("../../plugins/chat-moderator/chat-moderator.toml"),
    ),
    // The manifest that turns its keyspace mode on, beside the events mode.
    (
        "cache-invalidator",
        include_str!("../../plugins/cache-invalidator/keyspace/cache-invalidator.toml"),
    ),
    (
        "metrics-rollup",
        include_str!("../../plugins/metrics-rollup/metrics-rollup.toml"),
    ),
];

/// The outputs `notify-router` calls; the demo captures them.
const OUTPUTS: &[&str] = &["email", "sms", "push"];

/// Keyspace channels' common start, as bytes.
const KEYSPACE_PREFIX: &[u8] = CHANNEL_PREFIX.as_bytes();

/// How long the demo waits for plugins to finish a message before moving on.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the demo does to the broker in one step.
enum Action {
    /// Publishes `payload` on `channel`, as an application would.
    Publish {
        channel: &'static str,
        payload: String,
    },
    /// Writes a key (`SET KEY VALUE`): the broker publishes `set` on its keyspace channel.
    Set {
        key: &'static str,
        value: &'static str,
    },
    /// Deletes a key (`DEL KEY`): the broker publishes `del` on its keyspace channel.
    Del { key: &'static str },
}

/// One step of a scenario, with what the reader should notice about it.
struct Input {
    action: Action,
    note: &'static str,
}

fn input(channel: &'static str, payload: impl Into<String>, note: &'static str) -> Input {
    Input {
        action: Action::Publish {
            channel,
            payload: payload.into(),
        },
        note,
    }
}

fn write(action: Action, note: &'static str) -> Input {
    Input { action, note }
}

/// One story the demo tells.
struct Scenario {
    title: &'static str,
    about: &'static str,
    /// Keys set in the broker's key space before the inputs.
    keys: &'static [&'static str],
    inputs: Vec<Input>,
}

fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            title: "forward",
            about: "republishes every fwd:REST message unchanged on fwded:REST",
            keys: &[],
            inputs: vec![
                input("fwd:orders", r#"{"id":1,"total":9.5}"#, ""),
                input("metrics-not-forwarded", "0.93", "no plugin listens here"),
            ],
        },
        Scenario {
            title: "notifications",
            about: "notify-router sends notifications:email|sms|push to gateways, bad ones to notifications:dead",
            keys: &[],
            inputs: vec![
                input(
                    "notifications:email",
                    r#"{"to":"ana@example.com","subject":"Welcome","body":"Hi Ana"}"#,
                    "",
                ),
                input(
                    "notifications:sms",
                    r#"{"phone":"+15550100","message":"Your code is 4711"}"#,
                    "",
                ),
                input(
                    "notifications:push",
                    r#"{"device_id":"ios-42","title":"Ping"}"#,
                    "",
                ),
                input(
                    "notifications:sms",
                    r#"{"message":"who do I text?"}"#,
                    "no phone: dead-lettered",
                ),
                input(
                    "notifications:fax",
                    r#"{"to":"1985"}"#,
                    "unknown kind: dead-lettered",
                ),
            ],
        },
        Scenario {
            title: "chat",
            about: "chat-moderator masks banned words, drops muted users and oversize messages, rebroadcasts chat:in:ROOM on chat:ROOM",
            keys: &[],
            inputs: vec![
                input(
                    "chat:in:lobby",
                    r#"{"user_id":"ana","message":"hello everyone"}"#,
                    "",
                ),
                input(
                    "chat:in:lobby",
                    r#"{"user_id":"bob","message":"this is not a Scam, promise"}"#,
                    "banned word masked",
                ),
                input(
                    "chat:in:lobby",
                    r#"{"user_id":"troll42","message":"buy now"}"#,
                    "troll42 is muted: dropped",
                ),
                input(
                    "chat:in:lobby",
                    format!(r#"{{"user_id":"ana","message":"{}"}}"#, "la".repeat(150)),
                    "300 characters, limit 280: dropped",
                ),
            ],
        },
        Scenario {
            title: "cache invalidation",
            about: "cache-invalidator turns events:* and writes to db:user:* into deleted cache keys and a broadcast on cache:invalidate",
            keys: &[
                "cache:user:42",
                "cache:user:42:avatar",
                "cache:order:A-17",
                "cache:user:7",
            ],
            inputs: vec![
                input(
                    "events:user.updated",
                    r#"{"entity":"user","id":42,"keys":["cache:user:42:avatar"]}"#,
                    "",
                ),
                input("events:order.paid", r#"{"entity":"order","id":"A-17"}"#, ""),
                write(
                    Action::Set {
                        key: "db:user:7",
                        value: r#"{"name":"Bo"}"#,
                    },
                    "nobody publishes: the keyspace notification `set` of db:user:7 invalidates cache:user:7",
                ),
                write(
                    Action::Del { key: "db:user:7" },
                    "`del`: cache:user:7 is gone already, and the notice goes out all the same",
                ),
            ],
        },
        Scenario {
            title: "dashboard",
            about: "metrics-rollup keeps running totals of metrics:* and publishes dashboard:summary",
            keys: &[],
            inputs: vec![
                input(
                    "metrics:web-1",
                    r#"{"cpu":0.42,"memory":512,"requests":120}"#,
                    "",
                ),
                input(
                    "metrics:web-2",
                    r#"{"cpu":0.91,"memory":1024,"requests":300}"#,
                    "",
                ),
                input(
                    "metrics:web-1",
                    r#"{"cpu":0.58,"memory":530,"requests":140}"#,
                    "",
                ),
            ],
        },
    ]
}

/// Runs every scenario and writes the story to `out`; then, with a `gateway` address,
/// keeps running with the browser gateway there (and made-up metrics feeding the dashboard)
/// until interrupted.
pub async fn run(out: &mut impl Write, gateway: Option<SocketAddr>) -> anyhow::Result<()> {
    let folder = tempfile::Builder::new()
        .prefix("switchyard-demo-")
        .tempdir()
        .context("cannot create a folder for the demo plugins")?;
    for (name, wasm) in examples::ALL {
        let path = folder.path().join(format!("{name}.wasm"));
        std::fs::write(&path, wasm).with_context(|| format!("cannot write {}", path.display()))?;
    }
    for (name, manifest) in MANIFESTS {
        // The dashboard normally publishes at most once a second; the demo wants to see
        // every step.
        let manifest = manifest.replace("interval_ms = 1000", "interval_ms = 0");
        let path = folder.path().join(format!("{name}.toml"));
        std::fs::write(&path, manifest)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let mut config = Config::default();
    config.plugins.dir = folder.path().to_owned();
    let tokens = gateway.map(|addr| {
        config.gateway.listen = Some(addr);
        let token = |read: &[&str], write: &[&str]| GatewayToken {
            token: format!("{:032x}", rand::random::<u128>()),
            read: read.iter().map(|s| (*s).to_owned()).collect(),
            write: write.iter().map(|s| (*s).to_owned()).collect(),
        };
        let dashboard = token(&["dashboard:*", crate::gateway::PLUGINS_CHANNEL], &[]);
        let chat = token(&["chat:*"], &["chat:in:*"]);
        let urls = (dashboard.token.clone(), chat.token.clone());
        config.gateway.tokens.insert("dashboard".into(), dashboard);
        config.gateway.tokens.insert("chat".into(), chat);
        urls
    });

    let broker = EmbeddedBroker::new();
    broker.set_keyspace_events(true);
    let mut tap = broker.tap();
    let (outputs, mut captured) = Outputs::capture(OUTPUTS);
    let host = Host::start(
        &config,
        Broker::Embedded(broker.clone()),
        false,
        Some(Arc::new(outputs)),
    )
    .await?;

    writeln!(
        out,
        "Switchyard demo: example plugins on the embedded broker (no Redis needed)\n"
    )?;
    writeln!(out, "Loaded plugins:")?;
    for plugin in host.registry().report() {
        match &plugin.version {
            Some(v) => writeln!(
                out,
                "  {:<18} {} ({} KiB)  listens to [{}]",
                plugin.name,
                v.version,
                v.size / 1024,
                v.subscriptions
                    .iter()
                    .chain(&v.keys)
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(", "),
            )?,
            None => writeln!(
                out,
                "  {:<18} FAILED: {}",
                plugin.name,
                plugin.load_error().map_or("", |(_, message)| message)
            )?,
        }
    }

    for scenario in scenarios() {
        writeln!(out, "\n== {}: {}", scenario.title, scenario.about)?;
        for key in scenario.keys {
            broker.set(*key, "cached");
        }
        for input in &scenario.inputs {
            match &input.action {
                Action::Publish { channel, payload } => {
                    broker.publish(
                        Bytes::from_static(channel.as_bytes()),
                        Bytes::from(payload.clone()),
                    );
                }
                Action::Set { key, value } => {
                    writeln!(out, "  -> SET {key} {value}\n     ({})", input.note)?;
                    broker.set(*key, Bytes::from_static(value.as_bytes()));
                }
                Action::Del { key } => {
                    writeln!(out, "  -> DEL {key}\n     ({})", input.note)?;
                    broker.unlink(&[(*key).to_owned()]);
                }
            }
            wait_until_idle(&host).await;
            print_effects(out, &mut tap, &mut captured, input.note)?;
        }
        if !scenario.keys.is_empty() {
            let left: Vec<&str> = scenario
                .keys
                .iter()
                .copied()
                .filter(|key| broker.exists(key))
                .collect();
            writeln!(out, "     keys still cached: {left:?}")?;
        }
    }

    writeln!(out, "\nCounters:")?;
    for plugin in host.registry().report() {
        if let Some(stats) = &plugin.stats {
            writeln!(
                out,
                "  {:<18} handled {}, failed {}, denied {}, shed {}",
                plugin.name, stats.handled, stats.failed, stats.denied, stats.shed
            )?;
        }
    }
    if let (Some(addr), Some((dashboard, chat))) = (host.gateway_addr(), tokens) {
        drop(tap);
        drop(captured);
        writeln!(
            out,
            "\nBrowser gateway (Ctrl-C to stop):\n  dashboard  http://{addr}/dashboard.html?token={dashboard}\n  \
             chat       http://{addr}/chat.html?token={chat}\n\
             Made-up metrics from web-1, web-2 and web-3 feed the dashboard twice a second."
        )?;
        out.flush()?;
        feed_metrics(&broker).await;
    }
    host.stop(MESSAGE_TIMEOUT).await
}

/// Publishes made-up metrics for three sources every half second until Ctrl-C.
async fn feed_metrics(broker: &EmbeddedBroker) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut step = 0u32;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return,
            _ = tick.tick() => {}
        }
        step += 1;
        for (i, source) in ["web-1", "web-2", "web-3"].iter().enumerate() {
            let phase = f64::from(step) / 8.0 + i as f64;
            let metrics = serde_json::json!({
                "cpu": ((phase.sin() + 1.0) / 2.0 * 100.0).round() / 100.0,
                "memory": 256 + (i as u32) * 128 + step % 32,
                "requests": 100 + ((phase * 1.7).cos() * 40.0).round() as i64,
            });
            broker.publish(
                Bytes::from(format!("metrics:{source}")),
                Bytes::from(metrics.to_string()),
            );
        }
    }
}

/// Prints what happened since the last input: the input itself, then the effects. Keyspace
/// notifications are left out: a write is shown as its command, and the notifications of the
/// scenario's seeding and of invalidations' deletions would only repeat the story.
fn print_effects(
    out: &mut impl Write,
    tap: &mut mpsc::UnboundedReceiver<Published>,
    captured: &mut mpsc::UnboundedReceiver<Captured>,
    note: &str,
) -> std::io::Result<()> {
    while let Ok(published) = tap.try_recv() {
        if published.from.is_none() && published.channel.starts_with(KEYSPACE_PREFIX) {
            continue;
        }
        let channel = String::from_utf8_lossy(&published.channel);
        let payload = clip(&published.payload);
        match &published.from {
            None if note.is_empty() => writeln!(out, "  -> {channel:<22} {payload}")?,
            None => writeln!(out, "  -> {channel:<22} {payload}\n     ({note})")?,
            Some(plugin) => writeln!(out, "     {plugin} published {channel} {payload}")?,
        }
    }
    while let Ok(call) = captured.try_recv() {
        writeln!(
            out,
            "     {} called output {}: {}",
            call.plugin,
            call.output,
            clip(&call.payload)
        )?;
    }
    Ok(())
}

/// A payload as text, cut to a line's worth.
fn clip(payload: &[u8]) -> String {
    const SHOWN: usize = 100;
    let text = String::from_utf8_lossy(payload);
    match text.char_indices().nth(SHOWN) {
        Some((end, _)) => format!("{}... ({} bytes)", &text[..end], payload.len()),
        None => text.into_owned(),
    }
}

/// Waits until every plugin has handled everything queued for it.
async fn wait_until_idle(host: &Host) {
    let started = Instant::now();
    while !host.registry().idle() && started.elapsed() < MESSAGE_TIMEOUT {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
