//! Plugins from a registry, against a real one (Debian's `docker-registry`): the command
//! line's push and pull, a host following a tag under traffic, a registry that goes away,
//! and the components trust refuses.

use std::path::Path;

use switchyard::oci::PluginRef;
use switchyard::oci::commands::{self, Access};
use switchyard_tests::registry::{RegistryServer, SigningKey};
use switchyard_tests::{
    FORWARD_MANIFEST, RedisServer, Subscriber, TestHost, assert_each_arrived, plugins, read_plugin,
    rebuilt, switchyard_binary,
};

use crate::faults::stat;

/// How the tests reach the registry (on loopback: plain HTTP).
fn access() -> Access {
    Access {
        max_wasm_bytes: 64 << 20,
        ..Access::default()
    }
}

/// Pushes `wasm` with forward's manifest to `reference`; returns the manifest digest.
async fn push(dir: &Path, wasm: &[u8], reference: &str) -> anyhow::Result<String> {
    let file = dir.join("forward.wasm");
    std::fs::write(&file, wasm)?;
    std::fs::write(dir.join("forward.toml"), FORWARD_MANIFEST)?;
    let reference: PluginRef = reference.parse()?;
    Ok(commands::push(&file, None, &reference, &access()).await?.0)
}

/// Runs the `switchyard` binary with `args`; returns its stdout, failing with its stderr.
async fn switchyard(args: &[&str]) -> anyhow::Result<String> {
    let output = tokio::process::Command::new(switchyard_binary()?)
        .args(args)
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    anyhow::ensure!(
        output.status.success(),
        "switchyard {args:?}: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_then_pull_round_trips_byte_for_byte_and_check_reads_a_reference() -> anyhow::Result<()>
{
    let registry = RegistryServer::start().await?;
    let dir = tempfile::tempdir()?;
    let wasm = dir.path().join("forward.wasm");
    std::fs::copy(plugins::FORWARD, &wasm)?;
    std::fs::write(dir.path().join("forward.toml"), FORWARD_MANIFEST)?;
    let reference = registry.reference("team/forward:1");

    let pushed = switchyard(&["push", wasm.to_str().unwrap_or_default(), &reference]).await?;
    assert!(pushed.contains("with its manifest"), "{pushed}");
    let pinned = pushed
        .lines()
        .find_map(|line| line.strip_prefix("pinned: "))
        .expect("push prints the pinned reference")
        .to_owned();
    assert!(pinned.contains("@sha256:"), "{pinned}");

    // By tag and by digest, into a folder, byte for byte.
    for (i, source) in [reference.as_str(), pinned.as_str()]
        .into_iter()
        .enumerate()
    {
        let into = dir.path().join(format!("pulled-{i}"));
        let pulled =
            switchyard(&["pull", source, "--to", into.to_str().unwrap_or_default()]).await?;
        assert!(pulled.contains("sha256:"), "{pulled}");
        assert_eq!(
            std::fs::read(into.join("forward.wasm"))?,
            read_plugin(plugins::FORWARD)
        );
        assert_eq!(
            std::fs::read_to_string(into.join("forward.toml"))?,
            FORWARD_MANIFEST
        );
        let left: Vec<_> = std::fs::read_dir(&into)?.collect();
        assert_eq!(left.len(), 2, "only the plugin's two files");
    }

    // Pushing the same files again gives the same digest: a poll sees no move.
    let again = switchyard(&["push", wasm.to_str().unwrap_or_default(), &reference]).await?;
    assert!(again.contains(&pinned), "{again}");

    let checked = switchyard(&["check", &reference]).await?;
    assert!(checked.contains("switchyard:plugin"), "{checked}");
    assert!(checked.contains("publish [fwded:*]"), "{checked}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_follows_a_moved_tag_under_traffic_without_losing_a_message() -> anyhow::Result<()> {
    const MESSAGES: usize = 3000;
    let redis = RedisServer::start().await?;
    let registry = RegistryServer::start().await?;
    let work = tempfile::tempdir()?;
    let reference = registry.reference("team/forward:stable");
    let first = push(work.path(), &read_plugin(plugins::FORWARD), &reference).await?;
    let config = format!("[plugins]\nsources = [{reference:?}]\npoll_s = 1\n");
    let host = TestHost::start_with(&redis, &config, |_| Ok(())).await?;
    let entry = host
        .wait_plugin("forward", "running the pulled version", |p| {
            p["state"] == "running"
        })
        .await?;
    assert_eq!(entry["source"]["digest"], first.as_str(), "{entry}");
    assert_eq!(entry["source"]["reference"], reference.as_str(), "{entry}");

    let mut out = Subscriber::new(&redis, &[], &["fwded:*"]).await?;
    let publisher = redis.publish_steadily("fwd:x", MESSAGES).await?;
    let moved = push(
        work.path(),
        &rebuilt(&read_plugin(plugins::FORWARD), "v2"),
        &reference,
    )
    .await?;
    assert_ne!(moved, first);
    host.wait_plugin("forward", "swapping to the moved tag", |p| {
        p["source"]["digest"] == moved.as_str() && p["reloads"] == 1
    })
    .await?;
    assert_each_arrived(&mut out, publisher, MESSAGES).await?;
    host.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_its_registry_a_host_keeps_running_and_restarts_from_its_cache()
-> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let mut registry = RegistryServer::start().await?;
    let work = tempfile::tempdir()?;
    let cache = work.path().join("cache");
    let reference = registry.reference("team/forward:1");
    let digest = push(work.path(), &read_plugin(plugins::FORWARD), &reference).await?;
    let config = format!(
        "[plugins]\nsources = [{reference:?}]\npoll_s = 1\noci_cache = {:?}\n",
        cache.display().to_string()
    );
    let host = TestHost::start_with(&redis, &config, |_| Ok(())).await?;
    host.wait_plugin("forward", "running", |p| p["state"] == "running")
        .await?;

    registry.stop().await?;
    let entry = host
        .wait_plugin("forward", "noticing the registry is away", |p| {
            p["source"]["error"].is_string()
        })
        .await?;
    assert_eq!(entry["state"], "running", "{entry}");
    assert_eq!(host.get("/readyz").await?.0, 200, "still ready");
    switchyard_tests::assert_forwards(&redis, "while the registry is away").await?;
    host.stop().await?;

    // A new host with the registry still away: the cache has what the tag pointed at.
    let again = TestHost::start_with(&redis, &config, |_| Ok(())).await?;
    let entry = again
        .wait_plugin("forward", "running from the cache", |p| {
            p["state"] == "running"
        })
        .await?;
    assert_eq!(entry["source"]["digest"], digest.as_str(), "{entry}");
    switchyard_tests::assert_forwards(&redis, "from the cache").await?;
    again.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_foreign_signed_and_tampered_components_are_refused_while_the_old_one_runs()
-> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let registry = RegistryServer::start().await?;
    let work = tempfile::tempdir()?;
    let trusted = SigningKey::from_seed(1);
    let stranger = SigningKey::from_seed(2);
    let repository = "team/forward";
    let reference = registry.reference(&format!("{repository}:1"));
    let forward = read_plugin(plugins::FORWARD);

    let good = push(work.path(), &forward, &reference).await?;
    registry.sign(repository, &good, &trusted).await?;
    let config = format!(
        "[plugins]\nsources = [{reference:?}]\npoll_s = 1\n[plugins.verify]\nkeys = [{:?}]\n",
        trusted.public_pem()
    );
    let host = TestHost::start_with(&redis, &config, |_| Ok(())).await?;
    let entry = host
        .wait_plugin("forward", "running the signed version", |p| {
            p["state"] == "running"
        })
        .await?;
    assert!(
        entry["source"]["verified"]
            .as_str()
            .is_some_and(|v| v.contains("signed by trusted key")),
        "{entry}"
    );

    // Unsigned, then signed by a key the host does not trust: each refused, named.
    let unsigned = push(work.path(), &rebuilt(&forward, "unsigned"), &reference).await?;
    let entry = host
        .wait_plugin("forward", "refusing the unsigned version", |p| {
            p["source"]["refused"] == "unsigned"
        })
        .await?;
    let error = entry["source"]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&unsigned) && error.contains("not signed"),
        "{entry}"
    );
    assert_eq!(
        entry["source"]["digest"],
        good.as_str(),
        "the signed one runs"
    );

    let foreign = push(work.path(), &rebuilt(&forward, "foreign"), &reference).await?;
    registry.sign(repository, &foreign, &stranger).await?;
    host.wait_plugin("forward", "refusing the foreign-signed version", |p| {
        p["source"]["refused"] == "unknown_key"
    })
    .await?;

    // Signed by the trusted key, but its component altered in the registry's storage.
    let tampered = rebuilt(&forward, "tampered");
    let altered = push(work.path(), &tampered, &reference).await?;
    registry.sign(repository, &altered, &trusted).await?;
    let blob = registry.blob_path(&switchyard::oci::artifact::sha256(&tampered));
    let mut bytes = std::fs::read(&blob)?;
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&blob, &bytes)?;
    let entry = host
        .wait_plugin("forward", "refusing the altered component", |p| {
            p["source"]["error"]
                .as_str()
                .is_some_and(|e| e.contains(&altered) || e.contains("digest"))
        })
        .await?;
    assert_eq!(entry["source"]["digest"], good.as_str(), "{entry}");
    assert_eq!(entry["state"], "running");
    switchyard_tests::assert_forwards(&redis, "the signed version still runs").await?;

    // A file dropped in the folder needs its own signature beside it.
    host.install(
        "dropped",
        &rebuilt(&forward, "dropped"),
        Some(FORWARD_MANIFEST),
    )?;
    let entry = host
        .wait_plugin("dropped", "refusing the unsigned file", |p| {
            p["load_error"]["kind"] == "trust"
        })
        .await?;
    assert!(
        entry["load_error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("NAME.wasm.sig")),
        "{entry}"
    );
    let signed = rebuilt(&forward, "dropped-signed");
    std::fs::write(host.dir().join("dropped.wasm.sig"), trusted.sign(&signed))?;
    host.install("dropped", &signed, Some(FORWARD_MANIFEST))?;
    host.wait_plugin("dropped", "loading the signed file", |p| {
        p["state"] == "running"
    })
    .await?;

    let (_, metrics) = host.get("/metrics").await?;
    let text = metrics.as_str().unwrap_or_default().to_owned();
    for reason in ["unsigned", "unknown_key"] {
        assert!(
            text.contains(&format!(
                "switchyard_components_refused_total{{reason=\"{reason}\"}}"
            )),
            "{reason}: {text}"
        );
    }
    assert!(stat(&entry, "handled") == 0);
    host.stop().await?;
    Ok(())
}
