//! The `switchyard` binary as an operator uses it: exit codes, logs, the demo, `status`, and
//! `run` against a real redis-server, stopped with SIGTERM or SIGINT.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

// The same redis-server harness the integration tests use.
use switchyard_tests::{RedisServer, Subscriber, free_port};
use tokio::io::AsyncBufReadExt as _;
use tokio::process::Command;
use tokio::sync::watch;

const BINARY: &str = env!("CARGO_BIN_EXE_switchyard");
const PATIENCE: Duration = Duration::from_secs(15);

fn switchyard() -> Command {
    let mut command = Command::new(BINARY);
    command.kill_on_drop(true).stdin(Stdio::null());
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_config_key_exits_2_and_names_the_key_and_file() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("switchyard.toml");
    std::fs::write(
        &config,
        "[redis]\nurl = \"redis://127.0.0.1:1\"\nhost = \"x\"\n",
    )?;
    let output = switchyard()
        .arg("run")
        .arg("--config")
        .arg(&config)
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("switchyard.toml"), "{stderr}");
    assert!(stderr.contains("unknown field `host`"), "{stderr}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_check_prints_effective_settings_with_secrets_masked() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("switchyard.toml");
    std::fs::write(
        &config,
        "[outputs.email]\nkind = \"http\"\nurl = \"https://gw.example/send\"\n\
         headers = { Authorization = \"Bearer hunter2\" }\n",
    )?;
    let output = switchyard()
        .args(["config", "check", "--config"])
        .arg(&config)
        .env("SWITCHYARD_PLUGINS_DIR", dir.path())
        .env("REDIS_URL", "redis://app:s3cret@cache:6379")
        .env("SWITCHYARD_PLUGINS_QUEUE_BYTES", "16777216")
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("url = \"redis://app:***@cache:6379\""),
        "{stdout}"
    );
    assert!(stdout.contains("queue_bytes = 16777216\n"), "{stdout}");
    assert!(
        !stdout.contains("queue_capacity"),
        "no count cap unless asked: {stdout}"
    );
    assert!(stdout.contains("Authorization = ***"), "{stdout}");
    assert!(
        !stdout.contains("s3cret") && !stdout.contains("hunter2"),
        "{stdout}"
    );

    let bad = switchyard()
        .args(["config", "check"])
        .env("SWITCHYARD_PLUGINS_QUEUE_BYTES", "lots")
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("SWITCHYARD_PLUGINS_QUEUE_BYTES"),
        "{stderr}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_plugins_folder_is_a_configuration_error_for_run_and_config_check()
-> anyhow::Result<()> {
    for command in [&["run"][..], &["config", "check"]] {
        let output = switchyard()
            .args(command)
            .args([
                "--plugins",
                "/nonexistent/plugins",
                "--admin",
                "127.0.0.1:0",
            ])
            .output()
            .await?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{command:?}: {stderr}");
        assert!(
            stderr.contains("--plugins: plugins.dir /nonexistent/plugins is not a folder"),
            "{command:?}: {stderr}"
        );
    }

    // Set in the file, the message names the file.
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("switchyard.toml");
    std::fs::write(&config, "[plugins]\ndir = \"/nonexistent/plugins\"\n")?;
    let output = switchyard()
        .args(["config", "check", "--config"])
        .arg(&config)
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{}: plugins.dir /nonexistent/plugins is not a folder",
            config.display()
        )),
        "{stderr}"
    );
    Ok(())
}

