//! A host in a process of its own: `switchyard run` with a configuration file, as an operator
//! runs it. For tests that read what the process writes (its log on stderr, the `stdout`
//! output), or that measure the memory it holds apart from the test process and any other
//! test running beside it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::Context as _;
use serde_json::Value;
use tokio::process::{Child, ChildStderr, ChildStdout};

use crate::memory::ResidentPeak;
use crate::{PATIENCE, RedisServer, compile_cache_dir, copy_plugin, eventually};

/// How to start a [`HostProcess`].
pub struct HostProcessBuilder<'a> {
    redis: &'a RedisServer,
    config: String,
    plugins: Vec<(String, PathBuf, Option<String>)>,
    env: Vec<(String, String)>,
    stdout: bool,
    stderr: bool,
}

impl HostProcessBuilder<'_> {
    /// The configuration file's text. `[redis] url`, `[plugins] dir` and `[admin] listen` are
    /// set by the builder; a `[gateway] listen` of `127.0.0.1:0` becomes a free port (the
    /// process cannot tell the test which port it took). The run's shared compile cache is
    /// used unless `[plugins] compile_cache` is set.
    pub fn config(mut self, toml: &str) -> Self {
        self.config = toml.to_owned();
        self
    }

    /// Installs a built plugin as `NAME.wasm`, with `NAME.toml` if `manifest` is given.
    pub fn plugin(mut self, name: &str, wasm: &str, manifest: Option<&str>) -> Self {
        self.plugins
            .push((name.to_owned(), wasm.into(), manifest.map(str::to_owned)));
        self
    }

    /// Sets an environment variable of the process (`RUST_LOG` is `warn` unless set here).
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Pipes the process's stdout, for [`HostProcess::stdout`].
    pub fn stdout(mut self) -> Self {
        self.stdout = true;
        self
    }

    /// Pipes the process's stderr (its log), for [`HostProcess::stderr`].
    pub fn stderr(mut self) -> Self {
        self.stderr = true;
        self
    }

    /// Starts the process and waits until its plugins are listed on `/plugins` (loaded or
    /// rejected). It is killed when the [`HostProcess`] is dropped.
    pub async fn start(self) -> anyhow::Result<HostProcess> {
        let dir = tempfile::Builder::new()
            .prefix("switchyard-process-")
            .tempdir()?;
        let plugins_dir = dir.path().join("plugins");
        std::fs::create_dir(&plugins_dir)?;
        for (name, wasm, manifest) in &self.plugins {
            copy_plugin(&plugins_dir, name, wasm, manifest.as_deref())?;
        }
        let admin: SocketAddr = format!("127.0.0.1:{}", crate::free_port()?).parse()?;
        let mut config: toml::Table = toml::from_str(&self.config).context("the test config")?;
        let mut set = |table: &str, key: &str, value: toml::Value| {
            if let toml::Value::Table(section) = config
                .entry(table)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            {
                section.insert(key.to_owned(), value);
            }
        };
        set("redis", "url", self.redis.url().into());
        set("plugins", "dir", plugins_dir.display().to_string().into());
        set("admin", "listen", admin.to_string().into());
        let plugins = config["plugins"].as_table_mut().context("[plugins]")?;
        if !plugins.contains_key("compile_cache") {
            plugins.insert(
                "compile_cache".to_owned(),
                compile_cache_dir().display().to_string().into(),
            );
        }
        let mut gateway = None;
        if let Some(section) = config.get_mut("gateway").and_then(|g| g.as_table_mut())
            && section.get("listen").and_then(|l| l.as_str()) == Some("127.0.0.1:0")
        {
            let addr: SocketAddr = format!("127.0.0.1:{}", crate::free_port()?).parse()?;
            section.insert("listen".to_owned(), addr.to_string().into());
            gateway = Some(addr);
        }
        let path = dir.path().join("switchyard.toml");
        std::fs::write(&path, toml::to_string(&config)?)?;

        let mut command = tokio::process::Command::new(crate::switchyard_binary()?);
        command
            .arg("run")
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        for (name, value) in &self.env {
            command.env(name, value);
        }
        if self.stdout {
            command.stdout(Stdio::piped());
        }
        if self.stderr {
            command.stderr(Stdio::piped());
        }
        let child = command.spawn().context("starting switchyard run")?;
        let process = HostProcess {
            child,
            admin,
            gateway,
            plugins_dir,
            http: reqwest::Client::new(),
            _dir: dir,
        };
        let names: Vec<String> = self.plugins.iter().map(|p| p.0.clone()).collect();
        eventually(PATIENCE, || async {
            let listing = process.plugins().await?;
            for name in &names {
                anyhow::ensure!(
                    listing.iter().any(|p| p["name"] == name.as_str()),
                    "{name} is not listed yet"
                );
            }
            Ok(())
        })
        .await?;
        Ok(process)
    }
}

/// A running `switchyard run` process, killed when dropped.
pub struct HostProcess {
    child: Child,
    admin: SocketAddr,
    gateway: Option<SocketAddr>,
    plugins_dir: PathBuf,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl HostProcess {
    /// A process on `redis`, to be configured.
    pub fn builder(redis: &RedisServer) -> HostProcessBuilder<'_> {
        HostProcessBuilder {
            redis,
            config: String::new(),
            plugins: Vec::new(),
            env: Vec::new(),
            stdout: false,
            stderr: false,
        }
    }

    /// The admin endpoint's address.
    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    /// The gateway's address, if the configuration has one on `127.0.0.1:0`.
    pub fn gateway(&self) -> Option<SocketAddr> {
        self.gateway
    }

    /// The plugins folder.
    pub fn plugins_dir(&self) -> &Path {
        &self.plugins_dir
    }

    /// The piped stdout, once.
    pub fn stdout(&mut self) -> anyhow::Result<ChildStdout> {
        self.child.stdout.take().context("stdout is not piped")
    }

    /// The piped stderr (the log), once.
    pub fn stderr(&mut self) -> anyhow::Result<ChildStderr> {
        self.child.stderr.take().context("stderr is not piped")
    }

    /// GET `path` on the admin endpoint, as JSON.
    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        Ok(self
            .http
            .get(format!("http://{}{path}", self.admin))
            .send()
            .await?
            .json()
            .await?)
    }

    /// The `/plugins` listing.
    pub async fn plugins(&self) -> anyhow::Result<Vec<Value>> {
        let listing = self.get("/plugins").await?;
        Ok(listing["plugins"].as_array().cloned().unwrap_or_default())
    }

    /// The `/plugins` entry of `name`.
    pub async fn plugin(&self, name: &str) -> anyhow::Result<Value> {
        self.plugins()
            .await?
            .into_iter()
            .find(|p| p["name"] == name)
            .with_context(|| format!("{name} is not listed"))
    }

    /// The value of the series `series` (name and labels, exactly as `/metrics` prints
    /// them).
    pub async fn metric(&self, series: &str) -> anyhow::Result<f64> {
        let text = self
            .http
            .get(format!("http://{}/metrics", self.admin))
            .send()
            .await?
            .text()
            .await?;
        crate::gateway::metric_value(&text, series)
    }

    /// Starts sampling the process's resident memory: see [`ResidentPeak`].
    pub fn resident_peak(&self) -> anyhow::Result<ResidentPeak> {
        ResidentPeak::of_process(self.child.id().context("the process has ended")?)
    }

    /// Kills the process and waits for it to end.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }
}
