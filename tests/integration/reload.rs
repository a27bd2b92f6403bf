//! Live changes to the plugins folder: add, replace and remove while messages flow.

use std::collections::BTreeMap;

use anyhow::bail;
use serde_json::Value;
use switchyard_tests::{
    FORWARD_MANIFEST, PATIENCE, RedisServer, Subscriber, TestHost, echo_manifest, eventually,
    plugins, read_plugin, rebuilt,
};

async fn hash_of(host: &TestHost, name: &str) -> anyhow::Result<Option<String>> {
    Ok(host
        .plugin(name)
        .await?
        .and_then(|p| p["version"]["hash"].as_str().map(str::to_owned)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_plugin_handles_every_message_exactly_once() -> anyhow::Result<()> {
    // 2,500 messages a second: steady traffic the plugin keeps up with even in a debug
    // build, so that nothing is shed and every message must come out exactly once.
    const BATCH: usize = 25;
    const PACE: std::time::Duration = std::time::Duration::from_millis(10);
    const AFTER_SWAP: usize = 400;
    let redis = RedisServer::start().await?;
    let echo = read_plugin(plugins::ECHO);
    let v1 = echo_manifest(&[], &["r:*"], "seen", "v1");
    let host = TestHost::start(&redis, &[("echo", plugins::ECHO, Some(&v1))]).await?;
    let mut seen = Subscriber::new(&redis, &["seen"], &[]).await?;
    let mut connection = redis.connection().await?;

    // Each version subscribes differently, so every swap also changes the subscriptions on
    // the wire and which subscription is the plugin's first match for `r:x`.
    let versions = [
        (
            "v2",
            rebuilt(&echo, "v2"),
            echo_manifest(&["r:x"], &["r:*"], "seen", "v2"),
        ),
        (
            "v3",
            rebuilt(&echo, "v3"),
            echo_manifest(&[], &["r:?", "r:*"], "seen", "v3"),
        ),
    ];
    let mut sent = 0usize;
    let mut pace = tokio::time::interval(PACE);
    let mut publish_batch = async |sent: &mut usize| -> anyhow::Result<()> {
        pace.tick().await;
        let mut pipe = redis::pipe();
        for _ in 0..BATCH {
            let channel = if sent.is_multiple_of(2) {
                "r:x"
            } else {
                "r:yy"
            };
            pipe.publish(channel, sent.to_string()).ignore();
            *sent += 1;
        }
        let () = pipe.query_async(&mut connection).await?;
        Ok(())
    };
    for _ in 0..(AFTER_SWAP / BATCH) {
        publish_batch(&mut sent).await?;
    }
    for (_, wasm, manifest) in &versions {
        let before = hash_of(&host, "echo").await?;
        host.install("echo", wasm, Some(manifest))?;
        // Keep publishing until the new version is in, then some more.
        let mut batches = 0;
        while hash_of(&host, "echo").await? == before {
            publish_batch(&mut sent).await?;
            batches += 1;
            if batches > 1_000 {
                bail!("the new version never took over");
            }
        }
        for _ in 0..(AFTER_SWAP / BATCH) {
            publish_batch(&mut sent).await?;
        }
    }

    let got: Vec<Value> = seen
        .take(sent, PATIENCE)
        .await?
        .iter()
        .map(|r| serde_json::from_slice(&r.payload))
        .collect::<Result<_, _>>()?;
    let mut per_tag: BTreeMap<String, usize> = BTreeMap::new();
    let mut last_tag = String::new();
    for (i, report) in got.iter().enumerate() {
        assert_eq!(
            report["payload"],
            i.to_string(),
            "message {i} lost, doubled or reordered"
        );
        let tag = report["tag"].as_str().unwrap_or_default().to_owned();
        assert!(
            tag >= last_tag,
            "version {tag} handled a message after {last_tag}"
        );
        last_tag.clone_from(&tag);
        *per_tag.entry(tag).or_default() += 1;
    }
    assert!(
        seen.drain_for(std::time::Duration::from_millis(300))
            .await
            .is_empty(),
        "more reports than messages"
    );
    for tag in ["v1", "v2", "v3"] {
        assert!(
            per_tag.get(tag).is_some_and(|n| *n > 0),
            "{tag} handled nothing: {per_tag:?}"
        );
    }
    let echo = host.plugin("echo").await?.unwrap_or_default();
    assert_eq!(echo["stats"]["handled"], sent);
    assert_eq!(echo["stats"]["shed"], 0);
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_plugin_starts_receiving_without_restart() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let host = TestHost::start(&redis, &[]).await?;
    let mut out = Subscriber::new(&redis, &[], &["fwded:*"]).await?;
    assert_eq!(redis.publish("fwd:early", "x").await?, 0);

    host.install(
        "forward",
        &read_plugin(plugins::FORWARD),
        Some(FORWARD_MANIFEST),
    )?;
    host.wait_plugin("forward", "running", |p| p["state"] == "running")
        .await?;
    redis.publish("fwd:late", "y").await?;
    let got = out.take(1, PATIENCE).await?;
    assert_eq!(got[0].channel_str(), "fwded:late");
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_plugin_is_unloaded_and_unsubscribed() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let host = TestHost::with_forward(&redis).await?;
    let mut connection = redis.connection().await?;
    let patterns: i64 = redis::cmd("PUBSUB")
        .arg("NUMPAT")
        .query_async(&mut connection)
        .await?;
    assert_eq!(patterns, 1);

    host.remove("forward")?;
    eventually(PATIENCE, || async {
        match host.plugin("forward").await? {
            None => Ok(()),
            Some(entry) => bail!("still listed: {entry}"),
        }
    })
    .await?;
    eventually(PATIENCE, || {
        let mut connection = connection.clone();
        async move {
            let patterns: i64 = redis::cmd("PUBSUB")
                .arg("NUMPAT")
                .query_async(&mut connection)
                .await?;
            if patterns == 0 {
                Ok(())
            } else {
                bail!("{patterns} patterns still subscribed")
            }
        }
    })
    .await?;
    assert_eq!(redis.publish("fwd:x", "nobody").await?, 0);
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_style_symlink_swap_deploys_the_new_version() -> anyhow::Result<()> {
    use std::os::unix::fs::symlink;

    // Kubernetes mounts a ConfigMap as NAME -> ..data/NAME, with ..data a symlink to a
    // timestamped folder; an update writes a new folder and renames a new ..data over the
    // old one. No file named NAME.wasm changes: only the link it goes through.
    let redis = RedisServer::start().await?;
    let echo = read_plugin(plugins::ECHO);
    let version = |dir: &std::path::Path, tag: &str| -> anyhow::Result<()> {
        std::fs::create_dir(dir)?;
        std::fs::write(dir.join("echo.wasm"), rebuilt(&echo, tag))?;
        std::fs::write(
            dir.join("echo.toml"),
            echo_manifest(&[], &["cm:*"], "seen", tag),
        )?;
        Ok(())
    };
    let host = TestHost::start_with(&redis, "", |dir| {
        version(&dir.join("..2026_11_29_v1"), "v1")?;
        symlink("..2026_11_29_v1", dir.join("..data"))?;
        symlink("..data/echo.wasm", dir.join("echo.wasm"))?;
        symlink("..data/echo.toml", dir.join("echo.toml"))?;
        Ok(())
    })
    .await?;
    let mut seen = Subscriber::new(&redis, &["seen"], &[]).await?;
    redis.publish("cm:1", "before").await?;
    let before: Value = serde_json::from_slice(&seen.take(1, PATIENCE).await?[0].payload)?;
    assert_eq!(before["tag"], "v1");

    let dir = host.dir().to_owned();
    version(&dir.join("..2026_11_29_v2"), "v2")?;
    symlink("..2026_11_29_v2", dir.join("..data_tmp"))?;
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data"))?;

    host.wait_plugin("echo", "reloaded", |p| p["reloads"] == 1)
        .await?;
    redis.publish("cm:2", "after").await?;
    let after: Value = serde_json::from_slice(&seen.take(1, PATIENCE).await?[0].payload)?;
    assert_eq!(after["tag"], "v2");
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_still_being_written_at_start_up_is_loaded_once_complete() -> anyhow::Result<()> {
    // The file grows in small pieces while the host starts: its first look finds it
    // truncated, and the last pieces land around the time the watcher starts.
    const PIECE: usize = 4096;
    const PAUSE: std::time::Duration = std::time::Duration::from_millis(5);
    let redis = RedisServer::start().await?;
    let wasm = read_plugin(plugins::FORWARD);
    let mut writer = None;
    let host = TestHost::start_with(&redis, "[plugins]\nsettle_ms = 20\n", |dir| {
        std::fs::write(dir.join("forward.toml"), FORWARD_MANIFEST)?;
        let path = dir.join("forward.wasm");
        let mut file = std::fs::File::create(&path)?;
        writer = Some(std::thread::spawn(move || -> std::io::Result<()> {
            use std::io::Write as _;
            for piece in wasm.chunks(PIECE) {
                file.write_all(piece)?;
                file.flush()?;
                std::thread::sleep(PAUSE);
            }
            Ok(())
        }));
        Ok(())
    })
    .await?;
    writer
        .take()
        .expect("the writer started")
        .join()
        .expect("writer")?;

    let mut out = Subscriber::new(&redis, &[], &["fwded:*"]).await?;
    host.wait_plugin("forward", "running", |p| p["state"] == "running")
        .await?;
    redis.publish("fwd:x", "complete").await?;
    assert_eq!(out.take(1, PATIENCE).await?[0].payload_str(), "complete");
    host.stop().await
}
