//! Watches the plugins folder and asks the registry to reconcile when it changes.
//!
//! Events are only a prompt to look again: the registry compares the folder with what runs,
//! and loads only files unchanged for the settle time, so a file copied in chunks is looked at
//! once it is complete. One kind of event says more: a file renamed into the folder (write a
//! dotfile, then `mv` it into place: the documented way to deploy) is whole the moment it
//! appears, so the watcher tells the registry ([`Registry::arrived_whole`]) and the new
//! version is loaded at once instead of a settle time later. Access events are ignored: the
//! loader's own reads would otherwise trigger reloads forever.
//!
//! A look can end with files still unsettled (or a running plugin's file gone for less than
//! the settle time), and a file's last write may already have been reported: while any are,
//! the watcher looks again every settle time, without waiting for an event. A failed look (the folder unreadable, subscriptions not updated) is retried after
//! [`RETRY_AFTER_ERROR`].

use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
use notify::{Event, EventKind, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Registry;

/// How long after a failed reconcile the watcher tries again: often enough to recover soon
/// after the cause is gone, seldom enough not to flood the log while it lasts.
pub const RETRY_AFTER_ERROR: Duration = Duration::from_secs(1);

/// Starts watching `registry`'s folder; the returned task runs until `shutdown`.
pub fn spawn(
    registry: Arc<Registry>,
    settle: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    registry.set_settle(settle);
    // Capacity 1: a pending "look again" already covers any later change, so a copy written
    // in many chunks costs a few looks, not one per chunk.
    let (prompt, mut prompts) = mpsc::channel::<()>(1);
    let arrivals = registry.clone();
    let mut watcher = notify::recommended_watcher(move |result: notify::Result<Event>| {
        match result {
            Ok(event) if is_read(&event.kind) => return,
            Ok(event) => {
                if let Some(path) = renamed_to(&event) {
                    arrivals.arrived_whole(path);
                }
            }
            Err(error) => tracing::warn!("plugins folder watcher: {error}; rescanning"),
        }
        let _ = prompt.try_send(());
    })?;
    watcher
        .watch(registry.dir(), RecursiveMode::NonRecursive)
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot watch plugins folder {}: {e}",
                registry.dir().display()
            )
        })?;

    Ok(tokio::spawn(async move {
        // The watcher stops when dropped: keep it for the task's lifetime.
        let _watcher = watcher;
        // When to look again without an event: files were unsettled, or the last look failed.
        // The first look is at once: a file whose last write came before the watcher started
        // sends no event, and it may have been too fresh to load at start-up.
        let mut look_again = Some(Duration::ZERO);
        loop {
            tokio::select! {
                // Cancellation first, and always checked first: a pending prompt or a due
                // look must not start a reconcile once the host is stopping.
                biased;
                () = shutdown.cancelled() => break,
                prompt = prompts.recv() => {
                    if prompt.is_none() {
                        break;
                    }
                }
                () = sleep_or_never(look_again) => {}
            }
            look_again = match registry.reconcile().await {
                Ok(changes) if changes.settled() => None,
                Ok(_) => Some(settle),
                Err(e) => {
                    tracing::error!(retry_in = ?RETRY_AFTER_ERROR, "plugins folder: {e:#}");
                    Some(RETRY_AFTER_ERROR)
                }
            };
        }
    }))
}

/// Sleeps for `wait`, or forever when there is nothing to wait for.
async fn sleep_or_never(wait: Option<Duration>) {
    match wait {
        Some(wait) => tokio::time::sleep(wait).await,
        None => std::future::pending().await,
    }
}

/// Reads and opens change nothing; a close after writing does.
fn is_read(kind: &EventKind) -> bool {
    matches!(kind, EventKind::Access(access) if *access != AccessKind::Close(AccessMode::Write))
}

/// Where a file was renamed to, if `event` is such a rename: within the folder (both paths,
/// the new one last) or into it from elsewhere.
fn renamed_to(event: &Event) -> Option<&std::path::Path> {
    match event.kind {
        EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both)) => {
            event.paths.last().map(std::path::PathBuf::as_path)
        }
        _ => None,
    }
}
