//! The loader: turns a `.wasm` file (and its optional manifest) into a [`LoadedPlugin`], or
//! into an error that says plainly what is wrong with it.
//!
//! Every check happens here, before a version can replace another: the file must be a
//! component (not a core module, not truncated), must target the `switchyard:plugin` world
//! (its imports link, its exports have the right types), must instantiate, and its `describe`
//! must answer with a sane description within the describe deadline. Compilation runs on the
//! blocking pool, never on a reactor thread.
//!
//! The loader takes one file at a time, so a `describe` that never answered would stop every
//! later load and keep the host unready for good. Instantiation and `describe` run together
//! under their own deadline (`plugins.describe_deadline_ms`), enforced like a call's: epoch
//! interruption in Wasm and bounded waits in host calls. The loader also stops waiting for
//! them [`DESCRIBE_GRACE`] after that deadline, whatever happens in the probe.
//!
//! The folder's files are read as [`files`] reads anything the host did not
//! write: regular files only (a FIFO or `/dev/zero` under a plugin's name is refused at once,
//! without blocking the load of the others), each within its size limit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use wasmtime::component::Component;

use super::admission::Admission;
use super::compile_cache::{CompileCache, Compiled};
use super::description;
use super::files::{self, BoundedFile, FileError};
use super::manifest::{Disclosure, MAX_MANIFEST_BYTES, Manifest};
use crate::component::interface;
use crate::config::{
    DEFAULT_DESCRIBE_DEADLINE_MS, GrantsConfig, MIN_QUEUE_BYTES, Policy, StreamsConfig,
};
use crate::effects::Effects;
use crate::effects::loop_guard::LoopGuard;
use crate::grants::{Grants, Settings};
use crate::rate::TokenBucket;
use crate::stats::PluginStats;
use crate::stats::outcome::Failure;
use crate::stats::outcome::FailureReason;
use crate::worker::MAX_CONCURRENCY;
use crate::worker::bindings::switchyard::plugin::types;
use crate::worker::engine::Runtime;
use crate::worker::host::{LOG_BURST, LOG_LINES_PER_SEC};
use crate::worker::instance::Instance;
use crate::worker::state::PluginContext;
use crate::worker::version::{Description, LoadedPlugin};
use crate::worker::worlds::{HandlerPre, World};
use crate::{ContentHash, PluginName};

/// The world of the current contract, which new plugins target (the host also runs plugins
/// built for earlier versions: see [`World`]).
pub const WORLD: &str = "switchyard:plugin/plugin@0.6.0";

/// The contract's package version (`0.6.0`): what guests put in their imports' names.
pub fn world_version() -> &'static str {
    WORLD.rsplit_once('@').map_or("", |(_, version)| version)
}

/// The largest memory cap a manifest may ask for: all of a 32-bit linear memory.
const MAX_MEMORY_MIB: u64 = 4096;

/// How long past the describe deadline the loader waits for a probe (instantiation and
/// `describe`) before it rejects the file and leaves the probe's thread behind. The deadline
/// itself stops the probe; this only guards the loader against a host call that fails to
/// honour it, and is long enough that a probe stopped by its deadline on a busy machine
/// is reported as such.
pub const DESCRIBE_GRACE: Duration = Duration::from_secs(2);

/// Why a file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file (or its manifest) is not a regular file; it was not read.
    #[error("{path} is {what}, not a regular file: only regular files are loaded")]
    NotRegular {
        /// The file.
        path: PathBuf,
        /// What it is instead.
        what: &'static str,
    },
    /// The file (or its manifest) is over its size limit; it was not read.
    #[error("{path} has {size} bytes, over the limit of {limit} bytes ({setting})")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
        /// Where the limit comes from.
        setting: &'static str,
    },
    /// The manifest beside it is malformed.
    #[error("bad manifest {0}")]
    Manifest(String),
    /// Not WebAssembly at all.
    #[error("not a WebAssembly file (no \\0asm header)")]
    NotWasm,
    /// A core module, where a component is needed.
    #[error(
        "a core WebAssembly module, not a component: build for wasm32-wasip2, or wrap it with `wasm-tools component new`"
    )]
    CoreModule,
    /// wasmtime rejected the bytes (truncated, corrupt, unsupported feature).
    #[error("not a valid component: {0}")]
    Compile(String),
    /// A component of another world.
    #[error("{0}")]
    WrongWorld(String),
    /// Instantiation or `describe` trapped.
    #[error("describe failed: {0}")]
    Describe(String),
    /// `describe` answered something unusable.
    #[error("invalid description: {0}")]
    Invalid(String),
    /// `[plugins.verify]` or `plugins.allowed_digests` do not let it load.
    #[error("not trusted: {0}")]
    Untrusted(String),
}

