//! The integration-test harness: real `redis-server` processes, the real host in-process,
//! and real plugins compiled from `plugins/`.
//!
//! Tests synchronise on events (readiness, `/plugins` counters, messages arriving), never on
//! sleeps: [`eventually`] polls a condition until a deadline and fails with the last
//! observation.

pub mod cluster;
pub mod gateway;
pub mod memory;
pub mod otlp;
pub mod polyglot;
pub mod process;
pub mod proxy;
pub mod redis;
pub mod registry;
pub mod tls;
pub mod webhook;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::Value;
use switchyard::app::{Broker, Host};
use switchyard::config::{Config, RedisUrl};

pub use crate::polyglot::compile_cache_dir;
pub use crate::redis::{Received, RedisServer, Subscriber};

/// Components built from `plugins/` for these tests (paths).
pub mod plugins {
    include!(concat!(env!("OUT_DIR"), "/plugins.rs"));
}

/// The `switchyard` binary of this build (`target/<profile>/switchyard`, beside the test
/// binary's `deps` folder), for tests that need a host in a process of its own, to kill it.
/// `cargo test` builds it; when it is missing (a test run of this package alone)
/// it is built here, once.
pub fn switchyard_binary() -> anyhow::Result<PathBuf> {
    static BUILT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("the test binary is not in a target/<profile>/deps folder")?;
    let binary = profile_dir.join("switchyard");
    let _once = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !binary.is_file() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args(["build", "-p", "switchyard", "--bin", "switchyard"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .context("running cargo build for the switchyard binary")?;
        anyhow::ensure!(status.success(), "building the switchyard binary failed");
    }
    Ok(binary)
}

/// How long tests wait for something that should happen within milliseconds.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// The manifest `forward` ships with: its publish grant.
pub const FORWARD_MANIFEST: &str = include_str!("../../plugins/forward/forward.toml");

/// The manifest `notify-router` ships with: its grants.
pub const NOTIFY_MANIFEST: &str = include_str!("../../plugins/notify-router/notify-router.toml");

/// What `notify-router` needs: an `email` output, an `http` webhook at `url` with the extra
/// `settings` (TOML lines), and `sms` and `push` on standard output.
pub fn notify_router_outputs(url: &str, settings: &str) -> String {
    format!(
        "[outputs.email]\nkind = \"http\"\nurl = \"{url}\"\n{settings}\n\
         [outputs.sms]\nkind = \"stdout\"\n[outputs.push]\nkind = \"stdout\"\n"
    )
}

/// `notify-router`'s manifest with a `deadline_ms` long enough for its output calls.
pub fn notify_manifest_with_deadline(deadline_ms: u64) -> String {
    format!("{NOTIFY_MANIFEST}\n[limits]\ndeadline_ms = {deadline_ms}\n")
}

/// Sends the host's logs to the test output (shown for failing tests), once per process.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "switchyard=debug,info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Polls `check` until it returns `Ok`, or fails after `within` with its last error.
pub async fn eventually<T, F, Fut>(within: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let started = Instant::now();
    loop {
        match check().await {
            Ok(value) => return Ok(value),
            Err(e) if started.elapsed() >= within => {
                return Err(e.context(format!("still not true after {within:?}")));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// A port that was free a moment ago on 127.0.0.1 (bound to port 0, then released), for a
/// server the test starts: a `redis-server`, an admin or gateway listener, a process's own.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))
        .context("binding 127.0.0.1:0 to find a free port")?;
    let port = listener
        .local_addr()
        .context("reading the port of a 127.0.0.1:0 listener")?
        .port();
    Ok(port)
}

/// A host under test, with its own plugins folder and an admin endpoint on a free port.
pub struct TestHost {
    host: Option<Host>,
    dir: tempfile::TempDir,
    admin: SocketAddr,
    http: reqwest::Client,
}

impl TestHost {
    /// Starts a host on `redis` configured by `config` (TOML; the Redis URL, plugins folder
    /// and admin address are the harness's), after `prepare` put files in its plugins folder,
    /// and waits until it is ready.
    pub async fn start_with(
        redis: &RedisServer,
        config: &str,
        prepare: impl FnOnce(&Path) -> anyhow::Result<()>,
    ) -> anyhow::Result<Self> {
        let host = Self::launch(&redis.url(), config, prepare).await?;
        host.wait_ready().await?;
        Ok(host)
    }

    /// Like [`TestHost::start_with`] for the Redis at `redis_url`, without waiting for
    /// readiness (Redis may be down).
    pub async fn launch(
        redis_url: &str,
        config: &str,
        prepare: impl FnOnce(&Path) -> anyhow::Result<()>,
    ) -> anyhow::Result<Self> {
        init_logging();
        let dir = tempfile::Builder::new()
            .prefix("switchyard-test-")
            .tempdir()?;
        prepare(dir.path())?;
        let mut config = Config::from_toml(config, "test config")?;
        config.redis.url = RedisUrl::new(redis_url);
        config.plugins.dir = dir.path().to_owned();
        config.admin.listen = "127.0.0.1:0".parse()?;
        // One compile cache for the whole run: each component compiles once, however many
        // hosts load it (the Python and JavaScript ones take seconds).
        config
            .plugins
            .compile_cache
            .get_or_insert_with(compile_cache_dir);
        let host = Host::start(&config, Broker::Redis(config.redis.clone()), true, None).await?;
        let admin = host.admin_addr().context("admin endpoint enabled")?;
        Ok(Self {
            host: Some(host),
            dir,
            admin,
            http: reqwest::Client::new(),
        })
    }

    /// Starts a host with `plugins` installed: (name, component path, manifest text).
    pub async fn start(
        redis: &RedisServer,
        plugins: &[(&str, &str, Option<&str>)],
    ) -> anyhow::Result<Self> {
        Self::start_configured(redis, "", plugins).await
    }

    /// Starts a host with only `forward` (and its grant) installed.
    pub async fn with_forward(redis: &RedisServer) -> anyhow::Result<Self> {
        Self::start(
            redis,
            &[("forward", plugins::FORWARD, Some(FORWARD_MANIFEST))],
        )
        .await
    }

    /// Launches a host with only `forward` on the Redis at `redis_url`, without waiting for
    /// readiness (Redis may be down, or refuse the credentials).
    pub async fn launch_forward(redis_url: &str) -> anyhow::Result<Self> {
        Self::launch_forward_configured(redis_url, "").await
    }

    /// Like [`TestHost::launch_forward`], configured by `config` (TOML).
    pub async fn launch_forward_configured(redis_url: &str, config: &str) -> anyhow::Result<Self> {
        Self::launch(redis_url, config, |dir| {
            copy_plugin(
                dir,
                "forward",
                plugins::FORWARD.as_ref(),
                Some(FORWARD_MANIFEST),
            )
        })
        .await
    }

    /// Starts a host configured by `config` (TOML) with `plugins` installed.
    pub async fn start_configured(
        redis: &RedisServer,
        config: &str,
        plugins: &[(&str, &str, Option<&str>)],
    ) -> anyhow::Result<Self> {
        Self::start_with(redis, config, |dir| {
            for (name, wasm, manifest) in plugins {
                copy_plugin(dir, name, Path::new(wasm), *manifest)?;
            }
            Ok(())
        })
        .await
    }

    /// Starts a host with only `notify-router`, its `email` output a webhook at `email_url`
    /// with the extra `settings` ([`notify_router_outputs`]) and its deadline `deadline_ms`.
    pub async fn with_notify_router(
        redis: &RedisServer,
        email_url: &str,
        settings: &str,
        deadline_ms: u64,
    ) -> anyhow::Result<Self> {
        let manifest = notify_manifest_with_deadline(deadline_ms);
        Self::start_configured(
            redis,
            &notify_router_outputs(email_url, settings),
            &[("notify-router", plugins::NOTIFY_ROUTER, Some(&manifest))],
        )
        .await
    }

    /// The admin endpoint's address.
    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    /// The plugins folder.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The host itself.
    pub fn host(&self) -> &Host {
        self.host.as_ref().expect("host is running")
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        self.wait_readiness(200).await.map(drop)
    }

    /// Waits until `/readyz` answers `status`; returns its body.
    pub async fn wait_readiness(&self, status: u16) -> anyhow::Result<Value> {
        eventually(PATIENCE, || async {
            let response = self.get("/readyz").await?;
            if response.0 == status {
                Ok(response.1)
            } else {
                bail!("/readyz: {} {}", response.0, response.1)
            }
        })
        .await
    }

    /// GET `path` on the admin endpoint: (status, body).
    pub async fn get(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        let response = self
            .http
            .get(format!("http://{}{path}", self.admin))
            .send()
            .await?;
        let status = response.status().as_u16();
        let text = response.text().await?;
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, body))
    }

    /// The `/plugins` entry of `name`, if any.
    pub async fn plugin(&self, name: &str) -> anyhow::Result<Option<Value>> {
        let (_, body) = self.get("/plugins").await?;
        Ok(body["plugins"]
            .as_array()
            .and_then(|plugins| plugins.iter().find(|p| p["name"] == name))
            .cloned())
    }

    /// Waits until the `/plugins` entry of `name` satisfies `accept`, and returns it.
    pub async fn wait_plugin(
        &self,
        name: &str,
        what: &str,
        accept: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        self.wait_plugin_within(name, what, PATIENCE, accept).await
    }

    /// [`TestHost::wait_plugin`], waiting up to `within`: for a load that compiles a large
    /// component for the first time, which on a loaded machine takes seconds.
    pub async fn wait_plugin_within(
        &self,
        name: &str,
        what: &str,
        within: Duration,
        accept: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        eventually(within, || async {
            match self.plugin(name).await? {
                Some(entry) if accept(&entry) => Ok(entry),
                Some(entry) => bail!("plugin {name} is not {what}: {entry:#}"),
                None => bail!("plugin {name} is not listed"),
            }
        })
        .await
    }

    /// Installs a plugin the documented way: write a dotfile, then rename it into place.
    pub fn install(&self, name: &str, wasm: &[u8], manifest: Option<&str>) -> anyhow::Result<()> {
        if let Some(manifest) = manifest {
            atomic_write(
                &self.dir.path().join(format!("{name}.toml")),
                manifest.as_bytes(),
            )?;
        }
        atomic_write(&self.dir.path().join(format!("{name}.wasm")), wasm)
    }

    /// Deletes a plugin's files.
    pub fn remove(&self, name: &str) -> anyhow::Result<()> {
        let _ = std::fs::remove_file(self.dir.path().join(format!("{name}.toml")));
        std::fs::remove_file(self.dir.path().join(format!("{name}.wasm")))?;
        Ok(())
    }

    /// Stops the host, draining plugin queues.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        match self.host.take() {
            Some(host) => host.stop(PATIENCE).await,
            None => Ok(()),
        }
    }
}

