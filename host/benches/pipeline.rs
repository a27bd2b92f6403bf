//! The whole pipeline under load: the real `switchyard` binary with the `forward` plugin,
//! against a bare relay written with the same `redis` crate, both as separate processes on a
//! private `redis-server`. Prints one table per section:
//!
//! 1. throughput (64 B, 1 KiB), 2. added latency at fixed rates, 3. fan-out to 1/10/100
//!    plugins, 4. pattern scaling (1/100/10,000 patterns), 5. payload sizes, 6. hot swap under
//!    traffic, 7. start-up (cold and warm compile cache), 8. memory, 9. streams (1 and 2 hosts
//!    sharing a consumer group, against a bare consumer), 10. gateway fan-out (1,000 WebSocket
//!    clients on one channel, against a bare WebSocket fan-out relay), 11. a burst from
//!    `redis-benchmark` against Switchyard as shipped (`pipeline/burst.rs`).
//!
//! ```sh
//! cargo bench -p switchyard --bench pipeline                      # everything, ~9 min on 2 cores
//! cargo bench -p switchyard --bench pipeline -- --quick           # fewer messages, ~2 min
//! cargo bench -p switchyard --bench pipeline -- --only 1,latency  # some sections
//! ```
//!
//! Publisher, Redis, receiver and the process under test share the machine, so absolute rates
//! depend on it; compare within one run (the relay and Switchyard alternate round by round).

#[path = "pipeline/burst.rs"]
mod burst;
#[path = "pipeline/harness.rs"]
mod harness;
#[path = "pipeline/relay.rs"]
mod relay;
#[path = "pipeline/throughput.rs"]
mod throughput;
#[path = "pipeline/websocket.rs"]
mod websocket;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use redis::AsyncCommands as _;
use tokio_util::sync::CancellationToken;

use harness::{
    FanoutRelay, HostSetup, INPUT_CHANNEL, OUTPUT_PATTERN, Publisher, Receiver, Relay, STREAM_KEY,
    StreamConsumer, Switchyard, Transfer,
};
use relay::{STREAM_BATCH, STREAM_BLOCK_MS};
use switchyard_tests::{RedisServer, free_port};

/// The sections, by number and name.
const SECTIONS: &[(u8, &str)] = &[
    (1, "throughput"),
    (2, "latency"),
    (3, "fanout"),
    (4, "patterns"),
    (5, "payload"),
    (6, "hotswap"),
    (7, "startup"),
    (8, "memory"),
    (9, "streams"),
    (10, "gateway"),
    (11, "burst"),
];

/// Benchmarks Switchyard's whole pipeline against a bare relay.
#[derive(Parser, Debug)]
#[command(name = "pipeline")]
struct Args {
    /// Fewer messages, rounds and repetitions (about a minute).
    #[arg(long)]
    quick: bool,
    /// Sections to run, by number or name (throughput, latency, fanout, patterns, payload,
    /// hotswap, startup, memory, streams, gateway, burst), comma-separated. Default: all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Messages per throughput run (overrides the mode's default).
    #[arg(long)]
    messages: Option<u64>,
    /// Rounds per throughput comparison (overrides the mode's default).
    #[arg(long)]
    rounds: Option<usize>,
    /// Internal: run as the bare relay against this Redis URL.
    #[arg(long, hide = true)]
    relay: Option<String>,
    /// Internal: run as the bare stream consumer against this Redis URL.
    #[arg(long, hide = true, requires = "stream_group")]
    stream_consumer: Option<String>,
    /// Internal: the stream consumer's group.
    #[arg(long, hide = true)]
    stream_group: Option<String>,
    /// Internal: the stream consumer republishes every payload, as forward does.
    #[arg(long, hide = true)]
    stream_publish: bool,
    /// Internal: run as the bare WebSocket fan-out relay against this Redis URL.
    #[arg(long, hide = true, requires = "fanout_listen")]
    fanout_relay: Option<String>,
    /// Internal: where the fan-out relay listens.
    #[arg(long, hide = true)]
    fanout_listen: Option<String>,
    /// Internal: bytes the fan-out relay's sockets read at most per call.
    #[arg(long, hide = true)]
    fanout_read_buffer: Option<usize>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// How much of everything a run does.
struct Scale {
    messages: u64,
    rounds: usize,
    latency_rates: [f64; 2],
    latency_secs: f64,
    fanout_outputs: u64,
    fanout_rounds: usize,
    pattern_messages: u64,
    pattern_rounds: usize,
    payload_bytes: u64,
    payload_messages: u64,
    payload_rounds: usize,
    swap_rate: f64,
    swaps: usize,
    big_swaps: usize,
    startup_rounds: usize,
    stream_entries: u64,
    /// Section 10: (messages per second, messages) per pace.
    gateway_paces: [(f64, usize); 2],
    gateway_rounds: usize,
}

impl Scale {
    fn new(args: &Args) -> Self {
        let mut scale = if args.quick {
            Self {
                messages: 20_000,
                rounds: 2,
                latency_rates: [10_000.0, 50_000.0],
                latency_secs: 2.0,
                fanout_outputs: 20_000,
                fanout_rounds: 1,
                pattern_messages: 5_000,
                pattern_rounds: 1,
                payload_bytes: 40 << 20,
                payload_messages: 20_000,
                payload_rounds: 1,
                swap_rate: 5_000.0,
                swaps: 3,
                big_swaps: 1,
                startup_rounds: 1,
                stream_entries: 20_000,
                gateway_paces: [(20.0, 100), (100.0, 200)],
                gateway_rounds: 2,
            }
        } else {
            Self {
                messages: 200_000,
                rounds: 5,
                latency_rates: [10_000.0, 50_000.0],
                latency_secs: 5.0,
                fanout_outputs: 100_000,
                fanout_rounds: 2,
                pattern_messages: 30_000,
                pattern_rounds: 2,
                payload_bytes: 100 << 20,
                payload_messages: 100_000,
                payload_rounds: 3,
                swap_rate: 5_000.0,
                swaps: 10,
                big_swaps: 3,
                startup_rounds: 3,
                stream_entries: 200_000,
                gateway_paces: [(20.0, 200), (100.0, 1_000)],
                gateway_rounds: 3,
            }
        };
        if let Some(messages) = args.messages {
            scale.messages = messages;
        }
        if let Some(rounds) = args.rounds {
            scale.rounds = rounds.max(1);
        }
        scale
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(url) = &args.relay {
        return relay::main(url);
    }
    if let (Some(url), Some(group)) = (&args.stream_consumer, &args.stream_group) {
        return relay::consume(url, STREAM_KEY, group, args.stream_publish);
    }
    if let (Some(url), Some(listen)) = (&args.fanout_relay, &args.fanout_listen) {
        return websocket::relay_main(url, listen, args.fanout_read_buffer);
    }
    let mut wanted = Vec::new();
    for item in &args.only {
        let item = item.trim().to_ascii_lowercase();
        let section = SECTIONS
            .iter()
            .find(|(n, name)| item == n.to_string() || item == *name)
            .with_context(|| format!("unknown section {item:?}; known: {SECTIONS:?}"))?;
        wanted.push(section.0);
    }
    if wanted.is_empty() {
        wanted = SECTIONS.iter().map(|(n, _)| *n).collect();
    }
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(run(Scale::new(&args), args.quick, &wanted))
}

async fn run(scale: Scale, quick: bool, wanted: &[u8]) -> anyhow::Result<()> {
    let started = Instant::now();
    print_machine(quick);
    // Without persistence, otherwise with Redis's defaults: a subscriber that falls behind is
    // cut at its `client-output-buffer-limit pubsub` (32 MiB, or 8 MiB for 60 s), as it would
    // be on a user's server.
    let redis = RedisServer::start().await?;
    print_setup(&redis.config_get("client-output-buffer-limit").await?);
    let mut bench = Bench::new(redis, scale)?;
    let result = bench.sections(wanted).await;
    bench.redis.kill().await;
    result?;
    println!("\nwhole run: {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn print_machine(quick: bool) {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "# Switchyard pipeline bench{}",
        if quick { " (--quick)" } else { "" }
    );
    println!(
        "machine: {cores} cores (nproc), {cpu}, Linux {}",
        kernel.trim()
    );
    let version = RedisServer::version().unwrap_or_else(|e| format!("unknown ({e})"));
    println!("redis:   {version}");
}

/// What runs against what, with the Redis settings in force.
fn print_setup(output_buffer_limit: &str) {
    println!(
        "setup:   publisher, redis-server, receiver and the process under test on this machine; \
         redis without persistence, otherwise its defaults (client-output-buffer-limit \
         {output_buffer_limit}); switchyard with its default [plugins] settings (the bench \
         sets dir and compile_cache)"
    );
    println!(
        "relay:   PSUBSCRIBE fwd:* on one connection; a writer task fed through a channel \
         ({} messages) sends what has accumulated, up to {} PUBLISH fwded:REST, as one \
         pipeline per round trip, as switchyard's outgoing queue does",
        relay::QUEUE,
        relay::MAX_BATCH
    );
}

/// What every section shares.
struct Bench {
    redis: RedisServer,
    /// The Redis URL every section uses, `redis://127.0.0.1:PORT`.
    url: String,
    scale: Scale,
    forward: &'static [u8],
    work: tempfile::TempDir,
    /// A compile cache shared by the sections that do not measure start-up.
    cache: PathBuf,
    folders: std::cell::Cell<usize>,
}

impl Bench {
    fn new(redis: RedisServer, scale: Scale) -> anyhow::Result<Self> {
        let work = tempfile::tempdir()?;
        let cache = work.path().join("compile-cache");
        std::fs::create_dir(&cache)?;
        Ok(Self {
            url: redis.url(),
            redis,
            scale,
            forward: switchyard::examples::FORWARD,
            work,
            cache,
            folders: std::cell::Cell::new(0),
        })
    }

