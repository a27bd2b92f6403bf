//! Watches the plugins folder and asks the registry to reconcile when it changes.
//!
//! Events are only a prompt to look again: the registry compares the folder with what runs.
//! The debouncer passes each event on once it is the settle time old, and the registry loads
//! only files unchanged for that long, so a file copied in chunks is looked at once it is
//! complete; deploying by atomic rename (write a dotfile, then `mv` it into place) is the
//! documented way and never shows a partial file. Access events are ignored: the loader's
//! own reads would otherwise trigger reloads forever.
//!
//! A look can end with files still unsettled, and a file's last write may already have been
//! reported: while any are, the watcher looks again every settle time, without waiting for an
//! event. A failed look (the folder unreadable, subscriptions not updated) is retried after
//! [`RETRY_AFTER_ERROR`].

use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecursiveMode, event::AccessKind, event::AccessMode};
use notify_debouncer_full::{DebounceEventResult, new_debouncer};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Registry;

/// The shortest interval at which the debouncer checks for settled changes.
const MIN_TICK: Duration = Duration::from_millis(2);

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
    // Capacity 1: a pending "look again" already covers any later change.
    let (prompt, mut prompts) = mpsc::channel::<()>(1);
    // The debouncer looks for settled events once per tick (a quarter of the settle time by
    // default): a finer tick lets a change take effect closer to the settle time itself.
    let tick = (settle / 10).max(MIN_TICK);
    let mut debouncer = new_debouncer(settle, Some(tick), move |result: DebounceEventResult| {
        let relevant = match result {
            Ok(events) => events.iter().any(|event| !is_read(&event.kind)),
            Err(errors) => {
                for error in errors {
                    tracing::warn!("plugins folder watcher: {error}; rescanning");
                }
                true
            }
        };
        if relevant {
            let _ = prompt.try_send(());
        }
    })?;
    debouncer
        .watch(registry.dir(), RecursiveMode::NonRecursive)
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot watch plugins folder {}: {e}",
                registry.dir().display()
            )
        })?;

    Ok(tokio::spawn(async move {
        // The debouncer stops watching when dropped: keep it for the task's lifetime.
        let _debouncer = debouncer;
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
                Ok(changes) if changes.unsettled.is_empty() => None,
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
