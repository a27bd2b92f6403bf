//! The gateway's chat and dashboard pages in headless Chromium, against a real host running
//! chat-moderator and metrics-rollup on a real Redis.
//!
//! `tests/browser/pages.mjs` drives the browser (playwright-core, pinned in
//! `tests/browser/package-lock.json` and installed once per lock file into `target/tools` by
//! `tests/browser/install.sh`) and checks what the pages show; this test sets the host up, runs
//! it, and checks that it passed and left its screenshots in `target/browser-artifacts/`.
//!
//! Chromium is the system's (`/usr/bin/chromium`, Debian's `chromium` package; another binary
//! can be named with `SWITCHYARD_CHROMIUM`). `install.sh` installs it with apt-get where it is
//! missing and apt-get can; otherwise the test fails, saying how to install it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail, ensure};
use switchyard_tests::polyglot::{target_dir, tools_dir, workspace_root};
use switchyard_tests::{RedisServer, TestHost, plugins};

const DEFAULT_CHROMIUM: &str = "/usr/bin/chromium";

const CHAT_TOKEN: &str = "browser-test-chat-token";
const DASHBOARD_TOKEN: &str = "browser-test-dashboard-token";

/// The gateway on a free port, with a token for the chat page and one for the dashboard.
const CONFIG: &str = r#"
[gateway]
listen = "127.0.0.1:0"

[gateway.tokens.chat]
token = "browser-test-chat-token"
read = ["chat:*"]
write = ["chat:in:*"]

[gateway.tokens.dashboard]
token = "browser-test-dashboard-token"
read = ["dashboard:*", "switchyard:plugins"]
"#;

/// chat-moderator's example grant, with settings pages.mjs is told about (`--muted`,
/// `--max-length`, `--banned`). Both manifests raise the per-message deadline: the browser
/// shares the machine, and a call that overran the default 100 ms would count as failed (the
/// dashboard checks want none).
const CHAT_MODERATOR_MANIFEST: &str = r#"
[grants]
publish = ["chat:*"]

[config]
max_length = 40
muted = ["troll"]
banned_words = ["spam"]

[limits]
deadline_ms = 5000
"#;

/// metrics-rollup's example grant; a summary after every sample.
const METRICS_ROLLUP_MANIFEST: &str = r#"
[grants]
publish = ["dashboard:summary"]

[config]
interval_ms = 0

[limits]
deadline_ms = 5000
"#;

/// What pages.mjs must leave in the artifacts folder.
const SCREENSHOTS: &[&str] = &[
    "chat-alice.png",
    "chat-bob.png",
    "chat-troll.png",
    "dashboard.png",
];

