//! Real `redis-server` processes for integration tests, and a subscriber to observe them.
//!
//! [`RedisServer`] owns one `redis-server` child process listening on a free loopback port,
//! with its working directory and log file in a private temporary directory. It guarantees:
//!
//! - nothing depends on a Redis already running (6379 or otherwise): every server gets a port
//!   picked from the kernel, and readiness is confirmed by asking the server on that port for
//!   its process id, so a foreign server that happens to hold the port is never mistaken for it;
//! - no persistence (`--save ""`, `--appendonly no`), so every server starts empty;
//! - the process is SIGKILLed and reaped when the [`RedisServer`] is dropped, including while a
//!   test unwinds from a panic, so no `redis-server` outlives its test;
//! - [`RedisServer::kill`] makes the server vanish at once (SIGKILL), and
//!   [`RedisServer::restart`] brings it back on the same port, for reconnection tests;
//! - startup failures name the port and include the tail of the server's log (and of its
//!   stderr, where command-line errors go; stdout is discarded).
//!
//! [`Subscriber`] is a RESP2 pub/sub connection of its own that collects what the system under
//! test publishes, with deadlines on every wait.
//!
//! The binary is `redis-server` from `PATH`, or the path in the `REDIS_SERVER` environment
//! variable when that is set.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use futures::StreamExt as _;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::free_port;

/// How long a server may take to answer PING after it is spawned.
const STARTUP_DEADLINE: Duration = Duration::from_secs(10);
/// Interval between readiness probes.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Bound on each step (connect, write, read) of one readiness probe.
const PROBE_STEP_TIMEOUT: Duration = Duration::from_millis(500);
/// How many fresh ports [`RedisServer::start_with`] tries when the chosen one is taken.
const PORT_ATTEMPTS: usize = 5;
/// How many lines of the server log go into startup errors.
const LOG_TAIL_LINES: usize = 30;
/// How long `Drop` waits for a SIGKILLed server to be reaped.
const DROP_REAP_DEADLINE: Duration = Duration::from_secs(5);

/// A redis-server child process on a free loopback port, killed on drop.
pub struct RedisServer {
    /// `None` after [`RedisServer::kill`], until [`RedisServer::restart`].
    child: Option<Child>,
    port: u16,
    /// Caller's extra arguments, reused by [`RedisServer::restart`].
    extra_args: Vec<OsString>,
    /// The server's `--dir` and log file; declared after `child` so it is removed only once the
    /// process is gone.
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisServer")
            .field("port", &self.port)
            .field("pid", &self.child.as_ref().and_then(Child::id))
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl RedisServer {
    /// Starts redis-server on a free port and waits until it answers PING (deadline ~10 s).
    /// If redis-server is not installed, returns an error whose message says so plainly and
    /// how to install it (`apt-get install redis-server`).
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(&[]).await
    }

