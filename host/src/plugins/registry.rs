//! The [`Registry`]: one slot per plugin of the folder (its current version, queue and
//! workers), kept in step with the folder by [`Registry::reconcile`]: load, reload and swap,
//! retire; the routing table rebuilt from the slots and handed to the source; and
//! [`Registry::shutdown`], after which nothing changes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use super::compile_cache;
use super::loader::{LoadError, Loaded, Loader};
use super::scan::{FileStamp, Fingerprint, Pending, note_unsettled, scan, scan_one};
use super::sources::Sources;
use crate::PluginName;
use crate::config::BreakerPolicy;
use crate::config::WhenFull;
use crate::message::Subscription;
use crate::router::{Route, RoutingTable};
use crate::source::Source;
use crate::stats::PluginStats;
use crate::worker::queue::{HostBudget, Limits};
use crate::worker::version::LoadedPlugin;
use crate::worker::{self, Inbox, Workers};

/// Why a plugin's newest file was rejected, and which file that was: the same file is not
/// tried again.
#[derive(Debug, Clone, serde::Serialize)]
pub(super) struct LoadFailure {
    pub(super) kind: &'static str,
    pub(super) message: String,
    #[serde(skip)]
    pub(super) fingerprint: Fingerprint,
}

/// The part of [`Registry::shutdown`]'s time that clearing the subscriptions may take; the
/// rest is the workers' to drain the queues, which are closed once it has passed either way.
pub const UNSUBSCRIBE_SHARE: f64 = 0.5;

/// The settle time until [`Registry::set_settle`] says otherwise (`plugins.settle_ms`'s
/// default).
const DEFAULT_SETTLE: Duration = Duration::from_millis(50);

/// One plugin of the folder: its current version, its queue and workers, and its counters.
pub(super) struct Slot {
    pub(super) current: Arc<ArcSwap<LoadedPlugin>>,
    pub(super) inbox: Inbox,
    pub(super) stats: Arc<PluginStats>,
    pub(super) workers: Workers,
    fingerprint: Fingerprint,
    pub(super) reloads: u64,
    /// New files rejected while this plugin ran.
    pub(super) rejects: u64,
    pub(super) load_error: Option<LoadFailure>,
}

/// What the registry knows of the folder, behind one lock.
#[derive(Default)]
pub(super) struct Inner {
    pub(super) slots: BTreeMap<PluginName, Slot>,
    /// Files that failed to load and have no previous version running.
    pub(super) failed: BTreeMap<PluginName, LoadFailure>,
    /// Removed plugins whose workers finish their queues; closed once routes no longer
    /// reach them, dropped once their workers are done.
    pub(super) retired: Vec<(PluginName, Slot)>,
    /// Files still being written, as of the last reconcile.
    pub(super) pending: BTreeMap<PluginName, Pending>,
    /// The routing table in force does not match the slots (a change whose routes could not
    /// be published yet).
    routes_stale: bool,
    /// Plugins the routing table in force reaches. A plugin just loaded is not ready until it
    /// is here: its subscriptions may already deliver, but to the previous table.
    routed: BTreeSet<PluginName>,
    /// Files renamed into the folder (by file name: the folder may be named relatively or
    /// through a link, so full paths can differ), as they were when they arrived: complete,
    /// so loaded without waiting for them to settle while they stay so.
    whole: HashMap<OsString, FileStamp>,
    /// Running plugins whose file is gone, and since when. A plugin is removed once its file
    /// has been gone for the settle time, so that a file deleted and written again within it
    /// is a reload (same queue, nothing lost), not a removal and an addition.
    vanished: HashMap<PluginName, Instant>,
}

/// What one reconcile did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Plugins loaded for the first time.
    pub added: Vec<PluginName>,
    /// Plugins swapped to a new version.
    pub replaced: Vec<PluginName>,
    /// Plugins unloaded.
    pub removed: Vec<PluginName>,
    /// Plugins whose new file was rejected.
    pub rejected: Vec<PluginName>,
    /// Plugins whose file changed within the settle time or while it was being loaded (still
    /// being written): the next reconcile looks again.
    pub unsettled: Vec<PluginName>,
    /// Running plugins whose file disappeared less than the settle time ago: still running,
    /// and removed by a later reconcile unless the file comes back.
    pub vanishing: Vec<PluginName>,
}

