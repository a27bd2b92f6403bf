//! Bursts from the real `redis-benchmark`, unthrottled, against Redis's default
//! `client-output-buffer-limit`: section 11 (the relay against Switchyard as shipped) and the
//! burst row of section 8 (the host's memory while a plugin that cannot keep up is flooded).
//!
//! `redis-benchmark` cannot number its messages, but it replaces every `__rand_int__` in a
//! command with a fresh random number of 12 digits (below `-r`). Two of them open each payload,
//! which gives every message a 62-bit random tag: the receiver counts the copies of each tag,
//! so duplicates show as repeated tags and losses as tags missing from the count. (A repeat by
//! chance among 300,000 tags has a probability of about 10^-8.)

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::harness::{self, HostLosses, Relay, Switchyard};
use super::{Bench, Table, median, mib, range, rate};

/// Messages in one burst (the user's test).
pub const MESSAGES: u64 = 300_000;
/// Bytes of each message's payload.
pub const PAYLOAD: usize = 64;
/// Connections `redis-benchmark` publishes on.
const CLIENTS: u32 = 1;
/// PUBLISH commands `redis-benchmark` sends per pipeline.
const PIPELINE: u32 = 100;
/// Rounds per side; relay and Switchyard alternate.
const ROUNDS: usize = 3;
/// `redis-benchmark -r`: each `__rand_int__` becomes a number below this. Its generator
/// (`random()`) gives 31 bits, so two placeholders make 62.
const KEYSPACE: u64 = 2_147_483_647;
/// What `redis-benchmark` replaces with 12 random digits.
const PLACEHOLDER: &str = "__rand_int__";
/// Bytes of the tag that two replaced placeholders make.
const TAG: usize = 24;
/// Marks the warm-up messages, sent before each burst so that connections, the plugin
/// instance and caches are warm on both sides.
const WARM: &[u8] = b"warm";
/// Warm-up messages before each burst.
const WARM_UP: u64 = 500;
/// How long the receiver may see nothing new before a burst is declared over.
const IDLE: Duration = Duration::from_secs(3);
/// How long the warm-up may take.
const WARM_TIMEOUT: Duration = Duration::from_secs(20);

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

