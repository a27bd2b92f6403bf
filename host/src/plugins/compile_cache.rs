//! Compiled components on disk, so that a restart or a reload of a file seen before skips
//! compilation.
//!
//! Compiling takes milliseconds for a Rust or C component but seconds for Python and
//! JavaScript ones, which carry an interpreter; loading a compiled artefact takes
//! milliseconds. Each artefact is `<key>.cwasm`, where the key hashes the component's bytes
//! together with the engine's compatibility hash (Wasmtime's version, its settings, the CPU
//! features in use): a new host release or a changed engine setting never loads a stale
//! artefact, it compiles and writes a new one.
//!
//! # Trust
//!
//! An artefact is native code that Wasmtime runs without validating it again
//! (`Component::deserialize` is unsafe on bytes the host did not produce), so two things
//! must hold before one is loaded:
//!
//! - The folder is the host's own: owned by its user and writable by no one else. The host
//!   creates it with mode 0700; an existing folder that is group- or world-writable, or owned
//!   by another user, is refused: the host logs a warning and runs without the cache. Its
//!   parents are not checked: whoever can write a parent can swap the folder for another, but
//!   cannot forge an artefact (below), so the worst they can do is make the cache miss; and
//!   Kubernetes creates `emptyDir` volumes with mode 0777, so the cache belongs in a folder
//!   inside one, which the host then creates private.
//! - Each artefact carries a tag: BLAKE3 in its keyed mode (a MAC) over the artefact, the
//!   component's content hash and the engine's hash, under a key only this user can read
//!   (`key` in the folder, mode 0600, made on first use). The tag is checked on the bytes in
//!   memory, which are then the bytes deserialized, so a file swapped after the check cannot
//!   slip in. An artefact copied over another component's, or altered, fails the check: it
//!   is counted ([`CompileCache::rejected`]), logged, deleted and compiled again. BLAKE3
//!   rather than HMAC-SHA256: it is a MAC as it stands, the cache already hashes with it, and
//!   it is faster on artefacts of tens of MB (64 MiB: 49 ms against 120 ms in a test build
//!   here).
//!
//! The cache is an accelerator: any failure to read or write it is logged and the component
//! compiled as if there were none.

use std::hash::{Hash, Hasher};
use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rand::TryRngCore as _;
use wasmtime::Engine;
use wasmtime::component::Component;

use super::files::{self, BoundedFile, FileError};
use crate::ContentHash;

/// The artefact layout, hashed into every artefact's name: files of an earlier layout (before
/// tags) are never looked at.
const FORMAT: &[u8] = b"switchyard compile cache v2: artefact, then a keyed BLAKE3 tag";

/// The key's file in the folder.
const KEY_FILE: &str = "key";

/// Bytes of a key and of a tag.
const KEY_BYTES: usize = blake3::KEY_LEN;
const TAG_BYTES: usize = blake3::OUT_LEN;

/// An artefact is native code for the component plus Wasmtime's metadata: measured at 2.6 to
/// 3.2 times the component's size for the Rust plugins here. An artefact file larger than
/// this many times its component (or than [`MIN_ARTEFACT_LIMIT`]) is not read: room for
/// components that compile less compactly, while a file of gigabytes is never loaded.
const ARTEFACT_BYTES_PER_COMPONENT_BYTE: u64 = 16;

/// The artefact read limit for small components (a 75 KB component compiles to 237 KB).
const MIN_ARTEFACT_LIMIT: u64 = 16 << 20;

/// Where a component came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compiled {
    /// Read from the cache.
    Cached,
    /// Compiled now (and written to the cache, when there is one).
    Fresh,
}

impl Compiled {
    /// A label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Compiled::Cached => "hit",
            Compiled::Fresh => "miss",
        }
    }
}

