//! `switchyard demo`: the example plugins, embedded in the binary, on the embedded broker.
//!
//! It runs the real host (loader, registry, router, workers) against an in-process broker,
//! feeds each scenario's sample messages, and prints what every plugin published in return.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;

use crate::app::{Broker, Host};
use crate::config::Config;
use crate::source::embedded::{EmbeddedBroker, Published};

/// The example plugins built with this binary.
pub mod examples {
    include!(concat!(env!("OUT_DIR"), "/examples.rs"));
}

/// How long the demo waits for plugins to finish a scenario before reporting what it has.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(5);

/// One story the demo tells.
struct Scenario {
    title: &'static str,
    about: &'static str,
    inputs: &'static [(&'static str, &'static str)],
}

const SCENARIOS: &[Scenario] = &[Scenario {
    title: "forward",
    about: "republishes every fwd:REST message unchanged on fwded:REST",
    inputs: &[
        ("fwd:orders", r#"{"id":1,"total":9.5}"#),
        ("fwd:alerts:disk", "disk 91% full"),
        ("metrics:cpu", "0.93 (no plugin listens here)"),
    ],
}];

/// Runs every scenario and writes the story to `out`.
pub async fn run(out: &mut impl Write) -> anyhow::Result<()> {
    let folder = tempfile::Builder::new()
        .prefix("switchyard-demo-")
        .tempdir()
        .context("cannot create a folder for the demo plugins")?;
    for (name, wasm) in examples::ALL {
        let path = folder.path().join(format!("{name}.wasm"));
        std::fs::write(&path, wasm).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let mut config = Config::default();
    config.plugins.dir = folder.path().to_owned();

    let broker = EmbeddedBroker::new();
    let mut tap = broker.tap();
    let host = Host::start(&config, Broker::Embedded(broker.clone()), false).await?;

    writeln!(
        out,
        "Switchyard demo: example plugins on the embedded broker (no Redis needed)\n"
    )?;
    writeln!(out, "Loaded plugins:")?;
    for plugin in host.registry().report() {
        match &plugin.version {
            Some(v) => writeln!(
                out,
                "  {:<10} {} ({} bytes, {})  listens to [{}], may publish [{}]",
                plugin.name,
                v.version,
                v.size,
                v.hash,
                v.subscriptions.join(", "),
                v.grants.publish.join(", ")
            )?,
            None => writeln!(
                out,
                "  {:<10} FAILED: {}",
                plugin.name,
                plugin.load_error().map_or("", |(_, message)| message)
            )?,
        }
    }

    for scenario in SCENARIOS {
        writeln!(out, "\n== {}: {}", scenario.title, scenario.about)?;
        for (channel, payload) in scenario.inputs {
            broker.publish(
                Bytes::from_static(channel.as_bytes()),
                Bytes::from_static(payload.as_bytes()),
            );
            wait_until_idle(&host).await;
            while let Ok(published) = tap.try_recv() {
                print_published(out, &published)?;
            }
        }
    }

    writeln!(out, "\nCounters:")?;
    for plugin in host.registry().report() {
        if let Some(stats) = &plugin.stats {
            writeln!(
                out,
                "  {:<10} handled {}, failed {}, shed {}",
                plugin.name, stats.handled, stats.failed, stats.shed
            )?;
        }
    }
    host.stop(SCENARIO_TIMEOUT).await
}

fn print_published(out: &mut impl Write, published: &Published) -> std::io::Result<()> {
    let channel = String::from_utf8_lossy(&published.channel);
    let payload = String::from_utf8_lossy(&published.payload);
    match &published.from {
        None => writeln!(out, "  -> {channel:<18} {payload}"),
        Some(plugin) => writeln!(out, "     {plugin} published {channel:<18} {payload}"),
    }
}

/// Waits until every plugin has handled everything queued for it.
async fn wait_until_idle(host: &Host) {
    let started = Instant::now();
    while !host.registry().idle() && started.elapsed() < SCENARIO_TIMEOUT {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
