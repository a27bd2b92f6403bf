//! A real OCI registry for the tests: Debian's `docker-registry` (the CNCF Distribution
//! registry), on a free port, storing blobs in a temporary folder, without authentication.
//! It can be stopped and started again on the same port and storage, to test a host that
//! outlives its registry, and its stored blobs can be read and overwritten, to test
//! tampering.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::process::{Child, Command};

use crate::free_port;

/// Where Debian installs the registry.
const BINARY: &str = "docker-registry";
/// How long the registry may take to answer `GET /v2/`.
const START_DEADLINE: Duration = Duration::from_secs(15);

/// A running registry.
pub struct RegistryServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl RegistryServer {
    /// Starts a registry on a free port; fails with how to install it if it is missing.
    pub async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("registry-test-")
            .tempdir()
            .context("creating the registry's folder")?;
        let mut server = Self {
            child: None,
            port: free_port()?,
            dir,
        };
        server.launch().await?;
        Ok(server)
    }

    /// `127.0.0.1:PORT`: the registry part of references.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `oci://127.0.0.1:PORT/REPOSITORY_AND_TAG`.
    pub fn reference(&self, path: &str) -> String {
        format!("oci://{}/{path}", self.address())
    }

    /// Stops the registry (its storage stays).
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await.context("stopping docker-registry")?;
        }
        Ok(())
    }

    /// Starts it again on the same port and storage.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await?;
        self.launch().await
    }

    /// The stored file of blob `digest` (`sha256:HEX`).
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        let config = self.dir.path().join("config.yml");
        std::fs::write(
            &config,
            config_text(&self.dir.path().join("storage"), self.port),
        )?;
        let log = std::fs::File::create(self.dir.path().join("registry.log"))?;
        let child = Command::new(BINARY)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {BINARY}: is it installed? (apt-get install docker-registry; \
                     .ci/run installs it)"
                )
            })?;
        self.child = Some(child);
        let url = format!("http://{}/v2/", self.address());
        let started = Instant::now();
        loop {
            if let Ok(response) = reqwest::get(&url).await
                && response.status().is_success()
            {
                return Ok(());
            }
            if started.elapsed() > START_DEADLINE {
                let log = std::fs::read_to_string(self.dir.path().join("registry.log"))
                    .unwrap_or_default();
                bail!("docker-registry did not answer {url} within {START_DEADLINE:?}:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The registry's configuration: filesystem storage, HTTP on loopback, deletes allowed.
fn config_text(storage: &Path, port: u16) -> String {
    format!(
        "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  \
         delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
        storage.display()
    )
}

/// An ECDSA P-256 key pair like those `cosign generate-key-pair` makes, derived from a seed
/// so that tests are repeatable.
pub struct SigningKey(p256::ecdsa::SigningKey);

impl SigningKey {
    /// The key pair of `seed` (any seed from 1 on gives a valid key).
    pub fn from_seed(seed: u8) -> Self {
        let mut secret = [0u8; 32];
        secret[31] = seed.max(1);
        secret[0] = 0x42;
        Self(p256::ecdsa::SigningKey::from_bytes(&secret.into()).expect("a valid P-256 scalar"))
    }

    /// The public key as PEM, as in `cosign.pub`.
    pub fn public_pem(&self) -> String {
        use p256::pkcs8::EncodePublicKey as _;
        self.0
            .verifying_key()
            .to_public_key_pem(p256::pkcs8::LineEnding::LF)
            .expect("encoding a P-256 public key")
    }

    /// The base64 DER signature of `bytes`, as `cosign sign-blob` writes it.
    pub fn sign(&self, bytes: &[u8]) -> String {
        use base64::Engine as _;
        use p256::ecdsa::signature::Signer as _;
        let signature: p256::ecdsa::Signature = self.0.sign(bytes);
        base64::engine::general_purpose::STANDARD.encode(signature.to_der().as_bytes())
    }
}

impl RegistryServer {
    /// Signs `digest` in `repository` the way `cosign sign --key` does: a simple-signing
    /// payload naming the digest, pushed as the one layer of the `sha256-HEX.sig` tag, with
    /// its signature in the layer's annotation. Signing again adds nothing: the tag is
    /// replaced.
    pub async fn sign(
        &self,
        repository: &str,
        digest: &str,
        key: &SigningKey,
    ) -> anyhow::Result<()> {
        use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
        let payload = serde_json::to_vec(&serde_json::json!({
            "critical": {
                "identity": {"docker-reference": format!("{}/{repository}", self.address())},
                "image": {"docker-manifest-digest": digest},
                "type": "cosign container image signature",
            },
            "optional": null,
        }))?;
        let annotations = std::collections::BTreeMap::from([(
            "dev.cosignproject.cosign/signature".to_owned(),
            key.sign(&payload),
        )]);
        let layer = ImageLayer::new(
            payload,
            "application/vnd.dev.cosign.simplesigning.v1+json".to_owned(),
            Some(annotations),
        );
        let config = Config::new(
            b"{}".to_vec(),
            "application/vnd.oci.image.config.v1+json".to_owned(),
            None,
        );
        let reference = oci_client::Reference::with_tag(
            self.address(),
            repository.to_owned(),
            format!("{}.sig", digest.replacen(':', "-", 1)),
        );
        let client = oci_client::Client::new(ClientConfig {
            protocol: ClientProtocol::Http,
            ..ClientConfig::default()
        });
        client
            .push(
                &reference,
                &[layer],
                config,
                &oci_client::secrets::RegistryAuth::Anonymous,
                None,
            )
            .await
            .with_context(|| format!("pushing the signature of {digest}"))?;
        Ok(())
    }
}