/// A folder of compiled components, each keyed by its content and by the compatibility hash
/// of the engine that compiled it: the host's two engines (see `worker::engine`) share it.
#[derive(Debug)]
pub struct CompileCache {
    dir: PathBuf,
    /// The tag key; `None` when the folder was refused, and the cache is off.
    key: Option<Key>,
    /// Artefacts that failed their tag or could not be loaded, since the cache was opened.
    rejected: AtomicU64,
}

/// The host's key for artefact tags; `Debug` does not show it.
struct Key([u8; KEY_BYTES]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl CompileCache {
    /// Opens (creating it when missing) the cache folder `dir` for `engine`. A folder the host
    /// cannot trust (see the module's documentation) gives a cache that is off, with a warning
    /// that says why; only failing to create the folder is an error.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        create_private_dir(dir)?;
        let key = match trusted_key(dir) {
            Ok(key) => Some(key),
            Err(why) => {
                tracing::warn!(
                    dir = %dir.display(),
                    "plugins.compile_cache is off: {why}; components are compiled on every load"
                );
                None
            }
        };
        Ok(Self {
            dir: dir.to_owned(),
            key,
            rejected: AtomicU64::new(0),
        })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the cache is in use (its folder was trusted).
    pub fn enabled(&self) -> bool {
        self.key.is_some()
    }

    /// Artefacts discarded since the cache was opened: a tag that did not match (another
    /// component's artefact, an altered one) or one Wasmtime refused.
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    /// The artefact's path for a component whose bytes hash to `hash`.
    fn path(&self, engine: &blake3::Hash, hash: &ContentHash) -> PathBuf {
        let mut key = blake3::Hasher::new();
        key.update(FORMAT);
        key.update(engine.as_bytes());
        key.update(hash.as_bytes());
        let key = key.finalize().to_hex();
        self.dir.join(format!("{}.cwasm", &key[..32]))
    }

    /// The tag of `artefact` compiled from the component whose bytes hash to `hash`.
    fn tag(
        &self,
        key: &Key,
        engine: &blake3::Hash,
        hash: &ContentHash,
        artefact: &[u8],
    ) -> blake3::Hash {
        let mut mac = blake3::Hasher::new_keyed(&key.0);
        mac.update(FORMAT);
        mac.update(engine.as_bytes());
        mac.update(hash.as_bytes());
        mac.update(artefact);
        mac.finalize()
    }

    /// The component from the cache, or compiled from `bytes` and then stored.
    pub fn compile(
        &self,
        engine: &Engine,
        bytes: &[u8],
        hash: &ContentHash,
    ) -> wasmtime::Result<(Component, Compiled)> {
        let Some(key) = &self.key else {
            return Ok((Component::new(engine, bytes)?, Compiled::Fresh));
        };
        let engine_hash = compatibility(engine);
        let path = self.path(&engine_hash, hash);
        let limit = (bytes.len() as u64)
            .saturating_mul(ARTEFACT_BYTES_PER_COMPONENT_BYTE)
            .max(MIN_ARTEFACT_LIMIT);
        match self.load(engine, &engine_hash, key, hash, &path, limit) {
            Ok(Some(component)) => return Ok((component, Compiled::Cached)),
            Ok(None) => {}
            Err(why) => {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    path = %path.display(),
                    hash = %hash,
                    "discarding a compiled component: {why}; compiling it again"
                );
                let _ = std::fs::remove_file(&path);
            }
        }
        let component = Component::new(engine, bytes)?;
        if let Err(error) = component
            .serialize()
            .map_err(std::io::Error::other)
            .and_then(|artefact| {
                self.store(
                    &path,
                    &artefact,
                    &self.tag(key, &engine_hash, hash, &artefact),
                )
            })
        {
            tracing::warn!(dir = %self.dir.display(), "cannot write to the compile cache: {error}");
        }
        Ok((component, Compiled::Fresh))
    }

    /// The cached component at `path` if there is one and its tag proves it was compiled by
    /// this host from the component hashing to `hash`; `Err` says why a file there is unusable.
    fn load(
        &self,
        engine: &Engine,
        engine_hash: &blake3::Hash,
        key: &Key,
        hash: &ContentHash,
        path: &Path,
        limit: u64,
    ) -> Result<Option<Component>, String> {
        let tagged = match files::read_bounded(path, limit) {
            Ok(tagged) => tagged,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        let Some(split) = tagged.len().checked_sub(TAG_BYTES) else {
            return Err(format!("{} bytes is too short to hold a tag", tagged.len()));
        };
        let (artefact, tag) = tagged.split_at(split);
        let tag: [u8; TAG_BYTES] = tag.try_into().map_err(|_| "no tag".to_owned())?;
        // `blake3::Hash` compares in constant time.
        if self.tag(key, engine_hash, hash, artefact) != blake3::Hash::from_bytes(tag) {
            return Err(
                "its tag does not match this component (an artefact of another component, or \
                 altered)"
                    .to_owned(),
            );
        }
        // SAFETY: the tag above proves that these bytes (the ones in memory, not the file,
        // which may have changed since) were written by `store` from `Component::serialize`
        // of the component hashing to `hash`, for an engine with this compatibility hash, by
        // a holder of the key, which only this user can read. Wasmtime still checks the
        // header and engine settings.
        unsafe { Component::deserialize(engine, artefact) }
            .map(Some)
            .map_err(|e| format!("Wasmtime refused it: {e:#}"))
    }

    /// Writes `artefact` and its `tag` to `path` through a temporary file (mode 0600), so a
    /// reader never sees half of it.
    fn store(&self, path: &Path, artefact: &[u8], tag: &blake3::Hash) -> std::io::Result<()> {
        let mut file = tempfile::NamedTempFile::new_in(&self.dir)?;
        file.write_all(artefact)?;
        file.write_all(tag.as_bytes())?;
        file.persist(path).map_err(|e| e.error)?;
        Ok(())
    }
}

/// What tells `engine`'s compiled code apart from another engine's: Wasmtime's version, the
/// engine's settings and the CPU features in use.
fn compatibility(engine: &Engine) -> blake3::Hash {
    let mut hasher = Blake3Hasher(blake3::Hasher::new());
    engine.precompile_compatibility_hash().hash(&mut hasher);
    hasher.0.finalize()
}

/// The folder's key, if the folder and the key can be trusted; otherwise why not.
fn trusted_key(dir: &Path) -> Result<Key, String> {
    let uid = files::host_uid();
    let folder = std::fs::metadata(dir).map_err(|e| format!("cannot inspect the folder: {e}"))?;
    if folder.uid() != uid {
        return Err(format!(
            "the folder is owned by uid {}, not by this host's uid {uid}",
            folder.uid()
        ));
    }
    let mode = folder.mode() & 0o7777;
    if mode & 0o022 != 0 {
        let who = if mode & 0o002 != 0 {
            "anyone"
        } else {
            "its group"
        };
        return Err(format!(
            "the folder is writable by {who} (mode {mode:04o}), who could plant native code \
             there; `chmod 700` it, or name a folder that does not exist yet: the host creates \
             it with mode 0700"
        ));
    }
    let path = dir.join(KEY_FILE);
    match read_key(&path, uid) {
        Err(KeyError::Missing) => {
            create_key(dir, &path).map_err(|e| format!("cannot create {KEY_FILE}: {e}"))?;
            read_key(&path, uid).map_err(|e| e.to_string())
        }
        read => read.map_err(|e| e.to_string()),
    }
}

#[derive(Debug, thiserror::Error)]
enum KeyError {
    #[error("no key")]
    Missing,
    #[error("{KEY_FILE}: {0}")]
    Unusable(String),
}

/// Reads the key at `path`: a regular file of exactly [`KEY_BYTES`], owned by `uid` and
/// readable by no one else (checked on the opened file).
fn read_key(path: &Path, uid: u32) -> Result<Key, KeyError> {
    let unusable = |why: String| KeyError::Unusable(why);
    let file = match BoundedFile::open(path, KEY_BYTES as u64) {
        Ok(file) => file,
        Err(e) if e.is_not_found() => return Err(KeyError::Missing),
        Err(FileError::TooLarge { size, .. }) => {
            return Err(unusable(format!(
                "{size} bytes, not a key of {KEY_BYTES} bytes"
            )));
        }
        Err(e) => return Err(unusable(e.to_string())),
    };
    let meta = file.metadata();
    if meta.uid() != uid {
        return Err(unusable(format!(
            "owned by uid {}, not by this host's uid {uid}",
            meta.uid()
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(unusable(format!(
            "mode {mode:04o} lets others read it (and forge artefacts); it must be 0600"
        )));
    }
    let bytes = file.read().map_err(|e| unusable(e.to_string()))?;
    let key: [u8; KEY_BYTES] = bytes.as_slice().try_into().map_err(|_| {
        unusable(format!(
            "{} bytes, not a key of {KEY_BYTES} bytes",
            bytes.len()
        ))
    })?;
    Ok(Key(key))
}

/// Writes a new random key to `path`, unless another host sharing the folder just did.
fn create_key(dir: &Path, path: &Path) -> std::io::Result<()> {
    let mut key = [0; KEY_BYTES];
    rand::rngs::OsRng
        .try_fill_bytes(&mut key)
        .map_err(std::io::Error::other)?;
    // A temporary file is created with mode 0600; it is complete before it gets the name.
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    file.write_all(&key)?;
    file.as_file().sync_all()?;
    match file.persist_noclobber(path) {
        Ok(_) => Ok(()),
        Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e.error),
    }
}

/// Feeds what `Hash` writes into BLAKE3, for a key that is the same in every process.
struct Blake3Hasher(blake3::Hasher);

impl Hasher for Blake3Hasher {
    fn finish(&self) -> u64 {
        let mut first = [0; 8];
        first.copy_from_slice(&self.0.finalize().as_bytes()[..8]);
        u64::from_le_bytes(first)
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::examples::{FORWARD, METRICS_ROLLUP};
    use std::os::unix::fs::PermissionsExt as _;

    fn engine(epochs: bool) -> Engine {
        let mut config = wasmtime::Config::new();
        config.epoch_interruption(epochs);
        Engine::new(&config).unwrap()
    }

    fn artefacts(dir: &Path) -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.extension().is_some_and(|e| e == "cwasm"))
            .collect()
    }

    #[test]
    fn a_component_is_compiled_once_then_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(true);
        let cache = CompileCache::open(&dir.path().join("cache")).unwrap();
        let hash = ContentHash::of(FORWARD);

        let (_, first) = cache.compile(&engine, FORWARD, &hash).unwrap();
        let (component, second) = cache.compile(&engine, FORWARD, &hash).unwrap();
        assert_eq!((first, second), (Compiled::Fresh, Compiled::Cached));
        assert!(component.component_type().exports(&engine).count() > 0);
        assert_eq!(artefacts(cache.dir()).len(), 1);
    }

    #[test]
    fn another_engine_configuration_gets_its_own_artefact() {
        let dir = tempfile::tempdir().unwrap();
        let hash = ContentHash::of(FORWARD);
        for epochs in [true, false] {
            let engine = engine(epochs);
            let cache = CompileCache::open(dir.path()).unwrap();
            let (_, compiled) = cache.compile(&engine, FORWARD, &hash).unwrap();
            assert_eq!(compiled, Compiled::Fresh, "epochs {epochs}");
        }
        assert_eq!(artefacts(dir.path()).len(), 2);
    }

    #[test]
    fn a_damaged_artefact_is_replaced_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(true);
        let cache = CompileCache::open(dir.path()).unwrap();
        let hash = ContentHash::of(FORWARD);
        cache.compile(&engine, FORWARD, &hash).unwrap();
        let artefact = &artefacts(dir.path())[0];
        std::fs::write(artefact, b"not an artefact").unwrap();

        let (_, compiled) = cache.compile(&engine, FORWARD, &hash).unwrap();
        assert_eq!(compiled, Compiled::Fresh);
        let (_, compiled) = cache.compile(&engine, FORWARD, &hash).unwrap();
        assert_eq!(compiled, Compiled::Cached);
    }

    #[test]
    fn the_folder_is_private_to_the_host_user() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("a/b");
        CompileCache::open(&folder).unwrap();
        let mode = std::fs::metadata(&folder).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn the_key_is_private_and_kept_across_opens() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(true);
        let hash = ContentHash::of(FORWARD);
        let cache = CompileCache::open(dir.path()).unwrap();
        assert!(cache.enabled());
        cache.compile(&engine, FORWARD, &hash).unwrap();
        let key = dir.path().join(KEY_FILE);
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read(&key).unwrap().len(), KEY_BYTES);

        // A restart reads the same key, so what the last run compiled is used.
        let cache = CompileCache::open(dir.path()).unwrap();
        let (_, compiled) = cache.compile(&engine, FORWARD, &hash).unwrap();
        assert_eq!(compiled, Compiled::Cached);
    }

    #[test]
    fn an_artefact_copied_over_another_components_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(true);
        let cache = CompileCache::open(dir.path()).unwrap();
        let (x, y) = (ContentHash::of(METRICS_ROLLUP), ContentHash::of(FORWARD));
        cache.compile(&engine, METRICS_ROLLUP, &x).unwrap();
        cache.compile(&engine, FORWARD, &y).unwrap();
        let e = compatibility(&engine);
        let y_artefact = std::fs::read(cache.path(&e, &y)).unwrap();
        std::fs::copy(cache.path(&e, &x), cache.path(&e, &y)).unwrap();

        let (component, compiled) = cache.compile(&engine, FORWARD, &y).unwrap();
        assert_eq!(compiled, Compiled::Fresh);
        assert_eq!(cache.rejected(), 1);
        // What runs is Y, compiled again, and its artefact is Y's once more.
        assert_eq!(
            component.serialize().unwrap(),
            y_artefact[..y_artefact.len() - TAG_BYTES]
        );
        assert_eq!(std::fs::read(cache.path(&e, &y)).unwrap(), y_artefact);

        // An artefact with a tag made under another key (another folder's) is refused too.
        let other = tempfile::tempdir().unwrap();
        let foreign = CompileCache::open(other.path()).unwrap();
        foreign.compile(&engine, FORWARD, &y).unwrap();
        std::fs::copy(foreign.path(&e, &y), cache.path(&e, &y)).unwrap();
        let (_, compiled) = cache.compile(&engine, FORWARD, &y).unwrap();
        assert_eq!((compiled, cache.rejected()), (Compiled::Fresh, 2));
    }

    #[test]
    fn a_folder_others_may_write_turns_the_cache_off() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(true);
        let hash = ContentHash::of(FORWARD);
        for mode in [0o777, 0o770, 0o1777] {
            chmod(dir.path(), mode);
            let cache = CompileCache::open(dir.path()).unwrap();
            assert!(!cache.enabled(), "mode {mode:o}");
            for _ in 0..2 {
                let (_, compiled) = cache.compile(&engine, FORWARD, &hash).unwrap();
                assert_eq!(compiled, Compiled::Fresh);
            }
        }
        // Nothing was written: no key, no artefact.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

        chmod(dir.path(), 0o755);
        assert!(CompileCache::open(dir.path()).unwrap().enabled());
    }

    #[test]
    fn a_key_others_may_read_or_a_special_file_turns_the_cache_off() {
        let dir = tempfile::tempdir().unwrap();
        CompileCache::open(dir.path()).unwrap();
        let key = dir.path().join(KEY_FILE);
        chmod(&key, 0o644);
        assert!(!CompileCache::open(dir.path()).unwrap().enabled());

        std::fs::remove_file(&key).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &key).unwrap();
        assert!(!CompileCache::open(dir.path()).unwrap().enabled());
    }
}
