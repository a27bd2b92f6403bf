//! Throwaway certificates for TLS tests: a CA, a server certificate for 127.0.0.1 and a
//! client certificate, made with the `openssl` command line tool.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, bail};

/// PEM files in a temporary folder, removed on drop.
pub struct TlsFiles {
    dir: tempfile::TempDir,
}

impl TlsFiles {
    /// Makes a CA and the server and client certificates it signs (P-256 keys, valid a day).
    pub fn generate() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("tls-test-").tempdir()?;
        let files = Self { dir };
        files.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=Switchyard test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ])?;
        files.sign(
            "server",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        )?;
        files.sign("client", "extendedKeyUsage=clientAuth\n")?;
        Ok(files)
    }

    /// A key and a certificate signed by the CA, with `extensions` (openssl extension file).
    fn sign(&self, name: &str, extensions: &str) -> anyhow::Result<()> {
        let ext = format!("{name}.ext");
        std::fs::write(self.dir.path().join(&ext), extensions)?;
        let (key, csr, pem) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
        );
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &key,
            "-out",
            &csr,
        ])?;
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &ext,
            "-out",
            &pem,
        ])
    }

    fn openssl(&self, args: &[&str]) -> anyhow::Result<()> {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .context("running openssl (apt-get install openssl)")?;
        if !output.status.success() {
            bail!(
                "openssl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    /// The path of `name` (`ca.pem`, `server.pem`, `server.key`, `client.pem`, `client.key`).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}
