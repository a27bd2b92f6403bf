//! Looking at the folder: which `NAME.wasm` files it holds, a fingerprint of each (size,
//! modification time and inode of the `.wasm` and its manifest) that tells a changed file
//! from an unchanged one without reading it, whether a file has settled, and how long a
//! file has been seen changing. Nothing here loads a plugin.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use crate::PluginName;

/// How long a file may keep changing before the host stops waiting for it: long enough for a
/// slow copy of the largest plugins (tens of MB, Python or JavaScript) over a network volume.
/// A file changing for longer is being rewritten by something, not deployed; the host logs
/// an error naming it and no longer counts it against readiness, and loads it if it ever
/// settles.
pub const MAX_UNSETTLED: Duration = Duration::from_secs(60);

/// What identifies a file's content without reading it: when this is unchanged, so is the
/// file, and a rescan skips it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Fingerprint {
    wasm: FileStamp,
    manifest: Option<FileStamp>,
}

/// One file's size, modification time and inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
}

impl FileStamp {
    pub(super) fn of(path: &Path) -> Option<Self> {
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
    pub(super) fn settled(
        &self,
        wasm: &Path,
        settle: Duration,
        whole: &HashMap<OsString, FileStamp>,
    ) -> bool {
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

/// A file seen changing, and for how long.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pending {
    since: Instant,
    /// Changing for longer than [`MAX_UNSETTLED`]: logged, and no longer holding readiness
    /// back.
    pub(super) given_up: bool,
}

/// Keeps track in `pending` of how long each file has been unsettled; logs, once, a file that
/// keeps changing for longer than [`MAX_UNSETTLED`].
pub(super) fn note_unsettled(
    pending: &mut BTreeMap<PluginName, Pending>,
    found: &BTreeMap<PluginName, (PathBuf, Fingerprint)>,
    unsettled: &[PluginName],
    now: Instant,
) {
    {
        // Every file in the folder was either known, loaded, rejected or unsettled just now:
        // only the unsettled ones are still pending.
        pending.retain(|name, _| unsettled.contains(name));
        for name in unsettled {
            let pending = pending.entry(name.clone()).or_insert(Pending {
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
}

/// Lists `NAME.wasm` files of `dir` (dotfiles skipped) with their fingerprints.
pub(super) fn scan(dir: &Path) -> anyhow::Result<BTreeMap<PluginName, (PathBuf, Fingerprint)>> {
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

pub(super) fn scan_one(wasm: &Path) -> Option<Fingerprint> {
    Some(Fingerprint {
        wasm: FileStamp::of(wasm)?,
        manifest: FileStamp::of(&wasm.with_extension("toml")),
    })
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
        let mut pending = BTreeMap::new();
        let start = Instant::now();
        let unsettled = std::slice::from_ref(&name);
        note_unsettled(&mut pending, &found, unsettled, start);
        note_unsettled(&mut pending, &found, unsettled, start + MAX_UNSETTLED / 2);
        assert!(!pending[&name].given_up, "waited for while it changes");
        note_unsettled(&mut pending, &found, unsettled, start + MAX_UNSETTLED);
        assert!(pending[&name].given_up, "given up after the limit");
        // Once it settles (loaded or rejected), it is no longer pending; if it changes
        // again, the wait starts over.
        note_unsettled(&mut pending, &found, &[], start + MAX_UNSETTLED * 2);
        assert!(pending.is_empty());
        note_unsettled(&mut pending, &found, unsettled, start + MAX_UNSETTLED * 3);
        assert!(!pending[&name].given_up);
    }
}
