//! Plugins: the folder is the source of truth.
//!
//! The [`Registry`] keeps one slot per `NAME.wasm` in the plugins folder: its current version,
//! its queue and its workers. [`Registry::reconcile`] compares the folder with the slots and
//! makes them agree: new files are loaded, changed ones reloaded (and swapped in atomically
//! only if the new version passes every check), removed ones unloaded after their queue
//! drains. The [`watcher`] calls it whenever the folder changes; events only say "look
//! again", never what to do, so missed or merged events cannot leave the host out of step.
//!
//! # Settled files and readiness
//!
//! A file is looked at only once it has been unchanged for the settle time (its modification
//! time says so), and a load counts only if the file did not change while it was read: a file
//! still being written is neither loaded nor rejected, it is *pending*. A file renamed into
//! the folder (the documented way to deploy) is complete the moment it appears: the watcher
//! reports it ([`Registry::arrived_whole`]) and it is loaded at once, without the settle wait,
//! for as long as it is the file that arrived (same inode, size and modification time). The host is ready
//! ([`Registry::scanned`]) when every `NAME.wasm` in the folder, as it is now, has a version
//! running or has been rejected. A file that stops changing halfway (a writer that stalled)
//! is settled, so it is loaded or rejected like any other; a file that keeps changing for
//! [`MAX_UNSETTLED`] is reported in the log and stops holding readiness back.
//!
//! # Removal
//!
//! A removed file's plugin leaves the routing table first; then its queue is closed and its
//! workers handle what was already queued. Meanwhile `/plugins` lists it as draining; it
//! leaves the list when all its workers are done.

pub mod compile_cache;
pub mod files;
pub mod loader;
pub mod manifest;
pub mod watcher;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::config::BreakerPolicy;
use crate::config::GrantsConfig;
use crate::config::WhenFull;
use crate::message::Subscription;
use crate::router::{Route, RoutingTable};
use crate::source::Source;
use crate::stats::{PluginStats, StatsSnapshot};
use crate::worker::queue::{HostBudget, Limits};
use crate::worker::version::LoadedPlugin;
use crate::worker::{self, Inbox, Workers};
use crate::{ContentHash, PluginName};
use loader::{LoadError, Loaded, Loader};

/// How long a file may keep changing before the host stops waiting for it: long enough for a
/// slow copy of the largest plugins (tens of MB, Python or JavaScript) over a network volume.
/// A file changing for longer is being rewritten by something, not deployed; the host logs
/// an error naming it and no longer counts it against readiness, and loads it if it ever
/// settles.
pub const MAX_UNSETTLED: Duration = Duration::from_secs(60);

/// The part of [`Registry::shutdown`]'s time that clearing the subscriptions may take; the
/// rest is the workers' to drain the queues, which are closed once it has passed either way.
pub const UNSUBSCRIBE_SHARE: f64 = 0.5;

/// The settle time until [`Registry::set_settle`] says otherwise (`plugins.settle_ms`'s
/// default).
const DEFAULT_SETTLE: Duration = Duration::from_millis(50);

/// What identifies a file's content without reading it: when this is unchanged, so is the
/// file, and a rescan skips it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    wasm: FileStamp,
    manifest: Option<FileStamp>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
}

impl FileStamp {
    fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        // Follows symlinks: Kubernetes ConfigMap volumes are links into a `..data` folder
        // that is swapped as a whole.
        let meta = std::fs::metadata(path).ok()?;
        meta.is_file().then(|| Self {
            len: meta.len(),
            modified: meta.modified().ok(),
            inode: meta.ino(),
        })
    }

    /// Whether the file was last modified at least `settle` ago. A modification time that is
    /// unknown or in the future (a network volume's clock) cannot tell: the file counts as
    /// quiet, and the check that it did not change while it was loaded still applies.
    fn quiet_for(&self, settle: Duration) -> bool {
        self.modified
            .and_then(|modified| modified.elapsed().ok())
            .is_none_or(|age| age >= settle)
    }
}

