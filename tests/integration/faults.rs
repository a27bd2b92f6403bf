//! Fault injection: misbehaving plugins, a Redis that dies and comes back, floods and bad
//! input. Every test asserts what was handled, what was lost and why, and that nothing else
//! was affected, and prints one `fault-summary` line with its figures (see [`Summary`]).

use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use serde_json::{Value, json};
use switchyard_tests::{
    FORWARD_MANIFEST, PATIENCE, RedisServer, Subscriber, TestHost, assert_forwards, copy_plugin,
    echo_manifest, eventually, plugins, read_plugin, rebuilt,
};

const FAULTY: &str = "[grants]\npublish = [\"faults\"]\n";

/// `faulty` allowed to answer and to probe the `gate` channel (`hold:gate`), with a deadline
/// long enough that a hold lasts as long as a test needs.
pub(crate) const HELD: &str =
    "[grants]\npublish = [\"faults\", \"gate\"]\n[limits]\ndeadline_ms = 60000\n";

/// Host settings under which the circuit breaker never trips in a test: whatever a plugin
/// does, its messages are run (or shed by its queue), never shed for parking.
pub(crate) const BREAKER_OFF: &str = "breaker_failures = 100000\nbreaker_window = 100000\n";

/// The host's default deadline (`plugins.deadline_ms`).
const DEFAULT_DEADLINE: Duration = Duration::from_millis(100);

pub(crate) fn stat(entry: &Value, name: &str) -> u64 {
    entry["stats"][name].as_u64().unwrap_or_default()
}

/// One test's figures, printed as one line on stdout (shown with `--nocapture`) so that a run
/// can add up the suite:
///
/// `fault-summary test=NAME injected=N sent=N handled=N shed=N failed=N lost=N`
///
/// `injected`: faults the test caused (misbehaving messages, stuck plugins, kills, bad files
/// or input); `sent`: messages it published for plugins; `handled`, `shed` and `failed`: what
/// the plugins of the host counted; `lost`: what is left of `sent`, messages that never reached
/// a plugin (published while the subscriber was disconnected, dropped as oversize).
#[derive(Debug)]
struct Summary {
    test: &'static str,
    injected: u64,
    sent: u64,
}

impl Summary {
    fn new(test: &'static str) -> Self {
        Self {
            test,
            injected: 0,
            sent: 0,
        }
    }

    /// Waits until every plugin of `host` is done with what it accepted, then reads their
    /// counters and prints the line.
    async fn report(&self, host: &TestHost) -> anyhow::Result<()> {
        eventually(PATIENCE, || async {
            ensure!(host.host().registry().idle(), "plugins still busy");
            Ok(())
        })
        .await?;
        let (_, listing) = host.get("/plugins").await?;
        let (mut handled, mut shed, mut failed) = (0, 0, 0);
        for plugin in listing["plugins"].as_array().into_iter().flatten() {
            handled += stat(plugin, "handled");
            shed += stat(plugin, "shed");
            failed += stat(plugin, "failed");
        }
        let lost = self.sent.saturating_sub(handled + shed + failed);
        println!(
            "fault-summary test={} injected={} sent={} handled={handled} shed={shed} \
             failed={failed} lost={lost}",
            self.test, self.injected, self.sent
        );
        Ok(())
    }
}

/// The value of one series in `/metrics`, e.g.
/// `switchyard_plugin_shed_total{plugin="faulty",reason="parked"}`.
pub(crate) async fn metric(host: &TestHost, series: &str) -> anyhow::Result<Option<u64>> {
    let (_, body) = host.get("/metrics").await?;
    let text = body.as_str().unwrap_or_default();
    Ok(text
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok()))
}

/// Waits until `plugin` has taken a message from its queue and is still inside the call:
/// with `hold:gate`, until the test subscribes to `gate`.
pub(crate) async fn wait_in_flight(
    host: &TestHost,
    plugin: &str,
    accepted: u64,
) -> anyhow::Result<Value> {
    host.wait_plugin(plugin, "inside its first call", |p| {
        stat(p, "accepted") == accepted
            && p["queue_depth"] == 0
            && stat(p, "handled") + stat(p, "failed") == 0
    })
    .await
}

/// A host running `faulty` (on `fault:*`) and `forward` (on `fwd:*`) side by side.
async fn faulty_beside_forward(redis: &RedisServer) -> anyhow::Result<TestHost> {
    TestHost::start(
        redis,
        &[
            ("faulty", plugins::FAULTY, Some(FAULTY)),
            ("forward", plugins::FORWARD, Some(FORWARD_MANIFEST)),
        ],
    )
    .await
}

/// Publishes `payload` on `fault:x` and waits until faulty has settled it (handled + failed
/// grew by one); returns its entry.
async fn fault(host: &TestHost, redis: &RedisServer, payload: &str) -> anyhow::Result<Value> {
    settle(host, redis, "faulty", "fault:x", payload).await
}

