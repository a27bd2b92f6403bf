//! Talking to registries: pushing a plugin, pulling one with every digest checked, reading a
//! tag's current digest cheaply, and fetching the cosign signatures of a digest.
//!
//! Credentials come, in order, from explicit ones (flags, environment), then the Docker
//! configuration file (`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`, its
//! `auths.REGISTRY.auth`), else none. They are never logged: [`Credentials`] prints masked.
//! Registries on this machine (`localhost`, loopback addresses) are spoken to over plain HTTP,
//! as Docker does, and so are those listed as insecure; all others over HTTPS.

use std::fmt;
use std::path::PathBuf;

use bytes::Bytes;
use oci_client::Client;
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::manifest::OciImageManifest;
use oci_client::secrets::RegistryAuth;

use super::artifact::{
    Artifact, CONFIG_MEDIA_TYPE, MANIFEST_ANNOTATION, MAX_MANIFEST_BYTES, WASM_MEDIA_TYPE, sha256,
};
use super::reference::PluginRef;
use super::trust::{RegistrySignature, SIGNATURE_ANNOTATION, SIMPLE_SIGNING_MEDIA_TYPE};

/// The most signatures of one digest read (a signature artifact has one layer per signing).
const MAX_SIGNATURES: usize = 16;
/// The largest signature payload read.
const MAX_SIGNATURE_PAYLOAD: i64 = 64 << 10;

/// A user name and password for a registry.
#[derive(Clone)]
pub struct Credentials {
    /// The user name.
    pub username: String,
    /// The password or token.
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials({}, ****)", self.username)
    }
}

/// A plugin pulled from a registry, every digest checked.
#[derive(Debug, Clone)]
pub struct Pulled {
    /// The component and its manifest.
    pub artifact: Artifact,
    /// The digest of the image manifest: what tags point at, what cosign signs.
    pub digest: String,
    /// The digest of the component's bytes.
    pub content_digest: String,
}

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registry could not be reached or answered with an error.
    #[error("registry {registry}: {operation} {reference}: {message}")]
    Registry {
        /// The registry's host.
        registry: String,
        /// What was attempted.
        operation: &'static str,
        /// The reference.
        reference: String,
        /// The client's error.
        message: String,
    },
    /// The registry served something that is not a plugin artifact, or a digest that does
    /// not match.
    #[error("{reference}: {message}")]
    Invalid {
        /// The reference.
        reference: String,
        /// What is wrong.
        message: String,
    },
}

/// A registry client with its credentials.
pub struct Registry {
    client: Client,
    explicit: Option<Credentials>,
    docker_config: Option<PathBuf>,
    max_wasm_bytes: u64,
}

impl Registry {
    /// A client for `references`, with `explicit` credentials if given (else the Docker
    /// configuration's), speaking HTTP to loopback registries and to those in `insecure`,
    /// and pulling components of at most `max_wasm_bytes`.
    pub fn new(
        references: &[&PluginRef],
        insecure: &[String],
        explicit: Option<Credentials>,
        max_wasm_bytes: u64,
    ) -> Self {
        crate::crypto::install_crypto_provider();
        let mut plain: Vec<String> = insecure.to_vec();
        plain.extend(
            references
                .iter()
                .filter(|r| r.is_loopback())
                .map(|r| r.registry().to_owned()),
        );
        plain.sort();
        plain.dedup();
        let config = ClientConfig {
            protocol: ClientProtocol::HttpsExcept(plain),
            connect_timeout: Some(std::time::Duration::from_secs(10)),
            read_timeout: Some(std::time::Duration::from_secs(60)),
            ..ClientConfig::default()
        };
        Self {
            client: Client::new(config),
            explicit,
            docker_config: docker_config_path(),
            max_wasm_bytes,
        }
    }