/// `switchyard run` on a free plugins folder and an admin address some other socket holds:
/// it fails while binding, before it would need Redis.
async fn run_on_a_taken_admin_port(
    log_args: &[&str],
    rust_log: &str,
) -> anyhow::Result<(String, std::process::Output)> {
    let plugins = tempfile::tempdir()?;
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let admin = taken.local_addr()?.to_string();
    let output = switchyard()
        .args(log_args)
        .args([
            "run",
            "--redis",
            "redis://127.0.0.1:1",
            "--admin",
            &admin,
            "--plugins",
        ])
        .arg(plugins.path())
        .env("RUST_LOG", rust_log)
        .output()
        .await?;
    drop(taken);
    Ok((admin, output))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_port_in_use_is_a_configuration_error_naming_the_address() -> anyhow::Result<()> {
    let (admin, output) = run_on_a_taken_admin_port(&[], "").await?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on admin.listen {admin}")),
        "{stderr}"
    );
    assert!(stderr.contains("another process"), "{stderr}");
    assert!(stderr.contains("--admin ADDR"), "{stderr}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_level_flag_takes_precedence_over_rust_log() -> anyhow::Result<()> {
    // `starting` is an info line logged before the admin address fails.
    let (_, output) = run_on_a_taken_admin_port(&["--log-level", "info"], "error").await?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("starting"), "{stderr}");

    let (_, output) = run_on_a_taken_admin_port(&["--log-level", "error"], "info").await?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(!stderr.contains("starting"), "{stderr}");

    // Without the flag, RUST_LOG decides.
    let (_, output) = run_on_a_taken_admin_port(&[], "error").await?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("starting"), "{stderr}");
    let (_, output) = run_on_a_taken_admin_port(&[], "info").await?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("starting"), "{stderr}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_compile_cache_folder_is_a_clear_error() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let plugins = dir.path().join("plugins");
    std::fs::create_dir(&plugins)?;
    // A folder cannot be created below a regular file.
    let blocker = dir.path().join("not-a-folder");
    std::fs::write(&blocker, "")?;
    let output = switchyard()
        .args(["run", "--admin", "127.0.0.1:0", "--plugins"])
        .arg(&plugins)
        .env("SWITCHYARD_PLUGINS_COMPILE_CACHE", blocker.join("cache"))
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("plugins.compile_cache: cannot create"),
        "{stderr}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_the_examples_without_redis() -> anyhow::Result<()> {
    let output = switchyard().arg("demo").output().await?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("forward published fwded:orders"),
        "{stdout}"
    );
    assert!(
        stdout.contains("notify-router called output email"),
        "{stdout}"
    );
    assert!(
        stdout.contains("cache-invalidator published cache:invalidate"),
        "{stdout}"
    );
    assert!(stdout.contains("keys still cached: []"), "{stdout}");
    // The keyspace mode: a write to db:user:7, and no publish, invalidates cache:user:7;
    // so does its deletion.
    let keyspace = stdout
        .split("  -> SET db:user:7")
        .nth(1)
        .unwrap_or_default();
    assert_eq!(
        keyspace
            .matches(r#"cache-invalidator published cache:invalidate {"keys":["cache:user:7"],"source":"cache-invalidator"}"#)
            .count(),
        2,
        "{stdout}"
    );
    assert!(keyspace.contains("  -> DEL db:user:7"), "{stdout}");
    assert!(
        stdout.contains("\"message\":\"this is not a ****, promise\""),
        "{stdout}"
    );
    for notice in [
        r#"{"reason":"muted","room":"lobby","user_id":"troll42"}"#,
        r#"{"length":300,"limit":280,"reason":"too_long","room":"lobby","user_id":"ana"}"#,
    ] {
        assert!(
            stdout.contains(&format!(
                "chat-moderator published chat:notice:lobby {notice}"
            )),
            "{stdout}"
        );
    }
    // Only the two messages let through reach the room.
    assert_eq!(
        stdout
            .matches("chat-moderator published chat:lobby ")
            .count(),
        2,
        "{stdout}"
    );
    assert!(
        stdout.contains("metrics-rollup published dashboard:summary"),
        "{stdout}"
    );
    for plugin in [
        "forward",
        "notify-router",
        "chat-moderator",
        "cache-invalidator",
        "metrics-rollup",
    ] {
        let counters = stdout
            .lines()
            .find(|line| line.trim_start().starts_with(&format!("{plugin} handled")))
            .unwrap_or_default();
        assert!(
            counters.contains("failed 0, denied 0, shed 0"),
            "{plugin}: {stdout}"
        );
    }
    Ok(())
}