/// Fails with a clear message when `redis-benchmark` is not installed.
fn check_redis_benchmark() -> anyhow::Result<String> {
    let output = std::process::Command::new("redis-benchmark")
        .arg("--version")
        .output()
        .context(
            "this section needs redis-benchmark on the PATH (it ships with redis-server, in \
             Debian's redis-tools package)",
        )?;
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// The port of a `redis://127.0.0.1:PORT` URL.
fn port(url: &str) -> anyhow::Result<&str> {
    url.rsplit(':')
        .next()
        .filter(|p| p.chars().all(|c| c.is_ascii_digit()))
        .with_context(|| format!("no port in {url}"))
}

/// The `redis-benchmark` arguments of a burst of `messages` PUBLISHes of `payload` on
/// `channel`; with `-r` if the payload holds placeholders.
fn benchmark_args(url: &str, messages: u64, channel: &str, payload: &str) -> Vec<String> {
    let mut args: Vec<String> = vec!["-h".into(), "127.0.0.1".into(), "-p".into()];
    args.push(port(url).unwrap_or("6379").to_owned());
    for (flag, value) in [
        ("-c", CLIENTS.to_string()),
        ("-P", PIPELINE.to_string()),
        ("-n", messages.to_string()),
    ] {
        args.push(flag.into());
        args.push(value);
    }
    if payload.contains(PLACEHOLDER) {
        args.extend(["-r".to_owned(), KEYSPACE.to_string()]);
    }
    args.extend(["--csv", "PUBLISH", channel, payload].map(str::to_owned));
    args
}

/// The tagged payload of section 11: two placeholders, then filler up to [`PAYLOAD`] bytes.
fn tagged_payload() -> String {
    format!("{PLACEHOLDER}{PLACEHOLDER}{}", "x".repeat(PAYLOAD - TAG))
}

/// The command line of a burst, for the tables; `tagged` if the payload opens with the two
/// placeholders.
fn command_line(messages: u64, channel: &str, payload: usize, tagged: bool) -> String {
    let random = if tagged {
        format!(" -r {KEYSPACE}")
    } else {
        String::new()
    };
    format!(
        "redis-benchmark -c {CLIENTS} -P {PIPELINE} -n {messages}{random} PUBLISH {channel} \
         <{payload} B>"
    )
}

/// Runs `redis-benchmark` to completion; returns the rate it reports (requests per second).
async fn run_benchmark(args: &[String]) -> anyhow::Result<f64> {
    let output = tokio::process::Command::new("redis-benchmark")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .context("cannot run redis-benchmark")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "redis-benchmark exited with {}: {}{}",
            output.status,
            stdout.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    // --csv: a header line, then "COMMAND","rps",...
    stdout
        .lines()
        .last()
        .and_then(|line| line.rsplit("\",\"").nth(6))
        .and_then(|rps| rps.trim_matches('"').parse().ok())
        .with_context(|| format!("no rate in redis-benchmark's output: {stdout}"))
}

/// What the burst receiver counts, shared with the bench while it runs.
#[derive(Default)]
struct Progress {
    warm: AtomicU64,
    tagged: AtomicU64,
    changed: Notify,
}

/// What arrived on `fwded:*`.
struct Arrivals {
    /// The tag of every tagged copy, in arrival order.
    tags: Vec<u64>,
    /// The last tagged arrival.
    last: Option<Instant>,
    /// Whether Redis closed the receiver's connection.
    closed: bool,
}

/// A subscriber to `fwded:*` on its own connection, counting tags in a task.
struct Receiver {
    progress: Arc<Progress>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Arrivals>,
}

impl Receiver {
    async fn start(url: &str) -> anyhow::Result<Self> {
        let client = redis::Client::open(url)?;
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.psubscribe(harness::OUTPUT_PATTERN).await?;
        let progress = Arc::new(Progress::default());
        let stop = CancellationToken::new();
        let task = tokio::spawn(receive(
            pubsub.into_on_message(),
            progress.clone(),
            stop.clone(),
        ));
        Ok(Self {
            progress,
            stop,
            task,
        })
    }

    /// Waits until `counter` reaches `target`, or nothing moved for `idle`; true if reached.
    async fn wait(&self, counter: &AtomicU64, target: u64, idle: Duration) -> bool {
        harness::wait_for_count(counter, &self.progress.changed, target, idle).await
    }

    async fn finish(self) -> anyhow::Result<Arrivals> {
        self.stop.cancel();
        Ok(self.task.await?)
    }
}

async fn receive(
    mut stream: redis::aio::PubSubStream,
    progress: Arc<Progress>,
    stop: CancellationToken,
) -> Arrivals {
    let mut arrivals = Arrivals {
        tags: Vec::with_capacity(MESSAGES as usize),
        last: None,
        closed: false,
    };
    loop {
        let message = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            message = stream.next() => match message {
                Some(message) => message,
                None => {
                    arrivals.closed = true;
                    break;
                }
            },
        };
        let payload = message.get_payload_bytes();
        if payload.starts_with(WARM) {
            progress.warm.fetch_add(1, Ordering::Release);
        } else if let Some(tag) = parse_tag(payload) {
            arrivals.tags.push(tag);
            arrivals.last = Some(Instant::now());
            progress.tagged.fetch_add(1, Ordering::Release);
        } else {
            continue;
        }
        progress.changed.notify_one();
    }
    arrivals
}

/// The 62-bit tag of a payload that opens with two 12-digit numbers below 2^31.
fn parse_tag(payload: &[u8]) -> Option<u64> {
    let digits = payload.get(..TAG)?;
    let number = |part: &[u8]| -> Option<u64> { std::str::from_utf8(part).ok()?.parse().ok() };
    let (high, low) = (number(&digits[..TAG / 2])?, number(&digits[TAG / 2..])?);
    Some((high << 31) | low)
}

/// One burst through whatever runs on the server.
struct Burst {
    /// Copies delivered (duplicates included).
    delivered: u64,
    /// Messages that never arrived.
    lost: u64,
    /// Copies beyond the first of a message.
    duplicated: u64,
    /// Copies delivered per second, from starting `redis-benchmark` to the last arrival.
    rate: f64,
    /// What `redis-benchmark` reports: messages it published per second.
    offered: f64,
    /// Whether Redis cut the bench's receiver (then the counts are not the relay's).
    receiver_cut: bool,
}