/// pages.mjs gives up by itself after this (every single wait has 15 s); the test kills it
/// a little later.
const SCRIPT_DEADLINE: Duration = Duration::from_secs(180);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_and_dashboard_pages_work_in_chromium() -> anyhow::Result<()> {
    // Installs Chromium too where it is missing and apt-get can.
    let tools = tokio::task::spawn_blocking(install_driver).await??;
    let chromium = chromium()?;

    let redis = RedisServer::start().await?;
    let host = TestHost::start_configured(
        &redis,
        CONFIG,
        &[
            (
                "chat-moderator",
                plugins::CHAT_MODERATOR,
                Some(CHAT_MODERATOR_MANIFEST),
            ),
            (
                "metrics-rollup",
                plugins::METRICS_ROLLUP,
                Some(METRICS_ROLLUP_MANIFEST),
            ),
        ],
    )
    .await?;
    for name in ["chat-moderator", "metrics-rollup"] {
        host.wait_plugin(name, "running", |p| p["state"] == "running")
            .await?;
    }
    let gateway = host
        .host()
        .gateway_addr()
        .context("the gateway is configured but not listening")?;

    let artifacts = target_dir().join("browser-artifacts");
    std::fs::create_dir_all(&artifacts)
        .with_context(|| format!("creating {}", artifacts.display()))?;
    let script = workspace_root().join("tests/browser/pages.mjs");
    let started = Instant::now();
    // Screenshots older than this are a previous run's (file times are coarse: 1 s of slack).
    let written_after = SystemTime::now() - Duration::from_secs(1);
    let mut command = tokio::process::Command::new("node");
    command
        .arg(&script)
        .arg("--url")
        .arg(format!("http://{gateway}/"))
        .args(["--chat-token", CHAT_TOKEN])
        .args(["--dashboard-token", DASHBOARD_TOKEN])
        .args(["--redis-host", "127.0.0.1"])
        .arg("--redis-port")
        .arg(redis.port().to_string())
        .arg("--artifacts")
        .arg(&artifacts)
        .arg("--chromium")
        .arg(&chromium)
        .args(["--timeout-ms", "15000"])
        .arg("--deadline-ms")
        .arg(SCRIPT_DEADLINE.as_millis().to_string())
        .args(["--muted", "troll", "--max-length", "40", "--banned", "spam"])
        .env("BROWSER_TOOLS", &tools)
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(SCRIPT_DEADLINE + Duration::from_secs(30), command.output())
        .await
        .with_context(|| {
            format!(
                "{} did not finish within {:?}",
                script.display(),
                SCRIPT_DEADLINE + Duration::from_secs(30)
            )
        })?
        .with_context(|| format!("cannot run node {} (is node installed?)", script.display()))?;
    let elapsed = started.elapsed();
    let report = format!(
        "node {} ({}, {elapsed:.1?}):\n{}{}",
        script.display(),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    ensure!(
        output.status.success(),
        "the browser checks failed: {report}"
    );
    for name in SCREENSHOTS {
        check_png(&artifacts.join(name), written_after).with_context(|| report.clone())?;
    }
    // Shown with --nocapture: what was checked, and how long each check took.
    println!("{report}");

    host.stop().await?;
    Ok(())
}

/// The Chromium binary, or an error saying how to install it.
fn chromium() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("SWITCHYARD_CHROMIUM")
        .map_or_else(|| PathBuf::from(DEFAULT_CHROMIUM), PathBuf::from);
    if !path.is_file() {
        bail!(
            "Chromium is not installed at {}: the browser tests need it. Install it with \
             `apt-get install -y chromium` (Debian; tests/browser/install.sh does so where it \
             can), or set SWITCHYARD_CHROMIUM to a Chromium binary.",
            path.display()
        );
    }
    Ok(path)
}

/// Installs playwright-core once per lock file (`tests/browser/install.sh`, shared by every
/// run and by CI); returns the folder it is in.
fn install_driver() -> anyhow::Result<PathBuf> {
    let script = workspace_root().join("tests/browser/install.sh");
    let output = std::process::Command::new("bash")
        .arg(&script)
        .env("SWITCHYARD_TOOLS", tools_dir())
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", script.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "{} failed ({}):\n{stdout}{}",
            script.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let folder = stdout
        .lines()
        .last()
        .map(PathBuf::from)
        .filter(|folder| folder.join("node_modules/playwright-core").is_dir())
        .with_context(|| format!("{} printed no tools folder: {stdout}", script.display()))?;
    Ok(folder)
}

/// Checks that `path` was written after `written_after` and is a PNG image of some size:
/// signature, then an IHDR chunk with a non-zero width and height.
fn check_png(path: &Path, written_after: SystemTime) -> anyhow::Result<()> {
    let bytes =
        std::fs::read(path).with_context(|| format!("screenshot {} is missing", path.display()))?;
    let modified = std::fs::metadata(path)?.modified()?;
    ensure!(
        modified >= written_after,
        "screenshot {} is left over from an earlier run",
        path.display()
    );
    ensure!(
        bytes.len() > 24 && bytes.starts_with(b"\x89PNG\r\n\x1a\n") && &bytes[12..16] == b"IHDR",
        "screenshot {} is not a PNG image ({} bytes)",
        path.display(),
        bytes.len()
    );
    let width = u32::from_be_bytes(bytes[16..20].try_into()?);
    let height = u32::from_be_bytes(bytes[20..24].try_into()?);
    ensure!(
        width > 0 && height > 0,
        "screenshot {} is {width}x{height}",
        path.display()
    );
    Ok(())
}
