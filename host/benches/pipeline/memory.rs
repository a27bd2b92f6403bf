//! Section 8: memory, the resident set of the relay and of Switchyard with 1 and 100 plugins
//! when ready and after traffic, and of Switchyard as shipped while a burst from
//! `redis-benchmark` floods a plugin that cannot keep up, against its queue budget.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use super::bench::Bench;
use super::harness::{self, HostLosses, OUTPUT_PATTERN, Relay, Switchyard};
use super::redis_benchmark::{benchmark_args, check_redis_benchmark, command_line, run_benchmark};
use super::table::{Table, mib, rate};

/// Section 8's burst: messages of [`SLOW_PAYLOAD`] bytes into a plugin that handles about a
/// thousand a second; their payload is about three times a per-plugin budget of 64 MiB (the
/// default planned for `plugins.queue_bytes`), so a byte-bounded queue fills.
const SLOW_MESSAGES: u64 = 200_000;
/// Bytes of each message of section 8's burst.
const SLOW_PAYLOAD: usize = 1024;
/// The channel of section 8's burst; the slow plugin subscribes to `slow:*`.
const SLOW_CHANNEL: &str = "slow:x";
/// Millions of loop iterations the `echo` fixture runs per message (its `spin` setting): about
/// a millisecond, far below the default 100 ms deadline.
const SLOW_SPIN: u32 = 1;
/// What the host may hold beyond the slow plugin's queue budget: the outgoing queue, the
/// crate's buffer of what was read but not yet routed, the runtime and the allocator's
/// retained pages. RSS after the burst should stay below ready + budget + this.
const MARGIN_MIB: u64 = 32;

impl Bench {
    /// Section 8.
    pub(super) async fn memory(&self) -> anyhow::Result<()> {
        println!(
            "\n## 8. Memory: VmRSS after /readyz (or the relay's ready line), and after 500 \
             messages through every plugin (instances are created at the first message); peak: \
             VmHWM; queue budget: queue_bytes_limit per plugin in /plugins"
        );
        let mut table = Table::new(&[
            "process",
            "plugins",
            "ready MiB",
            "after traffic MiB",
            "peak MiB",
            "queue budget",
        ]);
        let relay = Relay::start(self.url()).await?;
        let ready = harness::rss_kib(relay.pid())?;
        let traffic =
            harness::transfer(self.url(), OUTPUT_PATTERN, 500, 64, 1, harness::UNTHROTTLED).await;
        let after = harness::rss_kib(relay.pid())?;
        let peak = harness::peak_rss_kib(relay.pid())?;
        relay.stop().await;
        traffic?;
        let row = |process: &str, plugins: String, kib: [u64; 3], budget: String| {
            let [ready, after, peak] = kib.map(mib);
            vec![process.to_owned(), plugins, ready, after, peak, budget]
        };
        table.row(row(
            "relay",
            "-".to_owned(),
            [ready, after, peak],
            "-".to_owned(),
        ));
        for count in [1usize, 100] {
            let dir = self.forwards(count, true)?;
            let host = Switchyard::start(self.url(), &self.setup(&dir)).await?;
            let ready = harness::rss_kib(host.pid())?;
            let copies = count as u64;
            let traffic = harness::transfer(
                self.url(),
                OUTPUT_PATTERN,
                500,
                64,
                copies,
                harness::UNTHROTTLED,
            )
            .await;
            let after = harness::rss_kib(host.pid())?;
            let peak = harness::peak_rss_kib(host.pid())?;
            let budget = host.queue_budget().await;
            host.stop().await;
            traffic?;
            let budget =
                budget?.map_or_else(|| "n/a".to_owned(), |b| format!("{} MiB", mib(b / 1024)));
            table.row(row(
                "switchyard",
                count.to_string(),
                [ready, after, peak],
                budget,
            ));
        }
        let (burst_row, note) = self.slow_burst_memory().await?;
        table.row(burst_row);
        table.print();
        println!("{note}");
        Ok(())
    }

