//! Streams through consumer groups on a real Redis: hosts sharing a group, retries and the
//! dead-letter stream, and work a dead consumer left behind.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use redis::AsyncCommands as _;
use serde_json::Value;
use switchyard_tests::process::HostProcess;
use switchyard_tests::redis::{RedisServer, Subscriber};
use switchyard_tests::{PATIENCE, TestHost, eventually, plugins};

const WAIT: Duration = Duration::from_secs(30);

/// An echo manifest reading `stream` (and reporting on `reply`), with `extra` TOML appended
/// to its `[config]` table and `stream_table` as its `[stream]` table.
fn stream_echo(stream: &str, reply: &str, tag: &str, extra: &str, stream_table: &str) -> String {
    format!(
        "[grants]\npublish = [{reply:?}]\n[stream]\n{stream_table}\n[config]\nstreams = [{stream:?}]\nreply = {reply:?}\ntag = {tag:?}\n{extra}\n"
    )
}

fn host_config(consumer: &str) -> String {
    format!("[streams]\nconsumer = {consumer:?}\nbatch = 16\nblock_ms = 200\nstart = \"all\"\n")
}

/// Pending entries of `group` on `stream` (XPENDING summary).
/// After `echo` reported `acked` entries of `stream` on `reports`: no report follows (nothing
/// was handled twice), nothing stays pending in its group, and it counts every entry
/// acknowledged. Returns its stats.
async fn assert_settled_once(
    host: &TestHost,
    redis: &RedisServer,
    reports: &mut Subscriber,
    stream: &str,
    acked: usize,
) -> anyhow::Result<serde_json::Value> {
    let again = reports.drain_for(Duration::from_millis(300)).await;
    anyhow::ensure!(again.is_empty(), "handled twice: {} reports", again.len());
    eventually(WAIT, || async {
        anyhow::ensure!(pending(redis, stream, "echo").await? == 0);
        Ok(())
    })
    .await?;
    let stats = host.plugin("echo").await?.expect("echo loaded")["stats"].clone();
    assert_eq!(stats["stream_acked"], acked, "{stats}");
    Ok(stats)
}

async fn pending(redis: &RedisServer, stream: &str, group: &str) -> anyhow::Result<u64> {
    let mut connection = redis.connection().await?;
    let summary: redis::Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .query_async(&mut connection)
        .await?;
    match summary {
        redis::Value::Array(items) => match items.first() {
            Some(redis::Value::Int(n)) => Ok(u64::try_from(*n)?),
            other => anyhow::bail!("unexpected XPENDING reply {other:?}"),
        },
        other => anyhow::bail!("unexpected XPENDING reply {other:?}"),
    }
}