impl Fingerprint {
    /// Whether the plugin's files are complete: each unchanged for `settle`, or renamed into
    /// the folder as it is now (`whole`, by file name).
    fn settled(&self, wasm: &Path, settle: Duration, whole: &HashMap<OsString, FileStamp>) -> bool {
        let settled = |path: &Path, stamp: &FileStamp| {
            stamp.quiet_for(settle)
                || path
                    .file_name()
                    .is_some_and(|name| whole.get(name) == Some(stamp))
        };
        settled(wasm, &self.wasm)
            && self
                .manifest
                .as_ref()
                .is_none_or(|m| settled(&wasm.with_extension("toml"), m))
    }
}

struct Slot {
    current: Arc<ArcSwap<LoadedPlugin>>,
    inbox: Inbox,
    stats: Arc<PluginStats>,
    workers: Workers,
    fingerprint: Fingerprint,
    reloads: u64,
    /// New files rejected while this plugin ran.
    rejects: u64,
    load_error: Option<LoadFailure>,
}

#[derive(Debug, Clone, Serialize)]
struct LoadFailure {
    kind: &'static str,
    message: String,
    #[serde(skip)]
    fingerprint: Fingerprint,
}

#[derive(Default)]
struct Inner {
    slots: BTreeMap<PluginName, Slot>,
    /// Files that failed to load and have no previous version running.
    failed: BTreeMap<PluginName, LoadFailure>,
    /// Removed plugins whose workers finish their queues; closed once routes no longer
    /// reach them, dropped once their workers are done.
    retired: Vec<(PluginName, Slot)>,
    /// Files still being written, as of the last reconcile.
    pending: BTreeMap<PluginName, Pending>,
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

/// A file seen changing, and for how long.
#[derive(Debug, Clone, Copy)]
struct Pending {
    since: Instant,
    /// Changing for longer than [`MAX_UNSETTLED`]: logged, and no longer holding readiness
    /// back.
    given_up: bool,
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
        }
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
    /// changing for longer than [`MAX_UNSETTLED`].
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

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
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
            inner.note_unsettled(&found, &changes.unsettled, Instant::now());
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
                    let workers = worker::spawn(
                        name.clone(),
                        current.clone(),
                        &inbox,
                        self.workers.breaker,
                        self.loader.runtime().engine().clone(),
                    )?;
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

    /// Bytes waiting in all plugins' queues, and the host's total budget for them.
    pub fn queue_budget(&self) -> (usize, usize) {
        (self.workers.budget.used(), self.workers.budget.limit())
    }

    /// The loader's compile cache, if one is configured.
    pub fn compile_cache(&self) -> Option<&compile_cache::CompileCache> {
        self.loader.compile_cache()
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
        }));
        reports.sort_by(|a, b| a.name.cmp(&b.name));
        reports
    }
}

impl Inner {
    /// Keeps track of how long each file has been unsettled; logs, once, a file that keeps
    /// changing for longer than [`MAX_UNSETTLED`].
    fn note_unsettled(
        &mut self,
        found: &BTreeMap<PluginName, (PathBuf, Fingerprint)>,
        unsettled: &[PluginName],
        now: Instant,
    ) {
        // Every file in the folder was either known, loaded, rejected or unsettled just now:
        // only the unsettled ones are still pending.
        self.pending.retain(|name, _| unsettled.contains(name));
        for name in unsettled {
            let pending = self.pending.entry(name.clone()).or_insert(Pending {
                since: now,
                given_up: false,
            });
            if !pending.given_up && now.duration_since(pending.since) >= MAX_UNSETTLED {
                pending.given_up = true;
                let file = found.get(name).map(|(path, _)| path.display().to_string());
                tracing::error!(
                    plugin = %name,
                    file = file.as_deref().unwrap_or_default(),
                    changing_for_s = MAX_UNSETTLED.as_secs(),
                    "plugin file keeps changing and is not loaded; readiness no longer waits \
                     for it, and it is loaded once unchanged for plugins.settle_ms \
                     (deploy by writing a dotfile and renaming it into place)"
                );
            }
        }
    }

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
            hash: current.hash,
            size: current.size,
            file: current.path.clone(),
            loaded_at_ms: millis_since_epoch(current.loaded_at),
            subscriptions: description
                .subscriptions
                .iter()
                .map(ToString::to_string)
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
    }
}

