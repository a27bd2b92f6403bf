//! What the registry shows: each plugin as `/plugins` lists it ([`PluginReport`]: state,
//! version, counters, queue, why its newest file was rejected), what `/metrics` reads of
//! each ([`PluginMetrics`]), and whether every plugin is idle. Read-only: nothing here
//! changes a slot.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;

use super::registry::{Inner, LoadFailure, Registry, Slot};
use super::sources::SourceStatus;
use crate::config::GrantsConfig;
use crate::stats::{PluginStats, StatsSnapshot};
use crate::{ContentHash, PluginName};

/// A plugin's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PluginState {
    /// A version is loaded and handling messages.
    Running,
    /// The circuit breaker parked it after repeated failures; its messages are shed until
    /// the back-off passes.
    Parked,
    /// Its file was removed: no new message reaches it, and it handles those already queued
    /// for it, then leaves.
    Draining,
    /// The file could not be loaded and no earlier version runs.
    Failed,
}

/// One plugin, as `/plugins` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PluginReport {
    /// The plugin's name (its file name without `.wasm`).
    pub name: PluginName,
    /// Running, parked, draining or failed.
    pub state: PluginState,
    /// The version running, if any.
    pub version: Option<VersionReport>,
    /// Message counters, if a version runs.
    pub stats: Option<StatsSnapshot>,
    /// Messages waiting in its queue.
    pub queue_depth: usize,
    /// Bytes waiting in its queue, if it has one.
    pub queue_bytes: Option<usize>,
    /// Its queue's byte budget, if it has a queue.
    pub queue_bytes_limit: Option<usize>,
    /// Times a new version replaced a running one.
    pub reloads: u64,
    /// Why the newest file was rejected, if it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    load_error: Option<LoadFailure>,
    /// The registry source it is pulled from, if it is (`plugins.sources`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceStatus>,
}

impl PluginReport {
    /// Why the newest file was rejected, if it was: (kind, message).
    pub fn load_error(&self) -> Option<(&str, &str)> {
        self.load_error
            .as_ref()
            .map(|f| (f.kind, f.message.as_str()))
    }
}

/// The running version of a plugin.
#[derive(Debug, Clone, Serialize)]
pub struct VersionReport {
    /// The name `describe` gave.
    pub declared_name: String,
    /// The version `describe` gave (empty for other hosts' worlds, which have no
    /// `describe`).
    pub version: String,
    /// The world the component is written for: `switchyard:plugin@0.6.0` (or `@0.5.0` and
    /// `@0.4.0`, earlier contracts), or another host's.
    pub world: &'static str,
    /// Content hash of the `.wasm`.
    pub hash: ContentHash,
    /// Size of the `.wasm` in bytes.
    pub size: usize,
    /// The file.
    pub file: PathBuf,
    /// When it was loaded, in milliseconds since the Unix epoch.
    pub loaded_at_ms: u64,
    /// Its subscriptions, as `channel NAME` or `pattern GLOB`.
    pub subscriptions: Vec<String>,
    /// Its key subscriptions, as `keys GLOB in database N (EVENTS)`; each is subscribed as
    /// the pattern `__keyspace@N__:GLOB`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<String>,
    /// The key prefixes whose client-side caching invalidations it hears of.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tracking: Vec<String>,
    /// What it is allowed to do.
    pub grants: GrantsConfig,
    /// What it asked for in `describe`.
    pub requested: GrantsConfig,
    /// The names of its settings. Values are never reported: they may hold tokens or
    /// passwords, and the operator who wrote them has the manifest.
    pub settings: Vec<String>,
    /// How many workers handle its messages at once, each with its own instance
    /// (`limits.concurrency`; 1, the default, keeps them in order).
    pub concurrency: usize,
}

/// One running plugin, as the metrics endpoint sees it.
pub struct PluginMetrics {
    /// Its name.
    pub name: PluginName,
    /// Its counters and histogram.
    pub stats: Arc<PluginStats>,
    /// Messages waiting.
    pub queue_depth: usize,
    /// Bytes waiting, and its queue's budget.
    pub queue_bytes: (usize, usize),
    /// Versions swapped in.
    pub reloads: u64,
    /// New files rejected.
    pub rejects: u64,
}