impl LoadError {
    /// A short label for metrics and `/plugins`.
    pub fn kind(&self) -> &'static str {
        match self {
            LoadError::Read { .. } | LoadError::NotRegular { .. } => "read",
            LoadError::TooLarge { .. } => "size",
            LoadError::Manifest(_) => "manifest",
            LoadError::NotWasm | LoadError::CoreModule | LoadError::Compile(_) => "compile",
            LoadError::WrongWorld(_) => "world",
            LoadError::Describe(_) => "describe",
            LoadError::Invalid(_) => "invalid",
            LoadError::Untrusted(_) => "trust",
        }
    }
}

/// Per-plugin limits applied to every version.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Wall-clock limit of one call.
    pub deadline: Duration,
    /// Linear-memory cap in bytes.
    pub memory: usize,
}

/// Compiles and checks plugins.
#[derive(Clone)]
pub struct Loader {
    runtime: Runtime,
    effects: Effects,
    limits: Limits,
    policy: Policy,
    grants: Arc<BTreeMap<String, GrantsConfig>>,
    max_size: u64,
    compile_cache: Option<Arc<CompileCache>>,
    streams: Arc<StreamsConfig>,
    /// The database of key subscriptions that name none: the one `redis.url` selects.
    database: u32,
    /// How long instantiation and `describe` of a new version may take together.
    describe_deadline: Duration,
    /// Which files may load.
    admission: Arc<Admission>,
}

/// What a load produced.
pub enum Loaded {
    /// A new version, ready to swap in.
    New(Box<LoadedPlugin>),
    /// The files hash to the version already running: nothing to do.
    Unchanged,
}

impl Loader {
    /// A loader compiling with `runtime`'s engine.
    pub fn new(
        runtime: Runtime,
        effects: Effects,
        limits: Limits,
        policy: Policy,
        grants: BTreeMap<String, GrantsConfig>,
    ) -> Self {
        Self {
            runtime,
            effects,
            limits,
            policy,
            grants: Arc::new(grants),
            max_size: u64::MAX,
            compile_cache: None,
            streams: Arc::default(),
            database: 0,
            describe_deadline: Duration::from_millis(DEFAULT_DESCRIBE_DEADLINE_MS),
            admission: Arc::new(Admission::open()),
        }
    }

    /// Loads only the files `admission` lets in.
    pub fn with_admission(mut self, admission: Arc<Admission>) -> Self {
        self.admission = admission;
        self
    }

    /// Which files may load.
    pub fn admission(&self) -> &Arc<Admission> {
        &self.admission
    }

    /// Gives instantiation and `describe` of a new version `deadline` together
    /// (`plugins.describe_deadline_ms`).
    pub fn with_describe_deadline(mut self, deadline: Duration) -> Self {
        self.describe_deadline = deadline;
        self
    }

    /// Reads plugins' streams with `config`'s settings (and each manifest's overrides).
    pub fn with_streams(mut self, config: StreamsConfig) -> Self {
        self.streams = Arc::new(config);
        self
    }

    /// Puts key subscriptions that name no database in `database` (the one `redis.url`
    /// selects).
    pub fn with_database(mut self, database: u32) -> Self {
        self.database = database;
        self
    }

    /// Keeps compiled components in `cache`, and reuses them.
    pub fn with_compile_cache(mut self, cache: CompileCache) -> Self {
        self.compile_cache = Some(Arc::new(cache));
        self
    }

    /// The compile cache, if one is in use (a refused folder gives one that is off).
    pub fn compile_cache(&self) -> Option<&CompileCache> {
        self.compile_cache.as_deref()
    }

    /// Rejects `.wasm` files larger than `bytes` without reading them.
    pub fn with_max_size(mut self, bytes: u64) -> Self {
        self.max_size = bytes;
        self
    }

    /// Where plugins' effects go.
    pub fn effects(&self) -> &Effects {
        &self.effects
    }