impl Changes {
    /// Whether the folder is at rest: nothing waits for the settle time to pass.
    pub fn settled(&self) -> bool {
        self.unsettled.is_empty() && self.vanishing.is_empty()
    }

    fn routes_changed(&self) -> bool {
        !(self.added.is_empty() && self.replaced.is_empty() && self.removed.is_empty())
    }
}

/// How each plugin's queue and worker behave.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Bytes a queue holds unless its plugin's manifest says otherwise.
    pub queue_bytes: u64,
    /// Messages a queue holds, if capped by count too.
    pub queue_capacity: Option<usize>,
    /// What all queues hold together.
    pub budget: Arc<HostBudget>,
    /// What a full queue sheds.
    pub when_full: WhenFull,
    /// When a failing plugin is parked.
    pub breaker: BreakerPolicy,
}

/// The plugins of one folder, and the routing table built from them.
pub struct Registry {
    dir: PathBuf,
    loader: Loader,
    source: Source,
    workers: WorkerSettings,
    inner: Mutex<Inner>,
    /// Serialises reconciles; `inner` is only ever held briefly.
    reconciling: tokio::sync::Mutex<()>,
    /// Set by [`Registry::shutdown`] under `reconciling`: a reconcile that gets the lock
    /// afterwards (a watcher that was already past its cancellation check) changes nothing.
    /// Otherwise every file would count as new, since the slots are empty, and its plugin
    /// would be loaded and subscribed again during the stop, with a queue nobody drains.
    stopped: AtomicBool,
    /// Whether one reconcile has finished.
    scanned: AtomicBool,
    /// How long a file must be unchanged to be looked at, in milliseconds.
    settle_ms: AtomicU64,
    /// The registry sources filling the folder, if any.
    sources: std::sync::OnceLock<Arc<Sources>>,
}

impl Registry {
    /// A registry for `dir`, routing through `source`. Nothing is loaded until
    /// [`Registry::reconcile`].
    pub fn new(dir: PathBuf, loader: Loader, source: Source, workers: WorkerSettings) -> Self {
        Self {
            dir,
            loader,
            source,
            workers,
            inner: Mutex::new(Inner::default()),
            reconciling: tokio::sync::Mutex::new(()),
            stopped: AtomicBool::new(false),
            scanned: AtomicBool::new(false),
            settle_ms: AtomicU64::new(millis(DEFAULT_SETTLE)),
            sources: std::sync::OnceLock::new(),
        }
    }

    /// Records the registry sources that fill the folder: readiness waits for them, and
    /// `/plugins` shows each plugin's.
    pub fn set_sources(&self, sources: Arc<Sources>) {
        let _ = self.sources.set(sources);
    }

    /// The registry sources, if any.
    pub fn sources(&self) -> Option<&Arc<Sources>> {
        self.sources.get()
    }

    /// The host's tracing.
    pub fn tracing(&self) -> &Arc<crate::trace::Tracing> {
        self.loader.effects().tracing()
    }

    /// Which files may load, and the refusals so far.
    pub fn admission(&self) -> &Arc<super::admission::Admission> {
        self.loader.admission()
    }

    /// Notes that `path` was just renamed into the folder: whatever is there now is complete
    /// (a rename is atomic), so the next reconcile loads it without the settle wait. A later
    /// write in place changes its stamp and brings the wait back.
    pub fn arrived_whole(&self, path: &Path) {
        if let (Some(name), Some(stamp)) = (path.file_name(), FileStamp::of(path)) {
            self.lock().whole.insert(name.to_owned(), stamp);
        }
    }

    /// Makes `settle` the time a file must be unchanged before it is loaded
    /// (`plugins.settle_ms`). Call it before the first [`Registry::reconcile`]; the watcher
    /// sets it too.
    pub fn set_settle(&self, settle: Duration) {
        self.settle_ms.store(millis(settle), Ordering::Relaxed);
    }

