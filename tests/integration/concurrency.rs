//! `limits.concurrency`: several workers, each with its own instance, taking from one
//! plugin's queue. Order is given up; everything else (exactly once, reload, drain, counters,
//! stream acknowledgements) must hold as it does with one worker.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{bail, ensure};
use serde_json::Value;
use switchyard_tests::{
    PATIENCE, RedisServer, Subscriber, TestHost, echo_manifest, eventually, plugins, read_plugin,
    rebuilt,
};

/// Where `faulty` answers.
const REPLY: &str = "faults";

/// Long enough for a debug build to handle a few thousand messages on two shared cores.
const LONG: Duration = Duration::from_secs(90);

/// `faulty` with `concurrency` workers, allowed to answer and to probe any `gate:*` channel
/// (`announce:gate:N`), with a deadline longer than any hold a test makes.
fn faulty(concurrency: usize) -> String {
    format!(
        "[grants]\npublish = [\"{REPLY}\", \"gate:*\"]\n[limits]\ndeadline_ms = 60000\n\
         concurrency = {concurrency}\n"
    )
}

fn stat(entry: &Value, name: &str) -> u64 {
    entry["stats"][name].as_u64().unwrap_or_default()
}

/// The payloads of `n` messages on `subscriber`, sorted.
async fn payloads(
    subscriber: &mut Subscriber,
    n: usize,
    within: Duration,
) -> anyhow::Result<Vec<String>> {
    let mut got: Vec<String> = subscriber
        .take(n, within)
        .await?
        .iter()
        .map(|m| m.payload_str())
        .collect();
    got.sort();
    Ok(got)
}

/// Publishes `payloads` on `fault:x`, back to back.
async fn to_faulty(redis: &RedisServer, payloads: &[String]) -> anyhow::Result<()> {
    redis
        .publish_all(payloads.iter().map(|payload| ("fault:x", payload.as_str())))
        .await
}