    /// The runtime plugins run on.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// Loads `wasm` (and `NAME.toml` beside it, if present) as plugin `name`. When the content
    /// hashes to `running`, returns [`Loaded::Unchanged`] without compiling.
    pub async fn load(
        &self,
        name: &PluginName,
        wasm: &Path,
        running: Option<(ContentHash, ContentHash)>,
    ) -> Result<Loaded, LoadError> {
        let PluginFiles { bytes, manifest } = {
            let path = wasm.to_owned();
            let max_size = self.max_size;
            tokio::task::spawn_blocking(move || PluginFiles::read(&path, max_size))
                .await
                .map_err(|e| LoadError::Read {
                    path: wasm.to_owned(),
                    source: std::io::Error::other(format!("read task failed: {e}")),
                })??
        };
        let manifest_path = wasm.with_extension("toml");
        let hash = ContentHash::of(&bytes);
        let manifest_hash =
            ContentHash::of(manifest.as_ref().map_or(&b""[..], |m| m.text.as_bytes()));
        if running == Some((hash, manifest_hash)) {
            return Ok(Loaded::Unchanged);
        }
        let (manifest, disclosure) = match &manifest {
            Some(file) => (
                Manifest::parse_disclosing(&file.text, &manifest_path, file.disclosure)
                    .map_err(LoadError::Manifest)?,
                file.disclosure,
            ),
            None => (Manifest::default(), Disclosure::Quote),
        };
        self.check_manifest(&manifest, &manifest_path, disclosure)?;
        let loader = self.clone();
        let name = name.clone();
        let path = wasm.to_owned();
        let size = bytes.len();
        tokio::task::spawn_blocking(move || {
            loader.build(
                name,
                path,
                bytes.into(),
                size,
                hash,
                manifest_hash,
                manifest,
            )
        })
        .await
        .map_err(|e| LoadError::Compile(format!("compile task failed: {e}")))?
        .map(|plugin| Loaded::New(Box::new(plugin)))
    }

