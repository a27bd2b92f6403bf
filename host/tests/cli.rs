//! The `switchyard` binary as an operator uses it: exit codes, the demo, and `run` against a
//! real redis-server, stopped with SIGTERM.

// The same redis-server harness the integration tests use.
#[path = "../../tests/harness/redis.rs"]
#[allow(dead_code)]
mod redis_server;

use std::process::Stdio;
use std::time::{Duration, Instant};

use redis_server::{RedisServer, Subscriber};
use tokio::process::Command;

const BINARY: &str = env!("CARGO_BIN_EXE_switchyard");
const PATIENCE: Duration = Duration::from_secs(15);

fn switchyard() -> Command {
    let mut command = Command::new(BINARY);
    command.kill_on_drop(true).stdin(Stdio::null());
    command
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
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
        .env("REDIS_URL", "redis://app:s3cret@cache:6379")
        .env("SWITCHYARD_PLUGINS_QUEUE_CAPACITY", "8192")
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
    assert!(stdout.contains("queue_capacity = 8192"), "{stdout}");
    assert!(stdout.contains("Authorization = ***"), "{stdout}");
    assert!(
        !stdout.contains("s3cret") && !stdout.contains("hunter2"),
        "{stdout}"
    );

    let bad = switchyard()
        .args(["config", "check"])
        .env("SWITCHYARD_PLUGINS_QUEUE_CAPACITY", "lots")
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("SWITCHYARD_PLUGINS_QUEUE_CAPACITY"),
        "{stderr}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_plugins_folder_is_a_clear_error() -> anyhow::Result<()> {
    let output = switchyard()
        .args([
            "run",
            "--plugins",
            "/nonexistent/plugins",
            "--admin",
            "127.0.0.1:0",
        ])
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("/nonexistent/plugins is not a folder"),
        "{stderr}"
    );
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
    std::fs::write(&wasm, switchyard::demo::examples::FORWARD)?;
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
        stdout.contains("a Switchyard plugin for switchyard:plugin/plugin@0.4.0"),
        "{stdout}"
    );
    assert!(stdout.contains("subscriptions: pattern fwd:*"), "{stdout}");
    assert!(stdout.contains("switchyard:plugin/host@0.4.0"), "{stdout}");
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
            &switchyard::demo::examples::FORWARD[..switchyard::demo::examples::FORWARD.len() / 2],
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

/// `switchyard run` with `forward` (and its grant) in a fresh plugins folder, once ready.
struct RunningHost {
    child: tokio::process::Child,
    admin: String,
    _plugins: tempfile::TempDir,
}

impl RunningHost {
    async fn start(redis: &RedisServer) -> anyhow::Result<Self> {
        let plugins = tempfile::tempdir()?;
        std::fs::write(
            plugins.path().join("forward.wasm"),
            switchyard::demo::examples::FORWARD,
        )?;
        std::fs::write(
            plugins.path().join("forward.toml"),
            include_str!("../../plugins/forward/forward.toml"),
        )?;
        let admin = format!("127.0.0.1:{}", free_port()?);
        let child = switchyard()
            .args([
                "run",
                "--redis",
                &redis.url(),
                "--admin",
                &admin,
                "--plugins",
            ])
            .arg(plugins.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let host = Self {
            child,
            admin,
            _plugins: plugins,
        };
        let started = Instant::now();
        while host.get("/readyz").await.map(|(status, _)| status) != Some(200) {
            anyhow::ensure!(
                started.elapsed() < PATIENCE,
                "switchyard run never became ready"
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

    fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self.child.id().ok_or_else(|| anyhow::anyhow!("no pid"))?;
        let status = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill {signal} failed");
        Ok(())
    }

    /// Waits for the process to exit: (exit code, its log).
    async fn exit(self) -> anyhow::Result<(Option<i32>, String)> {
        let output = tokio::time::timeout(PATIENCE, self.child.wait_with_output()).await??;
        Ok((
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ))
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_drains_queued_messages_before_exiting() -> anyhow::Result<()> {
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
    let started = Instant::now();
    let backlog = loop {
        let (_, listing) = host.get("/plugins").await.unwrap_or_default();
        let stats = &listing["plugins"][0]["stats"];
        if stats["accepted"] == N {
            break N as u64 - stats["handled"].as_u64().unwrap_or_default();
        }
        anyhow::ensure!(
            started.elapsed() < PATIENCE,
            "messages never all queued: {listing}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    host.signal("-TERM")?;
    let (code, log) = host.exit().await?;
    assert_eq!(code, Some(0), "{log}");
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
async fn status_shows_the_plugins_and_what_redis_sees() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let host = RunningHost::start(&redis).await?;
    redis.publish("fwd:x", "counted").await?;
    let args = |json: bool| {
        let mut args = vec![
            "status".to_owned(),
            "--admin".to_owned(),
            host.admin.clone(),
            "--redis".to_owned(),
            redis.url(),
            "--interval".to_owned(),
            "0.2".to_owned(),
        ];
        if json {
            args.push("--json".to_owned());
        }
        args
    };
    let table = switchyard().args(args(false)).output().await?;
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&table.stderr)
    );
    assert!(text.contains("ready; subscriber connected"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("forward") && l.contains("running")),
        "{text}"
    );
    assert!(text.contains("PUBSUB NUMPAT: 1"), "{text}");
    assert!(text.contains("name=switchyard-"), "{text}");

    let json = switchyard().args(args(true)).output().await?;
    let status: serde_json::Value = serde_json::from_slice(&json.stdout)?;
    assert_eq!(status["plugins"][0]["name"], "forward");
    assert_eq!(status["plugins"][0]["stats"]["handled"], 1);
    assert_eq!(status["redis"]["numpat"], 1);
    assert_eq!(
        status["redis"]["host_clients"].as_array().map(Vec::len),
        Some(1)
    );
    host.signal("-TERM")?;
    let (code, log) = host.exit().await?;
    assert_eq!(code, Some(0), "{log}");
    Ok(())
}
