//! A plugin as an OCI artifact, the way the Wasm OCI convention stores a component (what
//! `wkg oci push` writes and `wkg oci pull` reads):
//!
//! - the manifest is an OCI image manifest whose config has the media type
//!   [`CONFIG_MEDIA_TYPE`] and holds a [`WasmConfig`] (architecture `wasm`, os `wasip2`, the
//!   layer's digest, the component's imports and exports);
//! - it has exactly one layer, the component itself, media type [`WASM_MEDIA_TYPE`];
//! - the plugin's manifest (`NAME.toml`), when it has one, travels as the annotation
//!   [`MANIFEST_ANNOTATION`] of the image manifest.
//!
//! Why an annotation rather than a second layer: the convention's clients (`wkg`, the
//! `oci-wasm` crate) refuse an artifact with more than one layer, and an annotation is part
//! of the image manifest, so the manifest digest (the one a tag points at, the one pinned
//! references name and cosign signs) covers the plugin's grants and settings as it covers
//! its code. A plugin manifest is a few hundred bytes; [`MAX_MANIFEST_BYTES`] bounds it.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::component;

/// The media type of the config blob of a Wasm artifact.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.wasm.config.v0+json";
/// The media type of the layer holding the component.
pub const WASM_MEDIA_TYPE: &str = "application/wasm";
/// The image-manifest annotation holding the plugin's `NAME.toml`.
pub const MANIFEST_ANNOTATION: &str = "dev.switchyard.plugin.manifest";
/// The largest plugin manifest carried in an annotation. Registries cap a whole image
/// manifest at 4 MiB; a plugin manifest is far below this.
pub const MAX_MANIFEST_BYTES: usize = 64 << 10;

/// A plugin as pushed or pulled: its component and, optionally, its manifest's text.
#[derive(Debug, Clone)]
pub struct Artifact {
    /// The component's bytes.
    pub wasm: Bytes,
    /// The text of `NAME.toml`, if the plugin has one.
    pub manifest: Option<String>,
}

/// The config blob of a Wasm artifact, in the convention's field names.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WasmConfig {
    /// When it was made, RFC 3339.
    pub created: String,
    /// Who made it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    /// Always `wasm`.
    pub architecture: String,
    /// `wasip2` for a component.
    pub os: String,
    /// The digests of the manifest's layers, in order.
    pub layer_digests: Vec<String>,
    /// What the component imports and exports.
    #[serde(default)]
    pub component: Option<ComponentInfo>,
}

/// A component's interface, as the config lists it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ComponentInfo {
    /// Exported interface names.
    pub exports: Vec<String>,
    /// Imported interface names.
    pub imports: Vec<String>,
    /// The world it targets, when known.
    #[serde(default)]
    pub target: Option<String>,
}

impl Artifact {
    /// The config blob and the image-manifest annotations for this artifact. `created` is
    /// the build's time (`SOURCE_DATE_EPOCH` when set, else the Unix epoch), not the time of
    /// the push: pushing the same component and manifest twice gives the same digest, so a
    /// tag re-pushed unchanged does not look moved to the hosts that poll it.
    pub fn config(&self) -> Result<(Vec<u8>, BTreeMap<String, String>), String> {
        let interface = component::interface(&self.wasm)?;
        let config = WasmConfig {
            created: created(),
            author: None,
            architecture: "wasm".to_owned(),
            os: "wasip2".to_owned(),
            layer_digests: vec![sha256(&self.wasm)],
            component: Some(ComponentInfo {
                exports: interface.exports,
                imports: interface.imports,
                target: None,
            }),
        };
        let json = serde_json::to_vec(&config).map_err(|e| e.to_string())?;
        let mut annotations = BTreeMap::new();
        if let Some(manifest) = &self.manifest {
            if manifest.len() > MAX_MANIFEST_BYTES {
                return Err(format!(
                    "the plugin manifest is {} bytes; at most {MAX_MANIFEST_BYTES} travel with \
                     a component",
                    manifest.len()
                ));
            }
            annotations.insert(MANIFEST_ANNOTATION.to_owned(), manifest.clone());
        }
        Ok((json, annotations))
    }
}

/// `sha256:HEX` of `bytes`, as OCI names blobs.
pub fn sha256(bytes: &[u8]) -> String {
    super::trust::Digest::of_bytes(bytes).to_string()
}

/// The artifact's creation time: `SOURCE_DATE_EPOCH` (reproducible builds' convention) or
/// the Unix epoch.
fn created() -> String {
    let seconds = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .unwrap_or(0);
    chrono::DateTime::from_timestamp(seconds, 0)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_lists_the_component_and_the_manifest_rides_in_an_annotation() {
        let artifact = Artifact {
            wasm: Bytes::from_static(crate::examples::FORWARD),
            manifest: Some("[grants]\npublish = [\"fwded:*\"]\n".to_owned()),
        };
        let (json, annotations) = artifact.config().unwrap();
        let config: WasmConfig = serde_json::from_slice(&json).unwrap();
        assert_eq!(
            (config.architecture.as_str(), config.os.as_str()),
            ("wasm", "wasip2")
        );
        assert_eq!(config.layer_digests, vec![sha256(crate::examples::FORWARD)]);
        assert_eq!(config.created, "1970-01-01T00:00:00Z");
        let component = config.component.unwrap();
        assert!(
            component
                .exports
                .iter()
                .any(|e| e.starts_with("switchyard:plugin/handler@"))
        );
        assert_eq!(
            annotations.get(MANIFEST_ANNOTATION).map(String::as_str),
            artifact.manifest.as_deref()
        );
        // The same artifact gives the same config: the digest does not move.
        assert_eq!(artifact.config().unwrap().0, json);
    }

    #[test]
    fn sha256_names_blobs_as_oci_does() {
        assert_eq!(
            sha256(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
