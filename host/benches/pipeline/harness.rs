//! The moving parts of the pipeline bench: the `switchyard` binary and the baselines (the bare relay, the bare stream consumer, the bare WebSocket fan-out
//! relay) as child processes, a pipelined or paced publisher, and a receiver that counts what
//! comes back on `fwded:*`.
//!
//! Every message carries a 17-byte header: the wall-clock send time (nanoseconds since the Unix
//! epoch, little-endian), a sequence number, and a kind byte (warm-up or measured). The
//! receiver counts each sequence number, so losses and duplicates are exact, and turns the send
//! time into publish-to-republish latency.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use hdrhistogram::Histogram;
use switchyard_tests::free_port;
use tokio::io::AsyncBufReadExt as _;
use tokio::process::{Child, Command};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The channel every input message is published on; `forward` republishes it on `fwded:x`.
pub const INPUT_CHANNEL: &str = "fwd:x";
/// What the receiver subscribes to for the forwarded copies.
pub const OUTPUT_PATTERN: &str = "fwded:*";
/// The stream of the streams section: under `fwd:`, so that `forward` accepts its entries
/// (the channel of a stream entry is the stream's key) and republishes them on `fwded:orders`.
pub const STREAM_KEY: &str = "fwd:orders";
/// Bytes of the header every payload starts with.
pub const HEADER: usize = 17;
/// Kind byte of warm-up messages: counted apart, never measured.
const KIND_WARM: u8 = 0;
/// Kind byte of measured messages.
const KIND_MEASURED: u8 = 1;
/// Warm-up messages sent before each measured run (instances, connections, caches).
pub const WARM_UP: u64 = 500;
/// How long the receiver may see no new message before a run is declared over.
pub const IDLE: Duration = Duration::from_secs(3);
/// How long a process may take to become ready (a Python component compiles for seconds).
pub const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// Nanoseconds since the Unix epoch.
pub fn wall_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// `VmRSS` of a process, in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    proc_status_kib(pid, "VmRSS:")
}

/// `VmHWM` of a process (the most its resident set has been), in KiB.
pub fn peak_rss_kib(pid: u32) -> anyhow::Result<u64> {
    proc_status_kib(pid, "VmHWM:")
}

fn proc_status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// CPU time a process has used so far, all its threads together (from each thread's
/// `/proc/PID/task/TID/schedstat`, in nanoseconds).
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let Ok(text) = std::fs::read_to_string(task?.path().join("schedstat")) else {
            continue;
        };
        total += text
            .split_whitespace()
            .next()
            .and_then(|ns| ns.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(Duration::from_nanos(total))
}

/// A child process, killed when dropped.
struct Proc {
    child: Child,
}