    /// The byte budget of `version`'s queue: its manifest's, else the host's.
    fn queue_bytes(&self, version: &LoadedPlugin) -> usize {
        let bytes = version.queue_bytes.unwrap_or(self.workers.queue_bytes);
        usize::try_from(bytes).unwrap_or(usize::MAX)
    }

    fn settle(&self) -> Duration {
        Duration::from_millis(self.settle_ms.load(Ordering::Relaxed))
    }

    /// The plugins folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the folder has been scanned and every `NAME.wasm` in it, as it is now, has a
    /// version running or was rejected: the plugins' part of readiness. False while the
    /// folder cannot be read.
    pub fn scanned(&self) -> bool {
        self.scanned.load(Ordering::Acquire) && self.pending().is_ok_and(|p| p.is_empty())
    }

    /// The plugins readiness waits for: files in the folder whose current content is neither
    /// running nor rejected (new, still being written, or being loaded), except a running
    /// plugin's replacement (the running version serves meanwhile) and files that have kept
    /// changing for longer than [`MAX_UNSETTLED`](super::MAX_UNSETTLED).
    pub fn pending(&self) -> anyhow::Result<Vec<PluginName>> {
        let found = scan(&self.dir)?;
        let inner = self.lock();
        Ok(found
            .into_iter()
            .filter(|(name, (_, fingerprint))| {
                // Running means reached by the table in force, not only loaded.
                let running = inner.routed.contains(name);
                let rejected = inner
                    .failed
                    .get(name)
                    .is_some_and(|f| f.fingerprint == *fingerprint);
                let given_up = inner.pending.get(name).is_some_and(|p| p.given_up);
                !(running || rejected || given_up)
            })
            .map(|(name, _)| name)
            .collect())
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the loaded plugins match the folder. Returns what changed: nothing, once
    /// [`Registry::shutdown`] has begun.
    pub async fn reconcile(&self) -> anyhow::Result<Changes> {
        let _guard = self.reconciling.lock().await;
        if self.stopped.load(Ordering::Acquire) {
            tracing::debug!("plugins folder not looked at: the host is stopping");
            return Ok(Changes::default());
        }
        let found = scan(&self.dir)?;
        let settle = self.settle();
        let mut changes = Changes::default();

        // Decide what to load without holding the lock across compilation.
        let mut to_load = Vec::new();
        {
            let mut inner = self.lock();
            let now = Instant::now();
            let Inner {
                slots, vanished, ..
            } = &mut *inner;
            vanished.retain(|name, _| slots.contains_key(name) && !found.contains_key(name));
            let gone: Vec<PluginName> = inner
                .slots
                .keys()
                .filter(|name| !found.contains_key(*name))
                .cloned()
                .collect();
            for name in gone {
                let since = *inner.vanished.entry(name.clone()).or_insert(now);
                if now.duration_since(since) < settle {
                    changes.vanishing.push(name);
                    continue;
                }
                inner.vanished.remove(&name);
                if let Some(slot) = inner.slots.remove(&name) {
                    tracing::info!(plugin = %name, "file removed; unloading after its queue drains");
                    inner.retired.push((name.clone(), slot));
                    inner.routes_stale = true;
                    changes.removed.push(name);
                }
            }
            inner.failed.retain(|name, _| found.contains_key(name));
            for (name, (path, fingerprint)) in &found {
                let known = match (inner.slots.get(name), inner.failed.get(name)) {
                    (Some(slot), _) => {
                        slot.fingerprint == *fingerprint
                            || slot
                                .load_error
                                .as_ref()
                                .is_some_and(|f| f.fingerprint == *fingerprint)
                    }
                    (None, Some(failure)) => failure.fingerprint == *fingerprint,
                    (None, None) => false,
                };
                if known {
                    continue;
                }
                if !fingerprint.settled(path, settle, &inner.whole) {
                    // Written to within the settle time: a copy in progress. Loading it now
                    // would reject a partial file (and log an error about a file that is
                    // fine); the watcher looks again once it has settled.
                    changes.unsettled.push(name.clone());
                    continue;
                }
                let running = inner.slots.get(name).map(|slot| {
                    let current = slot.current.load();
                    (current.hash, current.manifest_hash)
                });
                to_load.push((name.clone(), path.clone(), fingerprint.clone(), running));
            }
        }

        for (name, path, fingerprint, running) in to_load {
            let result = self.loader.load(&name, &path, running).await;
            // A file still being written changes under us: skip this round, the watcher
            // reports its last write and the next reconcile sees the settled file.
            if scan_one(&path).as_ref() != Some(&fingerprint) {
                tracing::debug!(plugin = %name, "file changed while loading; will look again");
                changes.unsettled.push(name);
                continue;
            }
            self.apply(name, fingerprint, result, &mut changes)?;
        }

        let stale = {
            let mut inner = self.lock();
            note_unsettled(
                &mut inner.pending,
                &found,
                &changes.unsettled,
                Instant::now(),
            );
            // A renamed file's note is needed until it is loaded; a note about a file that is
            // gone or has changed since is stale either way.
            let dir = &self.dir;
            inner
                .whole
                .retain(|name, stamp| FileStamp::of(&dir.join(name)).as_ref() == Some(stamp));
            inner.routes_stale |= changes.routes_changed();
            inner.routes_stale
        };
        if stale {
            // On failure the table stays marked stale: the next reconcile publishes it again.
            self.publish_routes().await?;
            // The table in force no longer reaches removed plugins: close their queues, so
            // their workers drain and stop.
            let mut inner = self.lock();
            inner.routes_stale = false;
            for (_, slot) in &inner.retired {
                slot.inbox.close();
            }
        }
        self.lock()
            .retired
            .retain(|(_, slot)| !slot.workers.is_finished());
        self.scanned.store(true, Ordering::Release);
        Ok(changes)
    }

    fn apply(
        &self,
        name: PluginName,
        fingerprint: Fingerprint,
        result: Result<Loaded, LoadError>,
        changes: &mut Changes,
    ) -> anyhow::Result<()> {
        let mut inner = self.lock();
        match result {
            Ok(Loaded::Unchanged) => {
                if let Some(slot) = inner.slots.get_mut(&name) {
                    slot.fingerprint = fingerprint;
                    slot.load_error = None;
                }
            }
            Ok(Loaded::New(version)) => {
                inner.failed.remove(&name);
                let version = Arc::new(*version);
                tracing::info!(
                    plugin = %name,
                    version = %version.description.version,
                    hash = %version.hash,
                    subscriptions = version.description.subscriptions.len(),
                    "plugin loaded"
                );
                let queue_bytes = self.queue_bytes(&version);
                if let Some(slot) = inner.slots.get_mut(&name) {
                    slot.inbox.set_byte_limit(queue_bytes);
                    slot.current.store(version);
                    // The new version may want more or fewer workers than the old one.
                    if let Err(e) = slot.workers.staff() {
                        tracing::error!(
                            plugin = %name,
                            running = slot.workers.count(),
                            "cannot start more workers: {e}"
                        );
                    }
                    slot.fingerprint = fingerprint;
                    slot.reloads += 1;
                    slot.load_error = None;
                    changes.replaced.push(name);
                } else {
                    let stats = PluginStats::new();
                    let limits = Limits {
                        bytes: queue_bytes,
                        count: self.workers.queue_capacity,
                        when_full: self.workers.when_full,
                    };
                    let inbox = worker::inbox(
                        name.clone(),
                        limits,
                        self.workers.budget.clone(),
                        stats.clone(),
                    );
                    let current = Arc::new(ArcSwap::new(version));
                    let workers =
                        worker::spawn(name.clone(), current.clone(), &inbox, self.workers.breaker)?;
                    inner.slots.insert(
                        name.clone(),
                        Slot {
                            current,
                            inbox,
                            stats,
                            workers,
                            fingerprint,
                            reloads: 0,
                            rejects: 0,
                            load_error: None,
                        },
                    );
                    changes.added.push(name);
                }
            }
            Err(error) => {
                let failure = LoadFailure {
                    kind: error.kind(),
                    message: error.to_string(),
                    fingerprint,
                };
                if let Some(slot) = inner.slots.get_mut(&name) {
                    tracing::error!(
                        plugin = %name,
                        running = %slot.current.load().hash,
                        "new file rejected, previous version keeps running: {error}"
                    );
                    slot.load_error = Some(failure);
                    slot.rejects += 1;
                } else {
                    tracing::error!(plugin = %name, "cannot load plugin: {error}");
                    inner.failed.insert(name.clone(), failure);
                }
                changes.rejected.push(name);
            }
        }
        Ok(())
    }

    /// Rebuilds the routing table from the slots and hands it to the source.
    async fn publish_routes(&self) -> anyhow::Result<()> {
        let (names, table) = {
            let inner = self.lock();
            let names: BTreeSet<PluginName> = inner.slots.keys().cloned().collect();
            let table = RoutingTable::new(
                inner
                    .slots
                    .values()
                    .map(|slot| {
                        let current = slot.current.load();
                        Route::new(slot.inbox.clone(), &current.description.subscriptions)
                            .with_keys(&current.description.keys)
                            .with_tracking(&current.description.tracking)
                            .with_stream_settings(current.stream.clone())
                    })
                    .collect(),
            );
            (names, table)
        };
        let subscriptions = table.subscriptions();
        self.loader.effects().sharded().set_subscribed(
            subscriptions
                .iter()
                .filter_map(|s| match s {
                    Subscription::Sharded(name) => Some(name.clone()),
                    _ => None,
                })
                .collect(),
        );
        self.source.update(subscriptions, table).await?;
        self.lock().routed = names;
        Ok(())
    }

    /// Unloads every plugin for good: routes are cleared, queues drain, workers exit, and
    /// later reconciles change nothing. Everything within `deadline`: clearing the
    /// subscriptions gets at most [`UNSUBSCRIBE_SHARE`] of it, and the queues are closed
    /// however that ends, so the workers always get the rest. Returns whether they all
    /// finished in time.
    pub async fn shutdown(&self, deadline: Duration) -> bool {
        let until = tokio::time::Instant::now() + deadline;
        let _guard = self.reconciling.lock().await;
        self.stopped.store(true, Ordering::Release);
        let workers: Vec<_> = {
            let mut inner = self.lock();
            let slots = std::mem::take(&mut inner.slots);
            std::mem::take(&mut inner.retired)
                .into_iter()
                .map(|(_, slot)| slot)
                .chain(slots.into_values())
                .map(|slot| (slot.inbox, slot.workers))
                .collect()
        };
        // Unsubscribing first means no message arrives for a closed queue, but it is only a
        // courtesy: on a network gone silent it would wait for replies that never come.
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        let unsubscribe_within = left.mul_f64(UNSUBSCRIBE_SHARE);
        let cleared = self
            .source
            .update(Default::default(), RoutingTable::default());
        match tokio::time::timeout(unsubscribe_within, cleared).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("could not clear subscriptions while stopping: {e:#}"),
            Err(_) => tracing::warn!(
                waited = ?unsubscribe_within,
                "clearing subscriptions while stopping timed out; draining the queues anyway"
            ),
        }
        for (inbox, _) in &workers {
            inbox.close();
        }
        let join = tokio::task::spawn_blocking(move || {
            for (_, workers) in workers {
                workers.join();
            }
        });
        tokio::time::timeout_at(until, join).await.is_ok()
    }

    /// Bytes waiting in all plugins' queues, and the host's total budget for them.
    pub fn queue_budget(&self) -> (usize, usize) {
        (self.workers.budget.used(), self.workers.budget.limit())
    }

    /// The loader's compile cache, if one is configured.
    pub fn compile_cache(&self) -> Option<&compile_cache::CompileCache> {
        self.loader.compile_cache()
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
