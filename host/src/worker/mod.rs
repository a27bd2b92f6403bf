//! Workers: where Wasm runs.
//!
//! Each plugin has one bounded queue and one worker thread that owns a long-lived `Store` and
//! instance, so plugin state survives between messages and no message pays for an
//! instantiation. The worker takes messages in queue order (FIFO per plugin), runs `handle`
//! under the plugin's deadline and memory cap, and rebuilds the instance after a trap.
//!
//! Workers are OS threads, not tokio tasks: a call may run until its deadline, and it must not
//! hold a reactor thread while it does. Host imports that wait (publish) block this thread on
//! the runtime, bounded by the same deadline.
//!
//! Hot reload: before each message the worker checks which version of its plugin is current
//! and, if it changed, instantiates the new one. A message is handled once, by whichever
//! version is current when its turn comes; the call in flight during a swap finishes on the
//! old version. When the plugin is removed its queue's senders are dropped; the worker
//! finishes what is queued and exits.

#[allow(missing_docs)]
pub mod bindings;
pub mod engine;
pub mod instance;
pub mod state;

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use tokio::sync::mpsc;

use crate::PluginName;
use crate::plugins::LoadedPlugin;
use crate::source::Subscription;
use instance::{CallError, Instance};

/// One message waiting in a plugin's queue.
#[derive(Debug)]
pub struct Envelope {
    /// The channel it was published on.
    pub channel: Bytes,
    /// The plugin's subscription that matched.
    pub subscription: Subscription,
    /// The payload as published.
    pub payload: Bytes,
    /// When the source read it.
    pub received_at: SystemTime,
}

/// Counters of one plugin, shared by the router (accepted, shed) and its worker.
#[derive(Debug, Default)]
pub struct PluginStats {
    accepted: AtomicU64,
    shed: AtomicU64,
    handled: AtomicU64,
    failed: AtomicU64,
    denied: AtomicU64,
    loop_limited: AtomicU64,
    last_error: Mutex<Option<String>>,
    log_gate: LogGate,
    denial_gate: LogGate,
}

/// A snapshot of [`PluginStats`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct StatsSnapshot {
    /// Messages queued for the plugin.
    pub accepted: u64,
    /// Messages dropped because its queue was full or closing.
    pub shed: u64,
    /// Messages `handle` returned `ok` for.
    pub handled: u64,
    /// Messages that failed: an error value, a trap, a deadline, or no instance.
    pub failed: u64,
    /// Host calls refused for want of a grant.
    pub denied: u64,
    /// Publishes into the plugin's own subscriptions refused by the loop guard.
    pub loop_limited: u64,
    /// The most recent failure.
    pub last_error: Option<String>,
}

impl PluginStats {
    /// Fresh counters.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// A consistent-enough copy for reporting.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            accepted: self.accepted.load(Ordering::Relaxed),
            shed: self.shed.load(Ordering::Relaxed),
            handled: self.handled.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            denied: self.denied.load(Ordering::Relaxed),
            loop_limited: self.loop_limited.load(Ordering::Relaxed),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }

    /// Counts a host call refused for want of a grant.
    pub fn record_denied(&self, plugin: &PluginName, why: &str) {
        self.denied.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = self.denial_gate.admit() {
            tracing::warn!(%plugin, suppressed, "denied: {why}");
        }
    }

    /// Counts a publish refused by the loop guard.
    pub fn record_loop_limited(&self, plugin: &PluginName, channel: &str) {
        self.loop_limited.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = self.denial_gate.admit() {
            tracing::warn!(%plugin, suppressed, channel, "loop guard: plugin keeps publishing into its own subscriptions");
        }
    }

    fn record_failure(&self, plugin: &PluginName, error: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = self.log_gate.admit() {
            tracing::warn!(%plugin, suppressed, "message failed: {error}");
        }
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
    }
}

