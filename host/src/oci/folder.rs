//! Putting a pulled plugin into a plugins folder the way deployers should: each file is
//! written beside its place under a dotfile name (which the folder's scan skips) and renamed
//! into place, the manifest before the component, so the loader never reads half a file and
//! finds the new manifest when the new component appears.

use std::io;
use std::path::{Path, PathBuf};

use super::Artifact;

/// Writes `artifact` into `dir` as `NAME.wasm` (and `NAME.toml`; a manifest left from an
/// earlier version is removed when the artifact has none). Returns the component's path.
pub fn install(dir: &Path, name: &str, artifact: &Artifact) -> io::Result<PathBuf> {
    let manifest = dir.join(format!("{name}.toml"));
    match &artifact.manifest {
        Some(text) => replace(dir, &manifest, text.as_bytes())?,
        None => match std::fs::remove_file(&manifest) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        },
    }
    let wasm = dir.join(format!("{name}.wasm"));
    replace(dir, &wasm, &artifact.wasm)?;
    Ok(wasm)
}

/// Replaces `path` (in `dir`) with `bytes` through a synced dotfile and a rename.
pub fn replace(dir: &Path, path: &Path, bytes: &[u8]) -> io::Result<()> {
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let staging = dir.join(format!(".{file_name}.pulling"));
    std::fs::write(&staging, bytes)?;
    std::fs::File::open(&staging)?.sync_all()?;
    std::fs::rename(&staging, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn a_version_without_a_manifest_removes_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let with = Artifact {
            wasm: Bytes::from_static(b"v1"),
            manifest: Some("[grants]\n".to_owned()),
        };
        let path = install(dir.path(), "forward", &with).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"v1");
        assert!(dir.path().join("forward.toml").is_file());
        let without = Artifact {
            wasm: Bytes::from_static(b"v2"),
            manifest: None,
        };
        install(dir.path(), "forward", &without).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"v2");
        assert!(!dir.path().join("forward.toml").exists());
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no staging file is left behind");
    }
}
