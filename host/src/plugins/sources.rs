//! Registry sources (`plugins.sources`): plugins pulled from OCI registries into the plugins
//! folder, where the ordinary hot-reload path loads them.
//!
//! Each source is a reference: a tag, looked up every `poll_s` (one request for the
//! manifest's headers) and pulled again when it points at a new digest, or a digest, pulled
//! once. What is pulled is checked (digests; signatures when `[plugins.verify]` has keys),
//! kept in the cache folder by digest with its signatures, and renamed into the plugins
//! folder. A restart installs from the cache what the tag still points at (or, with the
//! registry away, what it pointed at last) without downloading it again.
//!
//! Nothing here can stop a running plugin: a registry that is down, or serves something that
//! fails a check, leaves the last good version running; the failure is logged, shown in
//! `/plugins` (the plugin's `source`) and counted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::admission::Admission;
use crate::config::PluginsConfig;
use crate::oci::trust::{Digest, Refusal, RegistrySignature};
use crate::oci::{self, Artifact, PluginRef, Pulled, Registry};

/// The cache folder's name in the plugins folder, when `plugins.oci_cache` is not set. A
/// dot-name: the folder's scan skips it.
pub const DEFAULT_CACHE: &str = ".oci-cache";

/// What `/plugins` shows of a plugin's source.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SourceStatus {
    /// The reference configured.
    pub reference: String,
    /// The digest installed in the folder (the image manifest's).
    pub digest: Option<String>,
    /// The digest of its component.
    pub content_digest: Option<String>,
    /// Why it was admitted.
    pub verified: Option<String>,
    /// The last failure to look up, pull or admit a new version, cleared by a success.
    pub error: Option<String>,
    /// Its reason, for a refusal: `unsigned`, `unknown_key`, ...
    pub refused: Option<&'static str>,
    /// When the reference was last looked up successfully (ms since the Unix epoch).
    pub checked_at_ms: Option<u64>,
    /// Versions installed from the registry or the cache since the host started.
    pub installs: u64,
    /// The digest that failed last: not pulled again until the reference moves on.
    #[serde(skip)]
    failed_digest: Option<String>,
}

/// One source.
#[derive(Debug)]
struct Entry {
    reference: PluginRef,
    name: String,
}

/// The registry sources of a host.
pub struct Sources {
    entries: Vec<Entry>,
    registry: Registry,
    dir: PathBuf,
    cache: Cache,
    admission: Arc<Admission>,
    poll: Duration,
    status: Mutex<BTreeMap<String, SourceStatus>>,
}

impl Sources {
    /// The sources of `config`, installing into `config.dir` under `admission`. Credentials
    /// come from the environment (`SWITCHYARD_REGISTRY_USERNAME`, `..._PASSWORD`) or the
    /// Docker configuration file.
    pub fn new(config: &PluginsConfig, admission: Arc<Admission>) -> anyhow::Result<Self> {
        let entries = config
            .sources
            .iter()
            .map(|text| {
                let reference: PluginRef = text.parse()?;
                Ok(Entry {
                    name: reference.default_name().to_owned(),
                    reference,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let cache_dir = config
            .oci_cache
            .clone()
            .unwrap_or_else(|| config.dir.join(DEFAULT_CACHE));
        let references: Vec<&PluginRef> = entries.iter().map(|e| &e.reference).collect();
        let credentials = match (
            std::env::var("SWITCHYARD_REGISTRY_USERNAME"),
            std::env::var("SWITCHYARD_REGISTRY_PASSWORD"),
        ) {
            (Ok(username), Ok(password)) => Some(oci::Credentials { username, password }),
            _ => None,
        };
        let status = entries
            .iter()
            .map(|e| {
                let status = SourceStatus {
                    reference: e.reference.to_string(),
                    ..SourceStatus::default()
                };
                (e.name.clone(), status)
            })
            .collect();
        Ok(Self {
            registry: Registry::new(
                &references,
                &config.insecure_registries,
                credentials,
                config.max_wasm_mib << 20,
            ),
            entries,
            dir: config.dir.clone(),
            cache: Cache::open(&cache_dir).with_context(|| {
                format!("plugins.oci_cache: cannot create {}", cache_dir.display())
            })?,
            admission,
            poll: Duration::from_secs(config.poll_s),
            status: Mutex::new(status),
        })
    }

    /// Whether there are any.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Looks up every source once, installing what moved.
    pub async fn sync(&self) {
        for entry in &self.entries {
            if let Err(failure) = self.sync_one(entry).await {
                self.failed(entry, failure);
            }
        }
    }

    /// Syncs every `poll_s` until `stop`.
    pub fn spawn(self: Arc<Self>, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(self.poll) => self.sync().await,
                }
            }
        })
    }

