//! Where a plugin lives in a registry: `oci://REGISTRY/REPOSITORY:TAG`, or pinned,
//! `oci://REGISTRY/REPOSITORY@sha256:DIGEST`.

use std::fmt;
use std::str::FromStr;

use oci_client::Reference;

/// The scheme written before a reference in configuration and on the command line.
pub const SCHEME: &str = "oci://";

/// A plugin's reference in a registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginRef {
    reference: Reference,
}

/// A reference that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error(
    "{given:?} is not a registry reference (oci://REGISTRY/REPOSITORY:TAG or \
     oci://REGISTRY/REPOSITORY@sha256:DIGEST): {why}"
)]
pub struct BadReference {
    given: String,
    why: String,
}

impl FromStr for PluginRef {
    type Err = BadReference;

    /// Reads `oci://REGISTRY/REPOSITORY[:TAG][@sha256:DIGEST]`; the scheme may be left out
    /// on the command line. The registry must be named: there is no default registry.
    fn from_str(given: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| BadReference {
            given: given.to_owned(),
            why: why.to_owned(),
        };
        let text = given.strip_prefix(SCHEME).unwrap_or(given);
        let first = text.split('/').next().unwrap_or_default();
        if !text.contains('/')
            || !(first.contains('.') || first.contains(':') || first == "localhost")
        {
            return Err(bad("it must start with the registry's host name"));
        }
        let reference = Reference::from_str(text).map_err(|e| bad(&e.to_string()))?;
        if let Some(digest) = reference.digest()
            && !is_sha256(digest)
        {
            return Err(bad("its digest must be sha256: and 64 hexadecimal digits"));
        }
        Ok(Self { reference })
    }
}

impl fmt::Display for PluginRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}", self.reference.whole())
    }
}

impl PluginRef {
    /// The reference as the registry client takes it.
    pub fn reference(&self) -> &Reference {
        &self.reference
    }

    /// The registry's host (and port), as credentials are keyed.
    pub fn registry(&self) -> &str {
        self.reference.resolve_registry()
    }

    /// Whether it names one digest, which never changes.
    pub fn is_pinned(&self) -> bool {
        self.reference.digest().is_some()
    }

    /// The plugin name it gives by default: the repository's last segment.
    pub fn default_name(&self) -> &str {
        self.reference
            .repository()
            .rsplit('/')
            .next()
            .unwrap_or_else(|| self.reference.repository())
    }

    /// The same repository at `digest`.
    pub fn at(&self, digest: &str) -> PluginRef {
        PluginRef {
            reference: Reference::with_digest(
                self.reference.registry().to_owned(),
                self.reference.repository().to_owned(),
                digest.to_owned(),
            ),
        }
    }

    /// The tag under which cosign stores the signatures of `digest` in this repository:
    /// `sha256-HEX.sig`.
    pub fn signatures_of(&self, digest: &str) -> PluginRef {
        PluginRef {
            reference: Reference::with_tag(
                self.reference.registry().to_owned(),
                self.reference.repository().to_owned(),
                format!("{}.sig", digest.replacen(':', "-", 1)),
            ),
        }
    }

    /// Whether the registry is on this machine (`localhost`, `127.0.0.0/8`, `::1`), which
    /// is spoken to over plain HTTP as Docker does.
    pub fn is_loopback(&self) -> bool {
        let host = self.registry();
        let host = match host.rsplit_once(':') {
            Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
            _ => host,
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

/// Whether `digest` is `sha256:` followed by 64 lowercase hexadecimal digits.
pub fn is_sha256(digest: &str) -> bool {
    digest.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn references_name_their_registry_and_may_pin_a_digest() {
        let tagged: PluginRef = "oci://127.0.0.1:5000/team/forward:1".parse().unwrap();
        assert_eq!(tagged.registry(), "127.0.0.1:5000");
        assert_eq!(tagged.default_name(), "forward");
        assert!(!tagged.is_pinned() && tagged.is_loopback());
        assert_eq!(tagged.to_string(), "oci://127.0.0.1:5000/team/forward:1");

        let pinned: PluginRef = format!("ghcr.io/team/forward@{DIGEST}").parse().unwrap();
        assert!(pinned.is_pinned() && !pinned.is_loopback());
        assert_eq!(
            tagged.signatures_of(DIGEST).to_string(),
            format!(
                "oci://127.0.0.1:5000/team/forward:{}.sig",
                DIGEST.replace(':', "-")
            )
        );
        assert_eq!(
            tagged.at(DIGEST).to_string(),
            format!("oci://127.0.0.1:5000/team/forward@{DIGEST}")
        );
    }

    #[test]
    fn a_reference_without_a_registry_or_with_a_bad_digest_is_refused() {
        for bad in [
            "forward:1",
            "oci://team/forward:1",
            "oci://ghcr.io/forward@sha256:12",
        ] {
            let error = bad.parse::<PluginRef>().unwrap_err().to_string();
            assert!(error.contains(bad.trim_start_matches(SCHEME)), "{error}");
        }
    }
}