/// Holds `workers` calls at once (`announce:gate:1..=N`, each announcing itself on
/// `replies` before holding) and waits until every one is inside its call.
async fn hold_every_worker(
    redis: &RedisServer,
    replies: &mut Subscriber,
    workers: usize,
) -> anyhow::Result<()> {
    let holds: Vec<String> = (1..=workers)
        .map(|n| format!("announce:gate:{n}"))
        .collect();
    to_faulty(redis, &holds).await?;
    assert_eq!(payloads(replies, workers, PATIENCE).await?.len(), workers);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_hold_three_calls_at_once_and_the_fourth_waits() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let host = TestHost::start(&redis, &[("faulty", plugins::FAULTY, Some(&faulty(3)))]).await?;
    let entry = host.plugin("faulty").await?.unwrap_or_default();
    assert_eq!(entry["version"]["concurrency"], 3, "{entry:#}");
    let mut replies = Subscriber::new(&redis, &[REPLY], &[]).await?;

    let holds: Vec<String> = (1..=4).map(|n| format!("announce:gate:{n}")).collect();
    to_faulty(&redis, &holds).await?;
    // The queue hands messages out in order: the first three are inside a call together.
    assert_eq!(
        payloads(&mut replies, 3, PATIENCE).await?,
        ["holding:gate:1", "holding:gate:2", "holding:gate:3"]
    );
    host.wait_plugin("faulty", "busy on three, one queued", |p| {
        stat(p, "accepted") == 4 && p["queue_depth"] == 1 && stat(p, "handled") == 0
    })
    .await?;

    // Freeing one worker lets the fourth message in.
    let _gate_1 = Subscriber::new(&redis, &["gate:1"], &[]).await?;
    assert_eq!(
        payloads(&mut replies, 2, PATIENCE).await?,
        ["holding:gate:4", "ok:1"]
    );
    let _all_gates = Subscriber::new(&redis, &[], &["gate:*"]).await?;
    // Each worker has its own instance, so its own count: the worker freed first handled
    // two messages, the others one each.
    assert_eq!(
        payloads(&mut replies, 3, PATIENCE).await?,
        ["ok:1", "ok:1", "ok:2"]
    );
    host.wait_plugin("faulty", "done with all four", |p| {
        stat(p, "handled") == 4 && stat(p, "failed") == 0 && p["queue_depth"] == 0
    })
    .await?;
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_workers_handle_every_message_exactly_once() -> anyhow::Result<()> {
    const MESSAGES: usize = 3_000;
    const BATCH: usize = 250;
    let redis = RedisServer::start().await?;
    let host = TestHost::start(&redis, &[("faulty", plugins::FAULTY, Some(&faulty(4)))]).await?;
    let mut replies = Subscriber::new(&redis, &[REPLY], &[]).await?;

    // The default queue (4,096) holds them all: nothing may be shed.
    let all: Vec<String> = (0..MESSAGES).map(|i| format!("say:{i}")).collect();
    for batch in all.chunks(BATCH) {
        to_faulty(&redis, batch).await?;
    }
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for message in replies.take(MESSAGES, LONG).await? {
        *seen.entry(message.payload_str()).or_default() += 1;
    }
    let expected: BTreeSet<String> = (0..MESSAGES).map(|i| i.to_string()).collect();
    let doubled: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "handled twice: {doubled:?}");
    assert_eq!(
        seen.keys().cloned().collect::<BTreeSet<_>>(),
        expected,
        "every message once"
    );

    let entry = host
        .wait_plugin("faulty", "settled", |p| {
            stat(p, "handled") + stat(p, "failed") + stat(p, "shed") >= MESSAGES as u64
        })
        .await?;
    assert_eq!(stat(&entry, "accepted"), MESSAGES as u64, "{entry:#}");
    assert_eq!(stat(&entry, "handled"), MESSAGES as u64, "{entry:#}");
    assert_eq!(stat(&entry, "failed"), 0, "{entry:#}");
    assert_eq!(stat(&entry, "shed"), 0, "{entry:#}");
    ensure!(host.host().registry().idle(), "accepted messages left over");
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_concurrent_plugin_loses_and_doubles_nothing() -> anyhow::Result<()> {
    // Steady traffic the plugin keeps up with, so that nothing is shed; each version asks for
    // a different number of workers, so a swap also grows or shrinks the crew.
    const BATCH: usize = 25;
    const PACE: Duration = Duration::from_millis(10);
    const AFTER_SWAP: usize = 400;
    let redis = RedisServer::start().await?;
    let echo = read_plugin(plugins::ECHO);
    let manifest = |tag: &str, concurrency: usize| {
        format!(
            "{}[limits]\nconcurrency = {concurrency}\n",
            echo_manifest(&[], &["r:*"], "seen", tag)
        )
    };
    let host =
        TestHost::start(&redis, &[("echo", plugins::ECHO, Some(&manifest("v1", 4)))]).await?;
    let mut seen = Subscriber::new(&redis, &["seen"], &[]).await?;
    let mut connection = redis.connection().await?;
    let versions = [
        ("v2", rebuilt(&echo, "v2"), manifest("v2", 1)),
        ("v3", rebuilt(&echo, "v3"), manifest("v3", 3)),
    ];

    let mut sent = 0usize;
    let mut pace = tokio::time::interval(PACE);
    let mut publish_batch = async |sent: &mut usize| -> anyhow::Result<()> {
        pace.tick().await;
        let mut pipe = redis::pipe();
        for _ in 0..BATCH {
            pipe.publish("r:x", sent.to_string()).ignore();
            *sent += 1;
        }
        let () = pipe.query_async(&mut connection).await?;
        Ok(())
    };
    for _ in 0..(AFTER_SWAP / BATCH) {
        publish_batch(&mut sent).await?;
    }
    for (reloads, (tag, wasm, manifest)) in (1u64..).zip(&versions) {
        host.install("echo", wasm, Some(manifest))?;
        let mut batches = 0;
        loop {
            let entry = host.plugin("echo").await?.unwrap_or_default();
            if entry["reloads"].as_u64() == Some(reloads) {
                break;
            }
            publish_batch(&mut sent).await?;
            batches += 1;
            if batches > 1_000 {
                bail!("{tag} never took over");
            }
        }
        for _ in 0..(AFTER_SWAP / BATCH) {
            publish_batch(&mut sent).await?;
        }
    }

    let mut per_payload: BTreeMap<usize, usize> = BTreeMap::new();
    let mut per_tag: BTreeMap<String, usize> = BTreeMap::new();
    for received in seen.take(sent, LONG).await? {
        let report: Value = serde_json::from_slice(&received.payload)?;
        let payload: usize = report["payload"].as_str().unwrap_or_default().parse()?;
        *per_payload.entry(payload).or_default() += 1;
        *per_tag
            .entry(report["tag"].as_str().unwrap_or_default().to_owned())
            .or_default() += 1;
    }
    assert_eq!(per_payload.len(), sent, "every message handled");
    assert!(
        per_payload.values().all(|n| *n == 1),
        "some message handled twice"
    );
    for tag in ["v1", "v2", "v3"] {
        assert!(
            per_tag.get(tag).is_some_and(|n| *n > 0),
            "{tag} handled nothing: {per_tag:?}"
        );
    }
    let entry = host
        .wait_plugin("echo", "settled", |p| stat(p, "handled") == sent as u64)
        .await?;
    assert_eq!(stat(&entry, "shed"), 0, "{entry:#}");
    assert_eq!(stat(&entry, "failed"), 0, "{entry:#}");
    assert_eq!(entry["version"]["concurrency"], 3, "{entry:#}");
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_concurrent_plugin_drains_its_backlog_on_every_worker() -> anyhow::Result<()> {
    const WORKERS: usize = 4;
    const BACKLOG: usize = 20;
    let redis = RedisServer::start().await?;
    let host = TestHost::start(
        &redis,
        &[("faulty", plugins::FAULTY, Some(&faulty(WORKERS)))],
    )
    .await?;
    let mut replies = Subscriber::new(&redis, &[REPLY], &[]).await?;

    // Every worker held inside a call, and a backlog behind them.
    hold_every_worker(&redis, &mut replies, WORKERS).await?;
    let backlog: Vec<String> = (0..BACKLOG).map(|i| format!("say:b{i}")).collect();
    to_faulty(&redis, &backlog).await?;
    host.wait_plugin("faulty", "holding a backlog", |p| {
        p["queue_depth"] == BACKLOG
    })
    .await?;

    host.remove("faulty")?;
    host.wait_plugin("faulty", "draining", |p| p["state"] == "draining")
        .await?;
    let _all_gates = Subscriber::new(&redis, &[], &["gate:*"]).await?;
    let got = payloads(&mut replies, WORKERS + BACKLOG, PATIENCE).await?;
    let answered: BTreeSet<&str> = got.iter().map(String::as_str).collect();
    for i in 0..BACKLOG {
        assert!(
            answered.contains(format!("b{i}").as_str()),
            "b{i} lost: {got:?}"
        );
    }
    assert_eq!(
        got.iter().filter(|p| p.starts_with("ok:")).count(),
        WORKERS,
        "every held call finished: {got:?}"
    );
    // Gone once every worker is done.
    eventually(PATIENCE, || async {
        match host.plugin("faulty").await? {
            None => Ok(()),
            Some(entry) => bail!("still listed: {entry}"),
        }
    })
    .await?;
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_outside_one_to_sixty_four_is_rejected_naming_the_field() -> anyhow::Result<()>
{
    let redis = RedisServer::start().await?;
    let host = TestHost::start(
        &redis,
        &[
            ("none", plugins::FAULTY, Some(&faulty(0))),
            ("many", plugins::FAULTY, Some(&faulty(65))),
        ],
    )
    .await?;
    for (name, value) in [("none", 0), ("many", 65)] {
        let entry = host.plugin(name).await?.unwrap_or_default();
        assert_eq!(entry["state"], "failed", "{entry:#}");
        let message = entry["load_error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("limits.concurrency") && message.contains(&format!("got {value}")),
            "{entry:#}"
        );
    }
    // Fixed, it loads.
    host.install("none", &read_plugin(plugins::FAULTY), Some(&faulty(2)))?;
    host.wait_plugin("none", "running with two workers", |p| {
        p["state"] == "running" && p["version"]["concurrency"] == 2
    })
    .await?;
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_batch_runs_in_parallel_and_every_entry_is_acknowledged() -> anyhow::Result<()> {
    const WORKERS: usize = 3;
    const MORE: usize = 40;
    let redis = RedisServer::start().await?;
    let manifest = format!(
        "{}[subscriptions]\nstreams = [\"work\"]\n[stream]\ngroup = \"crew\"\n",
        faulty(WORKERS)
    );
    let host = TestHost::start_configured(
        &redis,
        "[streams]\nconsumer = \"pod-a\"\nbatch = 16\nblock_ms = 200\nstart = \"all\"\n",
        &[("faulty", plugins::FAULTY, Some(&manifest))],
    )
    .await?;
    let mut replies = Subscriber::new(&redis, &[REPLY], &[]).await?;
    let mut connection = redis.connection().await?;
    // One transaction: the reader, blocked on the stream, gets all of them in one batch.
    let mut pipe = redis::pipe();
    pipe.atomic();
    for n in 1..=WORKERS {
        pipe.xadd("work", "*", &[("payload", format!("announce:gate:{n}"))])
            .ignore();
    }
    let () = pipe.query_async(&mut connection).await?;
    // Entries of one batch, inside their calls at the same time.
    assert_eq!(
        payloads(&mut replies, WORKERS, PATIENCE).await?,
        ["holding:gate:1", "holding:gate:2", "holding:gate:3"]
    );
    let _all_gates = Subscriber::new(&redis, &[], &["gate:*"]).await?;
    assert_eq!(
        payloads(&mut replies, WORKERS, PATIENCE).await?.len(),
        WORKERS
    );

    let mut pipe = redis::pipe();
    for i in 0..MORE {
        pipe.xadd("work", "*", &[("payload", format!("say:s{i}"))])
            .ignore();
    }
    let () = pipe.query_async(&mut connection).await?;
    let got = payloads(&mut replies, MORE, PATIENCE).await?;
    let expected: BTreeSet<String> = (0..MORE).map(|i| format!("s{i}")).collect();
    assert_eq!(got.iter().cloned().collect::<BTreeSet<_>>(), expected);

    let total = (WORKERS + MORE) as u64;
    eventually(PATIENCE, || async {
        let entry = host.plugin("faulty").await?.unwrap_or_default();
        ensure!(
            stat(&entry, "handled") == total && stat(&entry, "stream_acked") == total,
            "not all acknowledged: {entry:#}"
        );
        let pending: redis::Value = redis::cmd("XPENDING")
            .arg("work")
            .arg("crew")
            .query_async(&mut redis.connection().await?)
            .await?;
        match pending {
            redis::Value::Array(items) if items.first() == Some(&redis::Value::Int(0)) => Ok(()),
            other => bail!("entries still pending: {other:?}"),
        }
    })
    .await?;
    let entry = host.plugin("faulty").await?.unwrap_or_default();
    assert_eq!(stat(&entry, "stream_retried"), 0, "{entry:#}");
    assert_eq!(stat(&entry, "failed"), 0, "{entry:#}");
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_counts_the_plugins_failures_across_its_workers() -> anyhow::Result<()> {
    const WORKERS: usize = 3;
    let redis = RedisServer::start().await?;
    // Trips at 3 failures of the last 10 messages, and stays parked through the test.
    let config =
        "[plugins]\nbreaker_failures = 3\nbreaker_window = 10\nbreaker_backoff_ms = 60000\n";
    // Each hold ends at the deadline (inside the guest, or inside its publish, which then
    // answers `unavailable`): one failure on each worker.
    let manifest = format!(
        "[grants]\npublish = [\"{REPLY}\", \"gate:*\"]\n[limits]\ndeadline_ms = 3000\n\
         concurrency = {WORKERS}\n"
    );
    let host = TestHost::start_configured(
        &redis,
        config,
        &[("faulty", plugins::FAULTY, Some(&manifest))],
    )
    .await?;
    let mut replies = Subscriber::new(&redis, &[REPLY], &[]).await?;
    // All three inside a call at once: each worker fails exactly one message.
    hold_every_worker(&redis, &mut replies, WORKERS).await?;
    let entry = host
        .wait_plugin("faulty", "parked", |p| {
            p["state"] == "parked" && stat(p, "failed") == WORKERS as u64
        })
        .await?;
    assert_eq!(
        stat(&entry, "parks"),
        1,
        "one breaker, tripped once: {entry:#}"
    );

    // Whichever worker takes the next message finds the plugin parked.
    to_faulty(&redis, &["ok".to_owned()]).await?;
    host.wait_plugin("faulty", "shedding while parked", |p| {
        p["stats"]["shed_by"]["parked"] == 1
    })
    .await?;
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_of_calls_on_a_replaced_version_do_not_count_for_its_replacement()
-> anyhow::Result<()> {
    const WORKERS: usize = 2;
    let redis = RedisServer::start().await?;
    // Trips at 2 failures of the last 2 messages, and stays parked through the test.
    let config =
        "[plugins]\nbreaker_failures = 2\nbreaker_window = 2\nbreaker_backoff_ms = 60000\n";
    let host = TestHost::start_configured(
        &redis,
        config,
        &[("faulty", plugins::FAULTY, Some(&faulty(WORKERS)))],
    )
    .await?;
    let mut replies = Subscriber::new(&redis, &[REPLY], &[]).await?;

    // One worker inside a call on the first version while the second version takes over.
    to_faulty(&redis, &["announce:gate:1".to_owned()]).await?;
    assert_eq!(
        payloads(&mut replies, 1, PATIENCE).await?,
        ["holding:gate:1"]
    );
    let v2 = rebuilt(&read_plugin(plugins::FAULTY), "v2");
    host.install("faulty", &v2, Some(&faulty(WORKERS)))?;
    host.wait_plugin("faulty", "replaced", |p| p["reloads"] == 1)
        .await?;

    // The other worker starts the new version's record with a failure.
    to_faulty(&redis, &["error".to_owned()]).await?;
    host.wait_plugin("faulty", "failed once", |p| stat(p, "failed") == 1)
        .await?;
    // The old version's call then ends well: that says nothing about the new version.
    let _gate = Subscriber::new(&redis, &["gate:1"], &[]).await?;
    assert_eq!(payloads(&mut replies, 1, PATIENCE).await?, ["ok:1"]);
    host.wait_plugin("faulty", "done with the old call", |p| {
        stat(p, "handled") == 1
    })
    .await?;

    // The new version's second failure is its second in a row: parked.
    to_faulty(&redis, &["error".to_owned()]).await?;
    let entry = host
        .wait_plugin("faulty", "parked", |p| {
            p["state"] == "parked" && stat(p, "failed") == 2
        })
        .await?;
    assert_eq!(stat(&entry, "parks"), 1, "{entry:#}");
    host.stop().await
}