/// Publishes `payload` on `fwd:x` and asserts that a running `forward` republishes it on
/// `fwded:x`.
pub async fn assert_forwards(redis: &RedisServer, payload: &str) -> anyhow::Result<()> {
    let mut out = Subscriber::new(redis, &["fwded:x"], &[]).await?;
    redis.publish("fwd:x", payload).await?;
    let got = out.take(1, PATIENCE).await?;
    anyhow::ensure!(got[0].payload_str() == payload, "forwarded {got:?}");
    Ok(())
}

/// Copies a built plugin into `dir` as `NAME.wasm`, with `NAME.toml` if given.
pub fn copy_plugin(
    dir: &Path,
    name: &str,
    wasm: &Path,
    manifest: Option<&str>,
) -> anyhow::Result<()> {
    if let Some(manifest) = manifest {
        std::fs::write(dir.join(format!("{name}.toml")), manifest)?;
    }
    std::fs::copy(wasm, dir.join(format!("{name}.wasm")))
        .with_context(|| format!("cannot copy {}", wasm.display()))?;
    Ok(())
}

/// Waits for `publisher` ([`RedisServer::publish_steadily`] of `count` messages) to finish,
/// then for each of its messages to arrive on `out`: fails naming how many did.
pub async fn assert_each_arrived(
    out: &mut Subscriber,
    publisher: tokio::task::JoinHandle<anyhow::Result<()>>,
    count: usize,
) -> anyhow::Result<()> {
    publisher.await??;
    let got = out.take_flowing(count, PATIENCE).await?;
    let arrived = distinct_numbers(&got);
    anyhow::ensure!(arrived == count, "{arrived} of {count} messages arrived");
    Ok(())
}