/// Publishes `payload` on `channel` and waits until `plugin` has settled it (handled + failed
/// grew by one); returns its entry.
async fn settle(
    host: &TestHost,
    redis: &RedisServer,
    plugin: &str,
    channel: &str,
    payload: &str,
) -> anyhow::Result<Value> {
    let before = host.plugin(plugin).await?.unwrap_or_default();
    let done = stat(&before, "handled") + stat(&before, "failed");
    redis.publish(channel, payload).await?;
    host.wait_plugin(plugin, "done with the message", |p| {
        stat(p, "handled") + stat(p, "failed") == done + 1
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traps_deadlines_and_memory_exhaustion_fail_only_their_message() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let host = faulty_beside_forward(&redis).await?;
    let mut replies = Subscriber::new(&redis, &["faults"], &[]).await?;
    let mut forwarded = Subscriber::new(&redis, &[], &["fwded:*"]).await?;

    let mut summary = Summary::new("traps_deadlines_and_memory_exhaustion_fail_only_their_message");
    let mut reasons = Vec::new();
    for payload in [
        "ok",
        "trap",
        "ok",
        "loop",
        "ok",
        "alloc:200",
        "ok",
        "error",
        "ok",
    ] {
        summary.sent += 2;
        if payload != "ok" {
            summary.injected += 1;
        }
        let entry = fault(&host, &redis, payload).await?;
        reasons.push(
            entry["stats"]["last_error"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
        // The other plugin is untouched throughout.
        redis.publish("fwd:beat", payload).await?;
        assert_eq!(forwarded.take(1, PATIENCE).await?[0].payload_str(), payload);
    }
    assert!(reasons[1].contains("trapped"), "{reasons:?}");
    assert!(
        reasons[3].contains("deadline of 100ms exceeded"),
        "{reasons:?}"
    );
    assert!(reasons[5].contains("memory cap of 64 MiB"), "{reasons:?}");
    assert!(reasons[7].contains("asked to fail"), "{reasons:?}");

    // A trap costs the instance (its count restarts at 1); an error value does not.
    let seqs: Vec<String> = replies
        .take(5, PATIENCE)
        .await?
        .iter()
        .map(|r| r.payload_str())
        .collect();
    assert_eq!(seqs, ["ok:1", "ok:1", "ok:1", "ok:1", "ok:3"]);
    let entry = host.plugin("faulty").await?.unwrap_or_default();
    assert_eq!(stat(&entry, "handled"), 5);
    assert_eq!(stat(&entry, "failed"), 4);
    assert_eq!(
        entry["state"], "running",
        "4 failures in 9 do not trip the breaker"
    );
    // Each failure is counted under its own reason, in `/plugins` and in `/metrics`.
    let by_reason = json!({"error": 1, "trap": 1, "deadline": 1, "memory": 1, "no_instance": 0});
    assert_eq!(entry["stats"]["failed_by"], by_reason, "{entry}");
    assert_eq!(
        entry["stats"]["shed_by"],
        json!({"queue_full": 0, "host_budget": 0, "parked": 0, "stopped": 0}),
        "{entry}"
    );
    for (reason, count) in by_reason.as_object().into_iter().flatten() {
        let series =
            format!(r#"switchyard_plugin_failures_total{{plugin="faulty",reason="{reason}"}}"#);
        assert_eq!(metric(&host, &series).await?, count.as_u64(), "{series}");
    }
    let series = r#"switchyard_plugin_shed_total{plugin="faulty",reason="queue_full"}"#;
    assert_eq!(metric(&host, series).await?, Some(0), "{series}");
    let forward = host.plugin("forward").await?.unwrap_or_default();
    assert_eq!(forward["stats"]["failed"], 0, "{forward}");
    summary.report(&host).await?;
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_keeps_failing_is_parked_then_retried() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    // The back-off must outlast the steps that check the parked state, even on a busy machine.
    let config = "[plugins]\nbreaker_failures = 3\nbreaker_window = 5\nbreaker_backoff_ms = 4000\n";
    let host =
        TestHost::start_configured(&redis, config, &[("faulty", plugins::FAULTY, Some(FAULTY))])
            .await?;
    let mut replies = Subscriber::new(&redis, &["faults"], &[]).await?;
    let mut summary = Summary::new("a_plugin_that_keeps_failing_is_parked_then_retried");

    for _ in 0..3 {
        fault(&host, &redis, "error").await?;
    }
    summary.injected += 3;
    summary.sent += 3;
    let parked = host
        .wait_plugin("faulty", "parked", |p| p["state"] == "parked")
        .await?;
    assert_eq!(stat(&parked, "parks"), 1);
    assert!(parked["stats"]["parked_until_ms"].as_u64().is_some());

    // While parked, messages are shed, not run, and counted as shed for parking.
    redis.publish("fault:x", "ok").await?;
    summary.sent += 1;
    let shedding = host
        .wait_plugin("faulty", "shedding", |p| stat(p, "shed") == 1)
        .await?;
    assert_eq!(shedding["stats"]["shed_by"]["parked"], 1, "{shedding}");
    let series = r#"switchyard_plugin_shed_total{plugin="faulty",reason="parked"}"#;
    assert_eq!(metric(&host, series).await?, Some(1), "{series}");
    assert!(
        replies
            .drain_for(Duration::from_millis(100))
            .await
            .is_empty()
    );

    // After the back-off a trial goes through; success closes the breaker.
    host.wait_plugin("faulty", "unparked", |p| p["state"] == "running")
        .await?;
    redis.publish("fault:x", "ok").await?;
    summary.sent += 1;
    assert!(
        replies.take(1, PATIENCE).await?[0]
            .payload_str()
            .starts_with("ok:")
    );

    // A new file resets the breaker at once. Failing messages go out until it parks again
    // (messages that arrive once it is parked are shed).
    let mut failing = 0;
    eventually(PATIENCE, || {
        failing += 1;
        async {
            redis.publish("fault:x", "error").await?;
            let entry = host.plugin("faulty").await?.unwrap_or_default();
            anyhow::ensure!(entry["state"] == "parked", "not parked again yet");
            Ok(())
        }
    })
    .await?;
    summary.injected += failing;
    summary.sent += failing;
    host.install(
        "faulty",
        &rebuilt(&read_plugin(plugins::FAULTY), "fixed"),
        None,
    )?;
    host.wait_plugin("faulty", "reloaded", |p| p["reloads"] == 1)
        .await?;
    redis.publish("fault:x", "ok").await?;
    summary.sent += 1;
    assert_eq!(replies.take(1, PATIENCE).await?[0].payload_str(), "ok:1");
    summary.report(&host).await?;
    host.stop().await
}

/// A host running `faulty` (on `fault:*`, with the [`HELD`] manifest) and `forward` (on
/// `fwd:*`), with the circuit breaker off and `plugins` settings added.
pub(crate) async fn held_beside_forward(
    redis: &RedisServer,
    plugins: &str,
) -> anyhow::Result<TestHost> {
    TestHost::start_configured(
        redis,
        &format!("[plugins]\n{BREAKER_OFF}{plugins}"),
        &[
            ("faulty", plugins::FAULTY, Some(HELD)),
            ("forward", plugins::FORWARD, Some(FORWARD_MANIFEST)),
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_stuck_plugin_does_not_slow_another() -> anyhow::Result<()> {
    const N: usize = 1000;
    let redis = RedisServer::start().await?;
    // No breaker to park the stuck plugin and shed its messages: isolation alone must keep
    // forward going.
    let host = held_beside_forward(&redis, "").await?;
    let mut forwarded = Subscriber::new(&redis, &[], &["fwded:*"]).await?;
    let mut replies = Subscriber::new(&redis, &["faults"], &[]).await?;

    // faulty's first message holds it inside its call until the test lets it go; the other
    // N - 1 queue up behind it. forward's N messages are interleaved with them.
    redis
        .publish_all((0..N).flat_map(|i| {
            let fault = if i == 0 { "hold:gate" } else { "ok" };
            [("fault:x", fault.to_owned()), ("fwd:x", i.to_string())]
        }))
        .await?;

    let got = forwarded.take(N, PATIENCE).await?;
    for (i, message) in got.iter().enumerate() {
        assert_eq!(message.payload_str(), i.to_string());
    }
    // forward delivered all N while faulty is still inside its first message.
    let stuck = host.plugin("faulty").await?.unwrap_or_default();
    assert_eq!(
        stat(&stuck, "handled") + stat(&stuck, "failed"),
        0,
        "{stuck}"
    );
    assert_eq!(stat(&stuck, "shed"), 0, "{stuck}");
    let forward = host.plugin("forward").await?.unwrap_or_default();
    assert_eq!(stat(&forward, "handled"), N as u64, "{forward}");
    assert_eq!(stat(&forward, "shed"), 0);
    assert_eq!(stat(&forward, "failed"), 0);
    let (status, _) = host.get("/readyz").await?;
    assert_eq!(status, 200, "the subscriber connection stayed up");

    // Let it go: it works through its own backlog, in order, and loses nothing.
    let _gate = Subscriber::new(&redis, &["gate"], &[]).await?;
    let answers = replies.take(N, PATIENCE).await?;
    for (i, answer) in answers.iter().enumerate() {
        assert_eq!(answer.payload_str(), format!("ok:{}", i + 1));
    }
    let done = host
        .wait_plugin("faulty", "done", |p| stat(p, "handled") == N as u64)
        .await?;
    assert_eq!(stat(&done, "accepted"), N as u64, "{done}");
    Summary {
        test: "one_stuck_plugin_does_not_slow_another",
        injected: 1,
        sent: 2 * N as u64,
    }
    .report(&host)
    .await?;
    host.stop().await
}

/// Holds faulty inside one call while `burst` messages `say:<i>` arrive for it, each followed
/// by one for forward that must come through before the next; then lets faulty go. Returns
/// what faulty answered (after `ok:1` for the held message) and its `/plugins` entry.
async fn overflow(
    name: &'static str,
    when_full: &str,
    capacity: u64,
    burst: u64,
) -> anyhow::Result<(Vec<String>, Value)> {
    let redis = RedisServer::start().await?;
    let host = held_beside_forward(
        &redis,
        &format!("queue_capacity = {capacity}\nwhen_full = \"{when_full}\"\n"),
    )
    .await?;
    let mut forwarded = Subscriber::new(&redis, &[], &["fwded:*"]).await?;
    let mut replies = Subscriber::new(&redis, &["faults"], &[]).await?;

    redis.publish("fault:x", "hold:gate").await?;
    wait_in_flight(&host, "faulty", 1).await?;
    for i in 0..burst {
        redis.publish("fault:x", format!("say:{i}")).await?;
        redis.publish("fwd:x", i.to_string()).await?;
        assert_eq!(
            forwarded.take(1, PATIENCE).await?[0].payload_str(),
            i.to_string(),
            "forward gets every message while faulty's queue overflows"
        );
    }
    let shed = burst - capacity;
    let full = host
        .wait_plugin("faulty", "shedding", |p| stat(p, "shed") == shed)
        .await?;
    assert_eq!(full["stats"]["shed_by"]["queue_full"], shed, "{full}");
    assert_eq!(full["queue_depth"], capacity, "{full}");
    let series = r#"switchyard_plugin_shed_total{plugin="faulty",reason="queue_full"}"#;
    assert_eq!(metric(&host, series).await?, Some(shed), "{series}");
    let (status, _) = host.get("/readyz").await?;
    assert_eq!(status, 200, "the subscriber connection kept reading");
    let forward = host.plugin("forward").await?.unwrap_or_default();
    assert_eq!(stat(&forward, "handled"), burst, "{forward}");
    assert_eq!(stat(&forward, "shed"), 0, "{forward}");

    let _gate = Subscriber::new(&redis, &["gate"], &[]).await?;
    let answers: Vec<String> = replies
        .take(1 + capacity as usize, PATIENCE)
        .await?
        .iter()
        .map(|r| r.payload_str())
        .collect();
    assert_eq!(answers[0], "ok:1", "the held message finished");
    let entry = host
        .wait_plugin("faulty", "drained", |p| {
            stat(p, "handled") == 1 + capacity && p["queue_depth"] == 0
        })
        .await?;
    assert_eq!(stat(&entry, "failed"), 0, "{entry}");
    assert!(
        replies
            .drain_for(Duration::from_millis(100))
            .await
            .is_empty()
    );
    Summary {
        test: name,
        injected: 1,
        sent: 1 + 2 * burst,
    }
    .report(&host)
    .await?;
    host.stop().await?;
    Ok((answers[1..].to_vec(), entry))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_dropping_the_newest_keeps_what_it_accepted_first() -> anyhow::Result<()> {
    let (handled, entry) = overflow(
        "a_full_queue_dropping_the_newest_keeps_what_it_accepted_first",
        "drop-newest",
        4,
        10,
    )
    .await?;
    assert_eq!(handled, ["0", "1", "2", "3"]);
    // What was refused was never accepted.
    assert_eq!(stat(&entry, "accepted"), 1 + 4, "{entry}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_dropping_the_oldest_keeps_the_freshest() -> anyhow::Result<()> {
    let (handled, entry) = overflow(
        "a_full_queue_dropping_the_oldest_keeps_the_freshest",
        "drop-oldest",
        4,
        10,
    )
    .await?;
    assert_eq!(handled, ["6", "7", "8", "9"]);
    // Every message was accepted; the older ones were dropped to make room.
    assert_eq!(stat(&entry, "accepted"), 1 + 10, "{entry}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_limits_override_the_memory_cap_and_the_deadline() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let tight = format!(
        "{FAULTY}[limits]\nmemory_mib = 8\ndeadline_ms = 300\n[config]\npatterns = [\"tight:*\"]\n"
    );
    let patient = format!("{HELD}[config]\npatterns = [\"patient:*\"]\n");
    let host = TestHost::start_configured(
        &redis,
        &format!("[plugins]\n{BREAKER_OFF}"),
        &[
            ("tight", plugins::FAULTY, Some(&tight)),
            ("patient", plugins::FAULTY, Some(&patient)),
        ],
    )
    .await?;
    let mut summary = Summary::new("manifest_limits_override_the_memory_cap_and_the_deadline");

    // 8 MiB for all of tight's memories: 4 MiB more fits, 16 MiB does not.
    let entry = settle(&host, &redis, "tight", "tight:x", "alloc:4").await?;
    assert_eq!(stat(&entry, "handled"), 1, "{entry}");
    let entry = settle(&host, &redis, "tight", "tight:x", "alloc:16").await?;
    assert_eq!(entry["stats"]["failed_by"]["memory"], 1, "{entry}");
    let error = entry["stats"]["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("memory cap of 8 MiB"), "{error}");
    // The instance is rebuilt and works again within its cap.
    let entry = settle(&host, &redis, "tight", "tight:x", "alloc:4").await?;
    assert_eq!(stat(&entry, "handled"), 2, "{entry}");

    // A loop is stopped by tight's own deadline.
    let entry = settle(&host, &redis, "tight", "tight:x", "loop").await?;
    assert_eq!(entry["stats"]["failed_by"]["deadline"], 1, "{entry}");
    let error = entry["stats"]["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("deadline of 300ms exceeded"), "{error}");
    summary.injected += 2;
    summary.sent += 4;

    // patient's 60 s deadline lets a call run well past the host's default.
    let started = Instant::now();
    redis.publish("patient:x", "hold:gate").await?;
    summary.sent += 1;
    eventually(PATIENCE, || async {
        let entry = wait_in_flight(&host, "patient", 1).await?;
        ensure!(
            started.elapsed() > 3 * DEFAULT_DEADLINE,
            "in its call for {:?} only: {entry}",
            started.elapsed()
        );
        Ok(())
    })
    .await?;
    let _gate = Subscriber::new(&redis, &["gate"], &[]).await?;
    let entry = host
        .wait_plugin("patient", "done", |p| stat(p, "handled") == 1)
        .await?;
    assert_eq!(stat(&entry, "failed"), 0, "{entry}");
    summary.report(&host).await?;
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_files_declaring_the_same_name_run_as_two_plugins() -> anyhow::Result<()> {
    // The plugin's identity is its file name; the name `describe` gives is only reported.
    let redis = RedisServer::start().await?;
    let twin = "[grants]\npublish = [\"twins\"]\n[config]\nreply = \"twins\"\n";
    let host = TestHost::start(
        &redis,
        &[
            ("faulty", plugins::FAULTY, Some(FAULTY)),
            ("twin", plugins::FAULTY, Some(twin)),
        ],
    )
    .await?;
    let mut summary = Summary::new("two_files_declaring_the_same_name_run_as_two_plugins");
    for name in ["faulty", "twin"] {
        let entry = host.plugin(name).await?.unwrap_or_default();
        assert_eq!(entry["state"], "running", "{entry}");
        assert_eq!(entry["version"]["declared_name"], "faulty", "{entry}");
    }
    let mut replies = Subscriber::new(&redis, &["faults"], &[]).await?;
    let mut twins = Subscriber::new(&redis, &["twins"], &[]).await?;

    // Both subscribe to fault:*: each gets the message once, with its own grants and settings.
    redis.publish("fault:x", "ok").await?;
    assert_eq!(replies.take(1, PATIENCE).await?[0].payload_str(), "ok:1");
    assert_eq!(twins.take(1, PATIENCE).await?[0].payload_str(), "ok:1");
    // A trap costs each its own instance and counts in its own figures.
    redis.publish("fault:x", "trap").await?;
    for name in ["faulty", "twin"] {
        let entry = host
            .wait_plugin(name, "failed once", |p| stat(p, "failed") == 1)
            .await?;
        assert_eq!(entry["stats"]["failed_by"]["trap"], 1, "{entry}");
        assert_eq!(stat(&entry, "handled"), 1, "{entry}");
    }
    for name in ["faulty", "twin"] {
        let series =
            format!(r#"switchyard_plugin_failures_total{{plugin="{name}",reason="trap"}}"#);
        assert_eq!(metric(&host, &series).await?, Some(1), "{series}");
    }
    // Two messages, each for both plugins.
    summary.injected += 1;
    summary.sent += 4;
    summary.report(&host).await?;

    // Removing one file leaves the other running.
    host.remove("twin")?;
    eventually(PATIENCE, || async {
        ensure!(host.plugin("twin").await?.is_none(), "twin still listed");
        Ok(())
    })
    .await?;
    redis.publish("fault:x", "ok").await?;
    assert_eq!(replies.take(1, PATIENCE).await?[0].payload_str(), "ok:1");
    assert!(twins.drain_for(Duration::from_millis(100)).await.is_empty());
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_and_restarted_redis_is_resubscribed() -> anyhow::Result<()> {
    let mut redis = RedisServer::start().await?;
    let host = TestHost::with_forward(&redis).await?;

    redis.kill().await;
    let down = host.wait_readiness(503).await?;
    assert_eq!(down["source"]["connected"], false);

    redis.restart().await?;
    let up = host.wait_readiness(200).await?;
    assert_eq!(up["source"]["reconnects"], 1);
    assert_eq!(up["source"]["patterns"], 1);
    let mut connection = redis.connection().await?;
    let patterns: i64 = redis::cmd("PUBSUB")
        .arg("NUMPAT")
        .query_async(&mut connection)
        .await?;
    assert_eq!(patterns, 1, "exactly the current set is subscribed again");

    let mut out = Subscriber::new(&redis, &[], &["fwded:*"]).await?;
    let mut summary = Summary::new("a_killed_and_restarted_redis_is_resubscribed");
    summary.injected = 1;
    // The publishing connection reconnects on first use after the outage, so the first
    // publishes may fail inside the plugin; keep publishing until one comes through.
    let started = std::time::Instant::now();
    loop {
        redis.publish("fwd:back", "again").await?;
        summary.sent += 1;
        if let Ok(message) = out.next(Duration::from_millis(200)).await {
            assert_eq!(message.payload_str(), "again");
            break;
        }
        anyhow::ensure!(
            started.elapsed() < PATIENCE,
            "nothing forwarded after the restart"
        );
    }
    summary.report(&host).await?;
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_subscriber_connection_is_reestablished() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let host = TestHost::with_forward(&redis).await?;
    let mut connection = redis.connection().await?;
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut connection)
        .await?;
    assert_eq!(killed, 1);
    host.wait_plugin("forward", "still loaded", |p| p["state"] == "running")
        .await?;
    let ready = eventually(PATIENCE, || async {
        let (status, body) = host.get("/readyz").await?;
        if status == 200 && body["source"]["reconnects"] == 1 {
            Ok(body)
        } else {
            bail!("not reconnected yet: {body}")
        }
    })
    .await?;
    assert_eq!(ready["source"]["patterns"], 1);
    assert_forwards(&redis, "after").await?;
    Summary {
        test: "a_killed_subscriber_connection_is_reestablished",
        injected: 1,
        sent: 1,
    }
    .report(&host)
    .await?;
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_started_while_redis_is_down_waits_for_it() -> anyhow::Result<()> {
    let mut redis = RedisServer::start().await?;
    redis.kill().await;
    let host = TestHost::launch_forward(&redis.url()).await?;
    let down = host.wait_readiness(503).await?;
    assert_eq!(down["source"]["connected"], false);
    assert!(down["source"]["last_error"].as_str().is_some(), "{down}");

    redis.restart().await?;
    host.wait_ready().await?;
    assert_forwards(&redis, "late").await?;
    Summary {
        test: "a_host_started_while_redis_is_down_waits_for_it",
        injected: 1,
        sent: 1,
    }
    .report(&host)
    .await?;
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_during_an_outage_fails_fast_and_recovers_after_it() -> anyhow::Result<()> {
    const QUEUED: u64 = 30;
    let mut redis = RedisServer::start().await?;
    // A deadline far longer than anything here should take: a publish that waited for Redis
    // would end with the deadline's error, not Redis's.
    let manifest = format!("{FAULTY}[limits]\ndeadline_ms = 5000\n");
    let host = TestHost::start(&redis, &[("faulty", plugins::FAULTY, Some(&manifest))]).await?;
    let mut replies = Subscriber::new(&redis, &["faults"], &[]).await?;

    // Each message computes for a while before publishing its answer.
    redis
        .publish_all((0..QUEUED).map(|_| ("fault:x", "spin:20")))
        .await?;
    replies.take(1, PATIENCE).await?;
    redis.kill().await;

    // The rest of the queue drains: each publish fails with an error, none hangs (and after
    // five failures the breaker parks the plugin, shedding the rest).
    let entry = host
        .wait_plugin("faulty", "drained", |p| {
            stat(p, "handled") + stat(p, "failed") + stat(p, "shed") == QUEUED
                && p["queue_depth"] == 0
        })
        .await?;
    assert!(stat(&entry, "failed") > 0, "{entry}");
    let error = entry["stats"]["last_error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("unavailable: Redis"),
        "the plugin was not told Redis is unavailable: {entry}"
    );
    assert!(
        !error.contains("deadline"),
        "the publish waited for its deadline: {entry}"
    );

    // Once Redis is back, the plugin's publishes go through again.
    redis.restart().await?;
    host.wait_ready().await?;
    let mut replies = Subscriber::new(&redis, &["faults"], &[]).await?;
    let mut summary = Summary::new("publishing_during_an_outage_fails_fast_and_recovers_after_it");
    summary.injected = 1;
    summary.sent = QUEUED;
    let started = std::time::Instant::now();
    loop {
        redis.publish("fault:x", "ok").await?;
        summary.sent += 1;
        if let Ok(reply) = replies.next(Duration::from_millis(200)).await {
            assert!(reply.payload_str().starts_with("ok:"), "{reply:?}");
            break;
        }
        anyhow::ensure!(
            started.elapsed() < PATIENCE,
            "nothing published after the restart"
        );
    }
    summary.report(&host).await?;
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_payloads_are_dropped_before_plugins_and_counted() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let host = TestHost::start_configured(
        &redis,
        "[plugins]\nmax_payload_bytes = 1024\n",
        &[("forward", plugins::FORWARD, Some(FORWARD_MANIFEST))],
    )
    .await?;
    let mut out = Subscriber::new(&redis, &[], &["fwded:*"]).await?;
    redis.publish("fwd:big", "x".repeat(1025)).await?;
    redis.publish("fwd:fits", "x".repeat(1024)).await?;
    let got = out.take(1, PATIENCE).await?;
    assert_eq!(got[0].channel_str(), "fwded:fits");
    let (_, listing) = host.get("/plugins").await?;
    assert_eq!(listing["oversize"], 1);
    Summary {
        test: "oversize_payloads_are_dropped_before_plugins_and_counted",
        injected: 1,
        sent: 2,
    }
    .report(&host)
    .await?;
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_names_with_glob_metacharacters_are_literal_where_they_should_be()
-> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let manifest = echo_manifest(&["odd*?[name]"], &[r"lit\*:*"], "seen", "");
    let host = TestHost::start(&redis, &[("echo", plugins::ECHO, Some(&manifest))]).await?;
    let mut seen = Subscriber::new(&redis, &["seen"], &[]).await?;

    for channel in ["odd*?[name]", "oddX?[name]", "lit*:1", "litX:1", "odd*?[n]"] {
        redis.publish(channel, channel).await?;
    }
    let got: Vec<String> = seen
        .take(2, PATIENCE)
        .await?
        .iter()
        .map(|r| {
            serde_json::from_slice::<Value>(&r.payload).unwrap_or_default()["channel"].to_string()
        })
        .collect();
    assert_eq!(got, [r#""odd*?[name]""#, r#""lit*:1""#]);
    assert!(seen.drain_for(Duration::from_millis(200)).await.is_empty());
    // Five channel names with metacharacters; two of them match a subscription.
    Summary {
        test: "channel_names_with_glob_metacharacters_are_literal_where_they_should_be",
        injected: 5,
        sent: 2,
    }
    .report(&host)
    .await?;
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_files_and_manifests_are_refused_with_their_reason() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let host = TestHost::start_with(&redis, "[plugins]\nmax_wasm_mib = 1\n", |dir| {
        // A 2 MiB file (sparse: nothing is written) over the 1 MiB limit.
        std::fs::File::create(dir.join("huge.wasm"))?.set_len(2 << 20)?;
        copy_plugin(
            dir,
            "typo",
            plugins::FORWARD.as_ref(),
            Some("[limits]\ndeadline_ms = \"fast\"\n"),
        )?;
        copy_plugin(
            dir,
            "unknown",
            plugins::FORWARD.as_ref(),
            Some("[grants]\noutputs = [\"nowhere\"]\n"),
        )?;
        Ok(())
    })
    .await?;
    for (name, kind, text) in [
        ("huge", "size", "over the limit"),
        ("typo", "manifest", "deadline_ms"),
        ("unknown", "manifest", r#"output "nowhere" is not defined"#),
    ] {
        let entry = host.plugin(name).await?.unwrap_or_default();
        assert_eq!(entry["state"], "failed", "{entry}");
        assert_eq!(entry["load_error"]["kind"], kind, "{entry}");
        assert!(
            entry["load_error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(text)),
            "{entry}"
        );
    }
    Summary {
        test: "bad_files_and_manifests_are_refused_with_their_reason",
        injected: 3,
        sent: 0,
    }
    .report(&host)
    .await?;
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_flooding_the_log_is_limited_and_counted() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let host = faulty_beside_forward(&redis).await?;
    // 1,000 lines of 64 KiB in one call: 64 MB of log asked for.
    let entry = fault(&host, &redis, "log:1000").await?;
    assert_eq!(stat(&entry, "handled"), 1);
    assert!(stat(&entry, "logs_dropped") >= 700, "{entry}");
    assert_forwards(&redis, "unaffected").await?;
    Summary {
        test: "a_plugin_flooding_the_log_is_limited_and_counted",
        injected: 1,
        sent: 2,
    }
    .report(&host)
    .await?;
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_a_plugin_dozens_of_times_under_load_loses_nothing() -> anyhow::Result<()> {
    const BATCH: usize = 200;
    const REPLACEMENTS: u64 = 24;
    let redis = RedisServer::start().await?;
    let echo = read_plugin(plugins::ECHO);
    let manifest = |tag: u64| echo_manifest(&[], &["load:*"], "seen", &format!("v{tag:02}"));
    let host = TestHost::start_configured(
        &redis,
        "[plugins]\nqueue_capacity = 1000000\n",
        &[("echo", plugins::ECHO, Some(&manifest(0)))],
    )
    .await?;
    let mut seen = Subscriber::new(&redis, &["seen"], &[]).await?;
    let mut connection = redis.connection().await?;

    // Batches of 200 every 10 ms (up to 20,000 messages a second offered) for as long as it
    // takes to deploy 24 new files, each as soon as the previous one is live, then a little
    // more. The offer pauses while 50,000 messages wait, so a machine slowed by other work
    // deepens the backlog rather than overflowing the queue: this test is about swaps, not
    // about shedding.
    const MAX_BACKLOG: u64 = 50_000;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    let mut pace = tokio::time::interval(Duration::from_millis(10));
    let mut sent = 0usize;
    let mut replaced = 0u64;
    let mut tail = 20;
    while tail > 0 {
        pace.tick().await;
        let entry = host.plugin("echo").await?.unwrap_or_default();
        if (sent as u64).saturating_sub(stat(&entry, "handled")) < MAX_BACKLOG {
            let mut pipe = redis::pipe();
            for i in sent..sent + BATCH {
                pipe.publish("load:x", i.to_string()).ignore();
            }
            let () = pipe.query_async(&mut connection).await?;
            sent += BATCH;
        }
        let reloads = entry["reloads"].as_u64().unwrap_or_default();
        // One deploy (manifest, then component) may take effect as one reload or as two.
        if reloads >= REPLACEMENTS {
            tail -= 1;
        } else if reloads >= replaced && replaced < REPLACEMENTS {
            replaced += 1;
            host.install(
                "echo",
                &rebuilt(&echo, &replaced.to_string()),
                Some(&manifest(replaced)),
            )?;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the replacements never took effect ({reloads} reloads)"
        );
    }

    // The plugin works through the backlog at its own pace; allow it at least 2,000 a second.
    let allowance = Duration::from_secs(60).max(Duration::from_millis(sent as u64 / 2));
    let reports = seen.take(sent, allowance).await?;
    let mut last_tag = String::new();
    let mut versions = 0;
    for (i, report) in reports.iter().enumerate() {
        let report: Value = serde_json::from_slice(&report.payload)?;
        assert_eq!(
            report["payload"],
            i.to_string(),
            "message {i} lost, doubled or reordered"
        );
        let tag = report["tag"].as_str().unwrap_or_default().to_owned();
        assert!(tag >= last_tag, "{tag} after {last_tag}");
        if tag != last_tag {
            versions += 1;
        }
        last_tag = tag;
    }
    assert!(seen.drain_for(Duration::from_millis(300)).await.is_empty());
    let entry = host.plugin("echo").await?.unwrap_or_default();
    assert_eq!(stat(&entry, "shed"), 0);
    assert_eq!(stat(&entry, "handled"), sent as u64);
    assert!(entry["reloads"].as_u64().unwrap_or_default() >= REPLACEMENTS);
    assert!(versions >= 18, "only {versions} versions handled messages");
    tracing::info!(sent, versions, "replacements under load");
    Summary {
        test: "replacing_a_plugin_dozens_of_times_under_load_loses_nothing",
        injected: replaced,
        sent: sent as u64,
    }
    .report(&host)
    .await?;
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_users_work_and_a_wrong_password_is_reported_not_fatal() -> anyhow::Result<()> {
    // redis-server joins its arguments into config lines: one word per argument.
    let redis = RedisServer::start_with(&[
        "--user", "app", "on", ">s3cret", "~*", "&*", "+@all", "--user", "default", "off",
    ])
    .await?;
    let url = redis.url().replace("redis://", "redis://app:s3cret@");
    let host = TestHost::launch_forward(&url).await?;
    host.wait_ready().await?;
    let (_, listing) = host.get("/plugins").await?;
    assert!(
        !listing.to_string().contains("s3cret"),
        "the password leaked: {listing}"
    );
    let client = redis::Client::open(url.as_str())?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.psubscribe("fwded:*").await?;
    let mut messages = pubsub.into_on_message();
    let _: i64 = redis::cmd("PUBLISH")
        .arg("fwd:acl")
        .arg("with a user")
        .query_async(&mut connection)
        .await?;
    let message = tokio::time::timeout(PATIENCE, futures::StreamExt::next(&mut messages))
        .await?
        .ok_or_else(|| anyhow::anyhow!("stream ended"))?;
    assert_eq!(message.get_payload_bytes(), b"with a user");
    // The wrong password below is the fault.
    Summary {
        test: "acl_users_work_and_a_wrong_password_is_reported_not_fatal",
        injected: 1,
        sent: 1,
    }
    .report(&host)
    .await?;
    host.stop().await?;

    let wrong = redis.url().replace("redis://", "redis://app:wrong@");
    let host = TestHost::launch(&wrong, "", |_| Ok(())).await?;
    let down = host.wait_readiness(503).await?;
    let error = eventually(PATIENCE, || async {
        let (_, body) = host.get("/readyz").await?;
        match body["source"]["last_error"].as_str() {
            Some(error) => Ok(error.to_owned()),
            None => bail!("no error yet: {body}"),
        }
    })
    .await?;
    assert!(
        error.to_lowercase().contains("wrongpass") || error.to_lowercase().contains("auth"),
        "{error} / {down}"
    );
    assert!(!error.contains("wrong@"), "the password leaked: {error}");
    host.stop().await
}
