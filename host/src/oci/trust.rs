//! Whether a plugin component may load: the trust policy and its verdicts.
//!
//! A [`Policy`] holds the public keys whose signatures are trusted and the digests pinned in
//! `plugins.allowed_digests`. It answers for two kinds of component, each time with a
//! [`Verdict`] that says why the component was accepted (for logs and `/plugins`) or a
//! [`Refusal`] that names the digest and what is missing:
//!
//! - [`Policy::check_registry`]: a component pulled from an OCI registry, with the
//!   signatures the caller found in its cosign signature artifact (`sha256-HEX.sig`);
//! - [`Policy::check_file`]: a component dropped into the plugins folder, with the text of
//!   its sibling `NAME.wasm.sig`, if there is one.
//!
//! With no keys and no allowed digests the policy is open and every component loads (the
//! default). With keys and allowed digests both configured, either one suffices: a pinned
//! digest loads unsigned, and a component signed by a trusted key loads unpinned.
//!
//! # Formats
//!
//! These are cosign's, with the ECDSA P-256 keys `cosign generate-key-pair` makes:
//!
//! - A public key is PEM `-----BEGIN PUBLIC KEY-----` around a DER SubjectPublicKeyInfo
//!   (`cosign.pub`).
//! - A signature is the standard, padded base64 of an ASN.1 DER ECDSA signature over the
//!   SHA-256 of the signed bytes.
//! - `cosign sign --key cosign.key REGISTRY/REPO@sha256:D` pushes a manifest tagged
//!   `sha256-D.sig`; each of its layers of media type [`SIMPLE_SIGNING_MEDIA_TYPE`] is a
//!   "simple signing" JSON payload whose `critical.image.docker-manifest-digest` is
//!   `sha256:D` and whose `critical.type` is [`COSIGN_SIGNATURE_TYPE`], and carries its
//!   signature over the exact payload bytes in the annotation [`SIGNATURE_ANNOTATION`].
//! - `cosign sign-blob --key cosign.key NAME.wasm --output-signature NAME.wasm.sig` writes
//!   the signature of the file's bytes, as above, alone in the file.
//!
//! Cosign 3 writes a newer format by default (a Sigstore bundle, attached to the image as an
//! OCI referrer or written with `--bundle`), which this module does not read. Signing with
//! `--new-bundle-format=false --use-signing-config=false` gives the formats above, as
//! cosign 2 does by default.
//!
//! # What this module never does
//!
//! It reads no file and opens no connection: the caller fetches the signature artifact and
//! reads the files. It never parses a payload's JSON before the payload's signature has
//! verified with a trusted key, so unsigned bytes reach no parser but base64 and DER.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use p256::ecdsa::signature::hazmat::PrehashVerifier as _;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::DecodePublicKey as _;
use p256::pkcs8::spki;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

/// Media type of a cosign signature layer: its blob is a simple-signing payload.
pub const SIMPLE_SIGNING_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";

/// Annotation of a cosign signature layer that holds the base64 signature of its payload.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";

/// Value of `critical.type` in the payload of a cosign container image signature.
pub const COSIGN_SIGNATURE_TYPE: &str = "cosign container image signature";

/// The configuration key of the pinned digests, as refusals name it.
const ALLOWED_DIGESTS_KEY: &str = "plugins.allowed_digests";

/// Digests are SHA-256 only: the algorithm registries and cosign use in practice.
const SHA256_PREFIX: &str = "sha256:";

/// Hexadecimal digits in a SHA-256 digest.
const SHA256_HEX_DIGITS: usize = 64;

/// A SHA-256 digest in its canonical text form, `sha256:` and 64 lowercase hexadecimal
/// digits, as OCI registries and cosign write it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

/// A digest that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{given:?} is not a digest (sha256: followed by 64 hexadecimal digits): {why}")]
pub struct BadDigest {
    given: String,
    why: &'static str,
}

impl Digest {
    /// The digest of `bytes`.
    pub fn of_bytes(bytes: &[u8]) -> Digest {
        Digest::from_sha256(&sha256(bytes))
    }

    /// The whole digest, `sha256:HEX`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 64 hexadecimal digits after `sha256:`.
    pub fn hex(&self) -> &str {
        &self.0[SHA256_PREFIX.len()..]
    }

    /// The tag under which cosign stores the signatures of this digest: `sha256-HEX.sig`.
    pub fn signature_tag(&self) -> String {
        format!("sha256-{}.sig", self.hex())
    }

    fn from_sha256(hash: &[u8; 32]) -> Digest {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut text = String::with_capacity(SHA256_PREFIX.len() + SHA256_HEX_DIGITS);
        text.push_str(SHA256_PREFIX);
        for byte in hash {
            text.push(char::from(DIGITS[usize::from(byte >> 4)]));
            text.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
        }
        Digest(text)
    }
}

impl FromStr for Digest {
    type Err = BadDigest;

    /// Reads `sha256:HEX`. Surrounding whitespace and upper case are accepted and
    /// normalised away, since a digest pasted into configuration often carries both.
    fn from_str(given: &str) -> Result<Self, Self::Err> {
        let bad = |why| BadDigest {
            given: given.to_owned(),
            why,
        };
        let text = given.trim().to_ascii_lowercase();
        let Some(hex) = text.strip_prefix(SHA256_PREFIX) else {
            return Err(bad("it must start with sha256:"));
        };
        if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("it has a character that is not a hexadecimal digit"));
        }
        if hex.len() != SHA256_HEX_DIGITS {
            return Err(bad("it does not have exactly 64 hexadecimal digits"));
        }
        Ok(Digest(text))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One signature from a cosign signature artifact: a layer's blob and its annotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrySignature {
    /// The layer's blob, exactly as the registry served it: the signature covers these bytes.
    pub payload: Vec<u8>,
    /// The layer's [`SIGNATURE_ANNOTATION`]: base64 of the DER signature. A layer without
    /// the annotation may be passed with an empty string; it counts as a bad signature.
    pub signature: String,
}

