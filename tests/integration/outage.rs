//! Redis going away and coming back: network drops, killed servers and connections, and what
//! the host subscribes to when it returns.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{bail, ensure};
use serde_json::Value;
use switchyard_tests::proxy::Proxy;
use switchyard_tests::{
    FORWARD_MANIFEST, PATIENCE, RedisServer, Subscriber, TestHost, copy_plugin, echo_manifest,
    eventually, plugins, read_plugin,
};

/// How long a host may take to come back once Redis is reachable again: one pending
/// connection attempt or backoff wait (at most a few seconds), with room for a busy machine.
const RECOVERY: Duration = Duration::from_secs(30);

/// Channels the host reserves for itself (its routing barrier) begin with this.
const RESERVED_PREFIX: &str = "__switchyard:";

/// A health-check bound short enough for a test to wait out.
const SHORT_HEALTH_TIMEOUT: &str = "[redis]\nhealth_timeout_ms = 1000\n";

fn stat(entry: &Value, name: &str) -> u64 {
    entry["stats"][name].as_u64().unwrap_or_default()
}

/// Waits until the host is ready again after `reconnects` recoveries; returns `/readyz`.
async fn ready_after(host: &TestHost, reconnects: u64) -> anyhow::Result<Value> {
    eventually(RECOVERY, || async {
        let (status, body) = host.get("/readyz").await?;
        if status == 200 && body["source"]["reconnects"] == reconnects {
            Ok(body)
        } else {
            bail!("not ready after {reconnects} reconnects: {status} {body}")
        }
    })
    .await
}

/// Publishes on `fwd:x` until `forward` republishes it on `fwded:x`. The host's publishing
/// connection may still be finding its way back, so the first publishes may fail inside the
/// plugin: each try waits briefly for the forwarded message before publishing again.
async fn forwards_eventually(redis: &RedisServer, payload: &str) -> anyhow::Result<()> {
    let mut out = Subscriber::new(redis, &["fwded:x"], &[]).await?;
    let started = std::time::Instant::now();
    loop {
        redis.publish("fwd:x", payload).await?;
        if let Ok(message) = out.next(Duration::from_millis(200)).await {
            ensure!(message.payload_str() == payload, "forwarded {message:?}");
            return Ok(());
        }
        ensure!(
            started.elapsed() < RECOVERY,
            "nothing forwarded within {RECOVERY:?}"
        );
    }
}

/// The channels subscribed on `redis`, without the host's reserved ones, and how many
/// reserved ones there are.
async fn subscribed_channels(redis: &RedisServer) -> anyhow::Result<(BTreeSet<String>, usize)> {
    let all = redis.pubsub_channels().await?;
    let reserved = all
        .iter()
        .filter(|c| c.starts_with(RESERVED_PREFIX))
        .count();
    let channels = all
        .into_iter()
        .filter(|c| !c.starts_with(RESERVED_PREFIX))
        .collect();
    Ok((channels, reserved))
}