    /// Pushes `artifact` to `reference`; returns the image manifest's digest.
    pub async fn push(
        &self,
        reference: &PluginRef,
        artifact: &Artifact,
    ) -> Result<String, RegistryError> {
        let invalid = |message: String| RegistryError::Invalid {
            reference: reference.to_string(),
            message,
        };
        let (config, annotations) = artifact.config().map_err(invalid)?;
        let layers = [ImageLayer::new(
            artifact.wasm.clone(),
            WASM_MEDIA_TYPE.to_owned(),
            None,
        )];
        let config = Config::new(config, CONFIG_MEDIA_TYPE.to_owned(), None);
        let manifest = OciImageManifest {
            media_type: Some(oci_client::manifest::OCI_IMAGE_MEDIA_TYPE.to_owned()),
            ..OciImageManifest::build(
                &layers,
                &config,
                (!annotations.is_empty()).then_some(annotations),
            )
        };
        // Serialised here, in the specification's field order, and pushed as these bytes:
        // the digest printed is the digest stored. (Some registries, Distribution 2.8 among
        // them, refuse a manifest whose annotations come before its schema version.)
        let body = serde_json::to_vec(&manifest).map_err(|e| invalid(e.to_string()))?;
        let digest = sha256(&body);
        let auth = self.auth(reference);
        self.client
            .store_auth_if_needed(reference.registry(), &auth)
            .await;
        for (data, descriptor) in [
            (artifact.wasm.clone(), &manifest.layers[0]),
            (config.data.clone(), &manifest.config),
        ] {
            self.client
                .push_blob(reference.reference(), data, &descriptor.digest)
                .await
                .map_err(|e| self.failed("push a blob of", reference, e))?;
        }
        self.client
            .push_manifest_raw(
                reference.reference(),
                body,
                http::HeaderValue::from_static(oci_client::manifest::OCI_IMAGE_MEDIA_TYPE),
            )
            .await
            .map_err(|e| self.failed("push", reference, e))?;
        Ok(digest)
    }

    /// The digest `reference` points at now, asking the registry for the manifest's headers
    /// only: what a poll costs when nothing moved.
    pub async fn digest(&self, reference: &PluginRef) -> Result<String, RegistryError> {
        self.client
            .fetch_manifest_digest(reference.reference(), &self.auth(reference))
            .await
            .map_err(|e| self.failed("resolve", reference, e))
    }

    /// Pulls the plugin at `reference`, checking that the manifest has the digest asked for
    /// (pinned references) or announced, that it is a Wasm artifact with one component
    /// layer within the size limit, and that the component has the layer's digest.
    pub async fn pull(&self, reference: &PluginRef) -> Result<Pulled, RegistryError> {
        let invalid = |message: String| RegistryError::Invalid {
            reference: reference.to_string(),
            message,
        };
        let auth = self.auth(reference);
        let (raw, announced) = self
            .client
            .pull_manifest_raw(
                reference.reference(),
                &auth,
                &[oci_client::manifest::OCI_IMAGE_MEDIA_TYPE],
            )
            .await
            .map_err(|e| self.failed("pull manifest of", reference, e))?;
        let digest = sha256(&raw);
        let expected = reference.reference().digest().unwrap_or(&announced);
        if digest != expected {
            return Err(invalid(format!(
                "the registry served a manifest whose digest is {digest}, not {expected}"
            )));
        }
        let manifest: OciImageManifest = serde_json::from_slice(&raw)
            .map_err(|e| invalid(format!("not an OCI image manifest: {e}")))?;
        if manifest.config.media_type != CONFIG_MEDIA_TYPE {
            return Err(invalid(format!(
                "not a Wasm artifact: its config's media type is {:?}, not {CONFIG_MEDIA_TYPE:?}",
                manifest.config.media_type
            )));
        }
        let [layer] = manifest.layers.as_slice() else {
            return Err(invalid(format!(
                "a Wasm artifact has one layer, the component; this one has {}",
                manifest.layers.len()
            )));
        };
        if layer.media_type != WASM_MEDIA_TYPE {
            return Err(invalid(format!(
                "its layer's media type is {:?}, not {WASM_MEDIA_TYPE:?}",
                layer.media_type
            )));
        }
        if u64::try_from(layer.size).unwrap_or(u64::MAX) > self.max_wasm_bytes {
            return Err(invalid(format!(
                "its component is {} bytes, over plugins.max_wasm_mib ({} bytes)",
                layer.size, self.max_wasm_bytes
            )));
        }
        let manifest_text = manifest
            .annotations
            .as_ref()
            .and_then(|a| a.get(MANIFEST_ANNOTATION))
            .cloned();
        if manifest_text
            .as_ref()
            .is_some_and(|t| t.len() > MAX_MANIFEST_BYTES)
        {
            return Err(invalid(format!(
                "its plugin manifest is over {MAX_MANIFEST_BYTES} bytes"
            )));
        }
        let mut wasm = Vec::with_capacity(usize::try_from(layer.size).unwrap_or(0));
        self.client
            .pull_blob(reference.reference(), layer, &mut wasm)
            .await
            .map_err(|e| self.failed("pull component of", reference, e))?;
        let content_digest = sha256(&wasm);
        if content_digest != layer.digest {
            return Err(invalid(format!(
                "the component's digest is {content_digest}, not the {} its manifest names",
                layer.digest
            )));
        }
        Ok(Pulled {
            artifact: Artifact {
                wasm: Bytes::from(wasm),
                manifest: manifest_text,
            },
            digest,
            content_digest,
        })
    }