/// Lists `NAME.wasm` files of `dir` (dotfiles skipped) with their fingerprints.
fn scan(dir: &Path) -> anyhow::Result<BTreeMap<PluginName, (PathBuf, Fingerprint)>> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| anyhow::anyhow!("cannot read plugins folder {}: {e}", dir.display()))?;
    let mut found = BTreeMap::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("wasm") {
            continue;
        }
        let Some(name) = path
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse::<PluginName>().ok())
        else {
            continue;
        };
        if let Some(fingerprint) = scan_one(&path) {
            found.insert(name, (path, fingerprint));
        }
    }
    Ok(found)
}

fn scan_one(wasm: &Path) -> Option<Fingerprint> {
    Some(Fingerprint {
        wasm: FileStamp::of(wasm)?,
        manifest: FileStamp::of(&wasm.with_extension("toml")),
    })
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn millis_since_epoch(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
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
    /// The version `describe` gave.
    pub version: String,
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(modified: Option<SystemTime>) -> FileStamp {
        FileStamp {
            len: 1,
            modified,
            inode: 1,
        }
    }

    #[test]
    fn a_file_is_quiet_once_unchanged_for_the_settle_time() {
        let settle = Duration::from_millis(50);
        let now = SystemTime::now();
        assert!(!stamp(Some(now)).quiet_for(settle));
        assert!(stamp(Some(now - Duration::from_secs(1))).quiet_for(settle));
        // Unknown or future times cannot tell: the check during loading still applies.
        assert!(stamp(None).quiet_for(settle));
        assert!(stamp(Some(now + Duration::from_secs(3600))).quiet_for(settle));
        let fresh_manifest = Fingerprint {
            wasm: stamp(Some(now - Duration::from_secs(1))),
            manifest: Some(stamp(Some(now))),
        };
        let wasm = Path::new("p.wasm");
        let mut whole = HashMap::new();
        assert!(!fresh_manifest.settled(wasm, settle, &whole));
        // A manifest renamed into place is complete as it arrived, and only as it arrived.
        whole.insert(OsString::from("p.toml"), stamp(Some(now)));
        assert!(fresh_manifest.settled(wasm, settle, &whole));
        whole.insert(
            OsString::from("p.toml"),
            stamp(Some(now - Duration::from_millis(1))),
        );
        assert!(!fresh_manifest.settled(wasm, settle, &whole));
    }

    #[test]
    fn a_file_that_never_settles_stops_holding_readiness_back() {
        let name: PluginName = "slow".parse().expect("a valid name");
        let found = BTreeMap::from([(
            name.clone(),
            (
                PathBuf::from("slow.wasm"),
                Fingerprint {
                    wasm: stamp(None),
                    manifest: None,
                },
            ),
        )]);
        let mut inner = Inner::default();
        let start = Instant::now();
        let unsettled = std::slice::from_ref(&name);
        inner.note_unsettled(&found, unsettled, start);
        inner.note_unsettled(&found, unsettled, start + MAX_UNSETTLED / 2);
        assert!(
            !inner.pending[&name].given_up,
            "waited for while it changes"
        );
        inner.note_unsettled(&found, unsettled, start + MAX_UNSETTLED);
        assert!(inner.pending[&name].given_up, "given up after the limit");
        // Once it settles (loaded or rejected), it is no longer pending; if it changes
        // again, the wait starts over.
        inner.note_unsettled(&found, &[], start + MAX_UNSETTLED * 2);
        assert!(inner.pending.is_empty());
        inner.note_unsettled(&found, unsettled, start + MAX_UNSETTLED * 3);
        assert!(!inner.pending[&name].given_up);
    }
}