/// The `forward` example and its manifest in a fresh folder, as `forward.wasm`.
fn forward_in(dir: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    let wasm = dir.join("forward.wasm");
    std::fs::write(&wasm, switchyard::examples::FORWARD)?;
    std::fs::write(
        dir.join("forward.toml"),
        include_str!("../../plugins/forward/forward.toml"),
    )?;
    Ok(wasm)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_describes_a_plugin_and_what_it_would_be_granted() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let wasm = forward_in(dir.path())?;
    let output = switchyard().arg("check").arg(&wasm).output().await?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.contains("a Switchyard plugin for switchyard:plugin/plugin@0.6.0"),
        "{stdout}"
    );
    assert!(stdout.contains("subscriptions: pattern fwd:*"), "{stdout}");
    assert!(stdout.contains("switchyard:plugin/host@0.6.0"), "{stdout}");
    assert!(
        stdout.contains("policy deny): publish [fwded:*]"),
        "{stdout}"
    );

    // Without its manifest nothing is granted, and check says what is missing.
    std::fs::remove_file(dir.path().join("forward.toml"))?;
    let output = switchyard()
        .args(["check", "--json"])
        .arg(&wasm)
        .output()
        .await?;
    assert!(output.status.success());
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    assert_eq!(report["grants"]["publish"], serde_json::json!([]));
    assert_eq!(report["not_granted"]["publish"][0], "fwded:*");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_rejects_what_is_not_a_plugin_and_says_why() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cases: [(&str, &[u8], &str); 3] = [
        ("text.wasm", b"hello", "not a valid WebAssembly file"),
        (
            "core.wasm",
            b"\0asm\x01\0\0\0",
            "a core WebAssembly module, not a component",
        ),
        (
            "truncated.wasm",
            // Cut inside the embedded core module: a cut that falls exactly between two
            // top-level sections leaves a smaller, valid component.
            &switchyard::examples::FORWARD[..switchyard::examples::FORWARD.len() / 2],
            "not a valid WebAssembly file",
        ),
    ];
    for (name, bytes, reason) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes)?;
        let output = switchyard().arg("check").arg(&path).output().await?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{name}: {stderr}");
        assert!(stderr.contains(reason), "{name}: {stderr}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_prints_effects_and_checks_them_against_expectations() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let wasm = forward_in(dir.path())?;
    let input = dir.path().join("messages.jsonl");
    std::fs::write(
        &input,
        "{\"channel\": \"fwd:a\", \"payload\": \"one\"}\n\
         {\"channel\": \"elsewhere\", \"payload_base64\": \"/w==\"}\n",
    )?;
    let output = switchyard()
        .args(["test", "--json", "--input"])
        .arg(&input)
        .arg(&wasm)
        .output()
        .await?;
    assert!(output.status.success());
    let effects = String::from_utf8(output.stdout)?;
    assert_eq!(
        effects,
        "{\"input\":1,\"publish\":{\"channel\":\"fwded:a\",\"payload\":\"one\"}}\n\
         {\"input\":1,\"result\":\"ok\"}\n\
         {\"input\":2,\"result\":\"not delivered\"}\n"
    );

    let expected = dir.path().join("expected.jsonl");
    let expecting = |effects: String| {
        let (input, expected, wasm) = (input.clone(), expected.clone(), wasm.clone());
        async move {
            std::fs::write(&expected, effects)?;
            let output = switchyard()
                .args(["test", "--input"])
                .arg(&input)
                .arg("--expect")
                .arg(&expected)
                .arg(&wasm)
                .output()
                .await?;
            anyhow::Ok(output)
        }
    };
    assert!(expecting(effects.clone()).await?.status.success());

    let fails = expecting(effects.replace("fwded:a", "fwded:b")).await?;
    let stderr = String::from_utf8_lossy(&fails.stderr);
    assert_eq!(fails.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("effect 1 differs"), "{stderr}");
    Ok(())
}

/// A plugin file for the plugins folder: name, component, manifest.
type PluginFile = (&'static str, &'static [u8], Option<String>);

/// `forward` with its grant, as the examples ship it.
fn forward_plugin() -> PluginFile {
    (
        "forward",
        switchyard::examples::FORWARD,
        Some(include_str!("../../plugins/forward/forward.toml").to_owned()),
    )
}