    /// Same, with extra `--key value` arguments appended to the command line (e.g.
    /// `["--maxclients", "100"]`).
    pub async fn start_with(args: &[&str]) -> anyhow::Result<Self> {
        let extra_args: Vec<OsString> = args.iter().map(OsString::from).collect();
        let mut last_port_error = None;
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port()?;
            let dir = tempfile::Builder::new()
                .prefix("redis-test-")
                .tempdir()
                .context("creating a temporary directory for redis-server")?;
            match launch(port, dir.path(), &extra_args).await {
                Ok(child) => {
                    return Ok(Self {
                        child: Some(child),
                        port,
                        extra_args,
                        dir,
                    });
                }
                Err(LaunchError::PortTaken(error)) => last_port_error = Some(error),
                Err(LaunchError::Fatal(error)) => return Err(error),
            }
        }
        let error = last_port_error.unwrap_or_else(|| anyhow!("no attempt was made"));
        Err(error.context(format!(
            "starting redis-server: the free port was taken before it could bind, \
             {PORT_ATTEMPTS} times in a row"
        )))
    }

    /// Starts redis-server listening on a second port for TLS as well, with the server
    /// certificate `cert` and its `key`, requiring clients to present a certificate signed by
    /// `ca`. Returns the server and its TLS port; the harness's own probes use the plain port.
    pub async fn start_tls(cert: &Path, key: &Path, ca: &Path) -> anyhow::Result<(Self, u16)> {
        let tls_port = free_port()?.to_string();
        let text = |path: &Path| path.to_string_lossy().into_owned();
        let (cert, key, ca) = (text(cert), text(key), text(ca));
        let server = Self::start_with(&[
            "--tls-port",
            &tls_port,
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            "yes",
        ])
        .await?;
        Ok((server, tls_port.parse()?))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id; `None` after [`RedisServer::kill`], until a restart.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// `redis-server --version` of the binary the harness starts, trimmed.
    pub fn version() -> anyhow::Result<String> {
        let binary = redis_server_binary();
        let output = std::process::Command::new(&binary)
            .arg("--version")
            .output()
            .with_context(|| format!("running `{} --version`", binary.to_string_lossy()))?;
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    /// `redis://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A new redis::Client for this server.
    pub fn client(&self) -> redis::Client {
        // Opening only parses the URL (no I/O); ours is always well-formed.
        redis::Client::open(self.url()).expect("a redis://127.0.0.1:PORT URL is always valid")
    }

    /// A multiplexed async connection (RESP2) for publishing / plain commands.
    pub async fn connection(&self) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        self.client()
            .get_multiplexed_async_connection()
            .await
            .with_context(|| format!("connecting to redis-server on port {}", self.port))
    }

    /// Kills the process (SIGKILL) and waits for it to exit. The port stays reserved for
    /// `restart`. Does nothing if the server is already killed.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // `kill` is SIGKILL + wait; if the signal could not be sent (it had already exited
            // and been reaped), waiting is still harmless and makes sure it is reaped.
            if child.kill().await.is_err() {
                let _ = child.wait().await;
            }
        }
    }

    /// Starts redis-server again on the SAME port (after kill), waits for PING.
    ///
    /// If the server is still running it is killed first. If something else grabbed the port
    /// in the meantime, keeps retrying until the startup deadline, then errors.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill().await;
        let deadline = Instant::now() + STARTUP_DEADLINE;
        loop {
            match launch(self.port, self.dir.path(), &self.extra_args).await {
                Ok(child) => {
                    self.child = Some(child);
                    return Ok(());
                }
                Err(LaunchError::PortTaken(error)) if Instant::now() >= deadline => {
                    return Err(error.context(format!(
                        "restarting redis-server: port {} stayed taken by another process \
                         for {STARTUP_DEADLINE:?}",
                        self.port
                    )));
                }
                Err(LaunchError::PortTaken(_)) => tokio::time::sleep(POLL_INTERVAL).await,
                Err(LaunchError::Fatal(error)) => {
                    return Err(
                        error.context(format!("restarting redis-server on port {}", self.port))
                    );
                }
            }
        }
    }

    /// `CONFIG GET parameter`: the value of one configuration parameter, as the server
    /// reports it (`client-output-buffer-limit`, for instance).
    pub async fn config_get(&self, parameter: &str) -> anyhow::Result<String> {
        let mut connection = self.connection().await?;
        let (_, value): (String, String) = redis::cmd("CONFIG")
            .arg("GET")
            .arg(parameter)
            .query_async(&mut connection)
            .await
            .with_context(|| {
                format!("CONFIG GET {parameter} on redis-server port {}", self.port)
            })?;
        Ok(value)
    }

    /// `PUBSUB CHANNELS`: every channel some connection is subscribed to, as text.
    pub async fn pubsub_channels(&self) -> anyhow::Result<std::collections::BTreeSet<String>> {
        let mut connection = self.connection().await?;
        redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .query_async(&mut connection)
            .await
            .with_context(|| format!("PUBSUB CHANNELS on redis-server port {}", self.port))
    }

    /// `PUBSUB NUMPAT`: how many pattern subscriptions all connections hold together.
    pub async fn pubsub_numpat(&self) -> anyhow::Result<i64> {
        let mut connection = self.connection().await?;
        redis::cmd("PUBSUB")
            .arg("NUMPAT")
            .query_async(&mut connection)
            .await
            .with_context(|| format!("PUBSUB NUMPAT on redis-server port {}", self.port))
    }

    /// Sends PUBLISH and returns the receiver count.
    pub async fn publish(
        &self,
        channel: impl redis::ToRedisArgs + Send + Sync,
        payload: impl redis::ToRedisArgs + Send + Sync,
    ) -> anyhow::Result<i64> {
        let mut connection = self.connection().await?;
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query_async(&mut connection)
            .await
            .with_context(|| format!("PUBLISH to redis-server on port {}", self.port))
    }

    /// Publishes `0`, `1`, ... `count - 1` as text on `channel` from a task of its own, one
    /// at a time with a short pause every hundred: steady traffic while a test changes the
    /// host. The task ends with the last publish; await it to know they were all sent.
    pub async fn publish_steadily(
        &self,
        channel: &str,
        count: usize,
    ) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
        let mut connection = self.connection().await?;
        let channel = channel.to_owned();
        Ok(tokio::spawn(async move {
            for i in 0..count {
                redis::cmd("PUBLISH")
                    .arg(&channel)
                    .arg(i.to_string())
                    .query_async::<i64>(&mut connection)
                    .await?;
                if i % 100 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            anyhow::Ok(())
        }))
    }

    /// Publishes every `(channel, payload)` in order, as one pipeline: they reach the server
    /// back to back, faster than any plugin handles them.
    pub async fn publish_all<C, P>(
        &self,
        messages: impl IntoIterator<Item = (C, P)>,
    ) -> anyhow::Result<()>
    where
        C: redis::ToSingleRedisArg,
        P: redis::ToSingleRedisArg,
    {
        let mut connection = self.connection().await?;
        let mut pipe = redis::pipe();
        for (channel, payload) in messages {
            pipe.publish(channel, payload).ignore();
        }
        pipe.query_async::<()>(&mut connection)
            .await
            .with_context(|| format!("PUBLISH pipeline to redis-server on port {}", self.port))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if child.start_kill().is_err() {
            // Already exited and reaped.
            return;
        }
        // Reap it synchronously (Drop cannot await) so the process is gone, not a zombie,
        // by the time the test goes on. SIGKILL takes effect within a few milliseconds.
        let deadline = std::time::Instant::now() + DROP_REAP_DEADLINE;
        while std::time::Instant::now() < deadline {
            match child.try_wait() {
                Ok(None) => std::thread::sleep(Duration::from_millis(1)),
                Ok(Some(_)) | Err(_) => break,
            }
        }
    }
}

