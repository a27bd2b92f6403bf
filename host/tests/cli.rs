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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_forwards_messages_and_exits_0_on_sigterm() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
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
    let mut child = switchyard()
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

    let http = reqwest::Client::new();
    let started = Instant::now();
    loop {
        let ready = http.get(format!("http://{admin}/readyz")).send().await;
        if ready.is_ok_and(|r| r.status() == 200) {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < PATIENCE,
            "switchyard run never became ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut out = Subscriber::new(&redis, &["fwded:x"], &[]).await?;
    redis.publish("fwd:x", "hello").await?;
    let got = match out.take(1, PATIENCE).await {
        Ok(got) => got,
        Err(e) => {
            let _ = child.start_kill();
            let output = child.wait_with_output().await?;
            anyhow::bail!(
                "{e}\nswitchyard's log:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
    };
    assert_eq!(got[0].payload_str(), "hello");

    let pid = child.id().ok_or_else(|| anyhow::anyhow!("no pid"))?;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    assert!(status.success());
    let output = tokio::time::timeout(PATIENCE, child.wait_with_output()).await??;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("stopping"), "{stderr}");
    Ok(())
}