/// How many distinct numbers the payloads of `received` hold (those that are numbers):
/// with [`RedisServer::publish_steadily`]'s traffic, the messages that came through at least
/// once.
pub fn distinct_numbers(received: &[Received]) -> usize {
    let mut seen: Vec<usize> = received
        .iter()
        .filter_map(|m| m.payload_str().parse().ok())
        .collect();
    seen.sort_unstable();
    seen.dedup();
    seen.len()
}

/// Reads a built plugin.
pub fn read_plugin(path: &str) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("cannot read plugin {path}: {e}"))
}

/// The same component with a custom section appended: identical behaviour, different bytes
/// (and content hash), like a rebuilt plugin.
pub fn rebuilt(wasm: &[u8], label: &str) -> Vec<u8> {
    let name = b"switchyard-test";
    let mut body = Vec::new();
    leb128(&mut body, name.len());
    body.extend_from_slice(name);
    body.extend_from_slice(label.as_bytes());
    let mut out = wasm.to_vec();
    out.push(0); // custom section id
    leb128(&mut out, body.len());
    out.extend_from_slice(&body);
    out
}

fn leb128(out: &mut Vec<u8>, mut value: usize) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Writes `bytes` to a dotfile beside `path`, then renames it over `path`.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .context("path has a file name")?;
    let temp: PathBuf = path.with_file_name(format!(".{file_name}.tmp"));
    std::fs::write(&temp, bytes)?;
    std::fs::rename(&temp, path)?;
    Ok(())
}

/// An echo plugin manifest: subscriptions, reply channel (granted) and tag.
pub fn echo_manifest(channels: &[&str], patterns: &[&str], reply: &str, tag: &str) -> String {
    format!(
        "[grants]\npublish = [{reply:?}]\n[config]\nchannels = {}\npatterns = {}\nreply = {reply:?}\ntag = {tag:?}\n",
        toml_list(channels),
        toml_list(patterns)
    )
}

fn toml_list(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("{s:?}")).collect();
    format!("[{}]", quoted.join(", "))
}