    /// The cosign signatures of `digest` in `reference`'s repository (its `sha256-HEX.sig`
    /// tag); none when the tag does not exist.
    pub async fn signatures(
        &self,
        reference: &PluginRef,
        digest: &str,
    ) -> Result<Vec<RegistrySignature>, RegistryError> {
        let tag = reference.signatures_of(digest);
        let auth = self.auth(&tag);
        let manifest = match self
            .client
            .pull_image_manifest(tag.reference(), &auth)
            .await
        {
            Ok((manifest, _)) => manifest,
            Err(e) if is_not_found(&e) => return Ok(Vec::new()),
            Err(e) => return Err(self.failed("pull signatures of", &tag, e)),
        };
        let mut signatures = Vec::new();
        for layer in manifest.layers.iter().take(MAX_SIGNATURES) {
            let signature = layer
                .annotations
                .as_ref()
                .and_then(|a| a.get(SIGNATURE_ANNOTATION));
            let (Some(signature), true, true) = (
                signature,
                layer.media_type == SIMPLE_SIGNING_MEDIA_TYPE,
                layer.size <= MAX_SIGNATURE_PAYLOAD,
            ) else {
                continue;
            };
            let mut payload = Vec::new();
            self.client
                .pull_blob(tag.reference(), layer, &mut payload)
                .await
                .map_err(|e| self.failed("pull signature payload of", &tag, e))?;
            signatures.push(RegistrySignature::new(payload, signature.clone()));
        }
        Ok(signatures)
    }

    /// The credentials for `reference`'s registry.
    fn auth(&self, reference: &PluginRef) -> RegistryAuth {
        let credentials = self.explicit.clone().or_else(|| {
            self.docker_config
                .as_ref()
                .and_then(|path| docker_credentials(path, reference.registry()))
        });
        match credentials {
            Some(c) => RegistryAuth::Basic(c.username, c.password),
            None => RegistryAuth::Anonymous,
        }
    }

    fn failed(
        &self,
        operation: &'static str,
        reference: &PluginRef,
        error: oci_client::errors::OciDistributionError,
    ) -> RegistryError {
        // A blob that does not hash to its digest was served whole: it is bad, not away.
        if let oci_client::errors::OciDistributionError::DigestError(_) = &error {
            return RegistryError::Invalid {
                reference: reference.to_string(),
                message: format!("{operation} it: {error}"),
            };
        }
        RegistryError::Registry {
            registry: reference.registry().to_owned(),
            operation,
            reference: reference.to_string(),
            message: error.to_string(),
        }
    }
}

/// Whether the registry said the manifest does not exist.
fn is_not_found(error: &oci_client::errors::OciDistributionError) -> bool {
    use oci_client::errors::{OciDistributionError, OciErrorCode};
    match error {
        OciDistributionError::ImageManifestNotFoundError(_) => true,
        OciDistributionError::RegistryError { envelope, .. } => envelope.errors.iter().any(|e| {
            matches!(
                e.code,
                OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown
            )
        }),
        _ => false,
    }
}

/// Where the Docker configuration file is: `$DOCKER_CONFIG/config.json`, else
/// `$HOME/.docker/config.json`.
fn docker_config_path() -> Option<PathBuf> {
    match std::env::var_os("DOCKER_CONFIG") {
        Some(dir) => Some(PathBuf::from(dir).join("config.json")),
        None => {
            std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".docker/config.json"))
        }
    }
}

/// The `user:password` that the Docker configuration at `path` holds for `registry`
/// (`auths.REGISTRY.auth`, base64), if any.
fn docker_credentials(path: &PathBuf, registry: &str) -> Option<Credentials> {
    use base64::Engine as _;
    let text = std::fs::read_to_string(path).ok()?;
    let config: serde_json::Value = serde_json::from_str(&text).ok()?;
    let auths = config.get("auths")?.as_object()?;
    let entry = auths.get(registry).or_else(|| {
        auths.iter().find_map(|(key, value)| {
            let host = key
                .trim_start_matches("https://")
                .trim_start_matches("http://")
                .split('/')
                .next()?;
            (host == registry).then_some(value)
        })
    })?;
    let encoded = entry.get("auth")?.as_str()?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let (username, password) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    Some(Credentials {
        username: username.to_owned(),
        password: password.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_credentials_are_read_by_registry_and_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        // "ana:s3cret"
        std::fs::write(
            &path,
            r#"{"auths":{"https://registry.example.com/v1/":{"auth":"YW5hOnMzY3JldA=="}}}"#,
        )
        .unwrap();
        let credentials = docker_credentials(&path, "registry.example.com").unwrap();
        assert_eq!(
            (credentials.username.as_str(), credentials.password.as_str()),
            ("ana", "s3cret")
        );
        assert!(!format!("{credentials:?}").contains("s3cret"));
        assert!(docker_credentials(&path, "other.example.com").is_none());
    }
}
