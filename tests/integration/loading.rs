//! Bad files: every rejected file says why, and never displaces a working version.

use std::time::Duration;

use switchyard_tests::{
    FORWARD_MANIFEST, PATIENCE, RedisServer, Subscriber, TestHost, copy_plugin, echo_manifest,
    plugins, read_plugin, rebuilt,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_replacement_keeps_the_previous_version_running() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let host = TestHost::with_forward(&redis).await?;
    let mut out = Subscriber::new(&redis, &[], &["fwded:*"]).await?;
    let good = host
        .wait_plugin("forward", "running", |p| p["state"] == "running")
        .await?;
    let good_hash = good["version"]["hash"].clone();

    let forward = read_plugin(plugins::FORWARD);
    let bad: [(&str, Vec<u8>, &str, &str); 5] = [
        (
            "garbage",
            b"this is not wasm at all".to_vec(),
            "compile",
            "not a WebAssembly file",
        ),
        (
            "truncated",
            forward[..forward.len() / 2].to_vec(),
            "compile",
            "not a valid component",
        ),
        (
            "core module",
            b"\0asm\x01\0\0\0".to_vec(),
            "compile",
            "core WebAssembly module",
        ),
        (
            "wrong world",
            read_plugin(plugins::NOT_A_PLUGIN),
            "world",
            "exports none of the accepted worlds",
        ),
        (
            "describe traps",
            read_plugin(plugins::TRAP_DESCRIBE),
            "describe",
            "describe failed",
        ),
    ];
    for (i, (what, bytes, kind, text)) in bad.iter().enumerate() {
        host.install("forward", bytes, None)?;
        let entry = host
            .wait_plugin("forward", "rejecting the bad file", |p| {
                p["load_error"]["kind"] == *kind
                    && p["load_error"]["message"]
                        .as_str()
                        .is_some_and(|m| m.contains(text))
            })
            .await?;
        assert_eq!(entry["state"], "running", "{what}");
        assert_eq!(
            entry["version"]["hash"], good_hash,
            "{what} replaced the good version"
        );

        let channel = format!("fwd:{i}");
        redis.publish(channel.as_str(), *what).await?;
        let got = out.take(1, PATIENCE).await?;
        assert_eq!(got[0].channel_str(), format!("fwded:{i}"), "{what}");
    }

    // A good file clears the error and takes over.
    host.install("forward", &rebuilt(&forward, "fixed"), None)?;
    let fixed = host
        .wait_plugin("forward", "recovered", |p| p.get("load_error").is_none())
        .await?;
    assert_ne!(fixed["version"]["hash"], good_hash);
    assert_eq!(fixed["reloads"], 1);
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_files_alone_fail_with_a_reason_and_do_not_block_readiness() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let host = TestHost::start_with(&redis, "", |dir| {
        std::fs::write(dir.join("garbage.wasm"), b"\0asm but not really")?;
        copy_plugin(dir, "traps", plugins::TRAP_DESCRIBE.as_ref(), None)?;
        copy_plugin(dir, "command", plugins::NOT_A_PLUGIN.as_ref(), None)?;
        copy_plugin(
            dir,
            "forward",
            plugins::FORWARD.as_ref(),
            Some(FORWARD_MANIFEST),
        )?;
        std::fs::write(dir.join("badmanifest.toml"), "[config\n")?;
        copy_plugin(dir, "badmanifest", plugins::FORWARD.as_ref(), None)?;
        // Half-written files are hidden until renamed into place.
        std::fs::write(dir.join(".forward2.wasm.tmp"), b"\0asm partial")?;
        Ok(())
    })
    .await?;

    let (_, listing) = host.get("/plugins").await?;
    let plugins = listing["plugins"].as_array().cloned().unwrap_or_default();
    let names: Vec<&str> = plugins.iter().filter_map(|p| p["name"].as_str()).collect();
    assert_eq!(
        names,
        ["badmanifest", "command", "forward", "garbage", "traps"]
    );
    for (name, kind) in [
        ("badmanifest", "manifest"),
        ("command", "world"),
        ("garbage", "compile"),
        ("traps", "describe"),
    ] {
        let entry = plugins
            .iter()
            .find(|p| p["name"] == name)
            .cloned()
            .unwrap_or_default();
        assert_eq!(entry["state"], "failed", "{name}: {entry}");
        assert_eq!(entry["load_error"]["kind"], kind, "{name}: {entry}");
    }

    // Only the one working forward answers: the rejected copies of it do not.
    let mut out = Subscriber::new(&redis, &[], &["fwded:*"]).await?;
    redis.publish("fwd:still", "works").await?;
    assert_eq!(out.take(1, PATIENCE).await?[0].payload_str(), "works");
    assert!(out.drain_for(Duration::from_millis(100)).await.is_empty());
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_settings_are_listed_by_name_never_by_value() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let manifest = format!(
        "{}api_token = \"s3cret-value\"\n",
        echo_manifest(&["in"], &[], "out", "")
    );
    let host = TestHost::start(&redis, &[("echo", plugins::ECHO, Some(&manifest))]).await?;
    let entry = host
        .wait_plugin("echo", "running", |p| p["state"] == "running")
        .await?;
    let settings = &entry["version"]["settings"];
    assert!(
        settings
            .as_array()
            .is_some_and(|keys| keys.iter().any(|k| k == "api_token")),
        "{settings}"
    );
    let (_, everything) = host.get("/plugins").await?;
    assert!(
        !everything.to_string().contains("s3cret-value"),
        "{everything}"
    );
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_whose_writer_stalls_halfway_is_rejected_and_the_host_stays_ready()
-> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let host = TestHost::with_forward(&redis).await?;
    // Copied in place (not renamed) by a writer that stops halfway and never comes back:
    // once unchanged for the settle time the file is settled, so it is looked at, rejected
    // with a reason, and does not hold readiness back.
    let forward = read_plugin(plugins::FORWARD);
    std::fs::write(
        host.dir().join("stalled.wasm"),
        &forward[..forward.len() / 2],
    )?;
    let entry = host
        .wait_plugin("stalled", "rejected", |p| p["state"] == "failed")
        .await?;
    assert_eq!(entry["load_error"]["kind"], "compile", "{entry}");
    host.wait_ready().await?;
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_ready_every_message_reaches_the_plugins_in_the_folder() -> anyhow::Result<()> {
    // Readiness means the routing table in force reaches every plugin: a burst published the
    // moment /readyz says 200 is handled in full, none of it delivered to an older table.
    const BURST: usize = 200;
    let redis = RedisServer::start().await?;
    let host = TestHost::with_forward(&redis).await?;
    let mut out = Subscriber::new(&redis, &[], &["fwded:*"]).await?;
    redis
        .publish_all((0..BURST).map(|i| ("fwd:x", i.to_string())))
        .await?;
    assert_eq!(out.take(BURST, PATIENCE).await?.len(), BURST);
    let (_, listing) = host.get("/plugins").await?;
    assert_eq!(listing["unrouted"], 0, "{listing}");
    host.stop().await
}