/// Why a launch failed: the port was in use (worth retrying), or anything else.
enum LaunchError {
    PortTaken(anyhow::Error),
    Fatal(anyhow::Error),
}

/// What one readiness probe found.
enum Probe {
    /// Nothing answered yet, or the server is still loading.
    NotYet,
    /// Our server answered.
    Ready,
    /// A server with another process id answered on the port.
    Foreign(u32),
}

fn redis_server_binary() -> OsString {
    std::env::var_os("REDIS_SERVER").unwrap_or_else(|| OsString::from("redis-server"))
}

fn log_path(dir: &Path) -> PathBuf {
    dir.join("redis.log")
}

/// Spawns redis-server on `port` and waits until it answers PING as itself.
async fn launch(port: u16, dir: &Path, extra_args: &[OsString]) -> Result<Child, LaunchError> {
    let binary = redis_server_binary();
    let log = log_path(dir);
    // Errors in the command line are reported on stderr before the log file is opened, so
    // stderr goes to a file (never a pipe, which could fill up) that startup errors include.
    let stderr_path = dir.join("redis.stderr");
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&stderr_path)
        .with_context(|| format!("creating {}", stderr_path.display()))
        .map_err(LaunchError::Fatal)?;
    let mut command = Command::new(&binary);
    command
        .arg("--port")
        .arg(port.to_string())
        .arg("--bind")
        .arg("127.0.0.1")
        .arg("--save")
        .arg("")
        .arg("--appendonly")
        .arg("no")
        .arg("--dir")
        .arg(dir)
        .arg("--daemonize")
        .arg("no")
        .arg("--logfile")
        .arg(&log)
        .args(extra_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        // Belt and braces: `RedisServer`'s Drop kills and reaps; this covers a `Child` dropped
        // on an error path inside this function.
        .kill_on_drop(true);

    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) if error.kind() == ErrorKind::NotFound => {
            return Err(LaunchError::Fatal(anyhow!(
                "redis-server is not installed: `{}` was not found. The integration tests need \
                 a real Redis server; install it with `apt-get install redis-server` (or set \
                 REDIS_SERVER to the path of a redis-server binary)",
                binary.to_string_lossy()
            )));
        }
        Err(error) => {
            return Err(LaunchError::Fatal(anyhow::Error::new(error).context(
                format!("spawning `{}` on port {port}", binary.to_string_lossy()),
            )));
        }
    };
    let pid = child.id();

    let deadline = Instant::now() + STARTUP_DEADLINE;
    loop {
        match child.try_wait() {
            Ok(None) => {}
            Ok(Some(status)) => {
                let tail = startup_output(&log, &stderr_path);
                let error =
                    anyhow!("redis-server on port {port} exited during startup ({status}); {tail}");
                return Err(if tail.contains("Address already in use") {
                    LaunchError::PortTaken(error)
                } else {
                    LaunchError::Fatal(error)
                });
            }
            Err(error) => {
                let _ = child.kill().await;
                return Err(LaunchError::Fatal(anyhow::Error::new(error).context(
                    format!("checking whether redis-server on port {port} is still running"),
                )));
            }
        }

        match probe(port, pid).await {
            Probe::Ready => return Ok(child),
            Probe::Foreign(other) => {
                let _ = child.kill().await;
                return Err(LaunchError::PortTaken(anyhow!(
                    "port {port} is already served by another redis-server (pid {other})"
                )));
            }
            Probe::NotYet => {}
        }

        if Instant::now() >= deadline {
            let _ = child.kill().await;
            let tail = startup_output(&log, &stderr_path);
            return Err(LaunchError::Fatal(anyhow!(
                "redis-server on port {port} did not answer PING within {STARTUP_DEADLINE:?}; \
                 {tail}"
            )));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// One readiness probe over a fresh connection: PING, then (once it answers PONG) check via
/// `INFO server` that the answering process is ours, not one that beat it to the port.
async fn probe(port: u16, pid: Option<u32>) -> Probe {
    match tokio::time::timeout(PROBE_STEP_TIMEOUT * 4, probe_inner(port, pid)).await {
        Ok(Ok(probe)) => probe,
        // Refused, reset, timed out or garbled: not ready yet.
        Ok(Err(_)) | Err(_) => Probe::NotYet,
    }
}

async fn probe_inner(port: u16, pid: Option<u32>) -> anyhow::Result<Probe> {
    let stream = TcpStream::connect(("127.0.0.1", port)).await?;
    let mut stream = BufReader::new(stream);

    stream.get_mut().write_all(b"*1\r\n$4\r\nPING\r\n").await?;
    let reply = read_line(&mut stream).await?;
    if reply.starts_with("-NOAUTH") {
        // A password was configured: the server is serving commands, but INFO would be
        // refused too, so identity cannot be checked.
        return Ok(Probe::Ready);
    }
    if reply != "+PONG" {
        // e.g. -LOADING
        return Ok(Probe::NotYet);
    }

    let Some(pid) = pid else {
        return Ok(Probe::Ready);
    };
    stream
        .get_mut()
        .write_all(b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n")
        .await?;
    let header = read_line(&mut stream).await?;
    let Some(len) = header.strip_prefix('$') else {
        // INFO refused (e.g. renamed by the caller's arguments): PONG has to do.
        return Ok(Probe::Ready);
    };
    let len: usize = len.parse().context("INFO reply length")?;
    let mut body = vec![0; len + 2];
    stream.read_exact(&mut body).await?;
    let body = String::from_utf8_lossy(&body);
    let answering = body
        .lines()
        .find_map(|line| line.strip_prefix("process_id:"))
        .and_then(|value| value.trim().parse::<u32>().ok());
    Ok(match answering {
        Some(answering) if answering != pid => Probe::Foreign(answering),
        _ => Probe::Ready,
    })
}

/// Reads one RESP line without its CRLF.
async fn read_line(stream: &mut BufReader<TcpStream>) -> anyhow::Result<String> {
    let mut line = String::new();
    let n = stream.read_line(&mut line).await?;
    if n == 0 {
        bail!("connection closed");
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

/// The tail of the server log, and of its stderr when there is any, for startup errors.
fn startup_output(log: &Path, stderr: &Path) -> String {
    let mut out = format!("last lines of {}:\n{}", log.display(), file_tail(log));
    if let Ok(bytes) = std::fs::read(stderr)
        && !bytes.trim_ascii().is_empty()
    {
        let _ = write!(
            out,
            "\nstderr ({}):\n{}",
            stderr.display(),
            file_tail(stderr)
        );
    }
    out
}

/// The last lines of a file, for error messages.
fn file_tail(path: &Path) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(LOG_TAIL_LINES);
            let tail = lines[start..].join("\n");
            if tail.trim().is_empty() {
                "(empty)".to_owned()
            } else {
                tail
            }
        }
        Err(error) if error.kind() == ErrorKind::NotFound => "(not created)".to_owned(),
        Err(error) => format!("(could not read it: {error})"),
    }
}

/// A subscriber on its own connection that collects messages, for observing what the system
/// under test publishes.
pub struct Subscriber {
    stream: redis::aio::PubSubStream,
    port: u16,
}

impl std::fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscriber")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl Subscriber {
    /// Subscribes to `channels` (exact) and `patterns` (PSUBSCRIBE); returns after the
    /// server confirmed every subscription.
    pub async fn new(
        server: &RedisServer,
        channels: &[&str],
        patterns: &[&str],
    ) -> anyhow::Result<Self> {
        let port = server.port();
        let mut pubsub = server
            .client()
            .get_async_pubsub()
            .await
            .with_context(|| format!("opening a pub/sub connection to redis on port {port}"))?;
        // Each call resolves only once the server has confirmed every name in it.
        if !channels.is_empty() {
            pubsub
                .subscribe(channels)
                .await
                .with_context(|| format!("SUBSCRIBE {channels:?} on redis port {port}"))?;
        }
        if !patterns.is_empty() {
            pubsub
                .psubscribe(patterns)
                .await
                .with_context(|| format!("PSUBSCRIBE {patterns:?} on redis port {port}"))?;
        }
        Ok(Self {
            stream: pubsub.into_on_message(),
            port,
        })
    }

    /// The next message: (channel bytes, pattern bytes if via PSUBSCRIBE, payload bytes).
    /// Errors if none arrives within `timeout`.
    pub async fn next(&mut self, timeout: std::time::Duration) -> anyhow::Result<Received> {
        match tokio::time::timeout(timeout, self.stream.next()).await {
            Ok(Some(message)) => received(&message, self.port),
            Ok(None) => bail!(
                "subscriber on redis port {}: the connection closed while waiting for a message",
                self.port
            ),
            Err(_) => bail!(
                "subscriber on redis port {}: no message arrived within {timeout:?}",
                self.port
            ),
        }
    }

    /// Collects exactly `n` messages or errors (naming how many arrived) when `timeout` passes
    /// first (timeout is for the whole batch).
    pub async fn take(
        &mut self,
        n: usize,
        timeout: std::time::Duration,
    ) -> anyhow::Result<Vec<Received>> {
        self.take_until(n, Patience::Total(timeout)).await
    }

    /// Takes `n` messages, waiting as long as they keep coming: fails only when `stall`
    /// passes without one. For a long stream of messages whose pace depends on the machine
    /// (a burst through a test build on a loaded machine), where what matters is that every
    /// one arrives, not how fast.
    pub async fn take_flowing(
        &mut self,
        n: usize,
        stall: std::time::Duration,
    ) -> anyhow::Result<Vec<Received>> {
        self.take_until(n, Patience::Stall(stall)).await
    }

    async fn take_until(&mut self, n: usize, patience: Patience) -> anyhow::Result<Vec<Received>> {
        let start = Instant::now();
        let mut messages = Vec::with_capacity(n);
        while messages.len() < n {
            let deadline = match patience {
                Patience::Total(timeout) => start + timeout,
                Patience::Stall(stall) => Instant::now() + stall,
            };
            let why = match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Ok(Some(message)) => {
                    messages.push(received(&message, self.port)?);
                    continue;
                }
                Ok(None) => "the connection closed".to_owned(),
                Err(_) => match patience {
                    Patience::Total(timeout) => format!("{timeout:?} passed"),
                    Patience::Stall(stall) => format!("{stall:?} passed without one"),
                },
            };
            bail!(
                "subscriber on redis port {}: only {} of {n} messages arrived before {why}: {}",
                self.port,
                messages.len(),
                summarize(&messages)
            );
        }
        Ok(messages)
    }

    /// Returns every message that arrives until `quiet` passes with none (for asserting that
    /// nothing more comes). Stops early if the connection closes.
    pub async fn drain_for(&mut self, quiet: std::time::Duration) -> Vec<Received> {
        let mut messages = Vec::new();
        while let Ok(Some(message)) = tokio::time::timeout(quiet, self.stream.next()).await {
            messages.push(received_lossy(&message));
        }
        messages
    }
}

