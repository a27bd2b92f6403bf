//! What `switchyard push`, `switchyard pull` and `switchyard check oci://...` do with a
//! registry, for the command line to print.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use bytes::Bytes;

use super::{Artifact, Credentials, PluginRef, Registry};

/// How the command line reaches registries.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// Credentials given on the command line or in the environment.
    pub credentials: Option<Credentials>,
    /// Speak plain HTTP to the reference's registry even though it is not on this machine.
    pub insecure: bool,
    /// The largest component pulled, in bytes.
    pub max_wasm_bytes: u64,
}

impl Access {
    fn registry(&self, reference: &PluginRef) -> Registry {
        let insecure = if self.insecure {
            vec![reference.registry().to_owned()]
        } else {
            Vec::new()
        };
        Registry::new(
            &[reference],
            &insecure,
            self.credentials.clone(),
            self.max_wasm_bytes,
        )
    }
}

/// Pushes `wasm` (with `manifest`, or the `NAME.toml` beside it when there is one) to
/// `reference`; returns the pushed manifest's digest and whether a manifest went with it.
pub async fn push(
    wasm: &Path,
    manifest: Option<&Path>,
    reference: &PluginRef,
    access: &Access,
) -> anyhow::Result<(String, bool)> {
    let bytes = std::fs::read(wasm).with_context(|| format!("cannot read {}", wasm.display()))?;
    let beside = wasm.with_extension("toml");
    let manifest_path = manifest.or_else(|| beside.is_file().then_some(beside.as_path()));
    let manifest = manifest_path
        .map(|path| {
            std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
        })
        .transpose()?;
    let artifact = Artifact {
        wasm: Bytes::from(bytes),
        manifest,
    };
    let digest = access
        .registry(reference)
        .push(reference, &artifact)
        .await?;
    Ok((digest, artifact.manifest.is_some()))
}

/// What `pull` put where.
#[derive(Debug)]
pub struct PulledInto {
    /// The component's path.
    pub wasm: PathBuf,
    /// The manifest's path, when the artifact carried one.
    pub manifest: Option<PathBuf>,
    /// The image manifest's digest.
    pub digest: String,
}

/// Pulls `reference` into `dir` as `NAME.wasm` (and `NAME.toml`), `NAME` defaulting to the
/// repository's last segment.
pub async fn pull(
    reference: &PluginRef,
    dir: &Path,
    name: Option<&str>,
    access: &Access,
) -> anyhow::Result<PulledInto> {
    let pulled = access.registry(reference).pull(reference).await?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let name = name.unwrap_or_else(|| reference.default_name());
    let wasm = super::install(dir, name, &pulled.artifact)
        .with_context(|| format!("cannot write {name}.wasm into {}", dir.display()))?;
    Ok(PulledInto {
        manifest: pulled
            .artifact
            .manifest
            .is_some()
            .then(|| wasm.with_extension("toml")),
        wasm,
        digest: pulled.digest,
    })
}
