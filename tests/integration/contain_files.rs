//! Files the host reads from folders others may fill: manifests that are FIFOs, devices or
//! symlinks out of the folder, and a compile cache that is not the host's own or holds an
//! artefact copied over another's.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use serde_json::Value;
use switchyard_tests::gateway::metric;
use switchyard_tests::process::HostProcess;
use switchyard_tests::{
    FORWARD_MANIFEST, PATIENCE, RedisServer, TestHost, assert_forwards, copy_plugin, echo_manifest,
    eventually, plugins,
};
use tokio::io::AsyncBufReadExt as _;

/// How long a folder with a FIFO and a `/dev/zero` manifest may take to be loaded: loading
/// takes tens of milliseconds here, a blocked read would never end. Generous for a loaded
/// machine; the time measured is printed.
const AT_ONCE: Duration = Duration::from_secs(5);

fn mkfifo(path: &Path) -> anyhow::Result<()> {
    let status = std::process::Command::new("mkfifo").arg(path).status()?;
    ensure!(status.success(), "mkfifo {} failed", path.display());
    Ok(())
}

/// The `load_error` of plugin `name` in `/plugins`, once it is listed as failed.
async fn load_error(host: &TestHost, name: &str) -> anyhow::Result<Value> {
    let entry = host
        .wait_plugin(name, "failed", |entry| entry["state"] == "failed")
        .await?;
    Ok(entry["load_error"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_and_device_manifests_are_refused_at_once_and_the_rest_loads() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let started = Instant::now();
    let host = TestHost::start_with(&redis, "", |dir| {
        // Plugins load in name order: a blocked read of `m.toml` or `w.toml` would hold up
        // `x-forward`, and the host's readiness.
        copy_plugin(dir, "m", plugins::FORWARD.as_ref(), None)?;
        mkfifo(&dir.join("m.toml"))?;
        copy_plugin(dir, "w", plugins::FORWARD.as_ref(), None)?;
        std::os::unix::fs::symlink("/dev/zero", dir.join("w.toml"))?;
        copy_plugin(
            dir,
            "x-forward",
            plugins::FORWARD.as_ref(),
            Some(FORWARD_MANIFEST),
        )?;
        Ok(())
    })
    .await?;
    let ready_after = started.elapsed();
    println!("folder with a FIFO and a /dev/zero manifest ready after {ready_after:?}");
    assert!(ready_after < AT_ONCE, "ready only after {ready_after:?}");

    for (name, what) in [("m", "a FIFO"), ("w", "a character device")] {
        let error = load_error(&host, name).await?;
        assert_eq!(error["kind"], "read", "{name}: {error}");
        let message = error["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(&format!("{name}.toml is {what}, not a regular file")),
            "{name}: {error}"
        );
    }
    host.wait_plugin("x-forward", "running", |e| e["state"] == "running")
        .await?;
    assert_forwards(&redis, "past the FIFO").await?;

    // Later arrivals too: a FIFO manifest added while the host runs is refused, and a plugin
    // added after it loads.
    let fifo_at = Instant::now();
    mkfifo(&host.dir().join("late.toml"))?;
    host.install(
        "late",
        &switchyard_tests::read_plugin(plugins::FORWARD),
        None,
    )?;
    host.install(
        "later",
        &switchyard_tests::read_plugin(plugins::FORWARD),
        Some(FORWARD_MANIFEST),
    )?;
    load_error(&host, "late").await?;
    host.wait_plugin("later", "running", |e| e["state"] == "running")
        .await?;
    let later_after = fifo_at.elapsed();
    println!("plugin added after a FIFO manifest running after {later_after:?}");
    assert!(later_after < AT_ONCE, "running only after {later_after:?}");
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_linked_out_of_the_folder_never_shows_its_content() -> anyhow::Result<()> {
    const SECRET: &str = "hunter2-SECRET";
    let outside = tempfile::tempdir()?;
    // Valid TOML with a key no manifest has; not TOML at all; manifest keys of the wrong type;
    // an output name that is not defined.
    let secrets = [
        ("unknown", format!("db_password = \"{SECRET}\"\n")),
        ("shadow", format!("root:{SECRET}:19000:0:99999:7:::\n")),
        ("typed", format!("[limits]\ndeadline_ms = \"{SECRET}\"\n")),
        ("checked", format!("[grants]\noutputs = [\"{SECRET}\"]\n")),
    ];
    for (name, text) in &secrets {
        std::fs::write(outside.path().join(name), text)?;
    }
    let redis = RedisServer::start().await?;
    let host = TestHost::start_with(&redis, "", |dir| {
        for (name, _) in &secrets {
            copy_plugin(dir, name, plugins::FORWARD.as_ref(), None)?;
            std::os::unix::fs::symlink(
                outside.path().join(name),
                dir.join(format!("{name}.toml")),
            )?;
        }
        Ok(())
    })
    .await?;

    for (name, _) in &secrets {
        let error = load_error(&host, name).await?;
        assert_eq!(error["kind"], "manifest", "{name}: {error}");
        let message = error["message"].as_str().unwrap_or_default();
        assert!(message.contains(&format!("{name}.toml")), "{name}: {error}");
        assert!(
            message.contains("outside the plugins folder"),
            "{name}: {error}"
        );
    }
    // It says where the problem is, without the content.
    let typed = load_error(&host, "typed").await?;
    assert!(
        typed["message"]
            .as_str()
            .is_some_and(|m| m.contains("at line 2")),
        "{typed}"
    );
    let checked = load_error(&host, "checked").await?;
    assert!(
        checked["message"]
            .as_str()
            .is_some_and(|m| m.contains("grants.outputs")),
        "{checked}"
    );
    // Nowhere in the listing, nor anything else of those files.
    let (_, listing) = host.get("/plugins").await?;
    let listing = listing.to_string();
    for fragment in [SECRET, "db_password", "root:", "19000"] {
        assert!(!listing.contains(fragment), "{fragment} in {listing}");
    }
    host.stop().await
}

/// Lays out `files` the way a Kubernetes ConfigMap volume does: the files in a timestamped
/// folder, `..data` a symlink to it, and each name a symlink through `..data`.
fn configmap(dir: &Path, files: &[(&str, &[u8])]) -> anyhow::Result<()> {
    let version = dir.join("..2025_01_01_00_00_00.000000001");
    std::fs::create_dir(&version)?;
    for (name, content) in files {
        std::fs::write(version.join(name), content)?;
        std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name))?;
    }
    std::os::unix::fs::symlink(version.file_name().context("named")?, dir.join("..data"))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_style_manifest_is_followed_and_its_errors_quoted() -> anyhow::Result<()> {
    let forward = switchyard_tests::read_plugin(plugins::FORWARD);
    let redis = RedisServer::start().await?;
    let host = TestHost::start_with(&redis, "", |dir| {
        configmap(
            dir,
            &[
                ("forward.wasm", &forward),
                ("forward.toml", FORWARD_MANIFEST.as_bytes()),
                ("typo.wasm", &forward),
                ("typo.toml", b"[limits]\ndeadline_ms = \"fast\"\n"),
            ],
        )
    })
    .await?;
    // The manifest's grant took effect: forward may publish on fwded:*.
    assert_forwards(&redis, "through ..data").await?;
    // Its file lies in the folder, so the error shows the line at fault.
    let error = load_error(&host, "typo").await?;
    assert_eq!(error["kind"], "manifest", "{error}");
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("deadline_ms = \"fast\"")),
        "{error}"
    );
    host.stop().await
}

