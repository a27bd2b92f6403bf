//! The moving parts of the pipeline bench: the `switchyard` binary and the baselines as child
//! processes, plugin files for them, a pipelined or paced publisher, and a receiver that counts
//! what comes back on `fwded:*`; here, what they share (channels, limits, a child process,
//! figures from `/proc`).
//!
//! - `baselines`: the bare relay, the bare WebSocket fan-out relay, the bare stream consumer;
//! - `switchyard`: the real `switchyard run`, and what its admin endpoint reports;
//! - `plugins`: `forward` copies, manifests, installing and replacing them;
//! - `traffic`: the publisher, the receiver, and a windowed run of both;
//! - `keys`: the keyspace section's writer of keys and its receiver counting per key.

#[path = "harness/baselines.rs"]
mod baselines;
#[path = "harness/keys.rs"]
mod keys;
#[path = "harness/plugins.rs"]
mod plugins;
#[path = "harness/switchyard.rs"]
mod switchyard;
#[path = "harness/traffic.rs"]
mod traffic;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use tokio::process::{Child, Command};

pub use baselines::{FanoutRelay, Relay, StreamConsumer};
pub use keys::{KEY_EVENTS, KEY_PREFIX, KEYSPACE_PATTERN, KEYSPACE_PREFIX, key_transfer};
pub use plugins::{forward_manifest, install_plugin, replace_wasm, stream_manifest};
pub use switchyard::{HostLosses, HostSetup, Switchyard, plugin_entry, queue_bytes_limit};
pub use traffic::{
    PIPELINE, Publisher, Received, Receiver, Transfer, UNTHROTTLED, transfer, window,
};

/// The channel every input message is published on; `forward` republishes it on `fwded:x`.
pub const INPUT_CHANNEL: &str = "fwd:x";
/// What the receiver subscribes to for the forwarded copies.
pub const OUTPUT_PATTERN: &str = "fwded:*";
/// The stream of the streams section: under `fwd:`, so that `forward` accepts its entries
/// (the channel of a stream entry is the stream's key) and republishes them on `fwded:orders`.
pub const STREAM_KEY: &str = "fwd:orders";
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
