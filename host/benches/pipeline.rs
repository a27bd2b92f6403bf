//! The whole pipeline under load: the real `switchyard` binary with the `forward` plugin,
//! against a bare relay written with the same `redis` crate, both as separate processes on a
//! private `redis-server`. Prints one table per section:
//!
//! 1. throughput (64 B, 1 KiB), 2. added latency at fixed rates, 3. fan-out to 1/10/100
//!    plugins, 4. pattern scaling (1/100/10,000 patterns), 5. payload sizes, 6. hot swap under
//!    traffic, 7. start-up (cold and warm compile cache), 8. memory, 9. streams (1 and 2 hosts
//!    sharing a consumer group, against a bare consumer), 10. gateway fan-out (1,000 WebSocket
//!    clients on one channel, against a bare WebSocket fan-out relay), 11. a burst from
//!    `redis-benchmark` against Switchyard as shipped, 12. the cost of a message in each world
//!    Switchyard runs (its own and other hosts'), next to `forward`, 13. what tracing costs
//!    (off, on at ratio 0.01 and 1.0) against the relay, 14. keyspace notifications through
//!    a key subscription against the relay listening to the same notifications.
//!
//! ```sh
//! cargo bench -p switchyard --bench pipeline                      # everything, ~9 min on 2 cores
//! cargo bench -p switchyard --bench pipeline -- --quick           # fewer messages, ~2 min
//! cargo bench -p switchyard --bench pipeline -- --only 1,latency  # some sections
//! ```
//!
//! Publisher, Redis, receiver and the process under test share the machine, so absolute rates
//! depend on it; compare within one run (the relay and Switchyard alternate round by round).
//!
//! # Layout
//!
//! This file parses the arguments, holds the section table and runs the wanted sections on
//! one `redis-server` (the integration tests' harness starts it). Beside it, in `pipeline/`:
//!
//! - one module per section, named as in [`SECTIONS`]: `throughput`, `latency`, `fanout`,
//!   `patterns`, `payload`, `hotswap`, `startup`, `memory`, `streams`, `gateway`, `burst`,
//!   `worlds`, `tracing`, `keyspace`;
//! - `bench`: what every section shares ([`Bench`]) and the runs most are made of;
//! - `table`: the printed table and the numbers in its cells;
//! - `harness`: the processes under test, the publisher and the receiver;
//! - `relay` and `websocket`: the baselines (this binary re-executed in another mode), and
//!   `websocket`'s clients of section 10;
//! - `redis_benchmark`: driving `redis-benchmark` for sections 8 and 11.

#[path = "pipeline/bench.rs"]
mod bench;
#[path = "pipeline/burst.rs"]
mod burst;
#[path = "pipeline/fanout.rs"]
mod fanout;
#[path = "pipeline/gateway.rs"]
mod gateway;
#[path = "pipeline/harness.rs"]
mod harness;
#[path = "pipeline/hotswap.rs"]
mod hotswap;
#[path = "pipeline/keyspace.rs"]
mod keyspace;
#[path = "pipeline/latency.rs"]
mod latency;
#[path = "pipeline/memory.rs"]
mod memory;
#[path = "pipeline/patterns.rs"]
mod patterns;
#[path = "pipeline/payload.rs"]
mod payload;
#[path = "pipeline/redis_benchmark.rs"]
mod redis_benchmark;
#[path = "pipeline/relay.rs"]
mod relay;
#[path = "pipeline/startup.rs"]
mod startup;
#[path = "pipeline/streams.rs"]
mod streams;
#[path = "pipeline/table.rs"]
mod table;
#[path = "pipeline/throughput.rs"]
mod throughput;
#[path = "pipeline/tracing.rs"]
mod tracing;
#[path = "pipeline/websocket.rs"]
mod websocket;
#[path = "pipeline/worlds.rs"]
mod worlds;

use std::time::Instant;

use anyhow::Context as _;
use clap::Parser;
use switchyard_tests::RedisServer;

use bench::Bench;
use harness::STREAM_KEY;

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
    (12, "worlds"),
    (13, "tracing"),
    (14, "keyspace"),
];

/// Benchmarks Switchyard's whole pipeline against a bare relay.
#[derive(Parser, Debug)]
#[command(name = "pipeline")]
struct Args {
    /// Fewer messages, rounds and repetitions (about a minute).
    #[arg(long)]
    quick: bool,
    /// Sections to run, by number or name (throughput, latency, fanout, patterns, payload,
    /// hotswap, startup, memory, streams, gateway, burst, worlds, tracing, keyspace),
    /// comma-separated.
    /// Default: all.
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
    /// Internal: the relay listens to keyspace notifications of `fwd:*` keys instead.
    #[arg(long, hide = true, requires = "relay")]
    relay_keys: bool,
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
        return relay::main(url, args.relay_keys);
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

impl Bench {
    /// Runs the `wanted` sections in order, each followed by the time it took.
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
                12 => self.worlds().await,
                13 => self.tracing().await,
                14 => self.keyspace().await,
                _ => Ok(()),
            }
            .with_context(|| format!("section {section}"))?;
            println!("({:.1} s)", started.elapsed().as_secs_f64());
        }
        Ok(())
    }
}
