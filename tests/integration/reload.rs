//! Live changes to the plugins folder: add, replace and remove while messages flow.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

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
    // The host subscribes for the new plugin just after it reports running;
    // `fwded:*` above is the other pattern.
    eventually(PATIENCE, || async {
        anyhow::ensure!(
            redis.pubsub_numpat().await? == 2,
            "fwd:* not subscribed yet"
        );
        Ok(())
    })
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
    // The file grows in small pieces while the host starts, and its writer stays at work (the
    // last piece held back, the last byte written again every few milliseconds) until the
    // test lets it finish: start-up and its rescans end with the file incomplete. The host
    // must not call itself ready before the complete file is loaded.
    const PIECE: usize = 4096;
    const PAUSE: Duration = Duration::from_millis(5);
    let redis = RedisServer::start().await?;
    let wasm = read_plugin(plugins::FORWARD);
    let finish = Arc::new(AtomicBool::new(false));
    let mut writer = None;
    // The settle time is many times the writer's pause, so the writer is never mistaken for
    // one that stalled (whose half-written file would be rejected, and the host ready).
    let host = TestHost::launch(&redis.url(), "[plugins]\nsettle_ms = 100\n", |dir| {
        std::fs::write(dir.join("forward.toml"), FORWARD_MANIFEST)?;
        let mut file = std::fs::File::create(dir.join("forward.wasm"))?;
        let finish = finish.clone();
        writer = Some(std::thread::spawn(move || -> std::io::Result<()> {
            use std::io::Write as _;
            use std::os::unix::fs::FileExt as _;
            let (body, last) = wasm.split_at(wasm.len() - 1);
            for piece in body.chunks(PIECE) {
                file.write_all(piece)?;
                std::thread::sleep(PAUSE);
            }
            let end = body.len() - 1;
            while !finish.load(Ordering::Acquire) {
                file.write_all_at(&body[end..], u64::try_from(end).unwrap_or(u64::MAX))?;
                std::thread::sleep(PAUSE);
            }
            file.write_all(last)?;
            Ok(())
        }));
        Ok(())
    })
    .await?;

    let (status, body) = eventually(PATIENCE, || async {
        let (status, body) = host.get("/readyz").await?;
        if body["source"]["connected"] == true {
            Ok((status, body))
        } else {
            bail!("not subscribed yet: {status} {body}")
        }
    })
    .await?;
    assert_eq!(status, 503, "ready with forward.wasm incomplete: {body}");
    assert_eq!(body["plugins_scanned"], false, "{body}");
    assert!(
        host.plugin("forward").await?.is_none(),
        "the incomplete file was loaded or rejected"
    );

    finish.store(true, Ordering::Release);
    writer
        .take()
        .expect("the writer started")
        .join()
        .expect("writer")?;
    host.wait_ready().await?;
    // Ready means loaded: the complete file runs, and was never rejected on the way.
    let entry = host.plugin("forward").await?.unwrap_or_default();
    assert_eq!(entry["state"], "running", "{entry}");
    assert!(entry.get("load_error").is_none(), "{entry}");
    let mut out = Subscriber::new(&redis, &[], &["fwded:*"]).await?;
    redis.publish("fwd:x", "complete").await?;
    assert_eq!(out.take(1, PATIENCE).await?[0].payload_str(), "complete");
    host.stop().await
}

/// A numbered publisher on `channel`: batches of [`Sequence::BATCH`] messages `0`, `1`, ...
/// every [`Sequence::PACE`], a rate that plugins keep up with even in a debug build, so that
/// nothing is shed and every message must come out exactly once.
struct Sequence {
    connection: redis::aio::MultiplexedConnection,
    pace: tokio::time::Interval,
    channel: &'static str,
    sent: usize,
}

impl Sequence {
    const BATCH: usize = 25;
    const PACE: Duration = Duration::from_millis(10);

    async fn new(redis: &RedisServer, channel: &'static str) -> anyhow::Result<Self> {
        Ok(Self {
            connection: redis.connection().await?,
            pace: tokio::time::interval(Self::PACE),
            channel,
            sent: 0,
        })
    }