/// `notify-router` with its grants, as the examples ship it.
fn notify_router_plugin() -> PluginFile {
    (
        "notify-router",
        switchyard::examples::NOTIFY_ROUTER,
        Some(include_str!("../../plugins/notify-router/notify-router.toml").to_owned()),
    )
}

/// How to start `switchyard run`.
#[derive(Default)]
struct Launch {
    /// What goes into its plugins folder.
    plugins: Vec<PluginFile>,
    /// Its configuration file, if any.
    config: Option<String>,
    /// Global flags, before `run`.
    flags: Vec<String>,
}

/// `switchyard run` in a fresh plugins folder, once ready; its log is read as it comes.
struct RunningHost {
    child: tokio::process::Child,
    admin: String,
    log: watch::Receiver<String>,
    log_reader: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl RunningHost {
    /// With `forward` (and its grant) alone.
    async fn start(redis: &RedisServer) -> anyhow::Result<Self> {
        Self::launch(
            redis,
            Launch {
                plugins: vec![forward_plugin()],
                ..Launch::default()
            },
        )
        .await
    }

    async fn launch(redis: &RedisServer, launch: Launch) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let plugins = dir.path().join("plugins");
        std::fs::create_dir(&plugins)?;
        for (name, wasm, manifest) in &launch.plugins {
            std::fs::write(plugins.join(format!("{name}.wasm")), wasm)?;
            if let Some(manifest) = manifest {
                std::fs::write(plugins.join(format!("{name}.toml")), manifest)?;
            }
        }
        let admin = format!("127.0.0.1:{}", free_port()?);
        let mut command = switchyard();
        command.args(&launch.flags).args([
            "run",
            "--redis",
            &redis.url(),
            "--admin",
            &admin,
            "--plugins",
        ]);
        command.arg(&plugins);
        if let Some(config) = &launch.config {
            let file = dir.path().join("switchyard.toml");
            std::fs::write(&file, config)?;
            command.arg("--config").arg(file);
        }
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stderr"))?;
        let (log_tx, log) = watch::channel(String::new());
        let log_reader = tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                log_tx.send_modify(|log| {
                    log.push_str(&line);
                    log.push('\n');
                });
            }
        });
        let host = Self {
            child,
            admin,
            log,
            log_reader,
            _dir: dir,
        };
        let started = Instant::now();
        while host.get("/readyz").await.map(|(status, _)| status) != Some(200) {
            anyhow::ensure!(
                started.elapsed() < PATIENCE,
                "switchyard run never became ready:\n{}",
                host.log.borrow().as_str()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(host)
    }

    async fn get(&self, path: &str) -> Option<(u16, serde_json::Value)> {
        let response = reqwest::get(format!("http://{}{path}", self.admin))
            .await
            .ok()?;
        let status = response.status().as_u16();
        Some((status, response.json().await.unwrap_or_default()))
    }

    /// Waits until every plugin queued `n` messages in all: (total queued, of which handled).
    async fn wait_until_accepted(&self, n: u64) -> anyhow::Result<(u64, u64)> {
        let started = Instant::now();
        loop {
            let (_, listing) = self.get("/plugins").await.unwrap_or_default();
            let plugins = listing["plugins"].as_array().cloned().unwrap_or_default();
            let sum = |counter: &str| -> u64 {
                plugins
                    .iter()
                    .map(|p| p["stats"][counter].as_u64().unwrap_or_default())
                    .sum()
            };
            if sum("accepted") >= n {
                return Ok((sum("accepted"), sum("handled")));
            }
            anyhow::ensure!(
                started.elapsed() < PATIENCE,
                "messages never all queued: {listing}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until its log holds `text`.
    async fn wait_for_log(&self, text: &str) -> anyhow::Result<()> {
        let mut log = self.log.clone();
        tokio::time::timeout(PATIENCE, log.wait_for(|log| log.contains(text)))
            .await
            .map_err(|_| anyhow::anyhow!("{text:?} never logged:\n{}", self.log.borrow().as_str()))?
            .map_err(|_| {
                anyhow::anyhow!(
                    "the log ended without {text:?}:\n{}",
                    self.log.borrow().as_str()
                )
            })?;
        Ok(())
    }

    fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self.child.id().ok_or_else(|| anyhow::anyhow!("no pid"))?;
        let status = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill {signal} failed");
        Ok(())
    }

    /// Waits (up to `PATIENCE`) for the process to exit: (exit code, its log).
    async fn exit(mut self) -> anyhow::Result<(Option<i32>, String)> {
        let status = match tokio::time::timeout(PATIENCE, self.child.wait()).await {
            Ok(status) => status?,
            Err(_) => anyhow::bail!(
                "switchyard did not exit within {PATIENCE:?}:\n{}",
                self.log.borrow().as_str()
            ),
        };
        // The pipe closes with the process.
        let _ = tokio::time::timeout(PATIENCE, &mut self.log_reader).await;
        let log = self.log.borrow().clone();
        Ok((status.code(), log))
    }
}

/// A webhook that answers 200 after `delay`, counting the calls it received.
struct SlowWebhook {
    url: String,
    calls: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl SlowWebhook {
    async fn start(delay: Duration) -> anyhow::Result<Self> {
        let calls = Arc::new(AtomicU64::new(0));
        let counter = calls.clone();
        let app = axum::Router::new().route(
            "/",
            axum::routing::post(move || {
                let counter = counter.clone();
                async move {
                    counter.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(delay).await;
                    "ok"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/", listener.local_addr()?);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { url, calls, task })
    }

    fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
}

impl Drop for SlowWebhook {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The outputs `notify-router` is granted: `email` with the keys given, `sms` and `push` on
/// stdout.
fn notify_router_outputs(email: &str) -> String {
    format!(
        "[outputs.email]\n{email}\n\n[outputs.sms]\nkind = \"stdout\"\n\n\
         [outputs.push]\nkind = \"stdout\"\n"
    )
}

/// Each call takes this long at the webhook.
const SLOW_CALL: Duration = Duration::from_millis(250);
/// Messages queued for the slow webhook: with one worker, about 50 s of work.
const SLOW_BACKLOG: usize = 200;

/// `notify-router` sending every email to a slow webhook, with `drain_ms`, and
/// [`SLOW_BACKLOG`] emails queued: (host, webhook).
async fn slow_host_with_backlog(
    redis: &RedisServer,
    drain_ms: u64,
) -> anyhow::Result<(RunningHost, SlowWebhook)> {
    let webhook = SlowWebhook::start(SLOW_CALL).await?;
    let config = format!(
        "[plugins]\ndrain_ms = {drain_ms}\ndeadline_ms = 5000\n\n{}",
        notify_router_outputs(&format!(
            "kind = \"http\"\nurl = \"{}\"\nretries = 0\ntimeout_ms = 2000",
            webhook.url
        ))
    );
    let host = RunningHost::launch(
        redis,
        Launch {
            plugins: vec![notify_router_plugin()],
            config: Some(config),
            ..Launch::default()
        },
    )
    .await?;
    let mut connection = redis.connection().await?;
    let mut pipe = redis::pipe();
    for i in 0..SLOW_BACKLOG {
        pipe.publish(
            "notifications:email",
            format!(r#"{{"to":"a@example.com","subject":"{i}"}}"#),
        )
        .ignore();
    }
    let () = pipe.query_async(&mut connection).await?;
    host.wait_until_accepted(SLOW_BACKLOG as u64).await?;
    Ok((host, webhook))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_forwards_messages_and_exits_0_on_sigterm() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let host = RunningHost::start(&redis).await?;
    let mut out = Subscriber::new(&redis, &["fwded:x"], &[]).await?;
    redis.publish("fwd:x", "hello").await?;
    let forwarded = out.take(1, PATIENCE).await;
    host.signal("-TERM")?;
    let (code, log) = host.exit().await?;
    let got = forwarded.map_err(|e| anyhow::anyhow!("{e}\nswitchyard's log:\n{log}"))?;
    assert_eq!(got[0].payload_str(), "hello");
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("stopping"), "{log}");
    Ok(())
}

/// Queues messages for `forward`, sends `signal` while it works through them, and checks
/// that every one was handled before the host exited 0.
async fn stop_signal_drains_queued_messages(signal: &str) -> anyhow::Result<()> {
    // Within the default queue of 4,096, so that every message is accepted.
    const N: usize = 4_000;
    let redis = RedisServer::start().await?;
    let host = RunningHost::start(&redis).await?;
    let mut out = Subscriber::new(&redis, &[], &["fwded:*"]).await?;
    let mut connection = redis.connection().await?;
    let mut pipe = redis::pipe();
    for i in 0..N {
        pipe.publish("fwd:x", i.to_string()).ignore();
    }
    let () = pipe.query_async(&mut connection).await?;

    // Signal once every message is queued, while the plugin is still working through them.
    let (accepted, handled) = host.wait_until_accepted(N as u64).await?;
    let backlog = accepted - handled;
    host.signal(signal)?;
    let (code, log) = host.exit().await?;
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("stopped: every queue drained"), "{log}");
    let got = out.take(N, PATIENCE).await?;
    assert_eq!(
        got.last().map(|m| m.payload_str()),
        Some((N - 1).to_string())
    );
    assert!(
        backlog > 0,
        "nothing was left to drain; the test proved nothing"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_drains_queued_messages_before_exiting() -> anyhow::Result<()> {
    stop_signal_drains_queued_messages("-TERM").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_mid_stream_drains_queued_messages_like_sigterm() -> anyhow::Result<()> {
    stop_signal_drains_queued_messages("-INT").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_sigterm_exits_130_at_once_leaving_the_backlog() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    // A deadline far beyond the test: only the second signal can end the drain early.
    let (host, webhook) = slow_host_with_backlog(&redis, 600_000).await?;
    host.signal("-TERM")?;
    host.wait_for_log("stopping: draining plugin queues")
        .await?;
    let signalled = Instant::now();
    host.signal("-TERM")?;
    let (code, log) = host.exit().await?;
    let took = signalled.elapsed();
    assert_eq!(code, Some(130), "{log}");
    assert!(log.contains("stopped at once by a second signal"), "{log}");
    assert!(log.contains("second stop signal: exiting at once"), "{log}");
    // The backlog needed about 50 s; the exit, only the time to notice the signal.
    assert!(took < Duration::from_secs(5), "took {took:?}:\n{log}");
    let calls = webhook.calls();
    assert!(calls < SLOW_BACKLOG as u64, "all {calls} handled:\n{log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_deadline_exits_0_soon_after_it_with_a_warning() -> anyhow::Result<()> {
    const DRAIN: Duration = Duration::from_millis(1_000);
    let redis = RedisServer::start().await?;
    let (host, webhook) = slow_host_with_backlog(&redis, DRAIN.as_millis() as u64).await?;
    let signalled = Instant::now();
    host.signal("-TERM")?;
    let (code, log) = host.exit().await?;
    let took = signalled.elapsed();
    assert_eq!(code, Some(0), "{log}");
    assert!(took >= DRAIN, "took {took:?}:\n{log}");
    // The backlog needed about 50 s; the exit comes with the deadline.
    assert!(
        took < DRAIN + Duration::from_secs(5),
        "took {took:?}:\n{log}"
    );
    let warning = log
        .lines()
        .find(|line| line.contains("stop deadline passed"))
        .ok_or_else(|| anyhow::anyhow!("no warning:\n{log}"))?;
    assert!(warning.contains("WARN"), "{warning}");
    let unhandled: u64 = warning
        .split_once("unhandled=")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no count in {warning}"))?;
    let calls = webhook.calls();
    assert!(calls < SLOW_BACKLOG as u64, "all {calls} handled:\n{log}");
    // Each call the webhook got was handled, or was still in flight at the deadline.
    assert!(
        unhandled > 0 && unhandled + calls >= SLOW_BACKLOG as u64,
        "unhandled {unhandled}, calls {calls}:\n{log}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_objects_and_plugin_logs_carry_name_and_version() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let host = RunningHost::launch(
        &redis,
        Launch {
            plugins: vec![notify_router_plugin()],
            config: Some(notify_router_outputs("kind = \"stdout\"")),
            flags: vec!["--log-format".to_owned(), "json".to_owned()],
        },
    )
    .await?;
    let mut dead = Subscriber::new(&redis, &["notifications:dead"], &[]).await?;
    // An unknown kind is dead-lettered, with an info line from the plugin.
    redis.publish("notifications:bogus", "{}").await?;
    host.wait_for_log("dead-lettering").await?;
    dead.next(PATIENCE).await?;
    host.signal("-TERM")?;
    let (code, log) = host.exit().await?;
    assert_eq!(code, Some(0), "{log}");
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|line| {
            serde_json::from_str(line).map_err(|e| anyhow::anyhow!("{e}: not JSON: {line}"))
        })
        .collect::<anyhow::Result<_>>()?;
    assert!(lines.len() > 2, "{log}");
    for line in &lines {
        assert!(line.is_object(), "{line}");
        assert!(line["level"].is_string(), "no level: {line}");
    }
    let plugin_line = lines
        .iter()
        .find(|line| {
            line["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("dead-lettering message on notifications:bogus"))
        })
        .ok_or_else(|| anyhow::anyhow!("no plugin log line:\n{log}"))?;
    assert_eq!(plugin_line["level"], "INFO", "{plugin_line}");
    assert_eq!(
        plugin_line["fields"]["plugin"], "notify-router",
        "{plugin_line}"
    );
    assert!(
        plugin_line["fields"]["version"]
            .as_str()
            .is_some_and(|v| !v.is_empty()),
        "{plugin_line}"
    );
    Ok(())
}

/// `switchyard status` of `host`: (exit status, stdout, stderr).
async fn status_of(
    host: &RunningHost,
    redis: &RedisServer,
    json: bool,
) -> anyhow::Result<(bool, String, String)> {
    let mut command = switchyard();
    command.args([
        "status",
        "--admin",
        &host.admin,
        "--redis",
        &redis.url(),
        "--interval",
        "0.2",
    ]);
    if json {
        command.arg("--json");
    }
    let output = command.output().await?;
    Ok((
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_plugins_and_what_redis_sees() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let host = RunningHost::start(&redis).await?;
    // A second host on the same Redis, its `forward` on an exact channel.
    let other = RunningHost::launch(
        &redis,
        Launch {
            plugins: vec![(
                "forward",
                switchyard::examples::FORWARD,
                Some(
                    "[grants]\npublish = [\"fwded:*\"]\n\n\
                     [subscriptions]\nchannels = [\"fwd:exact\"]\n"
                        .to_owned(),
                ),
            )],
            ..Launch::default()
        },
    )
    .await?;
    redis.publish("fwd:x", "counted").await?;

    let (ok, text, stderr) = status_of(&host, &redis, false).await?;
    assert!(ok, "{text}{stderr}");
    assert!(text.contains("ready; subscriber connected"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("forward") && l.contains("running")),
        "{text}"
    );
    assert!(text.contains("PUBSUB NUMPAT: 1"), "{text}");
    assert!(text.contains("queues: 0.0 MiB of "), "{text}");
    assert!(text.contains("name=switchyard-"), "{text}");
    assert_eq!(text.matches("host connection:").count(), 1, "{text}");

    let (_, plugins) = host.get("/plugins").await.unwrap_or_default();
    let own = plugins["redis_client_name"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no client name: {plugins}"))?
        .to_owned();
    let (_, plugins) = other.get("/plugins").await.unwrap_or_default();
    let others = plugins["redis_client_name"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no client name: {plugins}"))?
        .to_owned();
    assert_ne!(own, others);

    let (_, json, stderr) = status_of(&host, &redis, true).await?;
    let status: serde_json::Value =
        serde_json::from_str(&json).map_err(|e| anyhow::anyhow!("{e}: {json}{stderr}"))?;
    assert_eq!(status["plugins"][0]["name"], "forward");
    assert_eq!(status["plugins"][0]["stats"]["handled"], 1);
    assert_eq!(status["plugins"][0]["queue_bytes_limit"], 64 << 20);
    assert_eq!(status["redis"]["numpat"], 1);
    assert_eq!(status["redis"]["client_name"], own.as_str());
    let clients = status["redis"]["host_clients"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(clients.len(), 1, "{status}");
    assert!(
        clients[0]
            .as_str()
            .is_some_and(|c| c.contains(&format!(" name={own} "))),
        "{status}"
    );

    // The other host: its exact channel through PUBSUB NUMSUB, and its own connection only.
    let (ok, text, stderr) = status_of(&other, &redis, false).await?;
    assert!(ok, "{text}{stderr}");
    assert!(text.contains("PUBSUB NUMSUB fwd:exact: 1"), "{text}");
    assert!(text.contains(&format!(" name={others} ")), "{text}");
    assert!(!text.contains(&format!(" name={own} ")), "{text}");
    let (_, json, _) = status_of(&other, &redis, true).await?;
    let status: serde_json::Value = serde_json::from_str(&json)?;
    assert_eq!(status["redis"]["numsub"]["fwd:exact"], 1, "{status}");
    assert_eq!(
        status["redis"]["host_clients"].as_array().map(Vec::len),
        Some(1),
        "{status}"
    );

    for host in [host, other] {
        host.signal("-TERM")?;
        let (code, log) = host.exit().await?;
        assert_eq!(code, Some(0), "{log}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_stay_out_of_logs_and_the_admin_api() -> anyhow::Result<()> {
    // A webhook with a token in its URL and its headers, unreachable, so that every call
    // fails and is logged at debug level; then a Redis URL whose password is wrong.
    let redis = RedisServer::start().await?;
    let closed = free_port()?;
    let config = format!(
        "[plugins]\ndeadline_ms = 2000\n\n{}",
        notify_router_outputs(&format!(
            "kind = \"http\"\nurl = \"http://gw:hunter2-user@127.0.0.1:{closed}/send?token=hunter2-query\"\n\
             headers = {{ Authorization = \"Bearer hunter2-header\" }}\nretries = 1\nbackoff_ms = 10\n"
        ))
    );
    let host = RunningHost::launch(
        &redis,
        Launch {
            plugins: vec![notify_router_plugin()],
            config: Some(config),
            flags: vec!["--log-level".into(), "debug".into()],
        },
    )
    .await?;
    let mut dead = Subscriber::new(&redis, &["notifications:dead"], &[]).await?;
    redis
        .publish(
            "notifications:email",
            r#"{"to":"a@example.com","subject":"hi"}"#,
        )
        .await?;
    let letter = dead.take(1, PATIENCE).await?;
    let (_, plugins) = host.get("/plugins").await.unwrap_or_default();
    let plugins = plugins.to_string();
    host.signal("-TERM")?;
    let (code, log) = host.exit().await?;
    assert_eq!(code, Some(0), "{log}");
    let letter = letter[0].payload_str();
    assert!(
        letter.contains("email"),
        "the failed call was dead-lettered: {letter}"
    );
    for place in [&log, &plugins, &letter] {
        assert!(!place.contains("hunter2"), "a secret leaked: {place}");
    }

    // A wrong password: retried and reported, never printed.
    let admin = format!("127.0.0.1:{}", free_port()?);
    let dir = tempfile::tempdir()?;
    let url = redis
        .url()
        .replacen("redis://", "redis://app:hunter2-redis@", 1);
    let child = switchyard()
        .args(["run", "--redis", &url, "--admin", &admin, "--plugins"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let started = Instant::now();
    let readiness = loop {
        let body = match reqwest::get(format!("http://{admin}/readyz")).await {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if body.contains("last_error") && !body.contains("\"last_error\":null") {
            break body;
        }
        anyhow::ensure!(started.elapsed() < PATIENCE, "no error reported: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let pid = child.id().ok_or_else(|| anyhow::anyhow!("no pid"))?;
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    let output = tokio::time::timeout(PATIENCE, child.wait_with_output()).await??;
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(
        readiness.contains("WRONGPASS") || readiness.contains("AuthenticationFailed"),
        "the refused password is reported: {readiness}"
    );
    assert!(!readiness.contains("hunter2"), "{readiness}");
    assert!(!log.contains("hunter2"), "{log}");
    Ok(())
}
