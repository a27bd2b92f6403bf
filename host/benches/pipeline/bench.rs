//! What every section shares: [`Bench`] (the bench's Redis, its scale, the `forward`
//! component, a temporary folder and a compile cache) and the runs most sections are made of,
//! a windowed transfer through a fresh Switchyard or through a fresh relay.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use switchyard_tests::RedisServer;

use super::Scale;
use super::harness::{self, HostSetup, OUTPUT_PATTERN, Relay, Switchyard, Transfer};

/// What every section shares.
pub(super) struct Bench {
    /// The `redis-server` every section uses, but for the pattern cases (a fresh one each).
    pub(super) redis: RedisServer,
    /// The Redis URL every section uses, `redis://127.0.0.1:PORT`.
    url: String,
    pub(super) scale: Scale,
    /// The `forward` component, as the host embeds it.
    pub(super) forward: &'static [u8],
    work: tempfile::TempDir,
    /// A compile cache shared by the sections that do not measure start-up.
    pub(super) cache: PathBuf,
    folders: std::cell::Cell<usize>,
}

impl Bench {
    pub(super) fn new(redis: RedisServer, scale: Scale) -> anyhow::Result<Self> {
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

    /// `redis://127.0.0.1:PORT` of the bench's `redis-server`.
    pub(super) fn url(&self) -> &str {
        &self.url
    }

    /// The process id of the bench's `redis-server`.
    pub(super) fn redis_pid(&self) -> anyhow::Result<u32> {
        self.redis
            .pid()
            .context("the bench's redis-server is not running")
    }

    /// A new, empty folder under the bench's temporary directory.
    pub(super) fn folder(&self, what: &str) -> anyhow::Result<PathBuf> {
        let n = self.folders.get();
        self.folders.set(n + 1);
        let dir = self.work.path().join(format!("{what}-{n}"));
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// A plugins folder with `count` forward copies (`forward`, or `fwd-000`...), all
    /// subscribed to `fwd:*`; byte-different copies if `distinct`.
    pub(super) fn forwards(&self, count: usize, distinct: bool) -> anyhow::Result<PathBuf> {
        let dir = self.folder("plugins")?;
        let manifest = harness::forward_manifest(None);
        for i in 0..count {
            let name = copy_name(count, i);
            let bytes = if distinct {
                switchyard_tests::rebuilt(self.forward, &format!("bench-copy-{name}"))
            } else {
                self.forward.to_vec()
            };
            harness::install_plugin(&dir, &name, &bytes, &manifest)?;
        }
        Ok(dir)
    }

    /// How a Switchyard on `plugins` starts: with the shared compile cache, nothing more.
    pub(super) fn setup<'a>(&'a self, plugins: &'a Path) -> HostSetup<'a> {
        HostSetup {
            plugins,
            compile_cache: Some(&self.cache),
            extra: "",
        }
    }

    /// One windowed run through a fresh Switchyard on `plugins`, the publisher keeping at most
    /// `window` copies in flight.
    pub(super) async fn switchyard_run(
        &self,
        url: &str,
        plugins: &Path,
        count: u64,
        size: usize,
        copies: u64,
        window: u64,
    ) -> anyhow::Result<HostRun> {
        self.switchyard_run_with(url, &self.setup(plugins), count, size, copies, window)
            .await
    }

    /// [`Bench::switchyard_run`] with the host set up as `setup` says.
    pub(super) async fn switchyard_run_with(
        &self,
        url: &str,
        setup: &HostSetup<'_>,
        count: u64,
        size: usize,
        copies: u64,
        window: u64,
    ) -> anyhow::Result<HostRun> {
        let host = Switchyard::start(url, setup).await?;
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
    pub(super) async fn relay_run(
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
}

/// A Switchyard run with the host's own counters.
pub(super) struct HostRun {
    pub(super) transfer: Transfer,
    pub(super) losses: harness::HostLosses,
    pub(super) mean_handle: Option<Duration>,
}

/// The mean handle time of each of `runs` that has one, in microseconds.
pub(super) fn handle_micros(runs: &[HostRun]) -> Vec<f64> {
    runs.iter()
        .filter_map(|r| r.mean_handle)
        .map(|d| d.as_secs_f64() * 1e6)
        .collect()
}

/// What `runs` lost by the host's own counters, summed.
pub(super) fn total_losses(runs: &[HostRun]) -> harness::HostLosses {
    let mut losses = harness::HostLosses::default();
    runs.iter().for_each(|r| losses.add(&r.losses));
    losses
}

/// The cells a row comparing the relay (`relay`, a) with the host (`host`, b) ends with:
/// the ceiling's rate, each side's median rate, b/a, each side's range, lost copies (with
/// the relay's runs cut by Redis), duplicated copies, the host's own losses, its handle
/// time and each side's CPU per message.
pub(super) fn compared(ceiling: &Transfer, relay: &[Transfer], host: &[HostRun]) -> Vec<String> {
    use super::table::{median, range, rate};
    let a: Vec<f64> = relay.iter().map(|t| t.output_rate).collect();
    let b: Vec<f64> = host.iter().map(|r| r.transfer.output_rate).collect();
    let sum = |values: &mut dyn Iterator<Item = u64>| values.sum::<u64>();
    vec![
        rate(ceiling.output_rate),
        rate(median(&a)),
        rate(median(&b)),
        format!("{:.2}", median(&b) / median(&a)),
        range(&a),
        range(&b),
        format!(
            "{}{}/{}",
            sum(&mut relay.iter().map(|t| t.lost)),
            match relay.iter().filter(|t| t.cut).count() {
                0 => String::new(),
                cuts => format!(" ({cuts} cut)"),
            },
            sum(&mut host.iter().map(|r| r.transfer.lost))
        ),
        format!(
            "{}/{}",
            sum(&mut relay.iter().map(|t| t.duplicated)),
            sum(&mut host.iter().map(|r| r.transfer.duplicated))
        ),
        total_losses(host).describe(),
        format!("{:.1}", median(&handle_micros(host))),
        format!(
            "{:.1}/{:.1}",
            median(&relay.iter().map(|t| t.cpu_us).collect::<Vec<_>>()),
            median(&host.iter().map(|r| r.transfer.cpu_us).collect::<Vec<_>>())
        ),
    ]
}

/// Microseconds of `cpu` per message.
pub(super) fn per_message(cpu: Duration, messages: u64) -> f64 {
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