fn report(payload: &[u8]) -> anyhow::Result<Value> {
    Ok(serde_json::from_slice(payload)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_share_a_consumer_group_and_handle_every_entry_once() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let mut reports = Subscriber::new(&redis, &["handled"], &[]).await?;
    let mut hosts = Vec::new();
    for pod in ["pod-a", "pod-b"] {
        let manifest = stream_echo("orders", "handled", pod, "", "");
        hosts.push(
            TestHost::start_configured(
                &redis,
                &host_config(pod),
                &[("echo", plugins::ECHO, Some(&manifest))],
            )
            .await?,
        );
    }

    const ENTRIES: usize = 2000;
    let mut connection = redis.connection().await?;
    let mut added = BTreeSet::new();
    for i in 0..ENTRIES {
        let id: String = connection
            .xadd(
                "orders",
                "*",
                &[("payload", format!("order-{i}")), ("n", i.to_string())],
            )
            .await?;
        added.insert(id);
    }

    let mut by_host: BTreeMap<String, usize> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for message in reports.take(ENTRIES, WAIT).await? {
        let report = report(&message.payload)?;
        let id = report["entry_id"].as_str().unwrap_or_default().to_owned();
        assert!(seen.insert(id.clone()), "entry {id} handled twice");
        assert_eq!(report["subscription"], "stream:orders");
        assert_eq!(report["fields"], serde_json::json!(["payload", "n"]));
        assert!(
            report["payload"]
                .as_str()
                .unwrap_or("")
                .starts_with("order-")
        );
        *by_host
            .entry(report["tag"].as_str().unwrap_or("").to_owned())
            .or_default() += 1;
    }
    assert_eq!(seen, added, "every entry handled");
    assert!(
        reports
            .drain_for(Duration::from_millis(500))
            .await
            .is_empty(),
        "nothing handled twice"
    );
    assert_eq!(by_host.len(), 2, "both hosts took a share: {by_host:?}");
    eventually(WAIT, || async {
        anyhow::ensure!(pending(&redis, "orders", "echo").await? == 0);
        Ok(())
    })
    .await?;
    let acked: u64 = futures::future::try_join_all(hosts.iter().map(|h| h.plugin("echo")))
        .await?
        .into_iter()
        .map(|p| p.map_or(0, |p| p["stats"]["stream_acked"].as_u64().unwrap_or(0)))
        .sum();
    assert_eq!(acked, ENTRIES as u64);
    for host in hosts {
        host.stop().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_entries_are_retried_then_moved_to_the_dead_letter_stream() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let mut reports = Subscriber::new(&redis, &["handled"], &[]).await?;
    let manifest = stream_echo(
        "jobs",
        "handled",
        "one",
        "fail_on = \"poison\"\ninvalid_on = \"malformed\"",
        "max_deliveries = 3\nretry_backoff_ms = 50",
    );
    let host = TestHost::start_configured(
        &redis,
        &host_config("pod-a"),
        &[("echo", plugins::ECHO, Some(&manifest))],
    )
    .await?;

    let mut connection = redis.connection().await?;
    let mut ids = Vec::new();
    for payload in ["fine-1", "poison pill", "fine-2", "malformed"] {
        let id: String = connection
            .xadd("jobs", "*", &[("payload", payload), ("origin", "test")])
            .await?;
        ids.push(id);
    }
    let handled: BTreeSet<String> = reports
        .take(2, WAIT)
        .await?
        .iter()
        .map(|m| report(&m.payload).map(|r| r["payload"].as_str().unwrap_or("").to_owned()))
        .collect::<anyhow::Result<_>>()?;
    assert_eq!(handled, BTreeSet::from(["fine-1".into(), "fine-2".into()]));

    let dead_letters = eventually(WAIT, || async {
        let mut connection = redis.connection().await?;
        let dead: redis::streams::StreamRangeReply = connection.xrange_all("jobs:dead").await?;
        anyhow::ensure!(
            dead.ids.len() == 2,
            "{} dead-letter entries",
            dead.ids.len()
        );
        Ok(dead.ids)
    })
    .await?;
    // `invalid` is final: dead-lettered at its first delivery, while the failing entry
    // still has retries left.
    let malformed = &dead_letters[0];
    assert_eq!(malformed.get::<String>("dead.id"), Some(ids[3].clone()));
    assert_eq!(malformed.get::<String>("dead.deliveries"), Some("1".into()));
    let dead = &dead_letters[1];
    let field = |name: &str| -> String {
        dead.get::<String>(name)
            .unwrap_or_else(|| panic!("dead-letter entry has no {name}"))
    };
    assert_eq!(field("dead.id"), ids[1]);
    assert_eq!(field("dead.plugin"), "echo");
    assert_eq!(field("dead.group"), "echo");
    assert_eq!(field("dead.deliveries"), "3");
    assert!(
        field("dead.error").contains("poison"),
        "{}",
        field("dead.error")
    );
    assert_eq!(field("dead.version").len(), 16);
    assert_eq!(
        field("payload"),
        "poison pill",
        "the entry's own fields are kept"
    );
    assert_eq!(field("origin"), "test");

    eventually(WAIT, || async {
        anyhow::ensure!(pending(&redis, "jobs", "echo").await? == 0);
        Ok(())
    })
    .await?;
    let stats = host.plugin("echo").await?.expect("echo loaded")["stats"].clone();
    assert_eq!(stats["stream_dead_lettered"], 2);
    assert_eq!(
        stats["stream_retried"], 2,
        "two retries before the third failure"
    );
    assert_eq!(
        stats["stream_acked"], 4,
        "dead-lettered entries are acknowledged too"
    );
    assert_eq!(stats["failed"], 4);
    assert!(
        reports
            .drain_for(Duration::from_millis(300))
            .await
            .is_empty(),
        "the poison entry never succeeded"
    );
    host.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_a_dead_consumer_left_pending_are_claimed_by_a_live_one() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let mut connection = redis.connection().await?;
    // A replica read a batch and died before acknowledging it: its entries stay pending
    // under its name, and nothing else would ever deliver them.
    let _: () = connection
        .xgroup_create_mkstream("payments", "echo", "0")
        .await?;
    let mut abandoned = BTreeSet::new();
    for i in 0..10 {
        let id: String = connection
            .xadd("payments", "*", &[("payload", format!("p-{i}"))])
            .await?;
        abandoned.insert(id);
    }
    let read: redis::streams::StreamReadReply = connection
        .xread_options(
            &["payments"],
            &[">"],
            &redis::streams::StreamReadOptions::default().group("echo", "crashed-pod"),
        )
        .await?;
    assert_eq!(read.keys[0].ids.len(), 10);
    assert_eq!(pending(&redis, "payments", "echo").await?, 10);

    let mut reports = Subscriber::new(&redis, &["handled"], &[]).await?;
    let manifest = stream_echo("payments", "handled", "survivor", "", "claim_idle_ms = 300");
    let host = TestHost::start_configured(
        &redis,
        &host_config("pod-b"),
        &[("echo", plugins::ECHO, Some(&manifest))],
    )
    .await?;
    let claimed: BTreeSet<String> = reports
        .take(10, WAIT)
        .await?
        .iter()
        .map(|m| report(&m.payload).map(|r| r["entry_id"].as_str().unwrap_or("").to_owned()))
        .collect::<anyhow::Result<_>>()?;
    assert_eq!(claimed, abandoned);
    eventually(WAIT, || async {
        anyhow::ensure!(pending(&redis, "payments", "echo").await? == 0);
        Ok(())
    })
    .await?;
    let stats = host.plugin("echo").await?.expect("echo loaded")["stats"].clone();
    assert_eq!(stats["stream_claimed"], 10);
    host.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_batch_leaves_its_entries_to_the_other() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let mut reports = Subscriber::new(&redis, &["handled"], &[]).await?;
    // Slow handling (a few tens of milliseconds an entry), so the kill lands mid-batch.
    let manifest = |tag: &str| {
        stream_echo(
            "work",
            "handled",
            tag,
            "spin = 20",
            "batch = 20\nclaim_idle_ms = 500",
        ) + "[limits]\ndeadline_ms = 5000\n"
    };

    // The replica that dies: a real `switchyard run` process, killed with SIGKILL.
    let mut doomed = HostProcess::builder(&redis)
        .config(&host_config("doomed"))
        .plugin("echo", plugins::ECHO, Some(&manifest("doomed")))
        .start()
        .await?;

    const ENTRIES: usize = 60;
    let mut connection = redis.connection().await?;
    // The process has created the group (from the stream's start) once its plugin is listed;
    // the entries come after.
    eventually(PATIENCE, || async {
        let groups: Vec<redis::Value> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg("work")
            .query_async(&mut redis.connection().await?)
            .await?;
        anyhow::ensure!(!groups.is_empty(), "no group on work yet");
        Ok(())
    })
    .await?;
    let mut added = BTreeSet::new();
    for i in 0..ENTRIES {
        let id: String = connection
            .xadd("work", "*", &[("payload", format!("job-{i}"))])
            .await?;
        added.insert(id);
    }
    let mut handled_by_doomed = BTreeSet::new();
    while handled_by_doomed.len() < 5 {
        let report = report(&reports.next(WAIT).await?.payload)?;
        assert_eq!(report["tag"], "doomed");
        handled_by_doomed.insert(report["entry_id"].as_str().unwrap_or("").to_owned());
    }
    doomed.kill().await?;
    // What the dead replica read and never acknowledged: the rest of its batches in flight,
    // including entries it handled but had not acknowledged yet.
    let stranded = pending(&redis, "work", "echo").await?;
    assert!(stranded > 0, "the kill left nothing pending");
    // Reports already on the wire from the dead replica.
    for message in reports.drain_for(Duration::from_millis(200)).await {
        let report = report(&message.payload)?;
        handled_by_doomed.insert(report["entry_id"].as_str().unwrap_or("").to_owned());
    }

    let survivor = TestHost::start_configured(
        &redis,
        &host_config("survivor"),
        &[("echo", plugins::ECHO, Some(&manifest("survivor")))],
    )
    .await?;
    let mut handled_by_survivor = BTreeSet::new();
    while !added.is_subset(&(&handled_by_doomed | &handled_by_survivor)) {
        let report = report(&reports.next(WAIT).await?.payload)?;
        assert_eq!(report["tag"], "survivor");
        let id = report["entry_id"].as_str().unwrap_or("").to_owned();
        assert!(
            handled_by_survivor.insert(id.clone()),
            "{id} handled twice by the survivor"
        );
    }
    eventually(WAIT, || async {
        anyhow::ensure!(pending(&redis, "work", "echo").await? == 0);
        Ok(())
    })
    .await?;
    let stats = survivor.plugin("echo").await?.expect("echo loaded")["stats"].clone();
    assert_eq!(
        stats["stream_claimed"], stranded,
        "the survivor claimed exactly what the dead replica left pending"
    );
    // Handled twice: only entries the dead replica had handled but not acknowledged, all
    // from its two batches in flight (one whose XACK may have been on its way).
    let twice: BTreeSet<_> = handled_by_doomed
        .intersection(&handled_by_survivor)
        .collect();
    assert!(
        twice.len() < 2 * 20,
        "at most the two batches in flight are handled again, got {}",
        twice.len()
    );
    survivor.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_acknowledges_what_was_handled_and_leaves_the_rest_unread()
-> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let mut reports = Subscriber::new(&redis, &["handled"], &[]).await?;
    let manifest = stream_echo("queue", "handled", "one", "spin = 20", "batch = 10")
        + "[limits]\ndeadline_ms = 5000\n";
    let host = TestHost::start_configured(
        &redis,
        &host_config("pod-a"),
        &[("echo", plugins::ECHO, Some(&manifest))],
    )
    .await?;
    let mut connection = redis.connection().await?;
    for i in 0..50 {
        let _: String = connection
            .xadd("queue", "*", &[("payload", format!("job-{i}"))])
            .await?;
    }
    reports.take(3, WAIT).await?;
    host.stop().await?;

    // Every entry read was handled and acknowledged before the host exited; what it had
    // not read waits in the stream for the next consumer.
    assert_eq!(
        pending(&redis, "queue", "echo").await?,
        0,
        "nothing left pending"
    );
    let handled = 3 + reports.drain_for(Duration::from_millis(300)).await.len();
    let groups: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg("queue")
        .query_async(&mut connection)
        .await?;
    let read: i64 = redis::from_redis_value(groups[0]["entries-read"].clone())?;
    assert_eq!(read as usize, handled, "every entry read was handled");
    assert!(handled < 50, "the host stopped before reading everything");
    Ok(())
}

/// XADDs `count` entries with payloads `{prefix}-{i}` in one pipeline; their ids in order.
async fn add_entries(
    redis: &RedisServer,
    stream: &str,
    prefix: &str,
    count: usize,
) -> anyhow::Result<Vec<String>> {
    let mut connection = redis.connection().await?;
    let mut pipe = redis::pipe();
    for i in 0..count {
        pipe.xadd(stream, "*", &[("payload", format!("{prefix}-{i}"))]);
    }
    Ok(pipe.query_async(&mut connection).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_handles_a_stream_in_order_across_many_small_batches() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let mut reports = Subscriber::new(&redis, &["handled"], &[]).await?;
    // A backlog before the host starts (its group starts at the stream's beginning), so
    // that the reader always finds a next batch to read ahead; more entries while it reads.
    let mut added = add_entries(&redis, "ledger", "early", 400).await?;
    let manifest = stream_echo("ledger", "handled", "one", "", "batch = 4");
    let host = TestHost::start_configured(
        &redis,
        &host_config("pod-a"),
        &[("echo", plugins::ECHO, Some(&manifest))],
    )
    .await?;
    added.extend(add_entries(&redis, "ledger", "late", 400).await?);

    // `seq` counts the calls of the plugin's one instance: the n-th report is the n-th
    // call, and it must be about the n-th entry of the stream.
    for (n, message) in reports.take(added.len(), WAIT).await?.iter().enumerate() {
        let report = report(&message.payload)?;
        assert_eq!(report["seq"], n + 1, "report {n} out of turn: {report}");
        assert_eq!(
            report["entry_id"].as_str(),
            Some(added[n].as_str()),
            "call {} handled the wrong entry",
            n + 1
        );
    }
    let stats = assert_settled_once(&host, &redis, &mut reports, "ledger", added.len()).await?;
    assert_eq!(stats["stream_retried"], 0);
    host.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_batch_is_read_while_the_plugin_handles_one() -> anyhow::Result<()> {
    const BATCH: u64 = 5;
    let redis = RedisServer::start().await?;
    let mut reports = Subscriber::new(&redis, &["handled"], &[]).await?;
    let added = add_entries(&redis, "slow", "job", 40).await?;
    // Slow handling (a few tens of milliseconds an entry), so a batch takes a while.
    let manifest = stream_echo(
        "slow",
        "handled",
        "one",
        "spin = 20",
        &format!("batch = {BATCH}"),
    ) + "[limits]\ndeadline_ms = 5000\n";
    let host = TestHost::start_configured(
        &redis,
        &host_config("pod-a"),
        &[("echo", plugins::ECHO, Some(&manifest))],
    )
    .await?;

    // Read but not acknowledged: the batch being handled and the one read ahead, never a
    // third. While the first batch is handled, the second is already read.
    let mut most = 0;
    let mut handled = 0;
    while handled < added.len() {
        reports.next(WAIT).await?;
        handled += 1;
        let now = pending(&redis, "slow", "echo").await?;
        assert!(now <= 2 * BATCH, "{now} entries read and not acknowledged");
        most = most.max(now);
    }
    assert_eq!(
        most,
        2 * BATCH,
        "a second batch read while the first was handled"
    );
    eventually(WAIT, || async {
        anyhow::ensure!(pending(&redis, "slow", "echo").await? == 0);
        Ok(())
    })
    .await?;
    let stats = host.plugin("echo").await?.expect("echo loaded")["stats"].clone();
    assert_eq!(stats["stream_acked"], added.len());
    host.stop().await?;
    Ok(())
}

/// Kills the connections whose last command was a stream read or acknowledgement: the
/// stream readers'. Returns how many.
async fn kill_stream_readers(redis: &RedisServer) -> anyhow::Result<usize> {
    let mut connection = redis.connection().await?;
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut connection)
        .await?;
    let mut killed = 0;
    for line in clients.lines() {
        let field = |name: &str| line.split(' ').find_map(|f| f.strip_prefix(name));
        if matches!(field("cmd="), Some("xreadgroup" | "xack"))
            && let Some(id) = field("id=")
        {
            let () = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("ID")
                .arg(id)
                .query_async(&mut connection)
                .await?;
            killed += 1;
        }
    }
    Ok(killed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_mid_batch_handles_no_entry_twice() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let mut reports = Subscriber::new(&redis, &["handled"], &[]).await?;
    let added = add_entries(&redis, "tasks", "task", 30).await?;
    // Slow handling (a few tens of milliseconds an entry), so the loss lands mid-batch, with
    // the next batch read ahead and queued.
    let manifest = stream_echo("tasks", "handled", "one", "spin = 20", "batch = 5")
        + "[limits]\ndeadline_ms = 5000\n";
    let host = TestHost::start_configured(
        &redis,
        &host_config("pod-a"),
        &[("echo", plugins::ECHO, Some(&manifest))],
    )
    .await?;

    let mut handled = Vec::new();
    for _ in 0..3 {
        handled.push(report(&reports.next(WAIT).await?.payload)?);
    }
    assert_eq!(kill_stream_readers(&redis).await?, 1, "one stream reader");
    // The batches in flight go on; once reconnected, the reader acknowledges what they
    // handled before it reads this consumer's pending entries again.
    for message in reports.take(added.len() - handled.len(), WAIT).await? {
        handled.push(report(&message.payload)?);
    }
    let ids: Vec<&str> = handled
        .iter()
        .map(|r| r["entry_id"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(ids, added, "every entry once, in order");
    assert_settled_once(&host, &redis, &mut reports, "tasks", added.len()).await?;
    host.stop().await?;
    Ok(())
}