    fn url(&self) -> &str {
        &self.url
    }

    /// The process id of the bench's `redis-server`.
    fn redis_pid(&self) -> anyhow::Result<u32> {
        self.redis
            .pid()
            .context("the bench's redis-server is not running")
    }

    async fn sections(&self, wanted: &[u8]) -> anyhow::Result<()> {
        for &section in wanted {
            let started = Instant::now();
            match section {
                1 => self.throughput().await,
                2 => self.latency().await,
                3 => self.fan_out().await,
                4 => self.patterns().await,
                5 => self.payloads().await,
                6 => self.hot_swap().await,
                7 => self.start_up().await,
                8 => self.memory().await,
                9 => self.streams().await,
                10 => self.gateway().await,
                11 => self.bursts().await,
                _ => Ok(()),
            }
            .with_context(|| format!("section {section}"))?;
            println!("({:.1} s)", started.elapsed().as_secs_f64());
        }
        Ok(())
    }

    /// A new, empty folder under the bench's temporary directory.
    fn folder(&self, what: &str) -> anyhow::Result<PathBuf> {
        let n = self.folders.get();
        self.folders.set(n + 1);
        let dir = self.work.path().join(format!("{what}-{n}"));
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// A plugins folder with `count` forward copies (`forward`, or `fwd-000`...), all
    /// subscribed to `fwd:*`; byte-different copies if `distinct`.
    fn forwards(&self, count: usize, distinct: bool) -> anyhow::Result<PathBuf> {
        let dir = self.folder("plugins")?;
        let manifest = harness::forward_manifest(None);
        for i in 0..count {
            let name = copy_name(count, i);
            let bytes = if distinct {
                harness::with_custom_section(self.forward, "bench-copy", name.as_bytes())
            } else {
                self.forward.to_vec()
            };
            harness::install_plugin(&dir, &name, &bytes, &manifest)?;
        }
        Ok(dir)
    }

    fn setup<'a>(&'a self, plugins: &'a Path) -> HostSetup<'a> {
        HostSetup {
            plugins,
            compile_cache: Some(&self.cache),
            extra: "",
        }
    }

    /// One windowed run through a fresh Switchyard on `plugins`, the publisher keeping at most
    /// `window` copies in flight.
    async fn switchyard_run(
        &self,
        url: &str,
        plugins: &Path,
        count: u64,
        size: usize,
        copies: u64,
        window: u64,
    ) -> anyhow::Result<HostRun> {
        let host = Switchyard::start(url, &self.setup(plugins)).await?;
        let cpu = harness::cpu_time(host.pid())?;
        let transfer = harness::transfer(url, OUTPUT_PATTERN, count, size, copies, window).await;
        let cpu = harness::cpu_time(host.pid())? - cpu;
        let losses = host.losses().await;
        let handle = host.mean_handle().await;
        let tail = host.log_tail();
        host.stop().await;
        let mut transfer = transfer.with_context(|| format!("switchyard log:\n{tail}"))?;
        transfer.cpu_us = per_message(cpu, (count + harness::WARM_UP) * copies);
        Ok(HostRun {
            transfer,
            losses: losses?,
            mean_handle: handle?,
        })
    }

    /// One windowed run through a fresh relay, the publisher keeping at most `window`
    /// messages in flight.
    async fn relay_run(
        &self,
        url: &str,
        count: u64,
        size: usize,
        window: u64,
    ) -> anyhow::Result<Transfer> {
        let mut relay = Relay::start(url).await?;
        let cpu = harness::cpu_time(relay.pid())?;
        let transfer = harness::transfer(url, OUTPUT_PATTERN, count, size, 1, window).await;
        let cpu = harness::cpu_time(relay.pid())? - cpu;
        let cut = relay.has_exited();
        relay.stop().await;
        let mut transfer = transfer?;
        transfer.cpu_us = per_message(cpu, count + harness::WARM_UP);
        transfer.cut = cut;
        Ok(transfer)
    }

    /// Section 2.
    async fn latency(&self) -> anyhow::Result<()> {
        let secs = self.scale.latency_secs;
        println!(
            "\n## 2. Added latency: publish to arrival of the republished copy, 64 B, paced \
             publisher (1 ms bursts) for {secs} s per run"
        );
        let mut table = Table::new(&[
            "offered msg/s",
            "process",
            "achieved",
            "p50 µs",
            "p99 µs",
            "p99.9 µs",
            "max µs",
            "missing",
            "note",
        ]);
        for target in self.scale.latency_rates {
            let relay = {
                let relay = Relay::start(self.url()).await?;
                let run = self.paced_run(target, secs).await;
                relay.stop().await;
                run?
            };
            let host = {
                let plugins = self.forwards(1, false)?;
                let host = Switchyard::start(self.url(), &self.setup(&plugins)).await?;
                let run = self.paced_run(target, secs).await;
                host.stop().await;
                run?
            };
            for (name, run) in [("relay", &relay), ("switchyard", &host)] {
                table.row(run.row(target, name));
            }
            if relay.sustained && host.sustained {
                let diff = |q: f64| {
                    host.seen.latency_us.value_at_quantile(q) as i64
                        - relay.seen.latency_us.value_at_quantile(q) as i64
                };
                table.row(vec![
                    String::new(),
                    "difference".to_owned(),
                    String::new(),
                    format!("{:+}", diff(0.5)),
                    format!("{:+}", diff(0.99)),
                    format!("{:+}", diff(0.999)),
                    String::new(),
                    String::new(),
                    "switchyard - relay".to_owned(),
                ]);
            } else {
                table.row(vec![
                    String::new(),
                    "difference".to_owned(),
                    String::new(),
                    "-".to_owned(),
                    "-".to_owned(),
                    "-".to_owned(),
                    String::new(),
                    String::new(),
                    "not comparable: a rate was not sustained".to_owned(),
                ]);
            }
        }
        table.print();
        println!(
            "   sustained = every message arrived within {} s of the end and the delivered \
             rate was within 3% of the offered one; otherwise percentiles would measure a \
             growing backlog, so they are not shown. missing: not arrived by then (a backlog, \
             not necessarily lost)",
            LATENCY_GRACE.as_secs()
        );
        Ok(())
    }

    /// A paced run of `secs` at `target` messages/s through whatever is running.
    async fn paced_run(&self, target: f64, secs: f64) -> anyhow::Result<PacedRun> {
        let receiver = Receiver::start(self.url(), OUTPUT_PATTERN).await?;
        let mut publisher = Publisher::new(self.url(), 64).await?;
        publisher.warm_up(&receiver, 1).await?;
        let started = Instant::now();
        let paced = publisher
            .paced(
                target,
                Duration::from_secs_f64(secs),
                &CancellationToken::new(),
            )
            .await?;
        let all = tokio::time::timeout(LATENCY_GRACE, receiver.wait_measured(paced.sent))
            .await
            .unwrap_or(false);
        let seen = receiver.finish().await?;
        let (lost, duplicated) = seen.lost_and_duplicated(paced.sent, 1);
        let delivered = seen.last.map_or(0.0, |last| {
            seen.measured as f64 / last.duration_since(started).as_secs_f64()
        });
        let sustained = all
            && lost == 0
            && paced.achieved >= 0.97 * target
            && delivered >= 0.97 * paced.achieved;
        Ok(PacedRun {
            achieved: paced.achieved,
            delivered,
            lost: lost + duplicated,
            sustained,
            seen,
        })
    }

    /// Section 3.
    async fn fan_out(&self) -> anyhow::Result<()> {
        let outputs = self.scale.fanout_outputs;
        println!(
            "\n## 3. Fan-out: one stream on {INPUT_CHANNEL} to N forward copies (all on fwd:*), \
             about {outputs} output messages per run, 64 B, best of {} runs; publisher \
             throttled to {} copies in flight",
            self.scale.fanout_rounds,
            harness::window(64)
        );
        let mut table = Table::new(&[
            "plugins",
            "input msgs",
            "input msg/s",
            "output msg/s",
            "output vs 1",
            "lost",
            "shed",
        ]);
        let mut first = None;
        for copies in [1usize, 10, 100] {
            let plugins = self.forwards(copies, false)?;
            let count = (outputs / copies as u64).max(500);
            let mut best: Option<HostRun> = None;
            let mut lost = 0;
            let mut shed = 0;
            for _ in 0..self.scale.fanout_rounds {
                let run = self
                    .switchyard_run(
                        self.url(),
                        &plugins,
                        count,
                        64,
                        copies as u64,
                        harness::window(64),
                    )
                    .await?;
                lost += run.transfer.lost + run.transfer.duplicated;
                shed += run.losses.shed() + run.losses.failed;
                if best
                    .as_ref()
                    .is_none_or(|b| run.transfer.output_rate > b.transfer.output_rate)
                {
                    best = Some(run);
                }
            }
            let best = best.context("no run")?;
            let base = *first.get_or_insert(best.transfer.output_rate);
            table.row(vec![
                copies.to_string(),
                count.to_string(),
                rate(best.transfer.input_rate),
                rate(best.transfer.output_rate),
                format!("{:.2}", best.transfer.output_rate / base),
                lost.to_string(),
                shed.to_string(),
            ]);
        }
        table.print();
        Ok(())
    }

    /// Section 4.
    async fn patterns(&self) -> anyhow::Result<()> {
        let count = self.scale.pattern_messages;
        println!(
            "\n## 4. Pattern scaling: one forward plugin matches {INPUT_CHANNEL}, the other \
             patterns never match; {count} messages of 64 B per run, best of {}; publisher \
             throttled to {} messages in flight",
            self.scale.pattern_rounds,
            harness::window(64)
        );
        let mut table = Table::new(&[
            "patterns",
            "plugins",
            "switchyard msg/s",
            "vs 1",
            "relay+idle msg/s",
            "vs 1",
            "b/a",
            "lost a/b",
        ]);
        // (plugins besides forward, patterns each; forward's own non-matching patterns)
        let cases: [(usize, usize, usize); 3] = [(0, 0, 0), (99, 1, 0), (99, 100, 99)];
        let mut base: Option<(f64, f64)> = None;
        for (idle_plugins, each, own) in cases {
            let dir = self.folder("patterns")?;
            let mut idle_patterns = Vec::new();
            let mut forward_patterns: Vec<String> =
                (0..own).map(|i| format!("nomatch:forward:{i}:*")).collect();
            idle_patterns.extend(forward_patterns.iter().cloned());
            forward_patterns.push("fwd:*".to_owned());
            harness::install_plugin(
                &dir,
                "forward",
                self.forward,
                &harness::forward_manifest(Some(&forward_patterns)),
            )?;
            for p in 0..idle_plugins {
                let patterns: Vec<String> = (0..each).map(|i| format!("idle:{p}:{i}:*")).collect();
                idle_patterns.extend(patterns.iter().cloned());
                harness::install_plugin(
                    &dir,
                    &format!("idle-{p:03}"),
                    self.forward,
                    &harness::forward_manifest(Some(&patterns)),
                )?;
            }
            let total = idle_patterns.len() + 1;
            // A fresh server per case: redis 7.0 does not shrink its pattern table after
            // PUNSUBSCRIBE, and PUBLISH walks the whole table, so a server that once held
            // 10,000 patterns stays slow for every later measurement.
            let mut redis = RedisServer::start().await?;
            let measured = self
                .pattern_case(&redis.url(), &dir, &idle_patterns, count)
                .await;
            redis.kill().await;
            let (a, b, lost) = measured?;
            let (a1, b1) = *base.get_or_insert((a, b));
            table.row(vec![
                total.to_string(),
                (idle_plugins + 1).to_string(),
                rate(b),
                format!("{:.2}", b / b1),
                rate(a),
                format!("{:.2}", a / a1),
                format!("{:.2}", b / a),
                format!("{}/{}", lost.0, lost.1),
            ]);
        }
        table.print();
        println!(
            "   relay+idle: the relay while another connection holds the same non-matching \
             patterns, so redis does the same per-PUBLISH pattern matching. 10,000 patterns: \
             forward lists 99 non-matching patterns before fwd:*, so the host's once-per-plugin \
             check tests them for every message. Each case runs on its own redis-server"
        );
        Ok(())
    }

    /// Best relay and Switchyard rates (and losses) for one pattern case on `url`.
    async fn pattern_case(
        &self,
        url: &str,
        dir: &Path,
        idle_patterns: &[String],
        count: u64,
    ) -> anyhow::Result<(f64, f64, (u64, u64))> {
        {
            let mut host_best: Option<HostRun> = None;
            let mut relay_best: Option<Transfer> = None;
            let mut lost = (0, 0);
            for _ in 0..self.scale.pattern_rounds {
                let run = self
                    .switchyard_run(url, dir, count, 64, 1, harness::window(64))
                    .await?;
                lost.1 += run.transfer.lost + run.transfer.duplicated + run.losses.shed();
                if host_best
                    .as_ref()
                    .is_none_or(|b| run.transfer.output_rate > b.transfer.output_rate)
                {
                    host_best = Some(run);
                }
                // The same patterns held, idle, by another connection, so that redis pays the
                // same matching cost per PUBLISH for the relay.
                let client = redis::Client::open(url)?;
                let mut holder = client.get_async_pubsub().await?;
                for chunk in idle_patterns.chunks(1000) {
                    holder.psubscribe(chunk).await?;
                }
                let run = self.relay_run(url, count, 64, harness::window(64)).await?;
                for chunk in idle_patterns.chunks(1000) {
                    holder.punsubscribe(chunk).await?;
                }
                drop(holder);
                lost.0 += run.lost + run.duplicated;
                if relay_best
                    .as_ref()
                    .is_none_or(|b| run.output_rate > b.output_rate)
                {
                    relay_best = Some(run);
                }
            }
            let b = host_best.context("no run")?.transfer.output_rate;
            let a = relay_best.context("no run")?.output_rate;
            Ok((a, b, lost))
        }
    }

    /// Section 5.
    async fn payloads(&self) -> anyhow::Result<()> {
        let budget = self.scale.payload_bytes;
        let rounds = self.scale.payload_rounds;
        println!(
            "\n## 5. Payload sizes through forward vs the relay: about {} MB per run (at most \
             {} messages), median of {rounds} rounds, alternating; publisher throttled to about \
             16 MiB in flight (at most {} messages)",
            budget / 1_000_000,
            self.scale.payload_messages,
            harness::window(64)
        );
        let mut table = Table::new(&[
            "payload",
            "messages",
            "relay msg/s",
            "relay MB/s",
            "switchyard msg/s",
            "switchyard MB/s",
            "b/a",
            "CPU µs/msg a/b",
            "lost a/b",
        ]);
        let plugins = self.forwards(1, false)?;
        for size in [64usize, 1024, 16 * 1024, 256 * 1024] {
            let count = (budget / size as u64).clamp(300, self.scale.payload_messages);
            let window = harness::window(size);
            let mut relay = Vec::new();
            let mut host = Vec::new();
            for round in 0..rounds {
                if round % 2 == 0 {
                    relay.push(self.relay_run(self.url(), count, size, window).await?);
                    host.push(
                        self.switchyard_run(self.url(), &plugins, count, size, 1, window)
                            .await?
                            .transfer,
                    );
                } else {
                    host.push(
                        self.switchyard_run(self.url(), &plugins, count, size, 1, window)
                            .await?
                            .transfer,
                    );
                    relay.push(self.relay_run(self.url(), count, size, window).await?);
                }
            }
            let pick = |runs: &[Transfer], f: fn(&Transfer) -> f64| {
                median(&runs.iter().map(f).collect::<Vec<_>>())
            };
            let a = pick(&relay, |t| t.output_rate);
            let b = pick(&host, |t| t.output_rate);
            table.row(vec![
                bytes(size),
                count.to_string(),
                rate(a),
                format!("{:.1}", pick(&relay, |t| t.output_mb)),
                rate(b),
                format!("{:.1}", pick(&host, |t| t.output_mb)),
                format!("{:.2}", b / a),
                format!(
                    "{:.1}/{:.1}",
                    pick(&relay, |t| t.cpu_us),
                    pick(&host, |t| t.cpu_us)
                ),
                format!(
                    "{}/{}",
                    relay.iter().map(|t| t.lost + t.duplicated).sum::<u64>(),
                    host.iter().map(|t| t.lost + t.duplicated).sum::<u64>()
                ),
            ]);
        }
        table.print();
        println!(
            "   MB = 10^6 bytes of payload received on fwded:*; CPU µs/msg: CPU time of the \
             relay / switchyard process (all threads) per message"
        );
        Ok(())
    }

    /// Section 6.
    async fn hot_swap(&self) -> anyhow::Result<()> {
        let rate_ = self.scale.swap_rate;
        println!(
            "\n## 6. Hot swap under traffic: {rate_:.0} msg/s (64 B) through forward while a \
             byte-different copy is renamed over a plugin file; settle_ms default (50)"
        );
        let mut table = Table::new(&[
            "swapped",
            "size",
            "swaps",
            "to new hash med",
            "max",
            "to 1st new output med",
            "max",
            "gap at swap",
            "gap otherwise",
            "sent",
            "lost",
        ]);
        let dir = self.forwards(1, false)?;
        let stats = self
            .swap_run(&dir, "", "forward", self.forward, self.scale.swaps)
            .await?;
        table.row(stats.row("forward", self.forward.len(), true));

        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let target =
            std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
        let python = target.join("plugins/polyglot/notify-router-py.wasm");
        let mut note = None;
        if python.is_file() {
            let wasm = std::fs::read(&python)?;
            let manifest =
                std::fs::read_to_string(root.join("plugins/notify-router/notify-router.toml"))?;
            let dir = self.forwards(1, false)?;
            harness::install_plugin(&dir, "notify-router", &wasm, &manifest)?;
            let outputs = self.folder("outputs")?;
            let mut extra = String::new();
            for name in ["email", "sms", "push"] {
                extra.push_str(&format!(
                    "[outputs.{name}]\nkind = \"file\"\npath = {:?}\n\n",
                    outputs.join(format!("{name}.jsonl")).display().to_string()
                ));
            }
            let stats = self
                .swap_run(&dir, &extra, "notify-router", &wasm, self.scale.big_swaps)
                .await?;
            table.row(stats.row("notify-router-py", wasm.len(), false));
        } else {
            note = Some(format!(
                "   notify-router-py: not measured, {} is not built (`cargo test --workspace` \
                 builds it)",
                python.display()
            ));
        }
        table.print();
        println!(
            "   to new hash: rename until /plugins shows the new content hash (polled every \
             2 ms). to 1st new output: rename until the first arrival of a message published \
             after the new hash showed; the worker picks the new version for the next message \
             it takes, so this bounds the switch from above. gaps: longest pause between \
             arrivals on fwded:* within 1 s after each rename, and elsewhere (1 ms bursts). \
             For notify-router-py, forward keeps the traffic and shows whether the swap \
             (compiling a multi-megabyte component: a new hash is never in the compile cache) disturbs another plugin."
        );
        if let Some(note) = note {
            println!("{note}");
        }
        Ok(())
    }

    /// Traffic through `forward` while `swapped` is replaced `swaps` times.
    async fn swap_run(
        &self,
        dir: &Path,
        extra: &str,
        swapped: &str,
        wasm: &[u8],
        swaps: usize,
    ) -> anyhow::Result<SwapStats> {
        let setup = HostSetup {
            plugins: dir,
            compile_cache: Some(&self.cache),
            extra,
        };
        let host = Switchyard::start(self.url(), &setup).await?;
        let receiver = Receiver::start(self.url(), OUTPUT_PATTERN).await?;
        let mut publisher = Publisher::new(self.url(), 64).await?;
        publisher.warm_up(&receiver, 1).await?;
        let next_seq = publisher.next_seq.clone();
        let stop = CancellationToken::new();
        let traffic = {
            let stop = stop.clone();
            let rate_ = self.scale.swap_rate;
            tokio::spawn(async move {
                publisher
                    .paced(rate_, Duration::from_secs(3600), &stop)
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut marks = Vec::new();
        let mut failure = None;
        for i in 0..swaps {
            let old = host.version_hash(swapped).await?;
            let bytes = harness::with_custom_section(
                wasm,
                "bench-swap",
                format!("{i}-{}", harness::wall_nanos()).as_bytes(),
            );
            let renamed = harness::replace_wasm(dir, swapped, &bytes)?;
            let seen = loop {
                let now = host.version_hash(swapped).await?;
                if now.is_some() && now != old {
                    break Some((Instant::now(), next_seq.load(Ordering::Acquire)));
                }
                if renamed.elapsed() > harness::READY_TIMEOUT {
                    break None;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            };
            let Some((visible, seq)) = seen else {
                failure = Some(format!(
                    "swap {i}: no new version within {:?}:\n{}",
                    harness::READY_TIMEOUT,
                    host.log_tail()
                ));
                break;
            };
            marks.push((renamed, visible, seq));
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        stop.cancel();
        let paced = traffic.await??;
        receiver.wait_measured(paced.sent).await;
        let base = receiver.base;
        let seen = receiver.finish().await?;
        let (lost, duplicated) = seen.lost_and_duplicated(paced.sent, 1);
        let (shed, failed) = host.shed_and_failed().await?;
        host.stop().await;
        if let Some(failure) = failure {
            anyhow::bail!(failure);
        }
        let at = |nanos: u64| base + Duration::from_nanos(nanos);
        let mut arrivals: Vec<u64> = seen
            .first_arrival
            .iter()
            .copied()
            .filter(|&t| t != u64::MAX)
            .collect();
        arrivals.sort_unstable();
        let mut to_hash = Vec::new();
        let mut to_output = Vec::new();
        let mut gap_swap = Duration::ZERO;
        let mut gap_other = Duration::ZERO;
        for pair in arrivals.windows(2) {
            let gap = Duration::from_nanos(pair[1] - pair[0]);
            let when = at(pair[1]);
            let near_swap = marks
                .iter()
                .any(|(renamed, _, _)| when >= *renamed && when <= *renamed + SWAP_WINDOW);
            if near_swap {
                gap_swap = gap_swap.max(gap);
            } else {
                gap_other = gap_other.max(gap);
            }
        }
        for (renamed, visible, seq) in &marks {
            to_hash.push(visible.duration_since(*renamed));
            let first = seen
                .first_arrival
                .iter()
                .skip(usize::try_from(*seq).unwrap_or(usize::MAX))
                .find(|&&t| t != u64::MAX);
            if let Some(&first) = first {
                to_output.push(at(first).saturating_duration_since(*renamed));
            }
        }
        Ok(SwapStats {
            to_hash,
            to_output,
            gap_swap,
            gap_other,
            sent: paced.sent,
            lost: lost + duplicated + shed + failed,
        })
    }

    /// Section 7.
    async fn start_up(&self) -> anyhow::Result<()> {
        let rounds = self.scale.startup_rounds;
        println!(
            "\n## 7. Start-up: spawn until /readyz answers 200; cold = empty compile_cache \
             folder, warm = second start on the same folder; median of {rounds}"
        );
        let mut table = Table::new(&[
            "plugins",
            "cold ms",
            "cold range",
            "warm ms",
            "warm range",
            "cold/warm",
        ]);
        for count in [1usize, 100] {
            let dir = self.forwards(count, true)?;
            let mut cold = Vec::new();
            let mut warm = Vec::new();
            for _ in 0..rounds {
                let cache = self.folder("startup-cache")?;
                let setup = HostSetup {
                    plugins: &dir,
                    compile_cache: Some(&cache),
                    extra: "",
                };
                for times in [&mut cold, &mut warm] {
                    let mut host = Switchyard::spawn(self.url(), &setup)?;
                    let ready = host.wait_ready().await;
                    host.stop().await;
                    times.push(ready?.as_secs_f64() * 1e3);
                }
            }
            table.row(vec![
                count.to_string(),
                format!("{:.0}", median(&cold)),
                range_ms(&cold),
                format!("{:.0}", median(&warm)),
                range_ms(&warm),
                format!("{:.1}", median(&cold) / median(&warm)),
            ]);
        }
        table.print();
        println!(
            "   the 100 copies are byte-different (a custom section each), so each is compiled \
             and cached on its own, as 100 different plugins would be"
        );
        Ok(())
    }

    /// Section 9.
    async fn streams(&self) -> anyhow::Result<()> {
        let entries = self.scale.stream_entries;
        let rounds = self.scale.rounds;
        println!(
            "\n## 9. Streams: {entries} entries ({STREAM_PAYLOAD} B payload field) preloaded in \
             {STREAM_KEY}, read through one consumer group until every one is acknowledged; \
             median of {rounds} rounds, the cases alternating"
        );
        let client = redis::Client::open(self.url())?;
        let mut connection = client.get_multiplexed_async_connection().await?;
        let preloaded = preload_stream(&mut connection, entries).await?;
        println!(
            "   rate = entries / (start signal .. XINFO GROUPS shows the last entry delivered and \
             none pending, polled every {} ms); every consumer reads XREADGROUP COUNT \
             {STREAM_BATCH} (BLOCK {STREAM_BLOCK_MS} when waiting) and sends each batch's XACK \
             in one pipeline with a following read; baseline: one read at a time; switchyard: \
             the next batch is read while the plugin handles one (at most two per reader)",
            STREAM_POLL.as_millis()
        );
        println!(
            "   context: the preload (pipelined XADD, {PRELOAD_PIPELINE} per pipeline) ran at {} \
             entries/s",
            rate(entries as f64 / preloaded.as_secs_f64())
        );
        let one = [self.stream_plugins()?];
        let two = [self.stream_plugins()?, self.stream_plugins()?];
        // (hosts' plugins folders, or none for the bare consumer; whether it republishes)
        let cases: [(&[PathBuf], bool); 4] =
            [(&[], false), (&[], true), (&one, false), (&two, false)];
        let mut runs: [Vec<StreamRun>; 4] = Default::default();
        for round in 0..rounds {
            let order = if round % 2 == 0 {
                [0, 1, 2, 3]
            } else {
                [3, 2, 1, 0]
            };
            for case in order {
                let (hosts, publish) = cases[case];
                let run = self
                    .stream_run(&mut connection, hosts, publish, entries)
                    .await
                    .with_context(|| format!("round {round}, {}", STREAM_CASES[case]))?;
                runs[case].push(run);
            }
        }
        redis::cmd("DEL")
            .arg(STREAM_KEY)
            .query_async::<()>(&mut connection)
            .await
            .context("DEL of the stream failed")?;

        let mut table = Table::new(&[
            "consumers",
            "entries/s",
            "range",
            "vs baseline",
            "vs +PUBLISH",
            "vs 1 host",
            "CPU µs/entry",
            "redis µs/entry",
            "cores busy",
            "acked by host",
            "dup/failed",
        ]);
        let rates: Vec<Vec<f64>> = runs
            .iter()
            .map(|runs| runs.iter().map(|r| r.rate).collect())
            .collect();
        let baseline = median(&rates[0]);
        let publishing = median(&rates[1]);
        let one_host = median(&rates[2]);
        for (case, runs) in runs.iter().enumerate() {
            let rate_ = median(&rates[case]);
            let split = if case == 3 {
                // The larger host's share, median over rounds.
                let larger: Vec<f64> = runs
                    .iter()
                    .map(|r| {
                        let total = r.acked.iter().sum::<u64>().max(1) as f64;
                        r.acked.iter().copied().max().unwrap_or(0) as f64 / total
                    })
                    .collect();
                let larger = median(&larger);
                format!("{:.0}%/{:.0}%", larger * 100.0, (1.0 - larger) * 100.0)
            } else {
                "-".to_owned()
            };
            table.row(vec![
                STREAM_CASES[case].to_owned(),
                rate(rate_),
                range(&rates[case]),
                format!("{:.2}", rate_ / baseline),
                if case >= 1 {
                    format!("{:.2}", rate_ / publishing)
                } else {
                    String::new()
                },
                if case == 3 {
                    format!("{:.2}", rate_ / one_host)
                } else {
                    String::new()
                },
                format!(
                    "{:.1}",
                    median(&runs.iter().map(|r| r.cpu_us).collect::<Vec<_>>())
                ),
                format!(
                    "{:.1}",
                    median(&runs.iter().map(|r| r.redis_us).collect::<Vec<_>>())
                ),
                format!(
                    "{:.2}",
                    median(&runs.iter().map(|r| r.busy).collect::<Vec<_>>())
                ),
                split,
                if case <= 1 {
                    "-".to_owned()
                } else {
                    format!(
                        "{}/{}",
                        runs.iter().map(|r| r.duplicated).sum::<u64>(),
                        runs.iter().map(|r| r.failed).sum::<u64>()
                    )
                },
            ]);
        }
        table.print();
        println!(
            "   every run has a fresh group, created by the bench at the end of the stream so that \
             no consumer reads before all are blocked in XREADGROUP; the start signal moves the \
             group to the beginning (XGROUP SETID 0) and adds one entry, which wakes the blocked \
             reads (so {} entries per run). baseline: the bench binary re-executed as a bare \
             consumer (same redis crate). switchyard: forward, whose manifest replaces its \
             subscriptions with {STREAM_KEY}; it republishes each entry on fwded:orders with \
             send (no subscriber). baseline + PUBLISH does that too: the batch's PUBLISHes, \
             its XACK and the next XREADGROUP in one pipeline. CPU µs/entry: the consumer processes (both hosts \
             together); redis µs/entry: redis-server. cores busy: CPU time of the consumers and \
             redis-server over the run's wall time. acked by host: stream_acked in /plugins, the \
             larger host's share first (median of rounds). dup/failed: acknowledgements beyond \
             the entries, failed handle calls, all rounds",
            entries + 1
        );
        Ok(())
    }

    /// A plugins folder with forward reading [`STREAM_KEY`] through [`HOST_GROUP`].
    fn stream_plugins(&self) -> anyhow::Result<PathBuf> {
        let dir = self.folder("stream-plugins")?;
        harness::install_plugin(
            &dir,
            "forward",
            self.forward,
            &harness::stream_manifest(HOST_GROUP),
        )?;
        Ok(dir)
    }

    /// One stream run through a fresh group: the bare consumer (republishing if `publish`) if
    /// `hosts` is empty, else one Switchyard per plugins folder in `hosts`.
    async fn stream_run(
        &self,
        connection: &mut redis::aio::MultiplexedConnection,
        hosts: &[PathBuf],
        publish: bool,
        entries: u64,
    ) -> anyhow::Result<StreamRun> {
        let group = if hosts.is_empty() {
            BASELINE_GROUP
        } else {
            HOST_GROUP
        };
        // At the end of the stream, the group gives the consumers nothing until the signal.
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(STREAM_KEY)
            .arg(group)
            .arg("$")
            .query_async::<()>(connection)
            .await
            .context("XGROUP CREATE failed")?;
        // Connections opened from now on have larger ids: the consumers'.
        let mark: u64 = redis::cmd("CLIENT")
            .arg("ID")
            .query_async(connection)
            .await
            .context("CLIENT ID failed")?;
        let expected = entries + 1;
        let measured = if hosts.is_empty() {
            let consumer = StreamConsumer::start(self.url(), group, publish).await?;
            let timing = self
                .time_stream(connection, group, mark, &[consumer.pid()])
                .await;
            consumer.stop().await;
            timing.map(|timing| (timing, Vec::new(), 0))
        } else {
            self.host_stream_run(connection, hosts, mark).await
        };
        redis::cmd("XGROUP")
            .arg("DESTROY")
            .arg(STREAM_KEY)
            .arg(group)
            .query_async::<()>(connection)
            .await
            .context("XGROUP DESTROY failed")?;
        let ((timing, wake), acked, failed) = measured?;
        // The stream keeps its preloaded entries only; the next run adds its own signal.
        redis::cmd("XDEL")
            .arg(STREAM_KEY)
            .arg(&wake)
            .query_async::<()>(connection)
            .await
            .context("XDEL failed")?;
        let total: u64 = acked.iter().sum();
        if !hosts.is_empty() && total < expected {
            bail!("the hosts acknowledged {total} entries of {expected}, by /plugins");
        }
        let secs = timing.elapsed.as_secs_f64().max(1e-9);
        Ok(StreamRun {
            rate: expected as f64 / secs,
            cpu_us: per_message(timing.cpu, expected),
            redis_us: per_message(timing.redis_cpu, expected),
            busy: (timing.cpu + timing.redis_cpu).as_secs_f64() / secs,
            duplicated: total.saturating_sub(expected),
            acked,
            failed,
        })
    }

    /// The Switchyard part of [`Bench::stream_run`]: the hosts started together, timed, and
    /// their acknowledged and failed counts.
    async fn host_stream_run(
        &self,
        connection: &mut redis::aio::MultiplexedConnection,
        plugins: &[PathBuf],
        mark: u64,
    ) -> anyhow::Result<((StreamTiming, String), Vec<u64>, u64)> {
        let mut hosts = Vec::new();
        for (i, plugins) in plugins.iter().enumerate() {
            let extra = stream_host_config(i);
            let setup = HostSetup {
                plugins,
                compile_cache: Some(&self.cache),
                extra: &extra,
            };
            hosts.push(Switchyard::spawn(self.url(), &setup)?);
        }
        for host in &mut hosts {
            host.wait_ready().await?;
        }
        let pids: Vec<u32> = hosts.iter().map(Switchyard::pid).collect();
        let timing = self.time_stream(connection, HOST_GROUP, mark, &pids).await;
        let mut acked = Vec::new();
        let mut failed = 0;
        let mut tails = String::new();
        for (i, host) in hosts.iter().enumerate() {
            tails.push_str(&format!("switchyard {i}:\n{}\n", host.log_tail()));
            if timing.is_ok() {
                let (a, f) = host.stream_acked_and_failed().await?;
                acked.push(a);
                failed += f;
            }
        }
        for host in hosts {
            host.stop().await;
        }
        let timing = timing.with_context(|| format!("logs:\n{tails}"))?;
        Ok((timing, acked, failed))
    }

    /// Waits until the consumers (`pids`, connected after client id `mark`) block in
    /// XREADGROUP, gives the start signal, and polls until `group` has delivered the last
    /// entry and has none pending. Returns the timing and the id of the signal's entry.
    async fn time_stream(
        &self,
        connection: &mut redis::aio::MultiplexedConnection,
        group: &str,
        mark: u64,
        pids: &[u32],
    ) -> anyhow::Result<(StreamTiming, String)> {
        wait_blocked(connection, mark, pids.len()).await?;
        let cpu = cpu_of(pids)?;
        let redis_cpu = harness::cpu_time(self.redis_pid()?)?;
        let started = Instant::now();
        let mut signal = redis::pipe();
        signal
            .cmd("XGROUP")
            .arg("SETID")
            .arg(STREAM_KEY)
            .arg(group)
            .arg("0")
            .arg("ENTRIESREAD")
            .arg(0)
            .ignore()
            .cmd("XADD")
            .arg(STREAM_KEY)
            .arg("*")
            .arg("payload")
            .arg(stream_payload());
        let (wake,): (String,) = signal
            .query_async(connection)
            .await
            .context("start signal (XGROUP SETID, XADD) failed")?;
        let mut last = (String::new(), usize::MAX);
        let mut moved = Instant::now();
        let elapsed = loop {
            tokio::time::sleep(STREAM_POLL).await;
            let reply: redis::streams::StreamInfoGroupsReply = connection
                .xinfo_groups(STREAM_KEY)
                .await
                .context("XINFO GROUPS failed")?;
            let now = Instant::now();
            let info = reply
                .groups
                .into_iter()
                .find(|g| g.name == group)
                .with_context(|| format!("group {group} is gone"))?;
            if info.last_delivered_id == wake && info.pending == 0 {
                break now.duration_since(started);
            }
            let state = (info.last_delivered_id, info.pending);
            if state != last {
                last = state;
                moved = now;
            } else if now.duration_since(moved) > STREAM_IDLE {
                bail!(
                    "no progress for {STREAM_IDLE:?}: last delivered {}, {} pending; the last \
                     entry is {wake}",
                    last.0,
                    last.1
                );
            }
        };
        let timing = StreamTiming {
            elapsed,
            cpu: cpu_of(pids)? - cpu,
            redis_cpu: harness::cpu_time(self.redis_pid()?)? - redis_cpu,
        };
        Ok((timing, wake))
    }

    /// Section 8.
    async fn memory(&self) -> anyhow::Result<()> {
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

    /// Section 10.
    async fn gateway(&self) -> anyhow::Result<()> {
        let rounds = self.scale.gateway_rounds;
        let clients = websocket::CLIENTS;
        let files = websocket::ensure_fd_limit()?;
        println!(
            "\n## 10. Gateway fan-out: {clients} WebSocket clients on one channel ({}), \
             messages of {} B published at a fixed pace, publish to arrival at every client; \
             {rounds} rounds per pace, the three cases alternating",
            websocket::CHANNEL,
            websocket::PAYLOAD,
        );
        println!(
            "   baseline: a bare WebSocket relay (tokio-tungstenite server, TCP_NODELAY, one \
             SUBSCRIBE, a broadcast ring of {} messages, one task per socket, the payload as \
             the frame); \
             baseline, 4 KiB reads: the same with read_buffer_size {} instead of tungstenite's \
             128 KiB; gateway: switchyard run with [gateway], no plugins, client_buffer default; \
             clients (tokio-tungstenite, read_buffer_size {}) and publisher in the bench \
             process; open-file limit {files}",
            websocket::RING,
            websocket::SMALL_READ_BUFFER,
            websocket::SMALL_READ_BUFFER
        );
        let mut table = Table::new(&[
            "offered msg/s",
            "process",
            "msgs",
            "1st client p50 ms",
            "median client p50",
            "p99",
            "max",
            "last client p50",
            "p99",
            "max",
            "p50 by run",
            "lost",
            "CPU µs/copy srv/bench/redis",
        ]);
        let plugins = self.folder("plugins")?;
        let mut slowest = f64::INFINITY;
        let mut other = 0;
        let mut duplicated = 0;
        for (rate, messages) in self.scale.gateway_paces {
            let mut baseline = Vec::new();
            let mut small = Vec::new();
            let mut gateway = Vec::new();
            for round in 0..rounds {
                // baseline, small reads, gateway; then the other way round.
                for step in 0..3 {
                    let case = if round % 2 == 0 { step } else { 2 - step };
                    match case {
                        0 => baseline.push(self.fanout_baseline(rate, messages, None).await?),
                        1 => small.push(
                            self.fanout_baseline(
                                rate,
                                messages,
                                Some(websocket::SMALL_READ_BUFFER),
                            )
                            .await?,
                        ),
                        _ => gateway.push(self.fanout_gateway(&plugins, rate, messages).await?),
                    }
                }
            }
            for run in baseline.iter().chain(&small).chain(&gateway) {
                slowest = slowest.min(run.achieved / rate);
                other += run.other;
                duplicated += run.duplicated;
            }
            let a = FanoutSummary::new(&baseline);
            let b = FanoutSummary::new(&gateway);
            table.row(a.row(rate, "baseline"));
            table.row(FanoutSummary::new(&small).row(rate, "baseline, 4 KiB reads"));
            table.row(b.row(rate, "gateway"));
            let ratio = |b: f64, a: f64| format!("{:.2}", b / a);
            table.row(vec![
                String::new(),
                "gateway / baseline".to_owned(),
                String::new(),
                ratio(b.first[0], a.first[0]),
                ratio(b.median[0], a.median[0]),
                ratio(b.median[1], a.median[1]),
                ratio(b.median[2], a.median[2]),
                ratio(b.last[0], a.last[0]),
                ratio(b.last[1], a.last[1]),
                ratio(b.last[2], a.last[2]),
                String::new(),
                String::new(),
                format!(
                    "{}/{}/{}",
                    ratio(b.cpu[0], a.cpu[0]),
                    ratio(b.cpu[1], a.cpu[1]),
                    ratio(b.cpu[2], a.cpu[2])
                ),
            ]);
        }
        table.print();
        println!(
            "   per message: latency = a client's receive time - the send time in the payload \
             (wall clock, same machine); 1st / median / last client = the fastest, the median \
             and the slowest of the {clients} clients for that message; then p50/p99/max over \
             the messages of all rounds (the ones every client received); p50 by run: the last \
             client's p50 in the fastest and the slowest run, ms. lost: messages some \
             client never received, (client, message) copies missing in brackets, over all \
             rounds. CPU µs/copy: CPU time from the first measured publish to the last arrival \
             per copy delivered (median of rounds), of the server (relay or switchyard), of the \
             bench process (clients and publisher), and of redis-server"
        );
        if slowest < 0.97 || other + duplicated > 0 {
            println!(
                "   note: the slowest publisher reached {:.0}% of its pace; {other} frames that \
                 were not messages (dropped notices), {duplicated} duplicated copies",
                slowest * 100.0
            );
        }
        Ok(())
    }

    /// One fan-out run through a fresh bare relay, its sockets reading at most `read_buffer`
    /// bytes per call if given.
    async fn fanout_baseline(
        &self,
        rate: f64,
        messages: usize,
        read_buffer: Option<usize>,
    ) -> anyhow::Result<websocket::Run> {
        let listen = format!("127.0.0.1:{}", free_port()?);
        let relay = FanoutRelay::start(self.url(), &listen, read_buffer).await?;
        let pids = websocket::Pids {
            server: relay.pid(),
            redis: self.redis_pid()?,
        };
        let url = websocket::relay_url(&listen);
        let run = websocket::run(self.url(), &url, rate, messages, &pids).await;
        relay.stop().await;
        run.context("baseline")
    }

    /// One fan-out run through a fresh Switchyard with the gateway on.
    async fn fanout_gateway(
        &self,
        plugins: &Path,
        rate: f64,
        messages: usize,
    ) -> anyhow::Result<websocket::Run> {
        let listen = format!("127.0.0.1:{}", free_port()?);
        let extra = websocket::gateway_config(&listen);
        let setup = HostSetup {
            plugins,
            compile_cache: Some(&self.cache),
            extra: &extra,
        };
        let host = Switchyard::start(self.url(), &setup).await?;
        let pids = websocket::Pids {
            server: host.pid(),
            redis: self.redis_pid()?,
        };
        let url = websocket::gateway_url(&listen);
        let run = websocket::run(self.url(), &url, rate, messages, &pids).await;
        let tail = host.log_tail();
        host.stop().await;
        run.with_context(|| format!("gateway; switchyard log:\n{tail}"))
    }
}

/// Bytes of the `payload` field of every stream entry.
const STREAM_PAYLOAD: usize = 64;
/// XADD commands per pipeline while preloading the stream.
const PRELOAD_PIPELINE: u64 = 1_000;
/// How often the bench reads `XINFO GROUPS` while a stream run is going.
const STREAM_POLL: Duration = Duration::from_millis(5);
/// How long a stream run may show no progress before it is declared stuck.
const STREAM_IDLE: Duration = Duration::from_secs(10);
/// How long the consumers may take to block in `XREADGROUP` once started.
const BLOCK_TIMEOUT: Duration = Duration::from_secs(10);
/// The bare consumer's group.
const BASELINE_GROUP: &str = "baseline";
/// The group every Switchyard host reads through.
const HOST_GROUP: &str = "switchyard";
/// The stream cases, in table order: the bare consumer, the bare consumer republishing as
/// forward does, then 1 and 2 hosts.
const STREAM_CASES: [&str; 4] = [
    "baseline",
    "baseline + PUBLISH",
    "switchyard, 1 host",
    "switchyard, 2 hosts",
];

/// How long after the end of a paced run its messages may still arrive.
const LATENCY_GRACE: Duration = Duration::from_secs(2);
/// After a rename, the stretch of arrivals counted as "at swap".
const SWAP_WINDOW: Duration = Duration::from_secs(1);

/// Microseconds of `cpu` per message.
fn per_message(cpu: Duration, messages: u64) -> f64 {
    cpu.as_secs_f64() * 1e6 / messages.max(1) as f64
}

/// Name of copy `i` of `count` forward copies.
fn copy_name(count: usize, i: usize) -> String {
    if count == 1 {
        "forward".to_owned()
    } else {
        format!("fwd-{i:03}")
    }
}

/// The payload of every stream entry.
fn stream_payload() -> Vec<u8> {
    vec![b'x'; STREAM_PAYLOAD]
}

/// The `[streams]` table of host `i`: a consumer name of its own, the bare consumer's batch
/// and block time, and `start = "all"` (what a host needs to read a preloaded stream from its
/// beginning; here the bench creates the group itself, so it is not used).
fn stream_host_config(i: usize) -> String {
    format!(
        "[streams]\nconsumer = \"switchyard-{i}\"\nbatch = {STREAM_BATCH}\n\
         block_ms = {STREAM_BLOCK_MS}\nstart = \"all\"\n"
    )
}

/// Replaces [`STREAM_KEY`] with `count` entries of one `payload` field, added with pipelined
/// XADD; returns how long that took.
async fn preload_stream(
    connection: &mut redis::aio::MultiplexedConnection,
    count: u64,
) -> anyhow::Result<Duration> {
    redis::cmd("DEL")
        .arg(STREAM_KEY)
        .query_async::<()>(connection)
        .await
        .context("DEL of the stream failed")?;
    let payload = stream_payload();
    let started = Instant::now();
    let mut added = 0;
    while added < count {
        let chunk = PRELOAD_PIPELINE.min(count - added);
        let mut pipe = redis::pipe();
        for _ in 0..chunk {
            pipe.cmd("XADD")
                .arg(STREAM_KEY)
                .arg("*")
                .arg("payload")
                .arg(&payload)
                .ignore();
        }
        pipe.query_async::<()>(connection)
            .await
            .context("XADD pipeline failed")?;
        added += chunk;
    }
    Ok(started.elapsed())
}

/// Waits until `count` connections opened after client id `mark` are blocked in XREADGROUP
/// (each consumer is then waiting for entries, and none has read any).
async fn wait_blocked(
    connection: &mut redis::aio::MultiplexedConnection,
    mark: u64,
    count: usize,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let clients: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(connection)
            .await
            .context("CLIENT LIST failed")?;
        let blocked = clients
            .lines()
            .filter(|line| {
                let field = |name: &str| line.split(' ').find_map(|f| f.strip_prefix(name));
                field("id=")
                    .and_then(|id| id.parse::<u64>().ok())
                    .is_some_and(|id| id > mark)
                    && field("cmd=") == Some("xreadgroup")
                    && field("flags=").is_some_and(|flags| flags.contains('b'))
            })
            .count();
        if blocked >= count {
            return Ok(());
        }
        if started.elapsed() > BLOCK_TIMEOUT {
            bail!("{blocked} of {count} consumers blocked in XREADGROUP within {BLOCK_TIMEOUT:?}");
        }
        tokio::time::sleep(STREAM_POLL).await;
    }
}

/// Total CPU time of `pids` so far.
fn cpu_of(pids: &[u32]) -> anyhow::Result<Duration> {
    pids.iter().map(|&pid| harness::cpu_time(pid)).sum()
}

/// What one stream run measured.
struct StreamRun {
    /// Entries delivered and acknowledged per second.
    rate: f64,
    /// CPU time of the consumer processes (all of them) per entry, in µs.
    cpu_us: f64,
    /// CPU time of redis-server per entry, in µs.
    redis_us: f64,
    /// Cores kept busy by the consumers and redis-server together (CPU time / wall time).
    busy: f64,
    /// Entries each host acknowledged, by its `/plugins` (empty for the bare consumer).
    acked: Vec<u64>,
    /// Acknowledgements beyond the entries (entries handled twice).
    duplicated: u64,
    /// Failed `handle` calls, by `/plugins`.
    failed: u64,
}

/// A timed stream run, before the consumers' own counters are read.
struct StreamTiming {
    elapsed: Duration,
    cpu: Duration,
    redis_cpu: Duration,
}

/// A Switchyard run with the host's own counters.
struct HostRun {
    transfer: Transfer,
    losses: harness::HostLosses,
    mean_handle: Option<Duration>,
}

/// A paced run's outcome.
struct PacedRun {
    achieved: f64,
    delivered: f64,
    lost: u64,
    sustained: bool,
    seen: harness::Received,
}

impl PacedRun {
    fn row(&self, target: f64, process: &str) -> Vec<String> {
        let q = |q: f64| self.seen.latency_us.value_at_quantile(q).to_string();
        let (p50, p99, p999, max, note) = if self.sustained {
            (
                q(0.5),
                q(0.99),
                q(0.999),
                self.seen.latency_us.max().to_string(),
                String::new(),
            )
        } else {
            let dash = || "-".to_owned();
            (
                dash(),
                dash(),
                dash(),
                dash(),
                format!(
                    "NOT SUSTAINED: delivered {} msg/s (p50 would be {} µs)",
                    rate(self.delivered),
                    q(0.5)
                ),
            )
        };
        vec![
            rate(target),
            process.to_owned(),
            rate(self.achieved),
            p50,
            p99,
            p999,
            max,
            self.lost.to_string(),
            note,
        ]
    }
}

/// What a hot-swap run measured.
struct SwapStats {
    to_hash: Vec<Duration>,
    to_output: Vec<Duration>,
    gap_swap: Duration,
    gap_other: Duration,
    sent: u64,
    lost: u64,
}

impl SwapStats {
    fn row(&self, name: &str, size: usize, own_output: bool) -> Vec<String> {
        let ms = |d: &[Duration]| d.iter().map(|d| d.as_secs_f64() * 1e3).collect::<Vec<_>>();
        let hash = ms(&self.to_hash);
        let output = ms(&self.to_output);
        let (out_med, out_max) = if own_output {
            (
                format!("{:.1} ms", median(&output)),
                format!("{:.1} ms", max(&output)),
            )
        } else {
            ("n/a".to_owned(), "n/a".to_owned())
        };
        vec![
            name.to_owned(),
            bytes(size),
            self.to_hash.len().to_string(),
            format!("{:.1} ms", median(&hash)),
            format!("{:.1} ms", max(&hash)),
            out_med,
            out_max,
            format!("{:.1} ms", self.gap_swap.as_secs_f64() * 1e3),
            format!("{:.1} ms", self.gap_other.as_secs_f64() * 1e3),
            self.sent.to_string(),
            self.lost.to_string(),
        ]
    }
}

/// Section 10's figures for one process, over all its rounds: p50, p99 and max (µs) of the
/// first, median and last client's latency per message, and CPU µs per copy.
struct FanoutSummary {
    first: [f64; 3],
    median: [f64; 3],
    last: [f64; 3],
    /// The last client's p50 in each run, lowest and highest.
    last_runs: [f64; 2],
    cpu: [f64; 3],
    sent: usize,
    lost: usize,
    missing: u64,
}

impl FanoutSummary {
    fn new(runs: &[websocket::Run]) -> Self {
        let spreads: Vec<websocket::Spread> =
            runs.iter().flat_map(|r| r.complete.clone()).collect();
        let quantiles = |f: fn(&websocket::Spread) -> f64| {
            let mut values: Vec<f64> = spreads.iter().map(f).collect();
            values.sort_by(f64::total_cmp);
            [
                quantile(&values, 0.5),
                quantile(&values, 0.99),
                values.last().copied().unwrap_or(f64::NAN),
            ]
        };
        let cpu = |f: fn(&websocket::Run) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
        let last_runs: Vec<f64> = runs
            .iter()
            .map(|r| {
                let mut last: Vec<f64> = r.complete.iter().map(|s| s.last_us).collect();
                last.sort_by(f64::total_cmp);
                quantile(&last, 0.5)
            })
            .collect();
        Self {
            last_runs: [min(&last_runs), max(&last_runs)],
            first: quantiles(|s| s.first_us),
            median: quantiles(|s| s.median_us),
            last: quantiles(|s| s.last_us),
            cpu: [
                cpu(|r| r.server_us),
                cpu(|r| r.clients_us),
                cpu(|r| r.redis_us),
            ],
            sent: runs.iter().map(|r| r.sent).sum(),
            lost: runs.iter().map(|r| r.lost).sum(),
            missing: runs.iter().map(|r| r.missing).sum(),
        }
    }

    fn row(&self, target: f64, process: &str) -> Vec<String> {
        let ms = |us: f64| format!("{:.2}", us / 1e3);
        vec![
            rate(target),
            process.to_owned(),
            self.sent.to_string(),
            ms(self.first[0]),
            ms(self.median[0]),
            ms(self.median[1]),
            ms(self.median[2]),
            ms(self.last[0]),
            ms(self.last[1]),
            ms(self.last[2]),
            format!(
                "{:.0}-{:.0}",
                self.last_runs[0] / 1e3,
                self.last_runs[1] / 1e3
            ),
            format!("{} ({})", self.lost, self.missing),
            format!("{:.1}/{:.1}/{:.2}", self.cpu[0], self.cpu[1], self.cpu[2]),
        ]
    }
}

/// A plain text table: first column left-aligned, the others right-aligned.
struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(headers: &[&str]) -> Self {
        Self {
            rows: vec![headers.iter().map(|h| (*h).to_owned()).collect()],
        }
    }

    fn row(&mut self, row: Vec<String>) {
        self.rows.push(row);
    }

    fn print(&self) {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|cell| cell.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for (i, row) in self.rows.iter().enumerate() {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                let pad = widths[c].saturating_sub(cell.chars().count());
                if c == 0 {
                    line.push_str(cell);
                    line.push_str(&" ".repeat(pad));
                } else {
                    line.push_str("  ");
                    line.push_str(&" ".repeat(pad));
                    line.push_str(cell);
                }
            }
            println!("{}", line.trim_end());
            if i == 0 {
                let total = widths.iter().sum::<usize>() + 2 * columns.saturating_sub(1);
                println!("{}", "-".repeat(total));
            }
        }
    }
}

fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    }
}

/// The `q` quantile of sorted `values` (nearest rank).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::NAN, f64::max)
}

fn min(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::NAN, f64::min)
}

/// Messages per second, compact.
fn rate(value: f64) -> String {
    if !value.is_finite() {
        "-".to_owned()
    } else if value >= 1e6 {
        format!("{:.2}M", value / 1e6)
    } else if value >= 1e3 {
        format!("{:.1}k", value / 1e3)
    } else {
        format!("{value:.0}")
    }
}

fn range(values: &[f64]) -> String {
    format!("{}-{}", rate(min(values)), rate(max(values)))
}

fn range_ms(values: &[f64]) -> String {
    format!("{:.0}-{:.0}", min(values), max(values))
}

fn bytes(size: usize) -> String {
    if size >= 1024 && size.is_multiple_of(1024) {
        format!("{} KiB", size / 1024)
    } else {
        format!("{size} B")
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}
