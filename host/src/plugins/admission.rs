//! Which plugin files may load, under `[plugins.verify]` and `plugins.allowed_digests`.
//!
//! With neither set (the default) every file may. Otherwise a file loads only if its
//! content's digest is allowed, or a trusted key signed it: registry sources check the cosign
//! signature of what they pull before it reaches the folder and vouch for its content here;
//! a file dropped in the folder by hand needs a `NAME.wasm.sig` beside it (`cosign
//! sign-blob --key`). A refused file is a load error of kind `trust`: the version running
//! keeps running, and the refusal is counted by reason.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Mutex;

use crate::oci::trust::{Digest, Policy, Refusal};

/// The policy, and the content digests registry sources have verified.
#[derive(Debug)]
pub struct Admission {
    policy: Policy,
    /// Contents whose registry signature was verified by a source (the folder then holds a
    /// file with no `.sig` beside it).
    vouched: Mutex<HashSet<Digest>>,
    /// Refusals so far, by reason.
    refused: Mutex<BTreeMap<&'static str, u64>>,
}

impl Admission {
    /// Admission under `policy`.
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            vouched: Mutex::default(),
            refused: Mutex::default(),
        }
    }

    /// Admission under `[plugins.verify]` and `plugins.allowed_digests`; a key is a PEM file
    /// or the PEM text itself.
    pub fn from_config(config: &crate::config::PluginsConfig) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let keys = config
            .verify
            .keys
            .iter()
            .enumerate()
            .map(|(i, key)| {
                let label = format!("plugins.verify.keys[{i}]");
                if key.trim_start().starts_with("-----BEGIN") {
                    return Ok((label, key.clone()));
                }
                let pem = std::fs::read_to_string(key)
                    .with_context(|| format!("{label}: cannot read the key file {key}"))?;
                Ok((format!("{label} ({key})"), pem))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self::new(Policy::new(&keys, &config.allowed_digests)?))
    }

    /// Everything loads.
    pub fn open() -> Self {
        Self::new(Policy::default())
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Records that a source verified `content` (its registry signature or allowed digest).
    pub fn vouch(&self, content: Digest) {
        self.vouched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(content);
    }

    /// Whether the file at `path`, holding `bytes`, may load; the signature, if needed, is
    /// read from `path` + `.sig`.
    pub fn admit(&self, path: &Path, bytes: &[u8]) -> Result<(), Refusal> {
        if self.policy.is_open() {
            return Ok(());
        }
        let digest = Digest::of_bytes(bytes);
        if self
            .vouched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&digest)
        {
            return Ok(());
        }
        let mut sig = path.as_os_str().to_owned();
        sig.push(".sig");
        let signature = std::fs::read_to_string(&sig).ok();
        self.policy
            .check_file(bytes, signature.as_deref())
            .map(|_| ())
            .inspect_err(|refusal| self.count(refusal))
    }

    /// Counts a refusal made here or by a source.
    pub fn count(&self, refusal: &Refusal) {
        *self
            .refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(refusal.kind())
            .or_default() += 1;
    }

    /// Refusals so far, by reason.
    pub fn refusals(&self) -> BTreeMap<&'static str, u64> {
        self.refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