/// Lets one log line through per [`LOG_INTERVAL`] and counts the rest, so a plugin failing
/// on every message cannot flood the log.
#[derive(Debug, Default)]
struct LogGate {
    state: Mutex<(Option<Instant>, u64)>,
}

/// The shortest gap between two log lines about the same plugin's failures or shedding.
pub const LOG_INTERVAL: Duration = Duration::from_secs(1);

impl LogGate {
    /// `Some(suppressed since the last admitted line)` if a line may be logged now.
    fn admit(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match state.0 {
            Some(last) if now.duration_since(last) < LOG_INTERVAL => {
                state.1 += 1;
                None
            }
            _ => {
                let suppressed = std::mem::take(&mut state.1);
                state.0 = Some(now);
                Some(suppressed)
            }
        }
    }
}

/// The sending side of a plugin's queue, held by the routing table.
#[derive(Clone, Debug)]
pub struct Inbox {
    plugin: PluginName,
    tx: mpsc::Sender<Envelope>,
    stats: Arc<PluginStats>,
}

/// Creates a plugin's queue with room for `capacity` messages.
pub fn inbox(
    plugin: PluginName,
    capacity: usize,
    stats: Arc<PluginStats>,
) -> (Inbox, mpsc::Receiver<Envelope>) {
    let (tx, rx) = mpsc::channel(capacity);
    (Inbox { plugin, tx, stats }, rx)
}

impl Inbox {
    /// Queues `envelope` if there is room; otherwise sheds it and counts. Never waits: the
    /// caller is the reading task, and Redis drops a subscriber that stops reading.
    pub fn offer(&self, envelope: Envelope) {
        match self.tx.try_send(envelope) {
            Ok(()) => {
                self.stats.accepted.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => {
                self.stats.shed.fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = self.stats.log_gate.admit() {
                    let why = match error {
                        mpsc::error::TrySendError::Full(_) => "queue full",
                        mpsc::error::TrySendError::Closed(_) => "plugin stopped",
                    };
                    tracing::warn!(plugin = %self.plugin, suppressed, "shedding message: {why}");
                }
            }
        }
    }

    /// Messages waiting.
    pub fn depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

/// Starts the worker thread of `plugin`, which runs whichever version `current` holds.
pub fn spawn(
    plugin: PluginName,
    current: Arc<ArcSwap<LoadedPlugin>>,
    queue: mpsc::Receiver<Envelope>,
    stats: Arc<PluginStats>,
    engine: wasmtime::Engine,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("plugin-{plugin}"))
        .spawn(move || run(plugin, current, queue, stats, engine))
}

fn run(
    plugin: PluginName,
    current: Arc<ArcSwap<LoadedPlugin>>,
    mut queue: mpsc::Receiver<Envelope>,
    stats: Arc<PluginStats>,
    engine: wasmtime::Engine,
) {
    let mut live: Option<Instance> = None;
    while let Some(envelope) = queue.blocking_recv() {
        let version = current.load();
        if !live.as_ref().is_some_and(|i| i.runs(&version)) {
            // Drop the old store before building the new one: its memory goes first.
            live = None;
            match Instance::new(&engine, version.clone(), stats.clone()) {
                Ok(instance) => {
                    tracing::debug!(%plugin, version = %version.hash, "instance ready");
                    live = Some(instance);
                }
                Err(e) => {
                    stats.record_failure(&plugin, format!("cannot instantiate: {e:#}"));
                    continue;
                }
            }
        }
        let Some(instance) = live.as_mut() else {
            continue;
        };
        match instance.handle(envelope) {
            Ok(()) => {
                stats.handled.fetch_add(1, Ordering::Relaxed);
            }
            Err(CallError::Returned(error)) => stats.record_failure(&plugin, error),
            Err(CallError::Trapped(trap)) => {
                // A trap poisons the store: the next message gets a fresh instance.
                live = None;
                stats.record_failure(&plugin, format!("trapped: {trap}"));
            }
        }
    }
    tracing::debug!(%plugin, "queue closed and drained; worker done");
}
