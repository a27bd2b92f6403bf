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
//! # Registry sources and admission
//!
//! [`sources`] pull plugins from OCI registries into the folder (`plugins.sources`), and
//! [`admission`] decides which files may load at all (`[plugins.verify]`,
//! `plugins.allowed_digests`). Readiness also waits for every source's first version.
//!
//! # Removal
//!
//! A removed file's plugin leaves the routing table first; then its queue is closed and its
//! workers handle what was already queued. Meanwhile `/plugins` lists it as draining; it
//! leaves the list when all its workers are done.

pub mod admission;
pub mod compile_cache;
mod description;
pub mod files;
pub mod loader;
pub mod manifest;
mod registry;
mod report;
mod scan;
pub mod sources;
pub mod watcher;

pub use registry::{Changes, Registry, UNSUBSCRIBE_SHARE, WorkerSettings};
pub use report::{PluginMetrics, PluginReport, PluginState, VersionReport};
pub use scan::MAX_UNSETTLED;
