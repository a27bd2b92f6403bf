//! Section 9: streams, a preloaded stream read through one consumer group until every entry
//! is acknowledged, by the bare consumer (with and without republishing) and by 1 and 2
//! Switchyard hosts sharing the group.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use redis::AsyncCommands as _;

use super::bench::{Bench, per_message};
use super::harness::{self, HostSetup, STREAM_KEY, StreamConsumer, Switchyard};
use super::relay::{STREAM_BATCH, STREAM_BLOCK_MS};
use super::table::{Table, median, range, rate};

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
/// forward does, then 1 and 2 hosts running forward, and 1 host running sink, which does
/// with an entry what the bare consumer does: nothing.
const STREAM_CASES: [&str; 5] = [
    "baseline",
    "baseline + PUBLISH",
    "switchyard, 1 host",
    "switchyard, 2 hosts",
    "switchyard (sink), 1 host",
];

impl Bench {
    /// Section 9.
    pub(super) async fn streams(&self) -> anyhow::Result<()> {
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
        let sink = [self.sink_plugins()?];
        // (hosts' plugins folders, or none for the bare consumer; whether it republishes)
        let cases: [(&[PathBuf], bool); 5] = [
            (&[], false),
            (&[], true),
            (&one, false),
            (&two, false),
            (&sink, false),
        ];
        let mut runs: [Vec<StreamRun>; 5] = Default::default();
        for round in 0..rounds {
            let order = if round % 2 == 0 {
                [0, 1, 2, 3, 4]
            } else {
                [4, 3, 2, 1, 0]
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
                if (1..=3).contains(&case) {
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
             its XACK and the next XREADGROUP in one pipeline. switchyard (sink): the sink \
             fixture, which does nothing with an entry, as the bare baseline: the host's own cost \
             (read, queue, one handle call, acknowledgement) against the same work done bare. \
             CPU µs/entry: the consumer processes (both hosts \
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

    /// A plugins folder with sink reading [`STREAM_KEY`] through [`HOST_GROUP`].
    fn sink_plugins(&self) -> anyhow::Result<PathBuf> {
        let dir = self.folder("stream-sink")?;
        let wasm = std::fs::read(switchyard_tests::plugins::SINK)
            .with_context(|| format!("reading {}", switchyard_tests::plugins::SINK))?;
        harness::install_plugin(
            &dir,
            "sink",
            &wasm,
            &format!(
                "[subscriptions]\nstreams = [{STREAM_KEY:?}]\n\n[stream]\ngroup = {HOST_GROUP:?}\n"
            ),
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
