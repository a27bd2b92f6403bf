//! Plugins that wait in WASI host calls: a `sleep` in `handle` or in `describe`, a read of
//! standard input. Epoch interruption cannot reach host code, so every such wait is bounded
//! by the call's deadline (the describe deadline at load), and what follows (the next
//! message, the breaker, a reload, a removal, a stop, the next file) goes on as after any
//! other deadline. A host call that works instead of waiting (a large `wasi:random` request)
//! is capped. The `attack` fixture does the waiting and the asking.

use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use serde_json::Value;
use switchyard_tests::{
    PATIENCE, RedisServer, Subscriber, TestHost, eventually, plugins, read_plugin, rebuilt,
};

use crate::faults::{metric, stat};

/// The host's default deadline (`plugins.deadline_ms`).
const DEFAULT_DEADLINE: Duration = Duration::from_millis(100);

/// How much later than its deadline a call stopped in a wait may end: one epoch tick, a
/// timer's resolution and a rebuilt instance take milliseconds; the rest is room for a busy
/// machine. A wait that ignored the deadline would end 100,000 s later.
const MARGIN: Duration = Duration::from_millis(500);

/// `attack` on `attack:*`, allowed to answer on `attacks`.
const ATTACK: &str = "[grants]\npublish = [\"attacks\"]\n";

/// A plugin that sleeps for 100,000 s in `describe`.
const SLEEPY_DESCRIBE: &str =
    "[grants]\npublish = [\"attacks\"]\n[config]\ndescribe_sleep_s = 100000\n";

/// The sum of `switchyard_plugin_handle_seconds` for `plugin`: how long its calls took, as
/// the host measured them.
async fn handle_seconds(host: &TestHost, plugin: &str) -> anyhow::Result<f64> {
    let (_, body) = host.get("/metrics").await?;
    let series = format!("switchyard_plugin_handle_seconds_sum{{plugin=\"{plugin}\"}}");
    body.as_str()
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix(series.as_str())?.trim().parse().ok())
        .with_context(|| format!("no {series} in /metrics"))
}