    /// Compiles, links, instantiates and describes; runs on the blocking pool.
    #[allow(clippy::too_many_arguments)]
    fn build(
        &self,
        name: PluginName,
        path: PathBuf,
        bytes: Bytes,
        size: usize,
        hash: ContentHash,
        manifest_hash: ContentHash,
        manifest: Manifest,
    ) -> Result<LoadedPlugin, LoadError> {
        check_header(&bytes)?;
        self.admission
            .admit(&path, &bytes)
            .map_err(|refusal| LoadError::Untrusted(refusal.to_string()))?;
        // The world decides the engine: an async handler needs the one with component-model
        // async, which the others avoid (it slows their calls).
        let interface = interface(&bytes).map_err(LoadError::Compile)?;
        let world = World::of_exports(&interface.exports).map_err(LoadError::WrongWorld)?;
        let started = std::time::Instant::now();
        let engine = self.runtime.engine_for(world);
        let (component, compiled) = match &self.compile_cache {
            Some(cache) => cache.compile(engine, &bytes, &hash),
            None => Component::new(engine, &bytes).map(|component| (component, Compiled::Fresh)),
        }
        .map_err(|e| LoadError::Compile(format!("{e:#}")))?;
        tracing::debug!(
            plugin = %name,
            cache = compiled.as_str(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "component compiled"
        );
        let pre =
            HandlerPre::new(world, self.runtime.linker_for(world), &component).map_err(|e| {
                LoadError::WrongWorld(match world.contract() {
                    Some(contract) => format!("does not target {contract}: {e:#}"),
                    None => format!("does not link as a {} component: {e:#}", world.label()),
                })
            })?;
        if !world.describes_itself() && manifest.subscriptions.is_none() {
            return Err(LoadError::Manifest(format!(
                "{}: a {} component has no describe, so its manifest must list what it \
                 listens to: [subscriptions] with channels, patterns, sharded, streams, keys or \
                 tracking",
                path.with_extension("toml").display(),
                world.label()
            )));
        }

        let settings = manifest.settings();
        let limits = Limits {
            deadline: manifest
                .limits
                .deadline_ms
                .map_or(self.limits.deadline, Duration::from_millis),
            memory: manifest
                .limits
                .memory_mib
                .map_or(self.limits.memory, |mib| {
                    usize::try_from(mib << 20).unwrap_or(usize::MAX)
                }),
        };
        // `describe` runs with the plugin's settings but no grants: it must not act. It has
        // the describe deadline, not the plugin's: it runs once per version, and a slow
        // runtime's instantiation must not fail for a `handle` deadline tuned to messages.
        let probe = LoadedPlugin {
            context: self.context(
                &name,
                String::new(),
                hash,
                Grants::default(),
                LoopGuard::new(&[]),
                settings.clone(),
                Limits {
                    deadline: self.describe_deadline,
                    ..limits
                },
            ),
            pre: pre.clone(),
            description: Description::default(),
            stream: Arc::default(),
            concurrency: 1,
            queue_bytes: None,
            path: path.clone(),
            size,
            manifest_hash,
            loaded_at: SystemTime::now(),
        };
        // A component of another host's world is instantiated all the same (its start
        // must not trap or hang), and described by its manifest.
        let info = self
            .probe(&name, probe)?
            .unwrap_or_else(|| types::PluginInfo {
                name: name.as_str().to_owned(),
                version: String::new(),
                subscriptions: Vec::new(),
                capabilities: types::Capabilities {
                    publish: Vec::new(),
                    invalidate: Vec::new(),
                    outputs: Vec::new(),
                },
            });
        let description =
            description::from_wit(info, manifest.subscriptions.as_ref(), self.database)?;
        let grants = Grants::new(self.grants_for(&name, &manifest, &description));
        let loop_guard = LoopGuard::new(&description.subscriptions);
        Ok(LoadedPlugin {
            context: self.context(
                &name,
                description.version.clone(),
                hash,
                grants,
                loop_guard,
                settings,
                limits,
            ),
            pre,
            description,
            stream: Arc::new(self.streams.settings_for(name.as_str(), &manifest.stream)),
            concurrency: manifest.limits.concurrency.unwrap_or(1),
            queue_bytes: manifest.limits.queue_bytes,
            path,
            size,
            manifest_hash,
            loaded_at: SystemTime::now(),
        })
    }

    /// Instantiates `probe` and asks it to describe itself, on a thread of its own, waiting
    /// no longer than the describe deadline plus [`DESCRIBE_GRACE`].
    fn probe(
        &self,
        name: &PluginName,
        probe: LoadedPlugin,
    ) -> Result<Option<types::PluginInfo>, LoadError> {
        let deadline = self.describe_deadline;
        let answer = match run_bounded(
            format!("describe-{name}"),
            deadline + DESCRIBE_GRACE,
            move || describe(probe),
        ) {
            Ok(Bounded::Done(answer)) => answer,
            Ok(Bounded::TimedOut) => {
                tracing::error!(
                    plugin = %name,
                    ?deadline,
                    grace = ?DESCRIBE_GRACE,
                    "describe did not return although its deadline had passed; \
                     its thread is left behind and the file is rejected"
                );
                return Err(LoadError::Describe(format!(
                    "no answer within the describe deadline of {deadline:?} \
                     (plugins.describe_deadline_ms), nor {DESCRIBE_GRACE:?} after it"
                )));
            }
            Ok(Bounded::Panicked) => {
                return Err(LoadError::Describe(
                    "the host panicked while instantiating or describing the plugin".to_owned(),
                ));
            }
            Err(e) => {
                return Err(LoadError::Describe(format!(
                    "cannot start a thread for describe: {e}"
                )));
            }
        };
        answer.map_err(|failure| {
            if failure.reason == FailureReason::Deadline {
                LoadError::Describe(format!(
                    "no answer within the describe deadline of {deadline:?} \
                     (plugins.describe_deadline_ms): {failure}"
                ))
            } else {
                LoadError::Describe(failure.message)
            }
        })
    }

    /// The operator's grants for `name` (host configuration and manifest), plus what the
    /// plugin asks for when the policy trusts `describe`.
    fn grants_for(
        &self,
        name: &PluginName,
        manifest: &Manifest,
        description: &Description,
    ) -> GrantsConfig {
        let operator = self
            .grants
            .get(name.as_str())
            .map_or_else(|| manifest.grants.clone(), |g| g.union(&manifest.grants));
        match self.policy {
            Policy::Deny => operator,
            Policy::TrustDescribe => operator.union(&description.requested),
        }
    }

    /// What types cannot check in a manifest: outputs that exist, sane limits. Without
    /// `Disclosure::Quote` the error names the keys at fault but not their values.
    fn check_manifest(
        &self,
        manifest: &Manifest,
        path: &Path,
        disclosure: Disclosure,
    ) -> Result<(), LoadError> {
        // (key, what is wrong with its value)
        let mut problems: Vec<(&str, String)> = Vec::new();
        for output in &manifest.grants.outputs {
            if !self.effects.outputs().contains(output) {
                problems.push((
                    "grants.outputs",
                    format!(
                        "grants.outputs: output {output:?} is not defined in the host configuration"
                    ),
                ));
            }
        }
        if manifest.limits.deadline_ms == Some(0) {
            problems.push((
                "limits.deadline_ms",
                "limits.deadline_ms must be at least 1".to_owned(),
            ));
        }
        if let Some(workers) = manifest.limits.concurrency
            && !(1..=MAX_CONCURRENCY).contains(&workers)
        {
            problems.push((
                "limits.concurrency",
                format!(
                    "limits.concurrency must be between 1 and {MAX_CONCURRENCY}, got {workers}"
                ),
            ));
        }
        if let Some(bytes) = manifest
            .limits
            .queue_bytes
            .filter(|bytes| *bytes < MIN_QUEUE_BYTES)
        {
            problems.push((
                "limits.queue_bytes",
                format!("limits.queue_bytes must be at least {MIN_QUEUE_BYTES}, got {bytes}"),
            ));
        }
        if let Some(mib) = manifest.limits.memory_mib
            && !(1..=MAX_MEMORY_MIB).contains(&mib)
        {
            problems.push((
                "limits.memory_mib",
                format!("limits.memory_mib must be between 1 and {MAX_MEMORY_MIB}, got {mib}"),
            ));
        }
        if let Some(Err(keys)) = manifest
            .subscriptions
            .as_ref()
            .map(|s| s.key_subscriptions(self.database))
        {
            problems.extend(keys);
        }
        if problems.is_empty() {
            return Ok(());
        }
        let detail = match disclosure {
            Disclosure::Quote => problems
                .iter()
                .map(|(_, problem)| problem.as_str())
                .collect::<Vec<_>>()
                .join("; "),
            Disclosure::PositionOnly => {
                let mut keys: Vec<&str> = problems.iter().map(|(key, _)| *key).collect();
                keys.dedup();
                format!(
                    "invalid values for {} (not quoted: the file lies outside the plugins folder)",
                    keys.join(", ")
                )
            }
        };
        Err(LoadError::Manifest(format!("{}: {detail}", path.display())))
    }

    #[allow(clippy::too_many_arguments)]
    fn context(
        &self,
        name: &PluginName,
        version: String,
        hash: ContentHash,
        grants: Grants,
        loop_guard: LoopGuard,
        settings: Settings,
        limits: Limits,
    ) -> Arc<PluginContext> {
        Arc::new(PluginContext {
            name: name.clone(),
            version,
            hash,
            grants,
            loop_guard,
            log_limit: TokenBucket::new(LOG_LINES_PER_SEC, LOG_BURST),
            settings,
            effects: self.effects.clone(),
            deadline: limits.deadline,
            memory_limit: limits.memory,
        })
    }
}

/// A plugin's files as read from the folder.
struct PluginFiles {
    /// The component.
    bytes: Vec<u8>,
    /// `NAME.toml` beside it, if there is one.
    manifest: Option<ManifestFile>,
}

/// A manifest's text, and what errors about it may show.
struct ManifestFile {
    text: String,
    disclosure: Disclosure,
}

impl PluginFiles {
    /// Reads `wasm` (at most `max_size` bytes) and the manifest beside it; blocks, but never
    /// on a FIFO or a device.
    fn read(wasm: &Path, max_size: u64) -> Result<Self, LoadError> {
        let bytes = files::read_bounded(wasm, max_size)
            .map_err(|e| file_error(wasm, e, "plugins.max_wasm_mib"))?;
        let path = wasm.with_extension("toml");
        let manifest_limit = "a manifest's fixed limit";
        let manifest = match BoundedFile::open(&path, MAX_MANIFEST_BYTES) {
            // A dangling symlink counts as absent, as a missing file does.
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(file_error(&path, e, manifest_limit)),
            Ok(file) => {
                let disclosure = disclosure(&file, wasm);
                let bytes = file
                    .read()
                    .map_err(|e| file_error(&path, e, manifest_limit))?;
                // The UTF-8 error gives a byte offset, never the bytes.
                let text = String::from_utf8(bytes).map_err(|e| {
                    LoadError::Manifest(format!(
                        "{}: not UTF-8 text ({})",
                        path.display(),
                        e.utf8_error()
                    ))
                })?;
                Some(ManifestFile { text, disclosure })
            }
        };
        Ok(Self { bytes, manifest })
    }
}

/// May errors about `manifest` quote it? Only if the opened file lies in the folder of `wasm`
/// (as it is, or by symlinks that stay inside the folder, like a ConfigMap's `..data`). A
/// symlink may point anywhere the host can read, and `load_error` is served over HTTP; a hard
/// link cannot lead out of the folder without write access to (or ownership of) its target
/// where the kernel protects hard links (Linux's `fs.protected_hardlinks`, on by default).
fn disclosure(manifest: &BoundedFile, wasm: &Path) -> Disclosure {
    let folder = wasm
        .parent()
        .filter(|folder| !folder.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    match (manifest.real_path(), std::fs::canonicalize(folder)) {
        (Some(real), Ok(folder)) if real.starts_with(&folder) => Disclosure::Quote,
        _ => Disclosure::PositionOnly,
    }
}

/// The load error for a file that could not be read; `setting` names the size limit.
fn file_error(path: &Path, error: FileError, setting: &'static str) -> LoadError {
    let path = path.to_owned();
    match error {
        FileError::Io(source) => LoadError::Read { path, source },
        FileError::NotRegular(what) => LoadError::NotRegular { path, what },
        FileError::TooLarge { size, limit } => LoadError::TooLarge {
            path,
            size,
            limit,
            setting,
        },
    }
}

/// Instantiates `probe` and calls `describe`, both within the probe's deadline.
fn describe(probe: LoadedPlugin) -> Result<Option<types::PluginInfo>, Failure> {
    let mut instance =
        Instance::new(Arc::new(probe), PluginStats::new()).map_err(|failure| Failure {
            message: format!("instantiation failed: {failure}"),
            ..failure
        })?;
    instance.describe()
}

/// How a piece of work run by [`run_bounded`] ended.
#[derive(Debug, PartialEq, Eq)]
enum Bounded<T> {
    /// It finished in time, with this result.
    Done(T),
    /// It had not finished when the limit passed; its thread was left to finish alone.
    TimedOut,
    /// Its thread panicked.
    Panicked,
}

/// Runs `work` on a new thread named `name` and waits at most `limit` for it to finish. An
/// error if the thread cannot be started.
fn run_bounded<T: Send + 'static>(
    name: String,
    limit: Duration,
    work: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<Bounded<T>> {
    let (done, result) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new().name(name).spawn(move || {
        // After a time-out nobody reads the result any more.
        let _ = done.send(work());
    })?;
    Ok(match result.recv_timeout(limit) {
        Ok(value) => Bounded::Done(value),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Bounded::TimedOut,
        // The sender went away without sending: the thread unwound.
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Bounded::Panicked,
    })
}

/// Tells a core module or a non-Wasm file from a component before compiling, so the error
/// says what the file is rather than what the parser tripped on.
fn check_header(bytes: &[u8]) -> Result<(), LoadError> {
    const MAGIC: &[u8] = b"\0asm";
    // The 4 bytes after the magic: version 1, layer 0 is a core module; components use a
    // different version and layer 1.
    const CORE_MODULE: &[u8] = &[1, 0, 0, 0];
    if bytes.len() < 8 || &bytes[..4] != MAGIC {
        return Err(LoadError::NotWasm);
    }
    if &bytes[4..8] == CORE_MODULE {
        return Err(LoadError::CoreModule);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_work_is_waited_for_up_to_its_limit_only() {
        let limit = Duration::from_millis(50);
        let done = run_bounded("quick".to_owned(), limit * 100, || 7).expect("a thread");
        assert_eq!(done, Bounded::Done(7));

        let started = std::time::Instant::now();
        let stuck = run_bounded("stuck".to_owned(), limit, || {
            std::thread::sleep(Duration::from_secs(3600));
        })
        .expect("a thread");
        assert_eq!(stuck, Bounded::TimedOut);
        let waited = started.elapsed();
        assert!(
            waited >= limit && waited < limit + Duration::from_secs(2),
            "{waited:?}"
        );

        let panicked = run_bounded("panics".to_owned(), limit * 100, || -> u8 {
            panic!("a host bug")
        })
        .expect("a thread");
        assert_eq!(panicked, Bounded::Panicked);
    }

    #[test]
    fn header_check_names_what_the_file_is() {
        assert!(matches!(
            check_header(b"hello world"),
            Err(LoadError::NotWasm)
        ));
        assert!(matches!(check_header(b"\0asm"), Err(LoadError::NotWasm)));
        assert!(matches!(
            check_header(b"\0asm\x01\0\0\0rest"),
            Err(LoadError::CoreModule)
        ));
        assert!(check_header(b"\0asm\x0d\0\x01\0rest").is_ok());
    }
}
