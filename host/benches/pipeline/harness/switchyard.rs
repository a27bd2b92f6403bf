//! The real `switchyard run` as a child process ([`Switchyard`]): its configuration, its
//! readiness, and what its admin endpoint reports (`/plugins`, `/metrics`) summed into the
//! figures the tables show.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use switchyard_tests::free_port;
use tokio::process::Command;

use super::{Proc, READY_TIMEOUT};

/// What a Switchyard process is started with.
pub struct HostSetup<'a> {
    /// The plugins folder.
    pub plugins: &'a Path,
    /// `plugins.compile_cache`, if any.
    pub compile_cache: Option<&'a Path>,
    /// More TOML appended to the configuration (outputs, for instance).
    pub extra: &'a str,
}

/// The real `switchyard run` as a child process.
pub struct Switchyard {
    proc: Proc,
    spawned: Instant,
    admin: String,
    http: reqwest::Client,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Switchyard {
    /// Spawns it without waiting for readiness, logging warnings and errors only. Every
    /// `[plugins]` setting but `dir` and `compile_cache` keeps the host's default.
    pub fn spawn(redis_url: &str, setup: &HostSetup<'_>) -> anyhow::Result<Self> {
        Self::spawn_with(redis_url, setup, Some("warn"))
    }

    /// Spawns it as a user would run it: a configuration that names only the Redis, the
    /// plugins folder and the admin listener (the bench reads `/plugins` there), and the
    /// default log level; waits until `/readyz` answers 200.
    pub async fn start_as_shipped(redis_url: &str, plugins: &Path) -> anyhow::Result<Self> {
        let setup = HostSetup {
            plugins,
            compile_cache: None,
            extra: "",
        };
        let mut host = Self::spawn_with(redis_url, &setup, None)?;
        host.wait_ready().await?;
        Ok(host)
    }

    fn spawn_with(
        redis_url: &str,
        setup: &HostSetup<'_>,
        log_level: Option<&str>,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let admin = format!("127.0.0.1:{}", free_port()?);
        let mut config = format!(
            "[redis]\nurl = {url:?}\n\n[plugins]\ndir = {dir:?}\n",
            url = redis_url,
            dir = setup.plugins.display().to_string(),
        );
        if let Some(cache) = setup.compile_cache {
            config.push_str(&format!(
                "compile_cache = {:?}\n",
                cache.display().to_string()
            ));
        }
        config.push_str(&format!("\n[admin]\nlisten = {admin:?}\n\n"));
        config.push_str(setup.extra);
        let config_path = dir.path().join("switchyard.toml");
        std::fs::write(&config_path, config)?;
        let log = dir.path().join("switchyard.log");
        let log_file = std::fs::File::create(&log)?;
        let mut command = Command::new(env!("CARGO_BIN_EXE_switchyard"));
        if let Some(level) = log_level {
            command.args(["--log-level", level]);
        }
        command
            .args(["run", "--config"])
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        // The configuration file must be the only source of settings.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("SWITCHYARD_") || key.starts_with("REDIS_") || key == "RUST_LOG" {
                command.env_remove(key.as_ref());
            }
        }
        let spawned = Instant::now();
        let proc = Proc::spawn(&mut command).context("cannot start switchyard")?;
        Ok(Self {
            proc,
            spawned,
            admin,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?,
            log,
            _dir: dir,
        })
    }

    /// Spawns it and waits until `/readyz` answers 200.
    pub async fn start(redis_url: &str, setup: &HostSetup<'_>) -> anyhow::Result<Self> {
        let mut host = Self::spawn(redis_url, setup)?;
        host.wait_ready().await?;
        Ok(host)
    }

    /// Waits for `/readyz` to answer 200, polling every 2 ms; returns the time since spawn.
    pub async fn wait_ready(&mut self) -> anyhow::Result<Duration> {
        let url = format!("http://{}/readyz", self.admin);
        loop {
            if let Ok(response) = self.http.get(&url).send().await
                && response.status() == reqwest::StatusCode::OK
            {
                return Ok(self.spawned.elapsed());
            }
            if let Ok(Some(status)) = self.proc.child.try_wait() {
                bail!(
                    "switchyard exited with {status} before it was ready:\n{}",
                    self.log_tail()
                );
            }
            if self.spawned.elapsed() > READY_TIMEOUT {
                bail!(
                    "switchyard was not ready within {READY_TIMEOUT:?}:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// `/plugins` as JSON.
    pub async fn plugins(&self) -> anyhow::Result<serde_json::Value> {
        let url = format!("http://{}/plugins", self.admin);
        Ok(self.http.get(&url).send().await?.json().await?)
    }

    /// `/metrics` as text.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let url = format!("http://{}/metrics", self.admin);
        Ok(self.http.get(&url).send().await?.text().await?)
    }

    /// The queue budget of its first plugin in bytes, if `/plugins` reports one
    /// (`queue_bytes_limit`).
    pub async fn queue_budget(&self) -> anyhow::Result<Option<u64>> {
        let report = self.plugins().await?;
        Ok(report["plugins"]
            .as_array()
            .and_then(|plugins| plugins.first())
            .and_then(queue_bytes_limit))
    }

    /// The content hash `/plugins` reports for `plugin`'s running version.
    pub async fn version_hash(&self, plugin: &str) -> anyhow::Result<Option<String>> {
        let report = self.plugins().await?;
        Ok(plugin_entry(&report, plugin)
            .and_then(|p| p["version"]["hash"].as_str())
            .map(str::to_owned))
    }

    /// Messages shed and failed, summed over every plugin.
    pub async fn shed_and_failed(&self) -> anyhow::Result<(u64, u64)> {
        let report = self.plugins().await?;
        let mut shed = 0;
        let mut failed = 0;
        for plugin in report["plugins"].as_array().into_iter().flatten() {
            shed += plugin["stats"]["shed"].as_u64().unwrap_or(0);
            failed += plugin["stats"]["failed"].as_u64().unwrap_or(0);
        }
        Ok((shed, failed))
    }

    /// What `/plugins` counts against delivery, summed over every plugin.
    pub async fn losses(&self) -> anyhow::Result<HostLosses> {
        let report = self.plugins().await?;
        let mut losses = HostLosses {
            reconnects: report["source"]["reconnects"].as_u64().unwrap_or(0),
            ..HostLosses::default()
        };
        for plugin in report["plugins"].as_array().into_iter().flatten() {
            let stats = &plugin["stats"];
            for (reason, count) in stats["shed_by"].as_object().into_iter().flatten() {
                *losses.shed_by.entry(reason.clone()).or_default() += count.as_u64().unwrap_or(0);
            }
            losses.failed += stats["failed"].as_u64().unwrap_or(0);
            losses.send_failed += stats["send_failed"].as_u64().unwrap_or(0);
        }
        Ok(losses)
    }

    /// Stream entries acknowledged and messages failed, summed over every plugin.
    pub async fn stream_acked_and_failed(&self) -> anyhow::Result<(u64, u64)> {
        let report = self.plugins().await?;
        let mut acked = 0;
        let mut failed = 0;
        for plugin in report["plugins"].as_array().into_iter().flatten() {
            acked += plugin["stats"]["stream_acked"].as_u64().unwrap_or(0);
            failed += plugin["stats"]["failed"].as_u64().unwrap_or(0);
        }
        Ok((acked, failed))
    }

    /// Mean duration of `handle` calls so far (all plugins), from the Prometheus histogram.
    pub async fn mean_handle(&self) -> anyhow::Result<Option<Duration>> {
        let text = self.metrics().await?;
        let total = |name: &str| -> f64 {
            text.lines()
                .filter(|l| l.starts_with(name))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        let sum = total("switchyard_plugin_handle_seconds_sum");
        let count = total("switchyard_plugin_handle_seconds_count");
        Ok((count > 0.0).then(|| Duration::from_secs_f64(sum / count)))
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The end of its log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Stops it (SIGKILL: nothing is left to drain when a run has been counted).
    pub async fn stop(self) {
        self.proc.stop().await;
    }
}

/// Messages a Switchyard run dropped by its own counters (`/plugins`), summed over plugins.
#[derive(Debug, Clone, Default)]
pub struct HostLosses {
    /// Shed messages by reason (`stats.shed_by`: every reason the host reports).
    pub shed_by: std::collections::BTreeMap<String, u64>,
    /// Failed `handle` calls.
    pub failed: u64,
    /// Messages queued by `send` and then not written to Redis.
    pub send_failed: u64,
    /// Times the subscriber connection was re-established (Redis cuts a subscriber that
    /// falls past its output-buffer limit).
    pub reconnects: u64,
}

impl HostLosses {
    /// Every shed message.
    pub fn shed(&self) -> u64 {
        self.shed_by.values().sum()
    }

    /// Adds another run's counters.
    pub fn add(&mut self, other: &HostLosses) {
        for (reason, count) in &other.shed_by {
            *self.shed_by.entry(reason.clone()).or_default() += count;
        }
        self.failed += other.failed;
        self.send_failed += other.send_failed;
        self.reconnects += other.reconnects;
    }

    /// The nonzero reasons, `queue_full 1234, parked 5`, then failed calls, lost sends and
    /// reconnects if any; `0` when nothing was dropped.
    pub fn describe(&self) -> String {
        let mut parts: Vec<String> = self
            .shed_by
            .iter()
            .filter(|(_, count)| **count > 0)
            .map(|(reason, count)| format!("{reason} {count}"))
            .collect();
        for (what, count) in [
            ("failed", self.failed),
            ("send_failed", self.send_failed),
            ("reconnects", self.reconnects),
        ] {
            if count > 0 {
                parts.push(format!("{what} {count}"));
            }
        }
        if parts.is_empty() {
            "0".to_owned()
        } else {
            parts.join(", ")
        }
    }
}

/// The entry of `plugin` in a `/plugins` report.
pub fn plugin_entry<'a>(
    report: &'a serde_json::Value,
    plugin: &str,
) -> Option<&'a serde_json::Value> {
    report["plugins"]
        .as_array()?
        .iter()
        .find(|p| p["name"].as_str() == Some(plugin))
}

/// A plugin's queue budget in bytes from its `/plugins` entry, if the host reports one.
pub fn queue_bytes_limit(plugin: &serde_json::Value) -> Option<u64> {
    plugin["queue_bytes_limit"]
        .as_u64()
        .or_else(|| plugin["stats"]["queue_bytes_limit"].as_u64())
}
