//! Watches the plugins folder and asks the registry to reconcile when it changes.
//!
//! Events are only a prompt to look again: the registry compares the folder with what runs.
//! The debouncer waits until the folder has been quiet for the settle time, so a file copied
//! in chunks is looked at once it is complete; deploying by atomic rename (write a dotfile,
//! then `mv` it into place) is the documented way and never shows a partial file. Access
//! events are ignored: the loader's own reads would otherwise trigger reloads forever.

use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecursiveMode, event::AccessKind, event::AccessMode};
use notify_debouncer_full::{DebounceEventResult, new_debouncer};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Registry;

/// The shortest interval at which the debouncer checks for settled changes.
const MIN_TICK: Duration = Duration::from_millis(2);

/// Starts watching `registry`'s folder; the returned task runs until `shutdown`.
pub fn spawn(
    registry: Arc<Registry>,
    settle: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
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
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                prompt = prompts.recv() => {
                    if prompt.is_none() {
                        break;
                    }
                    if let Err(e) = registry.reconcile().await {
                        tracing::error!("plugins folder: {e:#}");
                    }
                }
            }
        }
    }))
}

/// Reads and opens change nothing; a close after writing does.
fn is_read(kind: &EventKind) -> bool {
    matches!(kind, EventKind::Access(access) if *access != AccessKind::Close(AccessMode::Write))
}
