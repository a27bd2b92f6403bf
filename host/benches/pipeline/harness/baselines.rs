//! The baselines as child processes: this bench binary re-executed in the mode of the bare
//! relay, the bare WebSocket fan-out relay or the bare stream consumer (`relay.rs` and
//! `websocket.rs` hold what they run), each started once it printed "ready".

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::AsyncBufReadExt as _;
use tokio::process::Command;

use super::Proc;

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

    /// Starts it in keys mode (relaying `set` notifications of `fwd:*` keys) and waits for
    /// its "ready" line (printed once PSUBSCRIBE is confirmed).
    pub async fn start_keys(url: &str) -> anyhow::Result<Self> {
        let proc = start_baseline(&["--relay", url, "--relay-keys"], "the key relay").await?;
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