impl RegistrySignature {
    /// A signature layer from its blob and its signature annotation.
    pub fn new(payload: impl Into<Vec<u8>>, signature: impl Into<String>) -> Self {
        Self {
            payload: payload.into(),
            signature: signature.into(),
        }
    }
}

/// A public key whose signatures the policy trusts, with the label that names it.
#[derive(Debug, Clone)]
struct TrustedKey {
    label: String,
    key: VerifyingKey,
}

/// What may load: the trusted keys and the allowed digests. The default is open.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    keys: Vec<TrustedKey>,
    allowed_digests: Vec<Digest>,
}

/// A trust policy that cannot be built; it lists every problem found, not just the first.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the plugin trust policy is invalid: {}", join_problems(.problems))]
pub struct PolicyError {
    problems: Vec<PolicyProblem>,
}

/// One unusable entry of a trust policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyProblem {
    /// A trusted key that cannot be read as an ECDSA P-256 public key.
    #[error("trusted key {label} is unusable: {why}")]
    BadKey {
        /// The label the caller gave the key (its file, or its place in the configuration).
        label: String,
        /// Why it cannot be used.
        why: String,
    },
    /// An allowed digest that is not `sha256:` and 64 hexadecimal digits.
    #[error("{ALLOWED_DIGESTS_KEY}[{index}] is unusable: {error}")]
    BadDigest {
        /// Its index in the list.
        index: usize,
        /// What is wrong with it.
        error: BadDigest,
    },
}

impl PolicyError {
    /// Every problem found, in the order of the keys then the digests.
    pub fn problems(&self) -> &[PolicyProblem] {
        &self.problems
    }
}

fn join_problems(problems: &[PolicyProblem]) -> String {
    let texts: Vec<String> = problems.iter().map(ToString::to_string).collect();
    texts.join("; ")
}

/// Why a component was accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The policy has no keys and no allowed digests, so every component loads.
    Open,
    /// A signature by this trusted key covers the component.
    Signed {
        /// The label of the key that verified the signature.
        key: String,
    },
    /// This digest of the component is in `plugins.allowed_digests`.
    AllowedDigest {
        /// The digest that matched: for a registry component, its manifest's or its
        /// content's.
        digest: Digest,
    },
}

impl Verdict {
    /// A stable short name for a metric label: `open`, `signed` or `allowed_digest`.
    pub fn kind(&self) -> &'static str {
        match self {
            Verdict::Open => "open",
            Verdict::Signed { .. } => "signed",
            Verdict::AllowedDigest { .. } => "allowed_digest",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Open => write!(f, "no trusted keys or allowed digests are configured"),
            Verdict::Signed { key } => write!(f, "signed by trusted key {key}"),
            Verdict::AllowedDigest { digest } => write!(f, "{digest} is in {ALLOWED_DIGESTS_KEY}"),
        }
    }
}

/// Where a component came from, which says where its signature should have been.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Pulled from an OCI registry: its signatures are under its `sha256-HEX.sig` tag.
    Registry,
    /// Found in the plugins folder: its signature is the sibling `NAME.wasm.sig` file.
    Folder,
}

/// Why a component may not load. Each names the digest and what is missing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Keys are configured, the component has no signature, and its digest is not allowed.
    #[error(
        "component {digest} is not signed: {} and it is not in {ALLOWED_DIGESTS_KEY}",
        missing_signature(.digest, *.origin)
    )]
    Unsigned {
        /// The digest a signature should cover.
        digest: Digest,
        /// Where the signature was looked for.
        origin: Origin,
    },
    /// No keys are configured and the component's digest is not allowed.
    #[error(
        "component {digest}{} is not in {ALLOWED_DIGESTS_KEY}, and no trusted keys are \
         configured to check a signature",
        content_note(.content)
    )]
    NotAllowed {
        /// The component's digest: for a registry component, its manifest's.
        digest: Digest,
        /// For a registry component, the digest of its content (the wasm layer).
        content: Option<Digest>,
    },
    /// No signature verifies with a trusted key, and at least one is well formed: it was made
    /// with another key, or what it signed was altered afterwards. ECDSA cannot tell these
    /// two apart.
    #[error(
        "component {digest} is not signed by a trusted key: none of its {signatures} \
         signature(s) verifies with the {keys} trusted key(s); it was signed with another key, \
         or what was signed has been altered since"
    )]
    UnknownKey {
        /// The component's digest.
        digest: Digest,
        /// How many signatures were checked.
        signatures: usize,
        /// How many trusted keys each was checked against.
        keys: usize,
    },
    /// A signature that cannot be used: not base64, not a DER ECDSA signature, or (signed by
    /// a trusted key) a payload that is not a cosign container image signature.
    #[error("component {digest} has no usable signature: {why}")]
    BadSignature {
        /// The component's digest.
        digest: Digest,
        /// Which signature, and what is wrong with it.
        why: String,
    },
    /// A trusted key signed a payload for another digest: the signature is genuine but it
    /// does not cover this component.
    #[error(
        "component {digest} is not covered by its signature: trusted key {key} signed \
         {signed:?} instead"
    )]
    DigestMismatch {
        /// The component's digest.
        digest: Digest,
        /// The label of the key that made the signature.
        key: String,
        /// The digest the signed payload names.
        signed: String,
    },
}

impl Refusal {
    /// A stable short name for a metric label: `unsigned`, `not_allowed`, `unknown_key`,
    /// `bad_signature` or `digest_mismatch`.
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::Unsigned { .. } => "unsigned",
            Refusal::NotAllowed { .. } => "not_allowed",
            Refusal::UnknownKey { .. } => "unknown_key",
            Refusal::BadSignature { .. } => "bad_signature",
            Refusal::DigestMismatch { .. } => "digest_mismatch",
        }
    }

    /// The digest of the refused component (for a registry component, its manifest's).
    pub fn digest(&self) -> &Digest {
        match self {
            Refusal::Unsigned { digest, .. }
            | Refusal::NotAllowed { digest, .. }
            | Refusal::UnknownKey { digest, .. }
            | Refusal::BadSignature { digest, .. }
            | Refusal::DigestMismatch { digest, .. } => digest,
        }
    }
}

