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
//! An artefact is native code that Wasmtime loads without validating it again, so the folder
//! must be writable by the host's own user only, like its binary; the host creates it with
//! mode 0700. The cache is an accelerator: any failure to read or write it is logged and
//! the component compiled as if there were none.

use std::hash::{Hash, Hasher};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use wasmtime::Engine;
use wasmtime::component::Component;

use crate::ContentHash;

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

/// A folder of compiled components for one engine.
#[derive(Debug)]
pub struct CompileCache {
    dir: PathBuf,
    engine: blake3::Hash,
}

impl CompileCache {
    /// Opens (creating it when missing) the cache folder `dir` for `engine`.
    pub fn open(dir: &Path, engine: &Engine) -> std::io::Result<Self> {
        create_private_dir(dir)?;
        let mut hasher = Blake3Hasher(blake3::Hasher::new());
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(Self {
            dir: dir.to_owned(),
            engine: hasher.0.finalize(),
        })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The artefact's path for a component whose bytes hash to `hash`.
    fn path(&self, hash: &ContentHash) -> PathBuf {
        let mut key = blake3::Hasher::new();
        key.update(self.engine.as_bytes());
        key.update(hash.as_bytes());
        let key = key.finalize().to_hex();
        self.dir.join(format!("{}.cwasm", &key[..32]))
    }

    /// The component from the cache, or compiled from `bytes` and then stored.
    pub fn compile(
        &self,
        engine: &Engine,
        bytes: &[u8],
        hash: &ContentHash,
    ) -> wasmtime::Result<(Component, Compiled)> {
        let path = self.path(hash);
        if path.exists() {
            // SAFETY: the file was written by `store` below from `Component::serialize` for an
            // engine with this compatibility hash, in a folder only this user may write to
            // (see the module's documentation); Wasmtime still checks the artefact's header
            // and engine settings and refuses one that does not match.
            match unsafe { Component::deserialize_file(engine, &path) } {
                Ok(component) => return Ok((component, Compiled::Cached)),
                Err(error) => {
                    tracing::warn!(path = %path.display(), "ignoring an unusable compiled component: {error:#}");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let component = Component::new(engine, bytes)?;
        if let Err(error) = component
            .serialize()
            .map_err(std::io::Error::other)
            .and_then(|artefact| self.store(&path, &artefact))
        {
            tracing::warn!(dir = %self.dir.display(), "cannot write to the compile cache: {error}");
        }
        Ok((component, Compiled::Fresh))
    }

    /// Writes `artefact` to `path` through a temporary file, so a reader never sees half of it.
    fn store(&self, path: &Path, artefact: &[u8]) -> std::io::Result<()> {
        let mut file = tempfile::NamedTempFile::new_in(&self.dir)?;
        file.write_all(artefact)?;
        file.persist(path).map_err(|e| e.error)?;
        Ok(())
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

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::examples::FORWARD;

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
        let cache = CompileCache::open(&dir.path().join("cache"), &engine).unwrap();
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
            let cache = CompileCache::open(dir.path(), &engine).unwrap();
            let (_, compiled) = cache.compile(&engine, FORWARD, &hash).unwrap();
            assert_eq!(compiled, Compiled::Fresh, "epochs {epochs}");
        }
        assert_eq!(artefacts(dir.path()).len(), 2);
    }

    #[test]
    fn a_damaged_artefact_is_replaced_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(true);
        let cache = CompileCache::open(dir.path(), &engine).unwrap();
        let hash = ContentHash::of(FORWARD);
        cache.compile(&engine, FORWARD, &hash).unwrap();
        let artefact = &artefacts(dir.path())[0];
        std::fs::write(artefact, b"not an artefact").unwrap();

        let (_, compiled) = cache.compile(&engine, FORWARD, &hash).unwrap();
        assert_eq!(compiled, Compiled::Fresh);
        let (_, compiled) = cache.compile(&engine, FORWARD, &hash).unwrap();
        assert_eq!(compiled, Compiled::Cached);
    }

    #[cfg(unix)]
    #[test]
    fn the_folder_is_private_to_the_host_user() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("a/b");
        CompileCache::open(&folder, &engine(true)).unwrap();
        let mode = std::fs::metadata(&folder).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }
}