impl Burst {
    fn counts(&self) -> String {
        format!("{}/{}/{}", self.delivered, self.lost, self.duplicated)
    }
}

/// Warms up, sends the burst, and counts what arrives on `fwded:*`.
async fn burst(url: &str) -> anyhow::Result<Burst> {
    let receiver = Receiver::start(url).await?;
    let client = redis::Client::open(url)?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let mut warm = WARM.to_vec();
    warm.resize(PAYLOAD, b'.');
    let mut pipe = redis::pipe();
    for _ in 0..WARM_UP {
        pipe.cmd("PUBLISH")
            .arg(harness::INPUT_CHANNEL)
            .arg(&warm)
            .ignore();
    }
    pipe.query_async::<()>(&mut connection).await?;
    if !tokio::time::timeout(
        WARM_TIMEOUT,
        receiver.wait(&receiver.progress.warm, WARM_UP, IDLE),
    )
    .await
    .unwrap_or(false)
    {
        bail!(
            "warm-up: {} of {WARM_UP} messages came back",
            receiver.progress.warm.load(Ordering::Acquire)
        );
    }
    let args = benchmark_args(url, MESSAGES, harness::INPUT_CHANNEL, &tagged_payload());
    let started = Instant::now();
    let offered = run_benchmark(&args).await?;
    receiver
        .wait(&receiver.progress.tagged, MESSAGES, IDLE)
        .await;
    let arrivals = receiver.finish().await?;
    let delivered = arrivals.tags.len() as u64;
    let mut tags = arrivals.tags;
    tags.sort_unstable();
    tags.dedup();
    let distinct = tags.len() as u64;
    let elapsed = arrivals
        .last
        .map_or(Duration::ZERO, |last| last.duration_since(started));
    Ok(Burst {
        delivered,
        lost: MESSAGES.saturating_sub(distinct),
        duplicated: delivered - distinct,
        rate: delivered as f64 / elapsed.as_secs_f64().max(1e-9),
        offered,
        receiver_cut: arrivals.closed,
    })
}

/// A relay's burst, with its peak RSS and whether Redis cut its subscriber (it then exits).
struct RelayBurst {
    burst: Burst,
    /// Peak RSS, unless the relay had exited.
    peak_kib: Option<u64>,
    cut: bool,
}

/// A Switchyard burst, with its peak RSS and its own counters.
struct HostBurst {
    burst: Burst,
    peak_kib: u64,
    losses: HostLosses,
}