/// The `.cwasm` artefacts in `dir`, by name, with their content.
fn artefacts(dir: &Path) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "cwasm") {
            let name = path.file_name().context("named")?.to_string_lossy().into();
            found.push((name, std::fs::read(&path)?));
        }
    }
    found.sort();
    Ok(found)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artefact_copied_over_another_plugins_is_rejected() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let cache = tempfile::tempdir()?;
    let config = format!("[plugins]\ncompile_cache = {:?}\n", cache.path());
    // X: echo, answering on `echoes` what it receives on `fwd:*`. Y: forward.
    let echo = echo_manifest(&[], &["fwd:*"], "echoes", "x");
    let host =
        TestHost::start_configured(&redis, &config, &[("x", plugins::ECHO, Some(&echo))]).await?;
    host.stop().await?;
    let x_artefacts = artefacts(cache.path())?;
    ensure!(
        x_artefacts.len() == 1,
        "{} artefacts for x",
        x_artefacts.len()
    );
    let x_artefact = &x_artefacts[0];

    let y_plugin = [("forward", plugins::FORWARD, Some(FORWARD_MANIFEST))];
    let host = TestHost::start_configured(&redis, &config, &y_plugin).await?;
    host.stop().await?;
    let all = artefacts(cache.path())?;
    let y_artefact = all
        .iter()
        .find(|(name, _)| *name != x_artefact.0)
        .context("an artefact for forward")?
        .clone();

    // X's artefact under Y's name, as if the file had been copied over it.
    std::fs::write(cache.path().join(&y_artefact.0), &x_artefact.1)?;
    let host = TestHost::start_configured(&redis, &config, &y_plugin).await?;
    // Only forward's code republishes on fwded:*.
    assert_forwards(&redis, "still forward's code").await?;
    // The planted file was discarded and forward compiled again.
    let after = std::fs::read(cache.path().join(&y_artefact.0))?;
    assert!(
        after != x_artefact.1,
        "the copied artefact is still in place"
    );
    assert_eq!(
        after, y_artefact.1,
        "forward's artefact was not written again"
    );
    let rejected = metric(&host, "switchyard_compile_cache_rejected_total").await?;
    assert_eq!(rejected, 1.0, "rejections counted on /metrics");
    assert_eq!(
        metric(&host, "switchyard_compile_cache_enabled").await?,
        1.0
    );
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compile_cache_others_may_write_is_refused_with_a_warning() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let redis = RedisServer::start().await?;
    let dir = tempfile::tempdir()?;
    let cache = dir.path().join("cache");
    std::fs::create_dir(&cache)?;
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777))?;
    // A process of its own, to read the warning it logs.
    let mut host = HostProcess::builder(&redis)
        .config(&format!("[plugins]\ncompile_cache = {cache:?}\n"))
        .plugin("forward", plugins::FORWARD, Some(FORWARD_MANIFEST))
        .env("NO_COLOR", "1")
        .stderr()
        .start()
        .await?;
    let mut stderr = tokio::io::BufReader::new(host.stderr()?).lines();
    let warning = tokio::time::timeout(PATIENCE, async {
        while let Some(line) = stderr.next_line().await? {
            if line.contains("plugins.compile_cache is off") {
                return anyhow::Ok(line);
            }
        }
        anyhow::bail!("the host ended without the warning")
    })
    .await
    .context("no warning about the compile cache")??;
    assert!(
        warning.contains("writable by anyone (mode 0777)"),
        "{warning}"
    );

    // The host runs its plugins all the same, compiled without the cache.
    eventually(PATIENCE, || async {
        let mut connection = redis.connection().await?;
        let patterns: i64 = redis::cmd("PUBSUB")
            .arg("NUMPAT")
            .query_async(&mut connection)
            .await?;
        ensure!(patterns >= 1, "the host has not subscribed yet");
        Ok(())
    })
    .await?;
    assert_forwards(&redis, "without a cache").await?;
    host.kill().await?;
    let written: Vec<_> = std::fs::read_dir(&cache)?.collect::<Result<_, _>>()?;
    assert!(
        written.is_empty(),
        "the host wrote to the refused folder: {written:?}"
    );
    Ok(())
}