fn missing_signature(digest: &Digest, origin: Origin) -> String {
    match origin {
        Origin::Registry => format!("no {} signature found", digest.signature_tag()),
        Origin::Folder => "no NAME.wasm.sig signature file found beside it".to_owned(),
    }
}

fn content_note(content: &Option<Digest>) -> String {
    content
        .as_ref()
        .map(|content| format!(" (content {content})"))
        .unwrap_or_default()
}

impl Policy {
    /// Builds a policy from `(label, PEM)` public keys and allowed digest strings.
    ///
    /// The label names a key in errors and verdicts (its file, say). Every unusable key and
    /// digest is reported at once, each named. No keys and no digests give the open policy.
    pub fn new(keys: &[(String, String)], allowed: &[String]) -> Result<Policy, PolicyError> {
        let mut problems = Vec::new();
        let mut policy = Policy::default();
        for (label, pem) in keys {
            match parse_public_key(pem) {
                Ok(key) => policy.keys.push(TrustedKey {
                    label: label.clone(),
                    key,
                }),
                Err(why) => problems.push(PolicyProblem::BadKey {
                    label: label.clone(),
                    why,
                }),
            }
        }
        for (index, given) in allowed.iter().enumerate() {
            match given.parse::<Digest>() {
                Ok(digest) => policy.allowed_digests.push(digest),
                Err(error) => problems.push(PolicyProblem::BadDigest { index, error }),
            }
        }
        if problems.is_empty() {
            Ok(policy)
        } else {
            Err(PolicyError { problems })
        }
    }

    /// Whether every component loads: no trusted keys and no allowed digests.
    pub fn is_open(&self) -> bool {
        self.keys.is_empty() && self.allowed_digests.is_empty()
    }

    /// The labels of the trusted keys, in the order given.
    pub fn key_labels(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|key| key.label.as_str())
    }

    /// The allowed digests, normalised, in the order given.
    pub fn allowed_digests(&self) -> &[Digest] {
        &self.allowed_digests
    }

    /// Decides on a component pulled from a registry.
    ///
    /// `manifest_digest` is the digest of its OCI manifest, which cosign signs;
    /// `content_digest` is the digest of its wasm layer. An allowed digest may match either.
    /// `signatures` are the layers of the `sha256-HEX.sig` artifact of `manifest_digest`
    /// (empty if there is none); one signature by a trusted key, over a payload naming
    /// `manifest_digest`, suffices. When none does, the refusal is the one of the signature
    /// that came closest: a trusted key's signature for another digest, then a trusted key's
    /// unusable payload, then a signature by an unknown key, then a malformed one.
    pub fn check_registry(
        &self,
        manifest_digest: &Digest,
        content_digest: &Digest,
        signatures: &[RegistrySignature],
    ) -> Result<Verdict, Refusal> {
        if self.is_open() {
            return Ok(Verdict::Open);
        }
        if let Some(digest) = [manifest_digest, content_digest]
            .into_iter()
            .find(|digest| self.allows(digest))
        {
            return Ok(Verdict::AllowedDigest {
                digest: digest.clone(),
            });
        }
        if self.keys.is_empty() {
            return Err(Refusal::NotAllowed {
                digest: manifest_digest.clone(),
                content: Some(content_digest.clone()),
            });
        }
        let mut closest: Option<(usize, Failure)> = None;
        for (index, signature) in signatures.iter().enumerate() {
            match self.check_registry_signature(manifest_digest, signature) {
                Ok(key) => {
                    return Ok(Verdict::Signed {
                        key: key.label.clone(),
                    });
                }
                Err(failure) => {
                    if closest
                        .as_ref()
                        .is_none_or(|(_, best)| failure.closeness() > best.closeness())
                    {
                        closest = Some((index, failure));
                    }
                }
            }
        }
        Err(match closest {
            None => Refusal::Unsigned {
                digest: manifest_digest.clone(),
                origin: Origin::Registry,
            },
            Some((index, failure)) => {
                self.registry_refusal(manifest_digest, index, signatures.len(), failure)
            }
        })
    }

    /// Decides on a component found in the plugins folder, from its bytes and the text of
    /// its sibling `NAME.wasm.sig` (cosign `sign-blob` output), if there is one.
    ///
    /// An allowed digest matches the SHA-256 of `content`; otherwise the signature must
    /// verify over `content` with a trusted key. Whitespace and line breaks in the signature
    /// text are ignored. A genuine signature of other bytes cannot be told from one by an
    /// unknown key, so both are refused as `unknown_key`.
    pub fn check_file(
        &self,
        content: &[u8],
        blob_signature: Option<&str>,
    ) -> Result<Verdict, Refusal> {
        if self.is_open() {
            return Ok(Verdict::Open);
        }
        let hash = sha256(content);
        let digest = Digest::from_sha256(&hash);
        if self.allows(&digest) {
            return Ok(Verdict::AllowedDigest { digest });
        }
        if self.keys.is_empty() {
            return Err(Refusal::NotAllowed {
                digest,
                content: None,
            });
        }
        let Some(text) = blob_signature else {
            return Err(Refusal::Unsigned {
                digest,
                origin: Origin::Folder,
            });
        };
        let signature = match decode_signature(text) {
            Ok(signature) => signature,
            Err(why) => {
                return Err(Refusal::BadSignature {
                    digest,
                    why: format!("its .sig file {why}"),
                });
            }
        };
        match self.signer_of(&hash, &signature) {
            Some(key) => Ok(Verdict::Signed {
                key: key.label.clone(),
            }),
            None => Err(Refusal::UnknownKey {
                digest,
                signatures: 1,
                keys: self.keys.len(),
            }),
        }
    }

    fn allows(&self, digest: &Digest) -> bool {
        self.allowed_digests.contains(digest)
    }

    /// The trusted key whose signature over the SHA-256 `prehash` is `signature`, if any.
    fn signer_of(&self, prehash: &[u8; 32], signature: &Signature) -> Option<&TrustedKey> {
        self.keys
            .iter()
            .find(|trusted| trusted.key.verify_prehash(prehash, signature).is_ok())
    }

    /// Checks one signature layer: the signature first, and only then what it signed.
    fn check_registry_signature(
        &self,
        manifest_digest: &Digest,
        layer: &RegistrySignature,
    ) -> Result<&TrustedKey, Failure> {
        let signature = decode_signature(&layer.signature).map_err(Failure::Malformed)?;
        let key = self
            .signer_of(&sha256(&layer.payload), &signature)
            .ok_or(Failure::NoTrustedKey)?;
        let bad_payload = |why: String| Failure::BadPayload {
            key: key.label.clone(),
            why,
        };
        let claim = serde_json::from_slice::<SimpleSigning>(&layer.payload)
            .map_err(|error| bad_payload(format!("it is not simple-signing JSON: {error}")))?
            .critical;
        if claim.kind != COSIGN_SIGNATURE_TYPE {
            return Err(bad_payload(format!(
                "its critical.type is {:?}, not {COSIGN_SIGNATURE_TYPE:?}",
                claim.kind
            )));
        }
        // Compared as text, not parsed: cosign writes the canonical form, and a payload that
        // spells the digest any other way was not made for this manifest by cosign.
        if claim.image.docker_manifest_digest != manifest_digest.as_str() {
            return Err(Failure::OtherDigest {
                key: key.label.clone(),
                signed: claim.image.docker_manifest_digest,
            });
        }
        Ok(key)
    }

    fn registry_refusal(
        &self,
        digest: &Digest,
        index: usize,
        count: usize,
        failure: Failure,
    ) -> Refusal {
        let digest = digest.clone();
        let which = format!("signature {} of {count}", index + 1);
        match failure {
            Failure::Malformed(why) => Refusal::BadSignature {
                digest,
                why: format!("{which} {why}"),
            },
            Failure::NoTrustedKey => Refusal::UnknownKey {
                digest,
                signatures: count,
                keys: self.keys.len(),
            },
            Failure::BadPayload { key, why } => Refusal::BadSignature {
                digest,
                why: format!("{which} is by trusted key {key}, but its payload is unusable: {why}"),
            },
            Failure::OtherDigest { key, signed } => Refusal::DigestMismatch {
                digest,
                key,
                signed,
            },
        }
    }
}