/// A message as received by a [`Subscriber`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub channel: Vec<u8>,
    /// The matching pattern, for messages delivered through PSUBSCRIBE.
    pub pattern: Option<Vec<u8>>,
    pub payload: Vec<u8>,
}

impl Received {
    /// The channel as text (invalid UTF-8 replaced).
    pub fn channel_str(&self) -> String {
        String::from_utf8_lossy(&self.channel).into_owned()
    }

    /// The payload as text (invalid UTF-8 replaced).
    pub fn payload_str(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

fn received(message: &redis::Msg, port: u16) -> anyhow::Result<Received> {
    let channel = message
        .get_channel::<Vec<u8>>()
        .with_context(|| format!("reading the channel of a message from redis port {port}"))?;
    let pattern = message
        .get_pattern::<Option<Vec<u8>>>()
        .with_context(|| format!("reading the pattern of a message from redis port {port}"))?;
    Ok(Received {
        channel,
        pattern,
        payload: message.get_payload_bytes().to_vec(),
    })
}

/// Like [`received`], for callers that cannot return errors. RESP2 pub/sub messages always
/// carry bulk strings, so the fallbacks are not expected to be used.
fn received_lossy(message: &redis::Msg) -> Received {
    Received {
        channel: message
            .get_channel::<Vec<u8>>()
            .unwrap_or_else(|_| message.get_channel_name().as_bytes().to_vec()),
        pattern: message.get_pattern::<Option<Vec<u8>>>().unwrap_or(None),
        payload: message.get_payload_bytes().to_vec(),
    }
}

/// "[channel (via pattern): payload, ...]" for error messages.
fn summarize(messages: &[Received]) -> String {
    /// Enough to see where a stream went wrong without drowning the report.
    const SHOWN: usize = 5;
    let skipped = messages.len().saturating_sub(SHOWN);
    let mut out = String::from("[");
    if skipped > 0 {
        let _ = write!(out, "... {skipped} earlier, then ");
    }
    for (i, message) in messages[skipped..].iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        let _ = write!(out, "{}", message.channel_str());
        if let Some(pattern) = &message.pattern {
            let _ = write!(out, " (via {})", String::from_utf8_lossy(pattern));
        }
        let _ = write!(out, ": {:?}", message.payload_str());
    }
    out.push(']');
    out
}

/// How long [`Subscriber::take_until`] waits.
#[derive(Clone, Copy)]
enum Patience {
    /// For all the messages together.
    Total(std::time::Duration),
    /// Between two messages.
    Stall(std::time::Duration),
}