/// Waits until `redis` has exactly `channels` (and one routing barrier) subscribed and
/// `patterns` pattern subscriptions.
async fn wait_subscribed(
    redis: &RedisServer,
    channels: &[&str],
    patterns: i64,
) -> anyhow::Result<()> {
    let expected: BTreeSet<String> = channels.iter().map(|c| c.to_string()).collect();
    eventually(PATIENCE, || async {
        let (subscribed, barriers) = subscribed_channels(redis).await?;
        let numpat = redis.pubsub_numpat().await?;
        if subscribed == expected && barriers == 1 && numpat == patterns {
            Ok(())
        } else {
            bail!(
                "subscribed channels {subscribed:?} (+{barriers} barrier), {numpat} patterns; \
                 expected {expected:?} (+1 barrier), {patterns} patterns"
            )
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_network_is_noticed_and_survived() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let proxy = Proxy::start(&redis).await?;
    // The proxy keeps acknowledging at the TCP level, as a stalled server would: only the
    // health check's bound can tell, shortened here from its 10 s default.
    let host = TestHost::launch_forward_configured(&proxy.url(), SHORT_HEALTH_TIMEOUT).await?;
    host.wait_ready().await?;

    // Nothing is closed: only the health check can tell that nothing gets through.
    proxy.blackhole();
    let down = host.wait_readiness(503).await?;
    assert_eq!(down["source"]["connected"], false);
    let error = down["source"]["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("PING"), "{down}");

    proxy.restore();
    let up = ready_after(&host, 1).await?;
    assert_eq!(up["source"]["patterns"], 1);
    assert_eq!(up["source"]["last_error"], Value::Null);
    assert_eq!(redis.pubsub_numpat().await?, 1);
    forwards_eventually(&redis, "after the silence").await?;
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn severed_connections_are_reestablished_every_time() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let proxy = Proxy::start(&redis).await?;
    let host = TestHost::launch_forward(&proxy.url()).await?;
    host.wait_ready().await?;

    for outage in 1..=2 {
        proxy.sever();
        let up = ready_after(&host, outage).await?;
        assert_eq!(up["source"]["patterns"], 1, "{up}");
        wait_subscribed(&redis, &[], 1).await?;
        forwards_eventually(&redis, &format!("after sever {outage}")).await?;
    }
    host.wait_plugin("forward", "still loaded", |p| p["state"] == "running")
        .await?;
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_changed_while_redis_is_down_are_exactly_what_is_subscribed_after()
-> anyhow::Result<()> {
    let mut redis = RedisServer::start().await?;
    let gone = echo_manifest(&["gone:in"], &["gone:p:*"], "gone:out", "gone");
    let added = echo_manifest(
        &["added:in", "added:also"],
        &["added:p:*", "added:q:*"],
        "added:out",
        "added",
    );
    let host = TestHost::start(
        &redis,
        &[
            ("forward", plugins::FORWARD, Some(FORWARD_MANIFEST)),
            ("gone", plugins::ECHO, Some(&gone)),
        ],
    )
    .await?;
    wait_subscribed(&redis, &["gone:in"], 2).await?;

    redis.kill().await;
    host.wait_readiness(503).await?;
    host.install("added", &read_plugin(plugins::ECHO), Some(&added))?;
    host.remove("gone")?;
    host.wait_plugin("added", "running", |p| p["state"] == "running")
        .await?;
    eventually(PATIENCE, || async {
        match host.plugin("gone").await? {
            None => Ok(()),
            Some(entry) => bail!("gone is still listed: {entry}"),
        }
    })
    .await?;

    redis.restart().await?;
    ready_after(&host, 1).await?;
    // forward's fwd:* and added's two patterns; none of gone's subscriptions.
    wait_subscribed(&redis, &["added:also", "added:in"], 3).await?;

    let mut added_out = Subscriber::new(&redis, &["added:out"], &[]).await?;
    let started = std::time::Instant::now();
    loop {
        // Each publish reaches the host's one subscription: the channel is subscribed once.
        assert_eq!(redis.publish("added:in", "hello").await?, 1);
        if let Ok(report) = added_out.next(Duration::from_millis(200)).await {
            let report: Value = serde_json::from_slice(&report.payload)?;
            assert_eq!(report["tag"], "added");
            break;
        }
        ensure!(
            started.elapsed() < RECOVERY,
            "added never answered after the restart"
        );
    }
    assert_eq!(redis.publish("added:q:1", "by pattern").await?, 1);
    let report: Value = serde_json::from_slice(&added_out.next(PATIENCE).await?.payload)?;
    assert_eq!(report["payload"], "by pattern");
    // Nobody is subscribed to what only the removed plugin wanted.
    assert_eq!(redis.publish("gone:in", "lost").await?, 0);
    assert_eq!(redis.publish("gone:p:1", "lost").await?, 0);
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_into_a_silent_network_ends_within_the_deadline() -> anyhow::Result<()> {
    const QUEUED: u64 = 30;
    const MANIFEST: &str = "[grants]\npublish = [\"faults\"]\n";
    let redis = RedisServer::start().await?;
    let proxy = Proxy::start(&redis).await?;
    let host = TestHost::launch(&proxy.url(), SHORT_HEALTH_TIMEOUT, |dir| {
        copy_plugin(dir, "faulty", plugins::FAULTY.as_ref(), Some(MANIFEST))
    })
    .await?;
    host.wait_ready().await?;
    let mut replies = Subscriber::new(&redis, &["faults"], &[]).await?;

    redis
        .publish_all((0..QUEUED).map(|_| ("fault:x", "spin:20")))
        .await?;
    replies.take(1, PATIENCE).await?;
    proxy.blackhole();

    // Every publish into the silence ends with an error by its plugin's 100 ms deadline at
    // the latest, so the queue drains (the breaker may park the plugin and shed the rest).
    let entry = host
        .wait_plugin("faulty", "drained", |p| {
            stat(p, "handled") + stat(p, "failed") + stat(p, "shed") == QUEUED
                && p["queue_depth"] == 0
        })
        .await?;
    assert!(stat(&entry, "failed") > 0, "{entry}");
    host.wait_readiness(503).await?;

    proxy.restore();
    ready_after(&host, 1).await?;
    let mut replies = Subscriber::new(&redis, &["faults"], &[]).await?;
    let started = std::time::Instant::now();
    loop {
        redis.publish("fault:x", "ok").await?;
        if let Ok(reply) = replies.next(Duration::from_millis(200)).await
            && reply.payload_str().starts_with("ok:")
        {
            break;
        }
        ensure!(
            started.elapsed() < RECOVERY,
            "nothing published after the network came back"
        );
    }
    host.stop().await
}

/// Starts a host on the Redis at `redis_url`, configured by `config` (TOML), with the plugins
/// folder `dir` and no admin endpoint, for a test that needs what
/// [`switchyard::app::Host::stop_by`] reports; waits until it is ready.
async fn start_host(
    redis_url: &str,
    config: &str,
    dir: &std::path::Path,
) -> anyhow::Result<switchyard::app::Host> {
    switchyard_tests::init_logging();
    let mut config = switchyard::config::Config::from_toml(config, "test config")?;
    config.redis.url = switchyard::config::RedisUrl::new(redis_url);
    config.plugins.dir = dir.to_owned();
    config
        .plugins
        .compile_cache
        .get_or_insert_with(switchyard_tests::compile_cache_dir);
    let broker = switchyard::app::Broker::Redis(config.redis.clone());
    let host = switchyard::app::Host::start(&config, broker, false, None).await?;
    eventually(PATIENCE, || async {
        let readiness = host.readiness();
        ensure!(readiness.ready, "not ready: {readiness:?}");
        Ok(())
    })
    .await?;
    Ok(host)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_whose_redis_went_silent_stops_in_time_having_handled_its_queue()
-> anyhow::Result<()> {
    const QUEUED: usize = 5;
    // The breaker stays closed, so that every queued message is taken by the plugin.
    const CONFIG: &str = "[plugins]\nbreaker_failures = 100\nbreaker_window = 100\n";
    // The first message keeps the worker busy until its deadline, without Redis, and the
    // others fail at once, without Redis either: nothing the plugins do waits on the
    // silence, only the host's own unsubscribing does.
    const MANIFEST: &str = "[limits]\ndeadline_ms = 3000\n";
    // Unsubscribing into the silence may take half of it; the rest is ample for the queue.
    const STOP: Duration = Duration::from_secs(8);
    let redis = RedisServer::start().await?;
    let proxy = Proxy::start(&redis).await?;
    let dir = tempfile::tempdir()?;
    copy_plugin(
        dir.path(),
        "faulty",
        plugins::FAULTY.as_ref(),
        Some(MANIFEST),
    )?;
    let host = start_host(&proxy.url(), CONFIG, dir.path()).await?;

    redis
        .publish_all(
            std::iter::once(("fault:x", "loop"))
                .chain(std::iter::repeat_n(("fault:x", "error"), QUEUED)),
        )
        .await?;
    // The worker took the first: it is inside that call, the rest wait behind it.
    eventually(PATIENCE, || async {
        let depth: usize = host
            .registry()
            .metrics_view()
            .iter()
            .map(|p| p.queue_depth)
            .sum();
        ensure!(depth == QUEUED, "queue depth {depth}");
        Ok(())
    })
    .await?;
    proxy.blackhole();

    let backlog = host.backlog();
    let stopped = host.stop_by(tokio::time::Instant::now() + STOP).await;
    assert_eq!(stopped, switchyard::app::Stopped::Drained);
    assert_eq!(backlog.unhandled(), 0, "queued messages left unhandled");
    Ok(())
}