/// Publishes `payload` on `attack:x` and waits until `attack` has settled it (handled +
/// failed grew by one); returns its entry and how long the host spent in the call.
async fn attack(
    host: &TestHost,
    redis: &RedisServer,
    payload: &str,
) -> anyhow::Result<(Value, Duration)> {
    let before = host.plugin("attack").await?.unwrap_or_default();
    let done = stat(&before, "handled") + stat(&before, "failed");
    let spent = handle_seconds(host, "attack").await?;
    redis.publish("attack:x", payload).await?;
    let entry = host
        .wait_plugin("attack", "done with the message", |p| {
            stat(p, "handled") + stat(p, "failed") == done + 1
        })
        .await?;
    let call = Duration::from_secs_f64(handle_seconds(host, "attack").await? - spent);
    Ok((entry, call))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleep_in_handle_fails_at_the_deadline_and_the_next_message_is_handled()
-> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let host = TestHost::start(&redis, &[("attack", plugins::ATTACK, Some(ATTACK))]).await?;
    let mut replies = Subscriber::new(&redis, &["attacks"], &[]).await?;

    let (entry, call) = attack(&host, &redis, "sleep:100000").await?;
    assert_eq!(entry["stats"]["failed_by"]["deadline"], 1, "{entry}");
    assert_eq!(stat(&entry, "failed"), 1, "{entry}");
    let error = entry["stats"]["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("deadline of 100ms exceeded while waiting in wasi:io/poll.pollable.block"),
        "{error}"
    );
    // The sleep took real time up to the deadline, and no more than a margin beyond it.
    assert!(
        call >= DEFAULT_DEADLINE && call < DEFAULT_DEADLINE + MARGIN,
        "the sleeping call took {call:?}"
    );
    println!("contain-sleep handle: sleep:100000 under a 100 ms deadline failed after {call:?}");
    let series = r#"switchyard_plugin_failures_total{plugin="attack",reason="deadline"}"#;
    assert_eq!(metric(&host, series).await?, Some(1), "{series}");

    // The next message runs on a fresh instance (its count starts again at 1).
    let (entry, _) = attack(&host, &redis, "ping").await?;
    assert_eq!(stat(&entry, "handled"), 1, "{entry}");
    assert_eq!(replies.take(1, PATIENCE).await?[0].payload_str(), "ok:1");

    // Standard input is closed: a read of it to the end returns at once.
    let (entry, call) = attack(&host, &redis, "stdin").await?;
    assert_eq!(stat(&entry, "handled"), 2, "{entry}");
    assert_eq!(replies.take(1, PATIENCE).await?[0].payload_str(), "ok:2");
    assert!(call < DEFAULT_DEADLINE, "reading stdin took {call:?}");

    assert_eq!(entry["state"], "running", "{entry}");
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_random_request_over_one_mebibyte_traps() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let host = TestHost::start(&redis, &[("attack", plugins::ATTACK, Some(ATTACK))]).await?;
    let mut replies = Subscriber::new(&redis, &["attacks"], &[]).await?;

    let (entry, _) = attack(&host, &redis, "random:1024").await?;
    assert_eq!(stat(&entry, "handled"), 1, "{entry}");
    assert_eq!(replies.take(1, PATIENCE).await?[0].payload_str(), "ok:1");

    let (entry, call) = attack(&host, &redis, "random:1025").await?;
    assert_eq!(entry["stats"]["failed_by"]["trap"], 1, "{entry}");
    let error = entry["stats"]["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("exceeds limit 1048576"), "{error}");
    assert!(call < DEFAULT_DEADLINE, "the refused call took {call:?}");
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleep_within_the_deadline_takes_its_time_and_succeeds() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    // Clocks are frozen, but a wait on them takes real time: a sleep the deadline covers
    // ends normally.
    let manifest = format!("{ATTACK}[limits]\ndeadline_ms = 3000\n");
    let host = TestHost::start(&redis, &[("attack", plugins::ATTACK, Some(&manifest))]).await?;
    let mut replies = Subscriber::new(&redis, &["attacks"], &[]).await?;

    let (entry, call) = attack(&host, &redis, "sleep:1").await?;
    assert_eq!(stat(&entry, "handled"), 1, "{entry}");
    assert_eq!(replies.take(1, PATIENCE).await?[0].payload_str(), "ok:1");
    assert!(
        call >= Duration::from_secs(1) && call < Duration::from_secs(3),
        "sleep:1 took {call:?}"
    );
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sleeping_calls_the_breaker_a_reload_a_removal_and_a_stop_all_work()
-> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    // The back-off outlasts the steps that check the parked state, even on a busy machine.
    let config =
        "[plugins]\nbreaker_failures = 3\nbreaker_window = 5\nbreaker_backoff_ms = 60000\n";
    let host =
        TestHost::start_configured(&redis, config, &[("attack", plugins::ATTACK, Some(ATTACK))])
            .await?;
    let mut replies = Subscriber::new(&redis, &["attacks"], &[]).await?;

    // Three sleeping calls in a row park the plugin, as any three failures would.
    for _ in 0..3 {
        attack(&host, &redis, "sleep:100000").await?;
    }
    let parked = host
        .wait_plugin("attack", "parked", |p| p["state"] == "parked")
        .await?;
    assert_eq!(stat(&parked, "parks"), 1, "{parked}");
    assert_eq!(parked["stats"]["failed_by"]["deadline"], 3, "{parked}");

    // A new file is loaded, and its first message (the worker is free to take it) finds the
    // breaker reset.
    let wasm = read_plugin(plugins::ATTACK);
    host.install("attack", &rebuilt(&wasm, "second"), Some(ATTACK))?;
    host.wait_plugin("attack", "reloaded", |p| p["reloads"] == 1)
        .await?;
    let (entry, _) = attack(&host, &redis, "ping").await?;
    assert_eq!(stat(&entry, "handled"), 1, "{entry}");
    assert_eq!(entry["state"], "running", "{entry}");
    assert_eq!(replies.take(1, PATIENCE).await?[0].payload_str(), "ok:1");

    // Removed while sleeping calls are queued or in flight: they end by their deadlines and
    // the plugin leaves `/plugins` instead of draining for ever.
    let accepted = stat(&entry, "accepted");
    let done = stat(&entry, "handled") + stat(&entry, "failed");
    redis.publish("attack:x", "sleep:100000").await?;
    redis.publish("attack:x", "sleep:100000").await?;
    host.wait_plugin("attack", "inside the sleeps", |p| {
        stat(p, "accepted") == accepted + 2 && stat(p, "handled") + stat(p, "failed") < done + 2
    })
    .await?;
    host.remove("attack")?;
    eventually(PATIENCE, || async {
        let listed = host.plugin("attack").await?;
        ensure!(listed.is_none(), "still listed: {listed:?}");
        Ok(())
    })
    .await?;

    // A stop with a sleeping call in flight ends by that call's deadline, not the drain's.
    host.install("attack", &rebuilt(&wasm, "third"), Some(ATTACK))?;
    host.wait_plugin("attack", "running", |p| p["state"] == "running")
        .await?;
    redis.publish("attack:x", "sleep:100000").await?;
    host.wait_plugin("attack", "sleeping", |p| stat(p, "accepted") == 1)
        .await?;
    let stopping = Instant::now();
    host.stop().await?;
    let stop = stopping.elapsed();
    assert!(
        stop < PATIENCE / 2,
        "stop took {stop:?} (drain allowed {PATIENCE:?})"
    );
    println!("contain-sleep stop: with a sleeping call in flight the host stopped in {stop:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleeping_describe_is_rejected_and_later_plugins_load() -> anyhow::Result<()> {
    const DESCRIBE_DEADLINE: Duration = Duration::from_millis(1000);
    let redis = RedisServer::start().await?;
    let config = format!(
        "[plugins]\ndescribe_deadline_ms = {}\n",
        DESCRIBE_DEADLINE.as_millis()
    );
    let launched = Instant::now();
    let host = TestHost::start_configured(
        &redis,
        &config,
        &[("sleepy", plugins::ATTACK, Some(SLEEPY_DESCRIBE))],
    )
    .await?;
    // Ready once the sleeping plugin has been rejected: within its describe deadline, plus
    // a start-up that takes well under a few seconds.
    let ready = launched.elapsed();
    assert!(
        ready >= DESCRIBE_DEADLINE && ready < DESCRIBE_DEADLINE + Duration::from_secs(5),
        "ready after {ready:?}"
    );
    println!(
        "contain-sleep describe: a 100,000 s sleep in describe was rejected, host ready after {ready:?}"
    );
    let sleepy = host
        .wait_plugin("sleepy", "rejected", |p| p["state"] == "failed")
        .await?;
    assert_eq!(sleepy["load_error"]["kind"], "describe", "{sleepy}");
    let message = sleepy["load_error"]["message"].as_str().unwrap_or_default();
    for part in [
        "no answer within the describe deadline of 1s (plugins.describe_deadline_ms)",
        "waiting in wasi:io/poll.pollable.block",
    ] {
        assert!(message.contains(part), "{part:?} not in {message:?}");
    }
    assert_eq!(metric(&host, "switchyard_plugins_failed").await?, Some(1));

    // A plugin dropped in afterwards loads and handles messages; the host stays ready.
    host.install("attack", &read_plugin(plugins::ATTACK), Some(ATTACK))?;
    host.wait_plugin("attack", "running", |p| p["state"] == "running")
        .await?;
    let mut replies = Subscriber::new(&redis, &["attacks"], &[]).await?;
    let (entry, _) = attack(&host, &redis, "ping").await?;
    assert_eq!(stat(&entry, "handled"), 1, "{entry}");
    assert_eq!(replies.take(1, PATIENCE).await?[0].payload_str(), "ok:1");
    host.wait_ready().await?;

    // A running plugin's replacement that sleeps in describe is rejected; the running
    // version carries on.
    host.install(
        "attack",
        &read_plugin(plugins::ATTACK),
        Some(SLEEPY_DESCRIBE),
    )?;
    let kept = host
        .wait_plugin("attack", "rejecting its replacement", |p| {
            p["load_error"]["kind"] == "describe"
        })
        .await?;
    assert_eq!(kept["state"], "running", "{kept}");
    attack(&host, &redis, "ping").await?;
    assert_eq!(replies.take(1, PATIENCE).await?[0].payload_str(), "ok:2");
    let series = r#"switchyard_plugin_reloads_total{plugin="attack",result="rejected"}"#;
    assert_eq!(metric(&host, series).await?, Some(1), "{series}");

    // Deleting the rejected file is noticed like any other change.
    host.remove("sleepy")?;
    eventually(PATIENCE, || async {
        let listed = host.plugin("sleepy").await?;
        ensure!(listed.is_none(), "still listed: {listed:?}");
        Ok(())
    })
    .await?;
    assert_eq!(metric(&host, "switchyard_plugins_failed").await?, Some(0));
    host.wait_ready().await?;
    host.stop().await
}