impl Registry {
    /// Whether every running or draining plugin has finished every message queued for it.
    pub fn idle(&self) -> bool {
        let inner = self.lock();
        inner
            .slots
            .values()
            .chain(inner.retired.iter().map(|(_, slot)| slot))
            .all(|slot| slot.stats.settled())
    }

    /// What the metrics endpoint reads of every running or draining plugin.
    pub fn metrics_view(&self) -> Vec<PluginMetrics> {
        let inner = self.lock();
        inner
            .slots
            .iter()
            .chain(inner.draining())
            .map(|(name, slot)| PluginMetrics {
                name: name.clone(),
                stats: slot.stats.clone(),
                queue_depth: slot.inbox.depth(),
                queue_bytes: slot.inbox.bytes(),
                reloads: slot.reloads,
                rejects: slot.rejects,
            })
            .collect()
    }

    /// How many files in the folder failed to load with no earlier version running.
    pub fn failed_count(&self) -> usize {
        self.lock().failed.len()
    }

    /// A report of every plugin in the folder, loaded or not, and of removed plugins still
    /// draining their queues.
    pub fn report(&self) -> Vec<PluginReport> {
        let inner = self.lock();
        let mut reports: Vec<PluginReport> = inner
            .slots
            .iter()
            .map(|(name, slot)| {
                let state = if slot.stats.parked() {
                    PluginState::Parked
                } else {
                    PluginState::Running
                };
                slot_report(name, slot, state)
            })
            .chain(
                inner
                    .draining()
                    .map(|(name, slot)| slot_report(name, slot, PluginState::Draining)),
            )
            .collect();
        reports.extend(inner.failed.iter().map(|(name, failure)| PluginReport {
            name: name.clone(),
            state: PluginState::Failed,
            version: None,
            stats: None,
            queue_depth: 0,
            queue_bytes: None,
            queue_bytes_limit: None,
            reloads: 0,
            load_error: Some(failure.clone()),
            source: None,
        }));
        if let Some(sources) = self.sources() {
            for report in &mut reports {
                report.source = sources.status(report.name.as_str());
            }
        }
        reports.sort_by(|a, b| a.name.cmp(&b.name));
        reports
    }
}

impl Inner {
    /// Removed plugins whose workers still have messages to handle, one per name (the most
    /// recently removed), except where a file of the same name is back in the folder: that
    /// name is reported for its new file.
    fn draining(&self) -> impl Iterator<Item = (&PluginName, &Slot)> {
        let latest: BTreeMap<&PluginName, &Slot> = self
            .retired
            .iter()
            .filter(|(name, slot)| {
                !slot.workers.is_finished()
                    && !self.slots.contains_key(name)
                    && !self.failed.contains_key(name)
            })
            .map(|(name, slot)| (name, slot))
            .collect();
        latest.into_iter()
    }
}

/// How `/plugins` shows a plugin that has a version loaded.
fn slot_report(name: &PluginName, slot: &Slot, state: PluginState) -> PluginReport {
    let current = slot.current.load();
    let description = &current.description;
    PluginReport {
        name: name.clone(),
        state,
        version: Some(VersionReport {
            declared_name: description.name.clone(),
            version: description.version.clone(),
            world: current.pre.world().label(),
            hash: current.hash,
            size: current.size,
            file: current.path.clone(),
            loaded_at_ms: millis_since_epoch(current.loaded_at),
            subscriptions: description
                .subscriptions
                .iter()
                .map(ToString::to_string)
                .collect(),
            keys: description.keys.iter().map(ToString::to_string).collect(),
            tracking: description
                .tracking
                .iter()
                .map(|prefix| String::from_utf8_lossy(prefix).into_owned())
                .collect(),
            grants: current.grants.config().clone(),
            requested: description.requested.clone(),
            settings: current.settings.keys().map(str::to_owned).collect(),
            concurrency: current.concurrency,
        }),
        stats: Some(slot.stats.snapshot()),
        queue_depth: slot.inbox.depth(),
        queue_bytes: Some(slot.inbox.bytes().0),
        queue_bytes_limit: Some(slot.inbox.bytes().1),
        reloads: slot.reloads,
        load_error: slot.load_error.clone(),
        source: None,
    }
}

fn millis_since_epoch(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