impl Bench {
    /// Section 11.
    pub(super) async fn bursts(&self) -> anyhow::Result<()> {
        let version = check_redis_benchmark()?;
        let limit = self.redis.config_get("client-output-buffer-limit").await?;
        println!(
            "\n## 11. Burst: {}, unthrottled, counted \
             on {}; redis with its default client-output-buffer-limit ({limit}); {ROUNDS} rounds \
             each, relay and switchyard alternating",
            command_line(MESSAGES, harness::INPUT_CHANNEL, PAYLOAD, true),
            harness::OUTPUT_PATTERN,
        );
        println!(
            "   {version}. switchyard as shipped: forward.wasm and its manifest in a folder, a \
             config naming only redis.url, plugins.dir and admin.listen, default log level. \
             rate = copies delivered / (start of redis-benchmark .. last arrival); offered = \
             the rate redis-benchmark reports"
        );
        let plugins = self.folder("burst")?;
        harness::install_plugin(
            &plugins,
            "forward",
            self.forward,
            &harness::forward_manifest(None),
        )?;
        let mut table = Table::new(&[
            "round",
            "relay msg/s",
            "relay delivered/lost/dup",
            "switchyard msg/s",
            "switchyard delivered/lost/dup",
            "switchyard shed",
            "b/a",
            "offered msg/s a/b",
            "peak RSS MiB a/b",
        ]);
        let mut relays = Vec::new();
        let mut hosts = Vec::new();
        for round in 0..ROUNDS {
            if round % 2 == 0 {
                relays.push(self.relay_burst().await?);
                hosts.push(self.host_burst(&plugins).await?);
            } else {
                hosts.push(self.host_burst(&plugins).await?);
                relays.push(self.relay_burst().await?);
            }
            let (a, b) = (&relays[round], &hosts[round]);
            let mut relay_counts = a.burst.counts();
            if a.cut {
                relay_counts.push_str(" (subscriber cut)");
            }
            for run in [&a.burst, &b.burst] {
                if run.receiver_cut {
                    bail!("redis closed the bench's receiver: the counts would be wrong");
                }
            }
            table.row(vec![
                (round + 1).to_string(),
                rate(a.burst.rate),
                relay_counts,
                rate(b.burst.rate),
                b.burst.counts(),
                b.losses.describe(),
                format!("{:.2}", b.burst.rate / a.burst.rate),
                format!("{}/{}", rate(a.burst.offered), rate(b.burst.offered)),
                format!(
                    "{}/{}",
                    a.peak_kib.map_or_else(|| "-".to_owned(), mib),
                    mib(b.peak_kib)
                ),
            ]);
        }
        let a: Vec<f64> = relays.iter().map(|r| r.burst.rate).collect();
        let b: Vec<f64> = hosts.iter().map(|r| r.burst.rate).collect();
        let total = |runs: &mut dyn Iterator<Item = &Burst>| {
            let mut sum = (0, 0, 0);
            for run in runs {
                sum = (
                    sum.0 + run.delivered,
                    sum.1 + run.lost,
                    sum.2 + run.duplicated,
                );
            }
            format!("{}/{}/{}", sum.0, sum.1, sum.2)
        };
        let mut losses = HostLosses::default();
        hosts.iter().for_each(|h| losses.add(&h.losses));
        table.row(vec![
            "median".to_owned(),
            rate(median(&a)),
            total(&mut relays.iter().map(|r| &r.burst)),
            rate(median(&b)),
            total(&mut hosts.iter().map(|h| &h.burst)),
            losses.describe(),
            format!("{:.2}", median(&b) / median(&a)),
            format!(
                "{}/{}",
                rate(median(
                    &relays.iter().map(|r| r.burst.offered).collect::<Vec<_>>()
                )),
                rate(median(
                    &hosts.iter().map(|h| h.burst.offered).collect::<Vec<_>>()
                ))
            ),
            String::new(),
        ]);
        table.print();
        println!(
            "   a = relay, b = switchyard; rates per round, then their medians (ranges: relay \
             {}, switchyard {}). delivered/lost/dup: copies that arrived, of {MESSAGES} \
             messages those that never did, and copies beyond the first (the median row sums \
             the rounds). switchyard shed: its /plugins counters by reason (and failed calls, \
             lost sends, subscriber reconnects, if any). peak RSS: VmHWM of the process",
            range(&a),
            range(&b)
        );
        Ok(())
    }

    /// One burst through a fresh relay.
    async fn relay_burst(&self) -> anyhow::Result<RelayBurst> {
        let mut relay = Relay::start(self.url()).await?;
        let burst = burst(self.url()).await;
        let cut = relay.has_exited();
        let peak_kib = if cut {
            None
        } else {
            Some(harness::peak_rss_kib(relay.pid())?)
        };
        relay.stop().await;
        Ok(RelayBurst {
            burst: burst?,
            peak_kib,
            cut,
        })
    }

    /// One burst through a fresh Switchyard as shipped.
    async fn host_burst(&self, plugins: &std::path::Path) -> anyhow::Result<HostBurst> {
        let host = Switchyard::start_as_shipped(self.url(), plugins).await?;
        let burst = burst(self.url()).await;
        let losses = host.losses().await;
        let peak_kib = harness::peak_rss_kib(host.pid());
        let tail = host.log_tail();
        host.stop().await;
        Ok(HostBurst {
            burst: burst.with_context(|| format!("switchyard log:\n{tail}"))?,
            peak_kib: peak_kib?,
            losses: losses?,
        })
    }

    /// Section 8's burst row: Switchyard as shipped with one plugin that cannot keep up,
    /// flooded with [`SLOW_MESSAGES`] of [`SLOW_PAYLOAD`] bytes; its RSS against its queue
    /// budget. Returns the row and a note that explains it.
    pub(super) async fn slow_burst_memory(&self) -> anyhow::Result<(Vec<String>, String)> {
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