/// Why one registry signature did not accept the component.
#[derive(Debug)]
enum Failure {
    /// Not base64, or not a DER ECDSA signature.
    Malformed(String),
    /// Well formed, but no trusted key verifies it.
    NoTrustedKey,
    /// Verified by a trusted key, but the payload is not a cosign image signature.
    BadPayload { key: String, why: String },
    /// Verified by a trusted key, for another digest.
    OtherDigest { key: String, signed: String },
}

impl Failure {
    /// How far the signature got; the refusal reports the one that got furthest, since it
    /// says most about what went wrong.
    fn closeness(&self) -> u8 {
        match self {
            Failure::Malformed(_) => 0,
            Failure::NoTrustedKey => 1,
            Failure::BadPayload { .. } => 2,
            Failure::OtherDigest { .. } => 3,
        }
    }
}

/// The parts of a simple-signing payload that are checked. Other fields (the claimed
/// `identity`, the `optional` claims) are ignored, as cosign ignores them.
#[derive(Deserialize)]
struct SimpleSigning {
    critical: Critical,
}

#[derive(Deserialize)]
struct Critical {
    image: SignedImage,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct SignedImage {
    #[serde(rename = "docker-manifest-digest")]
    docker_manifest_digest: String,
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Reads a cosign signature: standard padded base64 of an ASN.1 DER ECDSA signature. Line
/// breaks anywhere and whitespace around it are ignored, as cosign's own decoder ignores
/// line breaks and a `.sig` file usually ends with one.
fn decode_signature(text: &str) -> Result<Signature, String> {
    let compact: String = text
        .trim()
        .chars()
        .filter(|c| *c != '\n' && *c != '\r')
        .collect();
    if compact.is_empty() {
        return Err("is empty".to_owned());
    }
    let der = BASE64
        .decode(compact.as_bytes())
        .map_err(|error| format!("is not base64: {error}"))?;
    Signature::from_der(&der).map_err(|_| "is not an ECDSA P-256 signature in ASN.1 DER".to_owned())
}

/// Reads a `cosign.pub`: PEM SubjectPublicKeyInfo of an ECDSA P-256 key.
fn parse_public_key(pem: &str) -> Result<VerifyingKey, String> {
    let pem = pem.trim().replace("\r\n", "\n");
    if pem.contains("PRIVATE KEY-----") {
        return Err("it is a private key; give its public key (cosign.pub)".to_owned());
    }
    if !pem.starts_with("-----BEGIN PUBLIC KEY-----") {
        return Err(
            "it is not a PEM public key: it must start with -----BEGIN PUBLIC KEY----- as \
             cosign.pub does"
                .to_owned(),
        );
    }
    VerifyingKey::from_public_key_pem(&pem).map_err(|error| match error {
        // This error names the OID that was expected, not the one found: say it plainly.
        spki::Error::OidUnknown { .. } => {
            "it is not an ECDSA P-256 key, the only kind supported (cosign generate-key-pair \
             makes those)"
                .to_owned()
        }
        other => format!("it is not a valid public key: {other}"),
    })
}

#[cfg(test)]
mod tests {
    use p256::ecdsa::SigningKey;
    use p256::ecdsa::signature::Signer as _;
    use p256::pkcs8::{EncodePublicKey as _, LineEnding};

    use super::*;

    const MANIFEST: &str =
        "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const CONTENT: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
    const OTHER: &str = "sha256:3333333333333333333333333333333333333333333333333333333333333333";

    /// A deterministic key, so a failing test fails the same way every run.
    fn signing_key(seed: &str) -> SigningKey {
        SigningKey::from_slice(&sha256(seed.as_bytes())).expect("a valid scalar")
    }

    fn public_pem(key: &SigningKey) -> String {
        key.verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .expect("a PEM public key")
    }

    fn sign(key: &SigningKey, message: &[u8]) -> String {
        let signature: Signature = key.sign(message);
        BASE64.encode(signature.to_der().as_bytes())
    }

    /// A payload as cosign writes it: compact JSON, keys in this order.
    fn simple_signing(digest: &str) -> Vec<u8> {
        format!(
            r#"{{"critical":{{"identity":{{"docker-reference":"registry.test/team/forward"}},"image":{{"docker-manifest-digest":"{digest}"}},"type":"cosign container image signature"}},"optional":null}}"#
        )
        .into_bytes()
    }

    fn digest(text: &str) -> Digest {
        text.parse().expect("a valid digest")
    }

    fn policy(keys: &[(&str, &SigningKey)], allowed: &[&str]) -> Policy {
        let keys: Vec<(String, String)> = keys
            .iter()
            .map(|(label, key)| (label.to_string(), public_pem(key)))
            .collect();
        let allowed: Vec<String> = allowed.iter().map(|d| d.to_string()).collect();
        Policy::new(&keys, &allowed).expect("a valid policy")
    }

    fn check(policy: &Policy, signatures: &[RegistrySignature]) -> Result<Verdict, Refusal> {
        policy.check_registry(&digest(MANIFEST), &digest(CONTENT), signatures)
    }

    fn signed_layer(key: &SigningKey, payload: Vec<u8>) -> RegistrySignature {
        let signature = sign(key, &payload);
        RegistrySignature::new(payload, signature)
    }

    #[test]
    fn a_registry_signature_by_a_trusted_key_is_accepted_and_names_the_key() {
        let team = signing_key("team");
        let ops = signing_key("ops");
        let policy = policy(&[("team.pub", &team), ("ops.pub", &ops)], &[]);
        let verdict = check(&policy, &[signed_layer(&ops, simple_signing(MANIFEST))]).unwrap();
        assert_eq!(
            verdict,
            Verdict::Signed {
                key: "ops.pub".into()
            }
        );
        assert_eq!(verdict.kind(), "signed");
        assert_eq!(verdict.to_string(), "signed by trusted key ops.pub");
    }

    #[test]
    fn one_valid_layer_among_bad_ones_suffices() {
        let team = signing_key("team");
        let stranger = signing_key("stranger");
        let policy = policy(&[("team.pub", &team)], &[]);
        let layers = [
            RegistrySignature::new(simple_signing(MANIFEST), "not base64!"),
            signed_layer(&stranger, simple_signing(MANIFEST)),
            signed_layer(&team, simple_signing(OTHER)),
            signed_layer(&team, simple_signing(MANIFEST)),
        ];
        assert_eq!(check(&policy, &layers).unwrap().kind(), "signed");
    }

    #[test]
    fn a_payload_for_another_digest_is_a_digest_mismatch() {
        let team = signing_key("team");
        let policy = policy(&[("team.pub", &team)], &[]);
        let refusal = check(&policy, &[signed_layer(&team, simple_signing(OTHER))]).unwrap_err();
        assert_eq!(refusal.kind(), "digest_mismatch");
        let message = refusal.to_string();
        assert!(
            message.contains(MANIFEST) && message.contains(OTHER),
            "{message}"
        );
        assert!(message.contains("team.pub"), "{message}");

        // A signature of the content digest does not count: cosign signs the manifest.
        let refusal = check(&policy, &[signed_layer(&team, simple_signing(CONTENT))]).unwrap_err();
        assert_eq!(refusal.kind(), "digest_mismatch");
    }

    #[test]
    fn a_digest_spelled_otherwise_than_cosign_writes_it_is_a_digest_mismatch() {
        let team = signing_key("team");
        let policy = policy(&[("team.pub", &team)], &[]);
        let shouting = MANIFEST.to_ascii_uppercase();
        let refusal =
            check(&policy, &[signed_layer(&team, simple_signing(&shouting))]).unwrap_err();
        assert_eq!(refusal.kind(), "digest_mismatch");
    }

    #[test]
    fn a_signature_by_a_key_not_in_the_policy_is_unknown_key() {
        let team = signing_key("team");
        let stranger = signing_key("stranger");
        let policy = policy(&[("team.pub", &team)], &[]);
        let refusal = check(
            &policy,
            &[signed_layer(&stranger, simple_signing(MANIFEST))],
        )
        .unwrap_err();
        assert_eq!(refusal.kind(), "unknown_key");
        let message = refusal.to_string();
        assert!(message.contains(MANIFEST), "{message}");
        assert!(message.contains("1 signature(s)") && message.contains("1 trusted key(s)"));
    }

    /// The signature no longer verifies over the altered bytes, with any key; ECDSA cannot
    /// say whether the key or the bytes differ, and the base64 and DER are well formed, so
    /// this is `unknown_key`, not `bad_signature`. The payload's JSON is never read.
    #[test]
    fn a_tampered_payload_is_unknown_key() {
        let team = signing_key("team");
        let policy = policy(&[("team.pub", &team)], &[]);
        let mut layer = signed_layer(&team, simple_signing(OTHER));
        layer.payload = simple_signing(MANIFEST);
        let refusal = check(&policy, &[layer]).unwrap_err();
        assert_eq!(refusal.kind(), "unknown_key");
        assert!(refusal.to_string().contains("altered"), "{refusal}");
    }

    #[test]
    fn no_signatures_is_unsigned_and_says_where_they_were_looked_for() {
        let team = signing_key("team");
        let policy = policy(&[("team.pub", &team)], &[OTHER]);
        let refusal = check(&policy, &[]).unwrap_err();
        assert_eq!(refusal.kind(), "unsigned");
        assert_eq!(refusal.digest(), &digest(MANIFEST));
        let hex = &MANIFEST["sha256:".len()..];
        assert_eq!(
            refusal.to_string(),
            format!(
                "component {MANIFEST} is not signed: no sha256-{hex}.sig signature found and it \
                 is not in plugins.allowed_digests"
            )
        );
    }

    #[test]
    fn malformed_base64_or_der_is_bad_signature() {
        let team = signing_key("team");
        let policy = policy(&[("team.pub", &team)], &[]);
        let not_der = BASE64.encode(b"this is not DER");
        for (text, expected) in [
            ("", "is empty"),
            ("MEUCIQ*", "is not base64"),
            (
                not_der.as_str(),
                "is not an ECDSA P-256 signature in ASN.1 DER",
            ),
        ] {
            let layer = RegistrySignature::new(simple_signing(MANIFEST), text);
            let refusal = check(&policy, &[layer]).unwrap_err();
            assert_eq!(refusal.kind(), "bad_signature", "{text:?}");
            let message = refusal.to_string();
            assert!(
                message.contains(expected) && message.contains(MANIFEST),
                "{message}"
            );
            assert!(message.contains("signature 1 of 1"), "{message}");
        }
    }

    #[test]
    fn a_trusted_signature_over_a_payload_that_is_no_image_signature_is_bad_signature() {
        let team = signing_key("team");
        let policy = policy(&[("team.pub", &team)], &[]);
        let wrong_type = String::from_utf8(simple_signing(MANIFEST))
            .unwrap()
            .replace(COSIGN_SIGNATURE_TYPE, "something else");
        for (payload, expected) in [
            (b"not json".to_vec(), "is not simple-signing JSON"),
            (br#"{"critical":{}}"#.to_vec(), "is not simple-signing JSON"),
            (wrong_type.into_bytes(), "critical.type"),
        ] {
            let refusal = check(&policy, &[signed_layer(&team, payload)]).unwrap_err();
            assert_eq!(refusal.kind(), "bad_signature");
            let message = refusal.to_string();
            assert!(
                message.contains(expected) && message.contains("team.pub"),
                "{message}"
            );
        }
    }

    #[test]
    fn the_refusal_reports_the_signature_that_came_closest() {
        let team = signing_key("team");
        let stranger = signing_key("stranger");
        let policy = policy(&[("team.pub", &team)], &[]);
        let malformed = RegistrySignature::new(simple_signing(MANIFEST), "@@@@");
        let unknown = signed_layer(&stranger, simple_signing(MANIFEST));
        let mismatch = signed_layer(&team, simple_signing(OTHER));

        let layers = [malformed.clone(), unknown.clone(), mismatch];
        assert_eq!(
            check(&policy, &layers).unwrap_err().kind(),
            "digest_mismatch"
        );
        let refusal = check(&policy, &[malformed.clone(), unknown]).unwrap_err();
        assert_eq!(refusal.kind(), "unknown_key");
        assert!(refusal.to_string().contains("2 signature(s)"), "{refusal}");
        let refusal = check(&policy, &[malformed.clone(), malformed]).unwrap_err();
        assert_eq!(refusal.kind(), "bad_signature");
    }

    #[test]
    fn an_allowed_digest_accepts_without_keys_by_manifest_or_content() {
        for allowed in [MANIFEST, CONTENT] {
            let policy = policy(&[], &[allowed]);
            assert_eq!(
                check(&policy, &[]).unwrap(),
                Verdict::AllowedDigest {
                    digest: digest(allowed)
                }
            );
        }
        let policy = policy(&[], &[OTHER]);
        let refusal = check(&policy, &[]).unwrap_err();
        assert_eq!(refusal.kind(), "not_allowed");
        let message = refusal.to_string();
        assert!(
            message.contains(MANIFEST) && message.contains(CONTENT),
            "{message}"
        );
    }

    #[test]
    fn without_keys_a_signature_does_not_help() {
        let team = signing_key("team");
        let policy = policy(&[], &[OTHER]);
        let refusal = check(&policy, &[signed_layer(&team, simple_signing(MANIFEST))]);
        assert_eq!(refusal.unwrap_err().kind(), "not_allowed");
    }

    #[test]
    fn with_keys_and_digests_either_suffices() {
        let team = signing_key("team");
        let policy = policy(&[("team.pub", &team)], &[CONTENT]);
        assert_eq!(check(&policy, &[]).unwrap().kind(), "allowed_digest");
        let other_content = policy.check_registry(
            &digest(MANIFEST),
            &digest(OTHER),
            &[signed_layer(&team, simple_signing(MANIFEST))],
        );
        assert_eq!(other_content.unwrap().kind(), "signed");
    }

    #[test]
    fn the_default_policy_is_open_and_accepts_everything() {
        let policy = Policy::new(&[], &[]).unwrap();
        assert!(policy.is_open() && Policy::default().is_open());
        assert_eq!(check(&policy, &[]).unwrap(), Verdict::Open);
        assert_eq!(policy.check_file(b"anything", None).unwrap(), Verdict::Open);
        assert_eq!(Verdict::Open.kind(), "open");
    }

    #[test]
    fn a_blob_signature_by_a_trusted_key_is_accepted_around_whitespace() {
        let team = signing_key("team");
        let policy = policy(&[("team.pub", &team)], &[]);
        let wasm = b"\0asm\x0d\0\x01\0 a component";
        let signature = sign(&team, wasm);
        let wrapped = format!("  {}\r\n{}\n", &signature[..40], &signature[40..]);
        for text in [signature.clone(), format!("{signature}\n"), wrapped] {
            let verdict = policy.check_file(wasm, Some(&text)).unwrap();
            assert_eq!(
                verdict,
                Verdict::Signed {
                    key: "team.pub".into()
                }
            );
        }
    }

    /// Go's verifier accepts either of the two equivalent values of s, and cosign does not
    /// normalise the ones it makes, so both must verify here too.
    #[test]
    fn a_signature_with_either_s_is_accepted_as_cosign_accepts_it() {
        let team = signing_key("team");
        let policy = policy(&[("team.pub", &team)], &[]);
        let wasm = b"\0asm either s";
        let signature: Signature = team.sign(wasm);
        let (r, s) = signature.split_scalars();
        let other_s = -*s.as_ref();
        let flipped = Signature::from_scalars(r.to_bytes(), other_s.to_bytes()).unwrap();
        assert_ne!(flipped, signature);
        for signature in [signature, flipped] {
            let text = BASE64.encode(signature.to_der().as_bytes());
            assert_eq!(
                policy.check_file(wasm, Some(&text)).unwrap().kind(),
                "signed"
            );
        }
    }

    #[test]
    fn a_blob_signature_is_refused_like_a_registry_one() {
        let team = signing_key("team");
        let stranger = signing_key("stranger");
        let policy = policy(&[("team.pub", &team)], &[]);
        let wasm = b"\0asm component bytes";
        let file_digest = Digest::of_bytes(wasm);

        let refusal = policy.check_file(wasm, None).unwrap_err();
        assert_eq!(refusal.kind(), "unsigned");
        assert_eq!(refusal.digest(), &file_digest);
        assert!(refusal.to_string().contains("NAME.wasm.sig"), "{refusal}");

        let by_stranger = sign(&stranger, wasm);
        let refusal = policy.check_file(wasm, Some(&by_stranger)).unwrap_err();
        assert_eq!(refusal.kind(), "unknown_key");
        assert!(
            refusal.to_string().contains(file_digest.as_str()),
            "{refusal}"
        );

        let of_other_bytes = sign(&team, b"another component");
        let refusal = policy.check_file(wasm, Some(&of_other_bytes)).unwrap_err();
        assert_eq!(refusal.kind(), "unknown_key");

        let refusal = policy
            .check_file(wasm, Some("not a signature"))
            .unwrap_err();
        assert_eq!(refusal.kind(), "bad_signature");
        assert!(refusal.to_string().contains("its .sig file"), "{refusal}");
    }

    #[test]
    fn a_folder_file_may_be_pinned_instead_of_signed() {
        let wasm = b"\0asm pinned";
        let pinned = Digest::of_bytes(wasm).to_string();
        let policy = policy(&[], &[pinned.as_str()]);
        assert_eq!(
            policy.check_file(wasm, None).unwrap().kind(),
            "allowed_digest"
        );
        let refusal = policy
            .check_file(b"\0asm other", Some("ignored"))
            .unwrap_err();
        assert_eq!(refusal.kind(), "not_allowed");
        assert!(!refusal.to_string().contains("content"), "{refusal}");
    }

    #[test]
    fn unusable_keys_are_named_by_label_all_at_once() {
        let good = public_pem(&signing_key("team"));
        let keys = vec![
            ("keys/good.pub".to_owned(), good.clone()),
            ("keys/garbage.pub".to_owned(), "garbage".to_owned()),
            (
                "keys/cosign.key".to_owned(),
                "-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\nabc\n-----END ENCRYPTED \
                 SIGSTORE PRIVATE KEY-----\n"
                    .to_owned(),
            ),
            ("keys/broken.pub".to_owned(), good.replace("MFkw", "MFkx")),
            ("keys/rsa.pub".to_owned(), RSA_PUBLIC_KEY.to_owned()),
            ("keys/other-curve.pub".to_owned(), other_curve(&good)),
        ];
        let error = Policy::new(&keys, &[]).unwrap_err();
        let labels: Vec<&str> = error
            .problems()
            .iter()
            .map(|problem| match problem {
                PolicyProblem::BadKey { label, .. } => label.as_str(),
                PolicyProblem::BadDigest { .. } => "a digest",
            })
            .collect();
        assert_eq!(
            labels,
            [
                "keys/garbage.pub",
                "keys/cosign.key",
                "keys/broken.pub",
                "keys/rsa.pub",
                "keys/other-curve.pub"
            ]
        );
        let message = error.to_string();
        assert!(message.contains("keys/cosign.key is unusable: it is a private key"));
        assert!(message.contains("keys/broken.pub is unusable: it is not a valid public key"));
        for label in ["keys/rsa.pub", "keys/other-curve.pub"] {
            let expected = format!("{label} is unusable: it is not an ECDSA P-256 key");
            assert!(message.contains(&expected), "{message}");
        }
        assert!(!message.contains("keys/good.pub"), "{message}");
    }

    /// The same key with its curve's OID changed from P-256 (1.2.840.10045.3.1.7) to
    /// 1.2.840.10045.3.1.8: an EC key on a curve this module does not support.
    fn other_curve(pem: &str) -> String {
        let body: String = pem
            .lines()
            .filter(|line| !line.starts_with("-----"))
            .collect();
        let mut der = BASE64.decode(body).unwrap();
        let at = der
            .windows(3)
            .position(|w| w == [0x03, 0x01, 0x07])
            .unwrap();
        der[at + 2] = 0x08;
        let text = BASE64.encode(&der);
        format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n{}\n-----END PUBLIC KEY-----\n",
            &text[..64],
            &text[64..]
        )
    }

    #[test]
    fn a_key_with_crlf_line_ends_and_surrounding_blank_lines_is_read() {
        let pem = format!(
            "\n{}\n",
            public_pem(&signing_key("team")).replace('\n', "\r\n")
        );
        let policy = Policy::new(&[("team.pub".to_owned(), pem)], &[]).unwrap();
        assert_eq!(policy.key_labels().collect::<Vec<_>>(), ["team.pub"]);
    }

    #[test]
    fn unusable_digests_are_named_by_index_and_value() {
        let allowed: Vec<String> = [
            MANIFEST,
            "sha512:abcd",
            "sha256:1234",
            "sha256:zz11111111111111111111111111111111111111111111111111111111111111",
        ]
        .iter()
        .map(|d| d.to_string())
        .collect();
        let error = Policy::new(&[], &allowed).unwrap_err();
        assert_eq!(error.problems().len(), 3);
        let message = error.to_string();
        assert!(message.contains(r#"plugins.allowed_digests[1] is unusable: "sha512:abcd""#));
        assert!(message.contains(r#"plugins.allowed_digests[2] is unusable: "sha256:1234""#));
        assert!(message.contains("plugins.allowed_digests[3]") && message.contains("hexadecimal"));
        assert!(!message.contains("[0]"), "{message}");
    }

    #[test]
    fn digests_are_normalised_and_computed() {
        let pasted = format!("  {}\n", MANIFEST.to_ascii_uppercase());
        let parsed: Digest = pasted.parse().unwrap();
        assert_eq!(parsed.as_str(), MANIFEST);
        assert_eq!(parsed.to_string(), MANIFEST);
        assert_eq!(
            parsed.signature_tag(),
            format!("sha256-{}.sig", &MANIFEST[7..])
        );
        assert_eq!(
            Digest::of_bytes(b"").as_str(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let policy = policy(&[], &[pasted.as_str()]);
        assert_eq!(policy.allowed_digests(), [digest(MANIFEST)]);
    }

    /// A signature not made by this crate: a simple-signing payload in the exact bytes cosign
    /// writes, with its P-256 key and signature, as published in the test data of sigstore-rs
    /// (the Rust Sigstore client), where it stands for cosign's output.
    #[test]
    fn a_genuine_cosign_image_signature_is_accepted() {
        const KEY: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAENptdY/l3nB0yqkXLBWkZWQwo6+cu
OSWS1X9vPavpiQOoTTGC0xX57OojUadxF1cdQmrsiReWg2Wn4FneJfa8xw==
-----END PUBLIC KEY-----";
        const SIGNATURE: &str = "MEUCIQD6q/COgzOyW0YH1Dk+CCYSt4uAhm3FDHUwvPI55zwnlwIgE0ZK58ZOWpZw8YVmBapJhBqCfdPekIknimuO0xH8Jh8=";
        const SIGNED: &str =
            "sha256:f3cfc9d0dbf931d3db4685ec659b7ac68e2a578219da4aae65427886e649b06b";
        let payload = format!(
            r#"{{"critical":{{"identity":{{"docker-reference":"registry-testing.svc.lan/busybox"}},"image":{{"docker-manifest-digest":"{SIGNED}"}},"type":"cosign container image signature"}},"optional":null}}"#
        );
        let policy = Policy::new(&[("cosign.pub".to_owned(), KEY.to_owned())], &[]).unwrap();
        let layer = RegistrySignature::new(payload.clone(), SIGNATURE);
        let verdict = policy.check_registry(&digest(SIGNED), &digest(CONTENT), &[layer]);
        assert_eq!(
            verdict.unwrap(),
            Verdict::Signed {
                key: "cosign.pub".into()
            }
        );

        let altered = RegistrySignature::new(payload.replace("busybox", "busyb0x"), SIGNATURE);
        let refusal = policy.check_registry(&digest(SIGNED), &digest(CONTENT), &[altered]);
        assert_eq!(refusal.unwrap_err().kind(), "unknown_key");
    }

    /// A blob signature from cosign's own test data: a transparency-log entry of the kind
    /// `cosign sign-blob` records (hashedrekord), which holds the key, the signature and the
    /// SHA-256 of the signed file (not the file itself), so the check starts from that hash.
    #[test]
    fn a_genuine_cosign_blob_signature_verifies() {
        const KEY: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEP+DGj/Yu1Nz01eyEhTwt6Oi1YjEc
IgQVpUR7Kf/BfiS3qT1Pl0vXpxZyKfIGK6zXB7iMekDSNwXfV8rIhfvvOg==
-----END PUBLIC KEY-----
";
        const SIGNATURE: &str = "MEQCIDO3XHbLovPWK+bk8ItCig2cwlr/8MXbLvz3UFzxMGIMAiA1lqdM9IqqUvCUqzOjufTq3sKU3qSn7R5tPqPz0ddNwQ==";
        const FILE_SHA256: &str =
            "38152d1dd326af405f899dbcc2ce350b5f16d45df7f23c488f4850afa1cd86d1";
        let policy = Policy::new(&[("release.pub".to_owned(), KEY.to_owned())], &[]).unwrap();
        let signature = decode_signature(&format!("{SIGNATURE}\n")).unwrap();
        let mut hash = from_hex(FILE_SHA256);
        let signer = policy
            .signer_of(&hash, &signature)
            .map(|key| key.label.as_str());
        assert_eq!(signer, Some("release.pub"));
        hash[0] ^= 1;
        assert!(policy.signer_of(&hash, &signature).is_none());
    }

    fn from_hex(text: &str) -> [u8; 32] {
        let mut bytes = [0; 32];
        for (byte, pair) in bytes.iter_mut().zip(text.as_bytes().chunks(2)) {
            *byte = u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap();
        }
        bytes
    }

    /// An RSA public key (from sigstore-rs test data): well-formed PEM, wrong algorithm.
    const RSA_PUBLIC_KEY: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAvM/dHoi6nSy7hbKHLYUr
Xy6Bv35JbdoIzny5vSFiRXApr0KS56U8PugdGmh+vd7H8YNlx2YOJxzv02Blsrcm
WDZcXjE3Xpsi/IHFfRZLOdwwR+u8MNFxwRUVzxyIzKGtbREVVfXPfb2Xc6FL5/tE
vQtUKuR6XdzSaav2RnV5IybCB09s0Np0AUbdi5EfSe4INuqgY+VFYLjvM5onbAQL
N3bFLS4Quk66Dhv93Zi6NwopwL1F07UPC5uadkyePStP3PA0OAOemj9vZADOWx5a
dsGCKISs8iphNC5mDVoLy8Ry49Ms3eQXRjVQOMco3YNf8AhsIdxDNBVN8VTDKVkE
DwIDAQAB
-----END PUBLIC KEY-----";
}
