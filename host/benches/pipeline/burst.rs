//! Section 11: bursts from the real `redis-benchmark`, unthrottled, against Redis's default
//! `client-output-buffer-limit`, through the relay and through Switchyard as shipped. (Section
//! 8 floods a plugin that cannot keep up the same way: `memory.rs`.)
//!
//! `redis-benchmark` cannot number its messages, but it replaces every `__rand_int__` in a
//! command with a fresh random number of 12 digits (below `-r`). Two of them open each payload,
//! which gives every message a 62-bit random tag: the receiver counts the copies of each tag,
//! so duplicates show as repeated tags and losses as tags missing from the count. (A repeat by
//! chance among 300,000 tags has a probability of about 10^-8.)

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::bench::Bench;
use super::harness::{self, HostLosses, Relay, Switchyard};
use super::redis_benchmark::{
    PLACEHOLDER, benchmark_args, check_redis_benchmark, command_line, run_benchmark,
};
use super::table::{Table, median, mib, range, rate};

/// Messages in one burst (the user's test).
pub const MESSAGES: u64 = 300_000;
/// Bytes of each message's payload.
pub const PAYLOAD: usize = 64;
/// Rounds per side; relay and Switchyard alternate.
const ROUNDS: usize = 3;
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

/// The tagged payload of section 11: two placeholders, then filler up to [`PAYLOAD`] bytes.
fn tagged_payload() -> String {
    format!("{PLACEHOLDER}{PLACEHOLDER}{}", "x".repeat(PAYLOAD - TAG))
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
}