    /// Section 8's burst row: Switchyard as shipped with one plugin that cannot keep up,
    /// flooded with [`SLOW_MESSAGES`] of [`SLOW_PAYLOAD`] bytes; its RSS against its queue
    /// budget. Returns the row and a note that explains it.
    async fn slow_burst_memory(&self) -> anyhow::Result<(Vec<String>, String)> {
        check_redis_benchmark()?;
        let wasm = std::fs::read(fixture("echo")?)?;
        let plugins = self.folder("slow")?;
        let manifest = format!(
            "[grants]\npublish = [\"slow-reports\"]\n\n[config]\npatterns = [\"slow:*\"]\n\
             reply = \"slow-reports\"\nspin = {SLOW_SPIN}\n"
        );
        harness::install_plugin(&plugins, "slow", &wasm, &manifest)?;
        let host = Switchyard::start_as_shipped(self.url(), &plugins).await?;
        let measured = self.flood(&host).await;
        let tail = host.log_tail();
        host.stop().await;
        let flood = measured.with_context(|| format!("switchyard log:\n{tail}"))?;
        let budget = flood.budget.map(|bytes| bytes / 1024);
        let (budget_cell, verdict) = match budget {
            Some(kib) => {
                let bound = flood.ready_kib + kib + MARGIN_MIB * 1024;
                let verdict = if flood.peak_kib <= bound {
                    "within"
                } else {
                    "ABOVE"
                };
                (
                    format!("{} MiB", mib(kib)),
                    format!(
                        "peak {} MiB {verdict} ready + budget + {MARGIN_MIB} MiB margin = {} MiB",
                        mib(flood.peak_kib),
                        mib(bound)
                    ),
                )
            }
            None => (
                "n/a".to_owned(),
                "no queue_bytes_limit in /plugins, so no byte budget to compare with".to_owned(),
            ),
        };
        let row = vec![
            "switchyard, burst".to_owned(),
            "1 slow".to_owned(),
            mib(flood.ready_kib),
            mib(flood.after_kib),
            mib(flood.peak_kib),
            budget_cell,
        ];
        let note = format!(
            "   switchyard, burst: as shipped (config: redis.url, plugins.dir, admin.listen), \
             one plugin (the echo fixture spinning {SLOW_SPIN}M iterations per message, about \
             {:.0} handled/s here) on slow:*, flooded by {} ({:.1} MiB of payload, offered at \
             {} msg/s); after traffic = when the host had read the whole burst. It handled \
             {}, shed {}, and {} waited in its queue. {verdict}",
            flood.handled_rate,
            command_line(SLOW_MESSAGES, SLOW_CHANNEL, SLOW_PAYLOAD, false),
            (SLOW_MESSAGES * SLOW_PAYLOAD as u64) as f64 / 1_048_576.0,
            rate(flood.offered),
            flood.handled,
            flood.losses.describe(),
            flood.queued,
        );
        Ok((row, note))
    }

    /// Floods the slow plugin of `host` and measures its memory once the host has read it all.
    async fn flood(&self, host: &Switchyard) -> anyhow::Result<Flood> {
        let ready_kib = harness::rss_kib(host.pid())?;
        let before = host.plugins().await?;
        let received_before = before["received"].as_u64().unwrap_or(0);
        let payload = "x".repeat(SLOW_PAYLOAD);
        let args = benchmark_args(self.url(), SLOW_MESSAGES, SLOW_CHANNEL, &payload);
        let started = Instant::now();
        let offered = run_benchmark(&args).await?;
        // The burst is over for the host once its reader stops counting new messages.
        let mut last = u64::MAX;
        let mut still = Instant::now();
        loop {
            let report = host.plugins().await?;
            let received = report["received"].as_u64().unwrap_or(0);
            if received != last {
                last = received;
                still = Instant::now();
            } else if still.elapsed() > Duration::from_millis(500)
                || received - received_before >= SLOW_MESSAGES
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let after_kib = harness::rss_kib(host.pid())?;
        let peak_kib = harness::peak_rss_kib(host.pid())?;
        let report = host.plugins().await?;
        let slow = harness::plugin_entry(&report, "slow").context("no slow plugin in /plugins")?;
        let handled = slow["stats"]["handled"].as_u64().unwrap_or(0);
        Ok(Flood {
            ready_kib,
            after_kib,
            peak_kib,
            budget: harness::queue_bytes_limit(slow),
            offered,
            handled,
            handled_rate: handled as f64 / started.elapsed().as_secs_f64(),
            queued: slow["queue_depth"].as_u64().unwrap_or(0),
            losses: host.losses().await?,
        })
    }
}

/// What section 8's burst measured.
struct Flood {
    ready_kib: u64,
    after_kib: u64,
    peak_kib: u64,
    /// The plugin's queue budget in bytes, as `/plugins` reports it (`queue_bytes_limit`).
    budget: Option<u64>,
    offered: f64,
    handled: u64,
    handled_rate: f64,
    queued: u64,
    losses: HostLosses,
}

/// The component of a test fixture, built (once) with the same command the integration
/// tests' build script uses if it is not there yet.
fn fixture(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), std::path::PathBuf::from)
        .join("plugins");
    let path = target.join(format!("wasm32-wasip2/release/{name}.wasm"));
    if path.is_file() {
        return Ok(path);
    }
    eprintln!("building the {name} fixture for wasm32-wasip2 ...");
    let status = std::process::Command::new(option_env!("CARGO").unwrap_or("cargo"))
        .current_dir(&root)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "-p",
            name,
        ])
        .arg("--target-dir")
        .arg(&target)
        .env_remove("CARGO_TARGET_DIR")
        .status()
        .with_context(|| format!("cannot run cargo to build the {name} fixture"))?;
    if !status.success() || !path.is_file() {
        bail!(
            "building the {name} fixture failed ({status}); `cargo test -p switchyard-tests` \
             builds it too"
        );
    }
    Ok(path)
}