impl Proc {
    fn spawn(command: &mut Command) -> std::io::Result<Self> {
        Ok(Self {
            child: command.kill_on_drop(true).spawn()?,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// This bench binary re-executed with `args` (a baseline mode), once it printed "ready".
async fn start_baseline(args: &[&str], what: &str) -> anyhow::Result<Proc> {
    let exe = std::env::current_exe()?;
    let mut proc = Proc::spawn(
        Command::new(exe)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit()),
    )
    .with_context(|| format!("cannot start {what}"))?;
    let stdout = proc
        .child
        .stdout
        .take()
        .with_context(|| format!("{what}: no stdout"))?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .with_context(|| format!("{what} did not get ready within 20 s"))??;
    if line.as_deref() != Some("ready") {
        bail!("{what} said {line:?} instead of ready");
    }
    Ok(proc)
}

/// The bare relay: this bench binary re-executed with `--relay URL`.
pub struct Relay {
    proc: Proc,
}

impl Relay {
    /// Starts it and waits for its "ready" line (printed once PSUBSCRIBE is confirmed).
    pub async fn start(url: &str) -> anyhow::Result<Self> {
        let proc = start_baseline(&["--relay", url], "the relay").await?;
        Ok(Self { proc })
    }

    /// Whether it has exited (it does when Redis closes its subscriber connection).
    pub fn has_exited(&mut self) -> bool {
        matches!(self.proc.child.try_wait(), Ok(Some(_)))
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Stops it.
    pub async fn stop(self) {
        self.proc.stop().await;
    }
}

/// The bare WebSocket fan-out relay: this bench binary re-executed with
/// `--fanout-relay URL --fanout-listen ADDR [--fanout-read-buffer BYTES]`.
pub struct FanoutRelay {
    proc: Proc,
}

impl FanoutRelay {
    /// Starts it on `listen`, its sockets reading at most `read_buffer` bytes per call if
    /// given, and waits for its "ready" line (printed once it listens and SUBSCRIBE is
    /// confirmed).
    pub async fn start(
        url: &str,
        listen: &str,
        read_buffer: Option<usize>,
    ) -> anyhow::Result<Self> {
        let size = read_buffer.map(|size| size.to_string());
        let mut args = vec!["--fanout-relay", url, "--fanout-listen", listen];
        if let Some(size) = &size {
            args.extend(["--fanout-read-buffer", size]);
        }
        let proc = start_baseline(&args, "the fan-out relay").await?;
        Ok(Self { proc })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Stops it.
    pub async fn stop(self) {
        self.proc.stop().await;
    }
}

/// The bare stream consumer: this bench binary re-executed with
/// `--stream-consumer URL --stream-group GROUP [--stream-publish]`, reading [`STREAM_KEY`].
pub struct StreamConsumer {
    proc: Proc,
}

impl StreamConsumer {
    /// Starts it on `group` (which must exist), republishing every payload as `forward` does
    /// if `publish`, and waits for its "ready" line (printed once connected, before its first
    /// `XREADGROUP`).
    pub async fn start(url: &str, group: &str, publish: bool) -> anyhow::Result<Self> {
        let mut args = vec!["--stream-consumer", url, "--stream-group", group];
        if publish {
            args.push("--stream-publish");
        }
        let proc = start_baseline(&args, "the stream consumer").await?;
        Ok(Self { proc })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Stops it.
    pub async fn stop(self) {
        self.proc.stop().await;
    }
}

/// What a Switchyard process is started with.
pub struct HostSetup<'a> {
    /// The plugins folder.
    pub plugins: &'a Path,
    /// `plugins.compile_cache`, if any.
    pub compile_cache: Option<&'a Path>,
    /// More TOML appended to the configuration (outputs, for instance).
    pub extra: &'a str,
}

/// The real `switchyard run` as a child process.
pub struct Switchyard {
    proc: Proc,
    spawned: Instant,
    admin: String,
    http: reqwest::Client,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Switchyard {
    /// Spawns it without waiting for readiness, logging warnings and errors only. Every
    /// `[plugins]` setting but `dir` and `compile_cache` keeps the host's default.
    pub fn spawn(redis_url: &str, setup: &HostSetup<'_>) -> anyhow::Result<Self> {
        Self::spawn_with(redis_url, setup, Some("warn"))
    }

    /// Spawns it as a user would run it: a configuration that names only the Redis, the
    /// plugins folder and the admin listener (the bench reads `/plugins` there), and the
    /// default log level; waits until `/readyz` answers 200.
    pub async fn start_as_shipped(redis_url: &str, plugins: &Path) -> anyhow::Result<Self> {
        let setup = HostSetup {
            plugins,
            compile_cache: None,
            extra: "",
        };
        let mut host = Self::spawn_with(redis_url, &setup, None)?;
        host.wait_ready().await?;
        Ok(host)
    }

    fn spawn_with(
        redis_url: &str,
        setup: &HostSetup<'_>,
        log_level: Option<&str>,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let admin = format!("127.0.0.1:{}", free_port()?);
        let mut config = format!(
            "[redis]\nurl = {url:?}\n\n[plugins]\ndir = {dir:?}\n",
            url = redis_url,
            dir = setup.plugins.display().to_string(),
        );
        if let Some(cache) = setup.compile_cache {
            config.push_str(&format!(
                "compile_cache = {:?}\n",
                cache.display().to_string()
            ));
        }
        config.push_str(&format!("\n[admin]\nlisten = {admin:?}\n\n"));
        config.push_str(setup.extra);
        let config_path = dir.path().join("switchyard.toml");
        std::fs::write(&config_path, config)?;
        let log = dir.path().join("switchyard.log");
        let log_file = std::fs::File::create(&log)?;
        let mut command = Command::new(env!("CARGO_BIN_EXE_switchyard"));
        if let Some(level) = log_level {
            command.args(["--log-level", level]);
        }
        command
            .args(["run", "--config"])
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        // The configuration file must be the only source of settings.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("SWITCHYARD_") || key.starts_with("REDIS_") || key == "RUST_LOG" {
                command.env_remove(key.as_ref());
            }
        }
        let spawned = Instant::now();
        let proc = Proc::spawn(&mut command).context("cannot start switchyard")?;
        Ok(Self {
            proc,
            spawned,
            admin,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?,
            log,
            _dir: dir,
        })
    }

    /// Spawns it and waits until `/readyz` answers 200.
    pub async fn start(redis_url: &str, setup: &HostSetup<'_>) -> anyhow::Result<Self> {
        let mut host = Self::spawn(redis_url, setup)?;
        host.wait_ready().await?;
        Ok(host)
    }

    /// Waits for `/readyz` to answer 200, polling every 2 ms; returns the time since spawn.
    pub async fn wait_ready(&mut self) -> anyhow::Result<Duration> {
        let url = format!("http://{}/readyz", self.admin);
        loop {
            if let Ok(response) = self.http.get(&url).send().await
                && response.status() == reqwest::StatusCode::OK
            {
                return Ok(self.spawned.elapsed());
            }
            if let Ok(Some(status)) = self.proc.child.try_wait() {
                bail!(
                    "switchyard exited with {status} before it was ready:\n{}",
                    self.log_tail()
                );
            }
            if self.spawned.elapsed() > READY_TIMEOUT {
                bail!(
                    "switchyard was not ready within {READY_TIMEOUT:?}:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// `/plugins` as JSON.
    pub async fn plugins(&self) -> anyhow::Result<serde_json::Value> {
        let url = format!("http://{}/plugins", self.admin);
        Ok(self.http.get(&url).send().await?.json().await?)
    }

    /// `/metrics` as text.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let url = format!("http://{}/metrics", self.admin);
        Ok(self.http.get(&url).send().await?.text().await?)
    }

    /// The queue budget of its first plugin in bytes, if `/plugins` reports one
    /// (`queue_bytes_limit`).
    pub async fn queue_budget(&self) -> anyhow::Result<Option<u64>> {
        let report = self.plugins().await?;
        Ok(report["plugins"]
            .as_array()
            .and_then(|plugins| plugins.first())
            .and_then(queue_bytes_limit))
    }

    /// The content hash `/plugins` reports for `plugin`'s running version.
    pub async fn version_hash(&self, plugin: &str) -> anyhow::Result<Option<String>> {
        let report = self.plugins().await?;
        Ok(plugin_entry(&report, plugin)
            .and_then(|p| p["version"]["hash"].as_str())
            .map(str::to_owned))
    }

    /// Messages shed and failed, summed over every plugin.
    pub async fn shed_and_failed(&self) -> anyhow::Result<(u64, u64)> {
        let report = self.plugins().await?;
        let mut shed = 0;
        let mut failed = 0;
        for plugin in report["plugins"].as_array().into_iter().flatten() {
            shed += plugin["stats"]["shed"].as_u64().unwrap_or(0);
            failed += plugin["stats"]["failed"].as_u64().unwrap_or(0);
        }
        Ok((shed, failed))
    }

    /// What `/plugins` counts against delivery, summed over every plugin.
    pub async fn losses(&self) -> anyhow::Result<HostLosses> {
        let report = self.plugins().await?;
        let mut losses = HostLosses {
            reconnects: report["source"]["reconnects"].as_u64().unwrap_or(0),
            ..HostLosses::default()
        };
        for plugin in report["plugins"].as_array().into_iter().flatten() {
            let stats = &plugin["stats"];
            for (reason, count) in stats["shed_by"].as_object().into_iter().flatten() {
                *losses.shed_by.entry(reason.clone()).or_default() += count.as_u64().unwrap_or(0);
            }
            losses.failed += stats["failed"].as_u64().unwrap_or(0);
            losses.send_failed += stats["send_failed"].as_u64().unwrap_or(0);
        }
        Ok(losses)
    }

    /// Stream entries acknowledged and messages failed, summed over every plugin.
    pub async fn stream_acked_and_failed(&self) -> anyhow::Result<(u64, u64)> {
        let report = self.plugins().await?;
        let mut acked = 0;
        let mut failed = 0;
        for plugin in report["plugins"].as_array().into_iter().flatten() {
            acked += plugin["stats"]["stream_acked"].as_u64().unwrap_or(0);
            failed += plugin["stats"]["failed"].as_u64().unwrap_or(0);
        }
        Ok((acked, failed))
    }

    /// Mean duration of `handle` calls so far (all plugins), from the Prometheus histogram.
    pub async fn mean_handle(&self) -> anyhow::Result<Option<Duration>> {
        let text = self.metrics().await?;
        let total = |name: &str| -> f64 {
            text.lines()
                .filter(|l| l.starts_with(name))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        let sum = total("switchyard_plugin_handle_seconds_sum");
        let count = total("switchyard_plugin_handle_seconds_count");
        Ok((count > 0.0).then(|| Duration::from_secs_f64(sum / count)))
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The end of its log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Stops it (SIGKILL: nothing is left to drain when a run has been counted).
    pub async fn stop(self) {
        self.proc.stop().await;
    }
}

/// Messages a Switchyard run dropped by its own counters (`/plugins`), summed over plugins.
#[derive(Debug, Clone, Default)]
pub struct HostLosses {
    /// Shed messages by reason (`stats.shed_by`: every reason the host reports).
    pub shed_by: std::collections::BTreeMap<String, u64>,
    /// Failed `handle` calls.
    pub failed: u64,
    /// Messages queued by `send` and then not written to Redis.
    pub send_failed: u64,
    /// Times the subscriber connection was re-established (Redis cuts a subscriber that
    /// falls past its output-buffer limit).
    pub reconnects: u64,
}

impl HostLosses {
    /// Every shed message.
    pub fn shed(&self) -> u64 {
        self.shed_by.values().sum()
    }

    /// Adds another run's counters.
    pub fn add(&mut self, other: &HostLosses) {
        for (reason, count) in &other.shed_by {
            *self.shed_by.entry(reason.clone()).or_default() += count;
        }
        self.failed += other.failed;
        self.send_failed += other.send_failed;
        self.reconnects += other.reconnects;
    }

    /// The nonzero reasons, `queue_full 1234, parked 5`, then failed calls, lost sends and
    /// reconnects if any; `0` when nothing was dropped.
    pub fn describe(&self) -> String {
        let mut parts: Vec<String> = self
            .shed_by
            .iter()
            .filter(|(_, count)| **count > 0)
            .map(|(reason, count)| format!("{reason} {count}"))
            .collect();
        for (what, count) in [
            ("failed", self.failed),
            ("send_failed", self.send_failed),
            ("reconnects", self.reconnects),
        ] {
            if count > 0 {
                parts.push(format!("{what} {count}"));
            }
        }
        if parts.is_empty() {
            "0".to_owned()
        } else {
            parts.join(", ")
        }
    }
}

/// The entry of `plugin` in a `/plugins` report.
pub fn plugin_entry<'a>(
    report: &'a serde_json::Value,
    plugin: &str,
) -> Option<&'a serde_json::Value> {
    report["plugins"]
        .as_array()?
        .iter()
        .find(|p| p["name"].as_str() == Some(plugin))
}

/// A plugin's queue budget in bytes from its `/plugins` entry, if the host reports one.
pub fn queue_bytes_limit(plugin: &serde_json::Value) -> Option<u64> {
    plugin["queue_bytes_limit"]
        .as_u64()
        .or_else(|| plugin["stats"]["queue_bytes_limit"].as_u64())
}

/// `bytes` with a custom section appended: a byte-different component (new content hash)
/// that behaves the same.
pub fn with_custom_section(bytes: &[u8], name: &str, payload: &[u8]) -> Vec<u8> {
    fn leb128(mut value: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (value & 0x7f) as u8;
            value >>= 7;
            if value == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let mut contents = Vec::new();
    leb128(name.len(), &mut contents);
    contents.extend_from_slice(name.as_bytes());
    contents.extend_from_slice(payload);
    let mut out = bytes.to_vec();
    out.push(0x00);
    leb128(contents.len(), &mut out);
    out.extend_from_slice(&contents);
    out
}

/// Writes `dir/NAME.wasm` (through a dotfile and a rename, as deployers should) and its
/// manifest `dir/NAME.toml`.
pub fn install_plugin(dir: &Path, name: &str, wasm: &[u8], manifest: &str) -> anyhow::Result<()> {
    std::fs::write(dir.join(format!("{name}.toml")), manifest)?;
    replace_wasm(dir, name, wasm)?;
    Ok(())
}

/// Atomically replaces `dir/NAME.wasm`; returns the moment of the rename.
pub fn replace_wasm(dir: &Path, name: &str, wasm: &[u8]) -> anyhow::Result<Instant> {
    let staging = dir.join(format!(".{name}.wasm.tmp"));
    std::fs::write(&staging, wasm)?;
    std::fs::File::open(&staging)?.sync_all()?;
    let at = Instant::now();
    std::fs::rename(&staging, dir.join(format!("{name}.wasm")))?;
    Ok(at)
}

/// The manifest of a forward copy: its publish grant, and subscriptions if given.
pub fn forward_manifest(patterns: Option<&[String]>) -> String {
    let mut manifest = String::from("[grants]\npublish = [\"fwded:*\"]\n");
    if let Some(patterns) = patterns {
        manifest.push_str("\n[subscriptions]\npatterns = [\n");
        for pattern in patterns {
            manifest.push_str(&format!("  {pattern:?},\n"));
        }
        manifest.push_str("]\n");
    }
    manifest
}

/// The manifest of a forward copy that reads [`STREAM_KEY`] through `group` instead of its
/// own subscriptions, with the grant its republishing needs.
pub fn stream_manifest(group: &str) -> String {
    format!(
        "{}\n[subscriptions]\nstreams = [{STREAM_KEY:?}]\n\n[stream]\ngroup = {group:?}\n",
        forward_manifest(None)
    )
}

/// Counters the receiver moves and the publisher waits on.
#[derive(Default)]
struct Progress {
    warm: AtomicU64,
    measured: AtomicU64,
    changed: Notify,
}

/// What the receiver saw.
pub struct Received {
    /// Copies received per sequence number.
    pub counts: Vec<u8>,
    /// First arrival of each sequence number, in nanoseconds since [`Receiver::base`]
    /// (`u64::MAX`: never).
    pub first_arrival: Vec<u64>,
    /// The last measured arrival.
    pub last: Option<Instant>,
    /// Publish-to-arrival latency of measured messages, in microseconds.
    pub latency_us: Histogram<u64>,
    /// Measured messages received (copies included).
    pub measured: u64,
    /// Payload bytes of measured messages received.
    pub bytes: u64,
    /// Messages without our header.
    pub foreign: u64,
}

impl Received {
    /// Sequence numbers below `sent` that arrived fewer than `copies` times, counted per
    /// missing copy; and copies beyond `copies`.
    pub fn lost_and_duplicated(&self, sent: u64, copies: u8) -> (u64, u64) {
        let mut lost = 0;
        let mut duplicated = 0;
        for seq in 0..usize::try_from(sent).unwrap_or(usize::MAX) {
            let got = self.counts.get(seq).copied().unwrap_or(0);
            lost += u64::from(copies.saturating_sub(got));
            duplicated += u64::from(got.saturating_sub(copies));
        }
        (lost, duplicated)
    }
}

/// A subscriber on its own connection, counting messages in a task.
pub struct Receiver {
    progress: Arc<Progress>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Received>,
    /// The instant arrival times are measured from.
    pub base: Instant,
}

impl Receiver {
    /// Subscribes to `pattern` and starts counting.
    pub async fn start(url: &str, pattern: &str) -> anyhow::Result<Self> {
        let client = redis::Client::open(url)?;
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.psubscribe(pattern).await?;
        let progress = Arc::new(Progress::default());
        let stop = CancellationToken::new();
        let base = Instant::now();
        let task = tokio::spawn(receive(
            pubsub.into_on_message(),
            progress.clone(),
            stop.clone(),
            base,
        ));
        Ok(Self {
            progress,
            stop,
            task,
            base,
        })
    }

    /// Measured messages received so far.
    pub fn measured(&self) -> u64 {
        self.progress.measured.load(Ordering::Acquire)
    }

    /// Waits until `target` measured messages have arrived, or none for [`IDLE`]; true if
    /// all arrived.
    pub async fn wait_measured(&self, target: u64) -> bool {
        self.wait(&self.progress.measured, target).await
    }

    async fn wait(&self, counter: &AtomicU64, target: u64) -> bool {
        wait_for_count(counter, &self.progress.changed, target, IDLE).await
    }

    /// Waits until the measured count is at least `target`, with no idle limit (used for
    /// the publisher's window; the run's final wait reports losses).
    async fn wait_window(&self, target: u64) -> bool {
        self.wait(&self.progress.measured, target).await
    }

    /// Stops counting and returns what was seen.
    pub async fn finish(self) -> anyhow::Result<Received> {
        self.stop.cancel();
        Ok(self.task.await?)
    }
}

async fn receive(
    mut stream: redis::aio::PubSubStream,
    progress: Arc<Progress>,
    stop: CancellationToken,
    base: Instant,
) -> Received {
    let mut seen = Received {
        counts: Vec::new(),
        first_arrival: Vec::new(),
        last: None,
        // 1 µs to 10 minutes, 3 significant digits.
        latency_us: Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds"),
        measured: 0,
        bytes: 0,
        foreign: 0,
    };
    loop {
        let message = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            message = stream.next() => match message {
                Some(message) => message,
                None => break,
            },
        };
        let now = Instant::now();
        let wall = wall_nanos();
        let payload = message.get_payload_bytes();
        let Some(header) = payload.get(..HEADER) else {
            seen.foreign += 1;
            continue;
        };
        let sent = u64::from_le_bytes(header[0..8].try_into().unwrap_or_default());
        let seq = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
        match header[16] {
            KIND_WARM => {
                progress.warm.fetch_add(1, Ordering::Release);
                progress.changed.notify_one();
                continue;
            }
            KIND_MEASURED => {}
            _ => {
                seen.foreign += 1;
                continue;
            }
        }
        let Ok(index) = usize::try_from(seq) else {
            seen.foreign += 1;
            continue;
        };
        if index >= seen.counts.len() {
            if index > 100_000_000 {
                seen.foreign += 1;
                continue;
            }
            let size = (index + 1).max(seen.counts.len() * 2);
            seen.counts.resize(size, 0);
            seen.first_arrival.resize(size, u64::MAX);
        }
        seen.counts[index] = seen.counts[index].saturating_add(1);
        if seen.first_arrival[index] == u64::MAX {
            seen.first_arrival[index] =
                u64::try_from(now.duration_since(base).as_nanos()).unwrap_or(u64::MAX - 1);
        }
        seen.latency_us
            .saturating_record((wall.saturating_sub(sent) / 1000).max(1));
        seen.bytes += payload.len() as u64;
        seen.measured += 1;
        seen.last = Some(now);
        progress.measured.fetch_add(1, Ordering::Release);
        progress.changed.notify_one();
    }
    seen
}

/// The most PUBLISH commands the publisher sends as one pipeline (fewer for payloads above
/// 1 KiB: about 256 KiB per pipeline).
pub const PIPELINE: u64 = 256;

/// Publishes numbered messages on [`INPUT_CHANNEL`] in pipelines.
pub struct Publisher {
    connection: redis::aio::MultiplexedConnection,
    payload: Vec<u8>,
    batch: u64,
    /// The next sequence number to be given out.
    pub next_seq: Arc<AtomicU64>,
}

/// What a paced run did.
pub struct Paced {
    /// Messages published.
    pub sent: u64,
    /// Offered rate actually achieved, messages per second.
    pub achieved: f64,
}

impl Publisher {
    /// A publisher of `size`-byte payloads on its own connection.
    pub async fn new(url: &str, size: usize) -> anyhow::Result<Self> {
        let client = redis::Client::open(url)?;
        let connection = client.get_multiplexed_async_connection().await?;
        let mut payload = vec![b'x'; size.max(HEADER)];
        payload[16] = KIND_MEASURED;
        // About 256 KiB per pipeline, at most PIPELINE commands.
        let batch = (256 * 1024 / payload.len()).clamp(1, PIPELINE as usize) as u64;
        Ok(Self {
            connection,
            payload,
            batch,
            next_seq: Arc::new(AtomicU64::new(0)),
        })
    }

    async fn send(&mut self, first: u64, count: u64, kind: u8) -> anyhow::Result<()> {
        let mut pipe = redis::pipe();
        for seq in first..first + count {
            self.payload[0..8].copy_from_slice(&wall_nanos().to_le_bytes());
            self.payload[8..16].copy_from_slice(&seq.to_le_bytes());
            self.payload[16] = kind;
            pipe.cmd("PUBLISH")
                .arg(INPUT_CHANNEL)
                .arg(&self.payload[..])
                .ignore();
        }
        pipe.query_async::<()>(&mut self.connection)
            .await
            .context("PUBLISH pipeline failed")
    }

    /// Sends [`WARM_UP`] warm-up messages, at most the throttled [`window`] of copies in
    /// flight, and waits until `copies` of each came back.
    pub async fn warm_up(&mut self, receiver: &Receiver, copies: u64) -> anyhow::Result<()> {
        // The warm-up is not measured: it must not flood a process that has just started
        // (500 messages of 256 KiB sent at once made Redis cut a fresh subscriber at its
        // 32 MiB output-buffer limit).
        let window = window(self.payload.len());
        let most = self.batch.min((window / copies.max(1)).max(1));
        let mut sent = 0;
        while sent < WARM_UP {
            let count = most.min(WARM_UP - sent);
            let allowed = (sent + count) * copies;
            if allowed > window {
                // On no progress, send on: the check below reports what came back.
                receiver
                    .wait(&receiver.progress.warm, allowed - window)
                    .await;
            }
            self.send(sent, count, KIND_WARM).await?;
            sent += count;
        }
        if !receiver
            .wait(&receiver.progress.warm, WARM_UP * copies)
            .await
        {
            bail!(
                "warm-up: {} of {} messages came back",
                receiver.progress.warm.load(Ordering::Acquire),
                WARM_UP * copies
            );
        }
        Ok(())
    }

    /// Sends `count` measured messages as fast as the pipeline goes, keeping at most
    /// `window` expected copies outstanding (sent × `copies` − received). Returns when the
    /// first was sent.
    pub async fn windowed(
        &mut self,
        count: u64,
        copies: u64,
        window: u64,
        receiver: &Receiver,
    ) -> anyhow::Result<Instant> {
        // A batch must fit in the window, or the first one would wait for itself.
        let most = self.batch.min((window / copies.max(1)).max(1));
        let started = Instant::now();
        let mut sent = 0;
        while sent < count {
            let batch = most.min(count - sent);
            let allowed = (sent + batch) * copies;
            if allowed > window
                && receiver.measured() < allowed - window
                && !receiver.wait_window(allowed - window).await
            {
                eprintln!(
                    "warning: nothing arrived for {IDLE:?} with {} copies outstanding; \
                     publishing on",
                    allowed - receiver.measured()
                );
            }
            let first = self.next_seq.fetch_add(batch, Ordering::AcqRel);
            self.send(first, batch, KIND_MEASURED).await?;
            sent += batch;
        }
        Ok(started)
    }

    /// Sends measured messages at `rate` per second (in 1 ms bursts) for `duration`, or
    /// until `stop`.
    pub async fn paced(
        &mut self,
        rate: f64,
        duration: Duration,
        stop: &CancellationToken,
    ) -> anyhow::Result<Paced> {
        let started = Instant::now();
        let mut sent = 0u64;
        loop {
            let elapsed = started.elapsed();
            if elapsed >= duration || stop.is_cancelled() {
                break;
            }
            let due = (rate * elapsed.as_secs_f64()) as u64 + 1;
            if due > sent {
                let count = (due - sent).min(self.batch.max(64));
                let first = self.next_seq.fetch_add(count, Ordering::AcqRel);
                self.send(first, count, KIND_MEASURED).await?;
                sent += count;
            } else {
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
        }
        let ended = Instant::now();
        Ok(Paced {
            sent,
            achieved: sent as f64 / ended.duration_since(started).as_secs_f64(),
        })
    }
}

/// One windowed run: how fast `count` messages went through, and what was lost.
pub struct Transfer {
    /// Input messages per second.
    pub input_rate: f64,
    /// Received (output) messages per second.
    pub output_rate: f64,
    /// Payload megabytes (10^6) per second received.
    pub output_mb: f64,
    /// Copies expected but not received.
    pub lost: u64,
    /// Copies received more often than expected.
    pub duplicated: u64,
    /// CPU time of the process under test per message handled (warm-up included), in µs;
    /// filled in by the caller, who knows the process.
    pub cpu_us: f64,
    /// Whether Redis closed the subscriber connection of the process under test during the
    /// run (past its output-buffer limit); filled in by the caller.
    pub cut: bool,
}

/// Sends `count` messages of `size` bytes on [`INPUT_CHANNEL`], with at most `window` copies
/// outstanding ([`UNTHROTTLED`]: no limit), and counts `copies` of each on `receive_pattern`.
pub async fn transfer(
    url: &str,
    receive_pattern: &str,
    count: u64,
    size: usize,
    copies: u64,
    window: u64,
) -> anyhow::Result<Transfer> {
    let receiver = Receiver::start(url, receive_pattern).await?;
    let mut publisher = Publisher::new(url, size).await?;
    publisher.warm_up(&receiver, copies).await?;
    let started = publisher.windowed(count, copies, window, &receiver).await?;
    receiver.wait_measured(count * copies).await;
    let seen = receiver.finish().await?;
    let elapsed = seen.last.map_or(Duration::ZERO, |last| last - started);
    let (lost, duplicated) =
        seen.lost_and_duplicated(count, u8::try_from(copies).unwrap_or(u8::MAX));
    let secs = elapsed.as_secs_f64().max(1e-9);
    Ok(Transfer {
        input_rate: count as f64 / secs,
        output_rate: seen.measured as f64 / secs,
        output_mb: seen.bytes as f64 / secs / 1e6,
        lost,
        duplicated,
        cpu_us: f64::NAN,
        cut: false,
    })
}

/// A publisher window that never holds the publisher back: it sends its pipelines one after
/// another, each as soon as Redis answered the previous one.
pub const UNTHROTTLED: u64 = u64::MAX;

/// The throttled publisher's window for a payload size: about 16 MiB of messages allowed in
/// flight (published, not yet received back), between 64 and 20,000.
pub fn window(size: usize) -> u64 {
    (16 * 1024 * 1024 / size.max(1)).clamp(64, 20_000) as u64
}

/// Waits until `counter` reaches `target` (`changed` is notified whenever it moves), or until
/// it stayed still for `idle`; true if reached.
pub async fn wait_for_count(
    counter: &AtomicU64,
    changed: &tokio::sync::Notify,
    target: u64,
    idle: Duration,
) -> bool {
    let mut seen = counter.load(Ordering::Acquire);
    let mut moved = Instant::now();
    loop {
        let notified = changed.notified();
        let now = counter.load(Ordering::Acquire);
        if now >= target {
            return true;
        }
        if now != seen {
            seen = now;
            moved = Instant::now();
        }
        if moved.elapsed() > idle {
            return false;
        }
        let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
    }
}