    /// The plugins whose source has not installed a version yet: readiness waits for them.
    pub fn pending(&self) -> Vec<String> {
        self.lock()
            .iter()
            .filter(|(_, status)| status.digest.is_none())
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// What `/plugins` shows of `name`'s source, if it has one.
    pub fn status(&self, name: &str) -> Option<SourceStatus> {
        self.lock().get(name).cloned()
    }

    async fn sync_one(&self, entry: &Entry) -> Result<(), Failure> {
        let installed = self.lock().get(&entry.name).and_then(|s| s.digest.clone());
        let digest = match entry.reference.reference().digest() {
            Some(pinned) => pinned.to_owned(),
            None => match self.registry.digest(&entry.reference).await {
                Ok(digest) => digest,
                // Away: what the tag pointed at last, if the cache has it and nothing is
                // installed yet (a restart); otherwise keep what runs.
                Err(error) => match self.cache.last(&entry.reference) {
                    Some(digest) if installed.is_none() => digest,
                    _ => return Err(Failure::Registry(error.to_string())),
                },
            },
        };
        let failed = self
            .lock()
            .get(&entry.name)
            .and_then(|s| s.failed_digest.clone());
        self.checked(entry, failed.as_deref() == Some(digest.as_str()));
        if installed.as_deref() == Some(digest.as_str())
            || failed.as_deref() == Some(digest.as_str())
        {
            return Ok(());
        }
        self.try_install(entry, &digest)
            .await
            .inspect_err(|failure| {
                // What the registry served is bad: the same digest will be bad again. A
                // registry that could not be reached is tried again at the next poll.
                if matches!(failure, Failure::Invalid(_) | Failure::Refused(_))
                    && let Some(status) = self.lock().get_mut(&entry.name)
                {
                    status.failed_digest = Some(digest.clone());
                }
            })
    }

    /// Pulls (or takes from the cache), admits and installs `digest` of `entry`.
    async fn try_install(&self, entry: &Entry, digest: &str) -> Result<(), Failure> {
        let (pulled, signatures) = match self.cache.get(digest) {
            Some(cached) => cached,
            None => {
                let pinned = entry.reference.at(digest);
                let pulled = self.registry.pull(&pinned).await.map_err(Failure::from)?;
                let signatures = if self.admission.policy().key_labels().next().is_some() {
                    self.registry
                        .signatures(&entry.reference, digest)
                        .await
                        .map_err(Failure::from)?
                } else {
                    Vec::new()
                };
                (pulled, signatures)
            }
        };
        let manifest_digest: Digest = pulled
            .digest
            .parse()
            .map_err(|e: crate::oci::trust::BadDigest| Failure::Invalid(e.to_string()))?;
        let content_digest: Digest = pulled
            .content_digest
            .parse()
            .map_err(|e: crate::oci::trust::BadDigest| Failure::Invalid(e.to_string()))?;
        let verdict = self
            .admission
            .policy()
            .check_registry(&manifest_digest, &content_digest, &signatures)
            .map_err(|refusal| {
                self.admission.count(&refusal);
                Failure::Refused(refusal)
            })?;
        if let Err(error) = self.cache.put(&entry.reference, &pulled, &signatures) {
            tracing::warn!(
                source = %entry.reference,
                "cannot keep the pulled component in the cache: {error:#}"
            );
        }
        self.admission.vouch(content_digest);
        oci::install(&self.dir, &entry.name, &pulled.artifact)
            .map_err(|e| Failure::Install(e.to_string()))?;
        tracing::info!(
            plugin = %entry.name,
            source = %entry.reference,
            digest = %pulled.digest,
            %verdict,
            "installed a version from the registry"
        );
        let mut status = self.lock();
        if let Some(status) = status.get_mut(&entry.name) {
            status.digest = Some(pulled.digest.clone());
            status.content_digest = Some(pulled.content_digest.clone());
            status.verified = Some(verdict.to_string());
            status.error = None;
            status.refused = None;
            status.failed_digest = None;
            status.installs += 1;
        }
        Ok(())
    }

    fn checked(&self, entry: &Entry, keep_error: bool) {
        if let Some(status) = self.lock().get_mut(&entry.name) {
            status.checked_at_ms = Some(now_ms());
            if !keep_error {
                status.error = None;
            }
        }
    }

    fn failed(&self, entry: &Entry, failure: Failure) {
        let running = self
            .lock()
            .get(&entry.name)
            .is_some_and(|s| s.digest.is_some());
        tracing::warn!(
            plugin = %entry.name,
            source = %entry.reference,
            "{failure}{}",
            if running { "; the version installed keeps running" } else { "" }
        );
        if let Some(status) = self.lock().get_mut(&entry.name) {
            status.refused = match &failure {
                Failure::Refused(refusal) => Some(refusal.kind()),
                _ => None,
            };
            status.error = Some(failure.to_string());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, SourceStatus>> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Why a source could not install a new version.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("{0}")]
    Registry(String),
    #[error("{0}")]
    Invalid(String),
    #[error("refused: {0}")]
    Refused(Refusal),
    #[error("cannot write into the plugins folder: {0}")]
    Install(String),
}

impl From<oci::RegistryError> for Failure {
    fn from(error: oci::RegistryError) -> Self {
        match error {
            oci::RegistryError::Invalid { .. } => Failure::Invalid(error.to_string()),
            oci::RegistryError::Registry { .. } => Failure::Registry(error.to_string()),
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Pulled artifacts by manifest digest, with the signatures they were admitted with, and the
/// digest each reference pointed at last. Written through a dotfile and a rename; a cached
/// entry is checked against its digests when read, so a damaged one is pulled again.
struct Cache {
    dir: PathBuf,
}

/// A cached entry's record beside its component.
#[derive(Serialize, Deserialize)]
struct Record {
    digest: String,
    content_digest: String,
    manifest: Option<String>,
    signatures: Vec<CachedSignature>,
}

/// A signature as cached: its payload in base64, byte for byte what was signed.
#[derive(Serialize, Deserialize)]
struct CachedSignature {
    payload: String,
    signature: String,
}

impl Cache {
    fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    fn entry(&self, digest: &str) -> PathBuf {
        self.dir.join(digest.replace(':', "-"))
    }

    /// The artifact of `digest` and its signatures, if cached and intact.
    fn get(&self, digest: &str) -> Option<(Pulled, Vec<RegistrySignature>)> {
        let entry = self.entry(digest);
        let record: Record =
            serde_json::from_slice(&std::fs::read(entry.with_extension("json")).ok()?).ok()?;
        let wasm = std::fs::read(entry.with_extension("wasm")).ok()?;
        if record.digest != digest || oci::artifact::sha256(&wasm) != record.content_digest {
            return None;
        }
        let signatures = record
            .signatures
            .into_iter()
            .map(|s| {
                Some(RegistrySignature::new(
                    BASE64.decode(s.payload).ok()?,
                    s.signature,
                ))
            })
            .collect::<Option<Vec<_>>>()?;
        Some((
            Pulled {
                artifact: Artifact {
                    wasm: Bytes::from(wasm),
                    manifest: record.manifest,
                },
                digest: record.digest,
                content_digest: record.content_digest,
            },
            signatures,
        ))
    }

    /// Keeps `pulled` and its `signatures`, and records that `reference` points at it.
    fn put(
        &self,
        reference: &PluginRef,
        pulled: &Pulled,
        signatures: &[RegistrySignature],
    ) -> anyhow::Result<()> {
        let entry = self.entry(&pulled.digest);
        let record = Record {
            digest: pulled.digest.clone(),
            content_digest: pulled.content_digest.clone(),
            manifest: pulled.artifact.manifest.clone(),
            signatures: signatures
                .iter()
                .map(|s| CachedSignature {
                    payload: BASE64.encode(&s.payload),
                    signature: s.signature.clone(),
                })
                .collect(),
        };
        oci::folder::replace(
            &self.dir,
            &entry.with_extension("wasm"),
            &pulled.artifact.wasm,
        )
        .context("writing a cached component")?;
        oci::folder::replace(
            &self.dir,
            &entry.with_extension("json"),
            &serde_json::to_vec(&record)?,
        )
        .context("writing a cached component's record")?;
        let mut last = self.index();
        last.insert(reference.to_string(), pulled.digest.clone());
        oci::folder::replace(
            &self.dir,
            &self.dir.join("references.json"),
            &serde_json::to_vec(&last)?,
        )
        .context("writing the cache's index")
    }

    /// The digest `reference` pointed at when last installed.
    fn last(&self, reference: &PluginRef) -> Option<String> {
        self.index().remove(&reference.to_string())
    }

    fn index(&self) -> BTreeMap<String, String> {
        std::fs::read(self.dir.join("references.json"))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }
}