    async fn batch(&mut self) -> anyhow::Result<()> {
        self.pace.tick().await;
        let mut pipe = redis::pipe();
        for _ in 0..Self::BATCH {
            pipe.publish(self.channel, self.sent.to_string()).ignore();
            self.sent += 1;
        }
        let () = pipe.query_async(&mut self.connection).await?;
        Ok(())
    }

    /// Publishes until `done` holds (checked between batches), or fails after `limit`
    /// batches.
    async fn until<F, Fut>(&mut self, what: &str, mut done: F) -> anyhow::Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<bool>>,
    {
        const LIMIT: usize = 1_000;
        for _ in 0..LIMIT {
            if done().await? {
                return Ok(());
            }
            self.batch().await?;
        }
        bail!("{what}: still not the case after {LIMIT} batches")
    }
}

/// The `payload` and `tag` of echo reports.
fn reports(received: &[switchyard_tests::Received]) -> anyhow::Result<Vec<(String, String)>> {
    received
        .iter()
        .map(|r| {
            let report: Value = serde_json::from_slice(&r.payload)?;
            Ok((
                report["payload"].as_str().unwrap_or_default().to_owned(),
                report["tag"].as_str().unwrap_or_default().to_owned(),
            ))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_plugin_handles_its_backlog_once_and_nothing_after() -> anyhow::Result<()> {
    const BACKLOG: usize = 100;
    const AFTER: usize = 20;
    let redis = RedisServer::start().await?;
    // `slow` takes tens of milliseconds a message, so a backlog waits in its queue when its
    // file goes; `fast` listens to the same channel, so the host stays subscribed to it and
    // keeps routing it after `slow` is gone.
    let slow = echo_manifest(&["q:slow"], &["q:*"], "slow-out", "slow")
        + "spin = 20\n[limits]\ndeadline_ms = 60000\n";
    let fast = echo_manifest(&["q:1"], &[], "fast-out", "fast");
    let host = TestHost::start(
        &redis,
        &[
            ("slow", plugins::ECHO, Some(&slow)),
            ("fast", plugins::ECHO, Some(&fast)),
        ],
    )
    .await?;
    let mut slow_out = Subscriber::new(&redis, &["slow-out"], &[]).await?;
    let mut fast_out = Subscriber::new(&redis, &["fast-out"], &[]).await?;
    redis
        .publish_all((0..BACKLOG).map(|i| ("q:1", format!("before:{i}"))))
        .await?;
    host.wait_plugin("slow", "holding the backlog", |p| {
        p["stats"]["accepted"] == BACKLOG
    })
    .await?;

    host.remove("slow")?;
    let draining = host
        .wait_plugin("slow", "draining", |p| p["state"] == "draining")
        .await?;
    assert!(
        draining["queue_depth"].as_u64().is_some_and(|n| n > 0),
        "left the queue before its backlog was handled: {draining}"
    );
    // Its subscriptions leave Redis after the router stopped routing to it.
    eventually(PATIENCE, || async {
        let patterns = redis.pubsub_numpat().await?;
        let channels = redis.pubsub_channels().await?;
        if patterns == 0 && !channels.contains("q:slow") && channels.contains("q:1") {
            Ok(())
        } else {
            bail!("{patterns} patterns, channels {channels:?}")
        }
    })
    .await?;
    redis
        .publish_all((0..AFTER).map(|i| ("q:1", format!("after:{i}"))))
        .await?;

    // It stays listed while it drains, and leaves once done.
    let last_seen = std::cell::RefCell::new(draining);
    eventually(PATIENCE, || async {
        match host.plugin("slow").await? {
            Some(entry) => {
                let listed = format!("still listed: {entry}");
                last_seen.replace(entry);
                bail!(listed)
            }
            None => Ok(()),
        }
    })
    .await?;
    let last_seen = last_seen.into_inner();
    assert_eq!(last_seen["state"], "draining", "{last_seen}");
    assert_eq!(last_seen["stats"]["accepted"], BACKLOG, "{last_seen}");

    // Every message it had accepted was handled exactly once, in order; none after.
    let handled = reports(&slow_out.take(BACKLOG, PATIENCE).await?)?;
    for (i, (payload, _)) in handled.iter().enumerate() {
        assert_eq!(*payload, format!("before:{i}"), "slow: message {i}");
    }
    let extra = slow_out.drain_for(Duration::from_millis(300)).await;
    assert!(extra.is_empty(), "slow handled more: {extra:?}");
    // The plugin that stays saw everything.
    let seen = reports(&fast_out.take(BACKLOG + AFTER, PATIENCE).await?)?;
    let expected = (0..BACKLOG)
        .map(|i| format!("before:{i}"))
        .chain((0..AFTER).map(|i| format!("after:{i}")));
    for (i, ((payload, _), expected)) in seen.iter().zip(expected).enumerate() {
        assert_eq!(*payload, expected, "fast: message {i}");
    }
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_plugin_sees_an_unbroken_run_of_a_flowing_sequence() -> anyhow::Result<()> {
    const AFTER_ADD: usize = 400 / Sequence::BATCH;
    let redis = RedisServer::start().await?;
    let first = echo_manifest(&["seq"], &[], "first-out", "first");
    let host = TestHost::start(&redis, &[("first", plugins::ECHO, Some(&first))]).await?;
    let mut first_out = Subscriber::new(&redis, &["first-out"], &[]).await?;
    let mut added_out = Subscriber::new(&redis, &["added-out"], &[]).await?;
    let mut sequence = Sequence::new(&redis, "seq").await?;
    for _ in 0..AFTER_ADD {
        sequence.batch().await?;
    }

    host.install(
        "added",
        &read_plugin(plugins::ECHO),
        Some(&echo_manifest(&["seq"], &[], "added-out", "added")),
    )?;
    sequence
        .until("the added plugin gets messages", || async {
            Ok(host
                .plugin("added")
                .await?
                .is_some_and(|p| p["stats"]["accepted"].as_u64().unwrap_or(0) > 0))
        })
        .await?;
    for _ in 0..AFTER_ADD {
        sequence.batch().await?;
    }
    let sent = sequence.sent;

    let everything = reports(&first_out.take(sent, PATIENCE).await?)?;
    for (i, (payload, _)) in everything.iter().enumerate() {
        assert_eq!(*payload, i.to_string(), "first: message {i}");
    }
    // The added plugin: from its first message on, every one, once, in order, to the end.
    let first_report = reports(&[added_out.next(PATIENCE).await?])?;
    let start: usize = first_report[0].0.parse()?;
    assert!(start < sent, "{start}");
    let rest = reports(&added_out.take(sent - 1 - start, PATIENCE).await?)?;
    for (i, (payload, _)) in rest.iter().enumerate() {
        assert_eq!(
            *payload,
            (start + 1 + i).to_string(),
            "added: a gap or a double"
        );
    }
    for (name, out) in [("first", &mut first_out), ("added", &mut added_out)] {
        let extra = out.drain_for(Duration::from_millis(300)).await;
        assert!(extra.is_empty(), "{name} handled more: {extra:?}");
    }
    let added = host.plugin("added").await?.unwrap_or_default();
    assert_eq!(added["stats"]["handled"], sent - start, "{added}");
    assert_eq!(added["stats"]["shed"], 0, "{added}");
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_removed_and_re_added_within_the_settle_time_is_reloaded_losslessly()
-> anyhow::Result<()> {
    const AFTER_SWAP: usize = 400 / Sequence::BATCH;
    let redis = RedisServer::start().await?;
    let echo = read_plugin(plugins::ECHO);
    // A settle time wide enough that the removal and the new file always fall in one window.
    let host = TestHost::start_configured(
        &redis,
        "[plugins]\nsettle_ms = 500\n",
        &[(
            "echo",
            plugins::ECHO,
            Some(&echo_manifest(&["r"], &[], "seen", "v1")),
        )],
    )
    .await?;
    let before = host
        .wait_plugin("echo", "running", |p| p["state"] == "running")
        .await?;
    let mut seen = Subscriber::new(&redis, &["seen"], &[]).await?;
    let mut sequence = Sequence::new(&redis, "r").await?;
    for _ in 0..AFTER_SWAP {
        sequence.batch().await?;
    }

    // Deleted, then a new version in place at once (as a careless deploy script might). The
    // new bytes are ready before the removal: on a loaded machine, building them in between
    // could take longer than the settle time, and the removal would rightly settle alone.
    let v2 = rebuilt(&echo, "v2");
    host.remove("echo")?;
    host.install("echo", &v2, Some(&echo_manifest(&["r"], &[], "seen", "v2")))?;
    sequence
        .until("v2 takes over", || async {
            Ok(hash_of(&host, "echo").await?.as_deref() != before["version"]["hash"].as_str())
        })
        .await?;
    for _ in 0..AFTER_SWAP {
        sequence.batch().await?;
    }
    let sent = sequence.sent;

    // One queue throughout: every message once, in order, v1 then v2.
    let got = reports(&seen.take(sent, PATIENCE).await?)?;
    let mut last_tag = "v1";
    for (i, (payload, tag)) in got.iter().enumerate() {
        assert_eq!(
            *payload,
            i.to_string(),
            "message {i} lost, doubled or reordered"
        );
        assert!(
            tag.as_str() >= last_tag,
            "{tag} handled a message after {last_tag}"
        );
        last_tag = tag;
    }
    assert_eq!(last_tag, "v2");
    let extra = seen.drain_for(Duration::from_millis(300)).await;
    assert!(extra.is_empty(), "more reports than messages: {extra:?}");
    let entry = host.plugin("echo").await?.unwrap_or_default();
    assert_eq!(entry["reloads"], 1, "not a reload: {entry}");
    assert_eq!(entry["stats"]["handled"], sent, "{entry}");
    assert_eq!(entry["stats"]["shed"], 0, "{entry}");
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_look_at_the_folder_after_shutdown_loads_and_subscribes_nothing() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let host = TestHost::with_forward(&redis).await?;
    eventually(PATIENCE, || async {
        anyhow::ensure!(
            redis.pubsub_numpat().await? == 1,
            "forward's fwd:* not subscribed"
        );
        Ok(())
    })
    .await?;
    let registry = host.host().registry().clone();

    // A watcher that was already past its cancellation check when the host began to stop
    // reconciles after the plugins were unloaded, while the source still runs.
    assert!(registry.shutdown(PATIENCE).await, "workers finished");
    assert_eq!(redis.pubsub_numpat().await?, 0, "unsubscribed by shutdown");
    let changes = registry.reconcile().await?;

    assert_eq!(changes, switchyard::plugins::Changes::default());
    let listed: Vec<String> = registry
        .report()
        .iter()
        .map(|p| p.name.to_string())
        .collect();
    assert!(listed.is_empty(), "plugins after shutdown: {listed:?}");
    assert_eq!(redis.pubsub_numpat().await?, 0, "subscribed again");
    assert_eq!(redis.publish("fwd:x", "after the stop").await?, 0);
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_renamed_into_place_is_loaded_without_the_settle_wait() -> anyhow::Result<()> {
    // A settle time no test waits out: a file written in place stays pending for all of it,
    // while one renamed into place (complete when it appears) loads at once, and so does
    // each later version deployed the same way.
    let redis = RedisServer::start().await?;
    let host =
        TestHost::launch(&redis.url(), "[plugins]\nsettle_ms = 600000\n", |_| Ok(())).await?;
    host.wait_ready().await?;
    let forward = read_plugin(plugins::FORWARD);

    std::fs::write(host.dir().join("copied.toml"), FORWARD_MANIFEST)?;
    std::fs::write(host.dir().join("copied.wasm"), &forward)?;
    // The manifest first, then the component: each renamed into place.
    switchyard_tests::atomic_write(
        &host.dir().join("forward.toml"),
        FORWARD_MANIFEST.as_bytes(),
    )?;
    switchyard_tests::atomic_write(&host.dir().join("forward.wasm"), &forward)?;
    host.wait_plugin("forward", "loaded", |p| p["state"] == "running")
        .await?;
    switchyard_tests::assert_forwards(&redis, "renamed").await?;

    let v2 = rebuilt(&forward, "v2");
    switchyard_tests::atomic_write(&host.dir().join("forward.wasm"), &v2)?;
    let expected = switchyard::ContentHash::of(&v2).to_string();
    host.wait_plugin("forward", "swapped", |p| {
        p["version"]["hash"] == expected.as_str()
    })
    .await?;

    let body = host.wait_readiness(503).await?;
    assert_eq!(
        body["plugins_pending"],
        serde_json::json!(["copied"]),
        "{body}"
    );
    assert!(
        host.plugin("copied").await?.is_none(),
        "written in place: still settling"
    );
    host.stop().await
}
