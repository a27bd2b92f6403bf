//! Queue budgets in bytes: a burst that Redis itself would buffer arrives whole with the
//! defaults; a plugin that cannot keep up sheds at its own budget; when the host's total is
//! spent, the plugin with the largest backlog sheds, and nobody else.
//!
//! Plugins are held inside a call (`faulty`'s `hold:gate`) so that their queues fill
//! deterministically: which message is kept and which is shed depends on the order Redis
//! delivered them, never on timing.

use serde_json::Value;
use switchyard_tests::{FORWARD_MANIFEST, PATIENCE, RedisServer, Subscriber, TestHost, plugins};

use crate::faults::{BREAKER_OFF, HELD, held_beside_forward, metric, stat, wait_in_flight};

/// The count cap every queue had before budgets were in bytes.
const OLD_COUNT_CAP: u64 = 4096;

/// Bytes in `entry`'s queue and its budget, from `/plugins`.
fn queue_bytes(entry: &Value) -> (u64, u64) {
    let read = |key: &str| entry[key].as_u64().unwrap_or_default();
    (read("queue_bytes"), read("queue_bytes_limit"))
}

/// Takes `count` messages from `forwarded`: forward's copies of `0`, `1`, ... in order.
async fn assert_forwarded_in_order(forwarded: &mut Subscriber, count: u64) -> anyhow::Result<()> {
    let got = forwarded.take_flowing(count as usize, PATIENCE).await?;
    let in_order = got
        .iter()
        .enumerate()
        .all(|(i, m)| m.payload_str() == i.to_string());
    anyhow::ensure!(in_order, "forward delivered every message, in order");
    Ok(())
}

/// `say:PREFIX:i` padded to about a kibibyte, so that budgets fill after a few dozen.
fn padded(prefix: &str, i: u64) -> String {
    format!("say:{prefix}:{i}:{}", "x".repeat(1000))
}

/// The answers faulty copies published for `padded` messages, without the padding.
fn said(replies: &[switchyard_tests::Received]) -> Vec<String> {
    replies
        .iter()
        .map(|r| {
            let answer = r.payload_str();
            answer
                .rsplit_once(':')
                .map_or(answer.clone(), |(said, _)| said.to_owned())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_far_larger_than_the_old_count_cap_is_queued_whole_with_the_defaults()
-> anyhow::Result<()> {
    const BURST: u64 = 4 * OLD_COUNT_CAP;
    let redis = RedisServer::start().await?;
    // The queues keep their defaults. The deadline is longer than the default 100 ms: in a
    // test build on a busy machine, a `send` of forward's can wait that long for room in the
    // outgoing queue while the burst is read, and a message failed at its deadline would be
    // counted here as one the queues lost.
    let host = held_beside_forward(
        &redis,
        "deadline_ms = 2000
",
    )
    .await?;
    let mut forwarded = Subscriber::new(&redis, &[], &["fwded:*"]).await?;
    let mut replies = Subscriber::new(&redis, &["faults"], &[]).await?;

    redis.publish("fault:x", "hold:gate").await?;
    wait_in_flight(&host, "faulty", 1).await?;
    redis
        .publish_all(
            (0..BURST).flat_map(|i| [("fault:x", format!("say:{i}")), ("fwd:x", i.to_string())]),
        )
        .await?;
    assert_forwarded_in_order(&mut forwarded, BURST).await?;
    let full = host
        .wait_plugin("faulty", "holding the whole burst", |p| {
            stat(p, "accepted") == BURST + 1
        })
        .await?;
    assert_eq!(stat(&full, "shed"), 0, "{full}");
    assert_eq!(full["queue_depth"], BURST, "{full}");
    let (bytes, limit) = queue_bytes(&full);
    assert_eq!(limit, 64 << 20, "the default budget: {full}");
    assert!(bytes > BURST * 64 && bytes <= limit, "{full}");
    let series = r#"switchyard_plugin_queue_bytes{plugin="faulty"}"#;
    assert_eq!(metric(&host, series).await?, Some(bytes), "{series}");
    let (_, body) = host.get("/plugins").await?;
    let (total, total_limit) = (&body["queue_bytes"], &body["queue_bytes_total"]);
    assert!(
        total.as_u64() >= Some(bytes) && total_limit.as_u64() >= total.as_u64(),
        "the host's total counts faulty's queue: {body}"
    );

    let _gate = Subscriber::new(&redis, &["gate"], &[]).await?;
    // faulty answers with `publish`, one round trip each: the backlog takes its time.
    let answers = replies.take_flowing(1 + BURST as usize, PATIENCE).await?;
    assert_eq!(answers[0].payload_str(), "ok:1");
    assert!(
        answers[1..]
            .iter()
            .enumerate()
            .all(|(i, a)| a.payload_str() == i.to_string()),
        "every queued message was handled, in order"
    );
    let done = host
        .wait_plugin("faulty", "drained", |p| p["queue_depth"] == 0)
        .await?;
    assert_eq!(queue_bytes(&done).0, 0, "{done}");
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_cannot_keep_up_sheds_at_its_byte_budget_while_forward_delivers_all()
-> anyhow::Result<()> {
    const BUDGET: u64 = 64 << 10;
    const SENT: u64 = 500;
    let redis = RedisServer::start().await?;
    let manifest = format!("{HELD}queue_bytes = {BUDGET}\n");
    let host = TestHost::start_configured(
        &redis,
        &format!("[plugins]\n{BREAKER_OFF}"),
        &[
            ("faulty", plugins::FAULTY, Some(&manifest)),
            ("forward", plugins::FORWARD, Some(FORWARD_MANIFEST)),
        ],
    )
    .await?;
    let mut forwarded = Subscriber::new(&redis, &[], &["fwded:*"]).await?;
    let mut replies = Subscriber::new(&redis, &["faults"], &[]).await?;

    redis.publish("fault:x", "hold:gate").await?;
    wait_in_flight(&host, "faulty", 1).await?;
    redis
        .publish_all(
            (0..SENT).flat_map(|i| [("fault:x", padded("f", i)), ("fwd:x", i.to_string())]),
        )
        .await?;
    assert_forwarded_in_order(&mut forwarded, SENT).await?;
    let full = host
        .wait_plugin("faulty", "shedding", |p| {
            stat(p, "accepted") + stat(p, "shed") == SENT + 1
        })
        .await?;
    let kept = stat(&full, "accepted") - 1;
    let (bytes, limit) = queue_bytes(&full);
    assert_eq!(limit, BUDGET, "the manifest's budget: {full}");
    assert!(bytes <= BUDGET && bytes > BUDGET - 2048, "{full}");
    assert!((40..60).contains(&kept), "about 1.2 KiB a message: {full}");
    assert_eq!(
        full["stats"]["shed_by"]["queue_full"],
        SENT - kept,
        "{full}"
    );
    let series = r#"switchyard_plugin_shed_total{plugin="faulty",reason="queue_full"}"#;
    assert_eq!(metric(&host, series).await?, Some(SENT - kept), "{series}");
    let forward = host.plugin("forward").await?.unwrap_or_default();
    assert_eq!(stat(&forward, "shed"), 0, "{forward}");
    let (status, _) = host.get("/readyz").await?;
    assert_eq!(status, 200, "the subscriber connection kept reading");

    // drop-newest: what was accepted stays accepted, and is handled in order.
    let _gate = Subscriber::new(&redis, &["gate"], &[]).await?;
    let answers = replies.take(1 + kept as usize, PATIENCE).await?;
    let expected: Vec<String> = (0..kept).map(|i| format!("f:{i}")).collect();
    assert_eq!(said(&answers[1..]), expected);
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_total_budget_is_spent_the_largest_backlog_sheds() -> anyhow::Result<()> {
    const TOTAL: u64 = 256 << 10;
    const BIG: u64 = 180;
    const SMALL: u64 = 40;
    const FORWARDED: u64 = 200;
    let redis = RedisServer::start().await?;
    let held = |patterns: &str| format!("{HELD}[config]\npatterns = '{patterns}'\n");
    let host = TestHost::start_configured(
        &redis,
        &format!("[plugins]\n{BREAKER_OFF}queue_bytes_total = {TOTAL}\n"),
        &[
            ("big", plugins::FAULTY, Some(&held(r#"["big:*"]"#))),
            ("small", plugins::FAULTY, Some(&held(r#"["small:*"]"#))),
            ("forward", plugins::FORWARD, Some(FORWARD_MANIFEST)),
        ],
    )
    .await?;
    let mut forwarded = Subscriber::new(&redis, &[], &["fwded:*"]).await?;
    let mut replies = Subscriber::new(&redis, &["faults"], &[]).await?;

    redis.publish("big:x", "hold:gate").await?;
    redis.publish("small:x", "hold:gate").await?;
    wait_in_flight(&host, "big", 1).await?;
    wait_in_flight(&host, "small", 1).await?;
    // big's backlog (about 225 KiB) takes most of the total; small's (50 KiB) needs more
    // than is left, and forward's messages come through a spent budget. big stays the
    // largest throughout, so it alone sheds.
    redis
        .publish_all((0..BIG).map(|i| ("big:x", padded("big", i))))
        .await?;
    redis
        .publish_all((0..SMALL).map(|i| ("small:x", padded("small", i))))
        .await?;
    redis
        .publish_all((0..FORWARDED).map(|i| ("fwd:x", i.to_string())))
        .await?;
    assert_forwarded_in_order(&mut forwarded, FORWARDED).await?;

    let small = host
        .wait_plugin("small", "holding its backlog", |p| {
            stat(p, "accepted") == SMALL + 1
        })
        .await?;
    assert_eq!(stat(&small, "shed"), 0, "{small}");
    let big = host
        .wait_plugin("big", "shedding for the others", |p| stat(p, "shed") > 0)
        .await?;
    let big_kept = big["queue_depth"].as_u64().unwrap_or_default();
    assert_eq!(
        big["stats"]["shed_by"]["host_budget"],
        BIG - big_kept,
        "{big}"
    );
    assert_eq!(stat(&big, "shed"), BIG - big_kept, "{big}");
    let forward = host.plugin("forward").await?.unwrap_or_default();
    assert_eq!(stat(&forward, "shed"), 0, "{forward}");
    let (_, body) = host.get("/plugins").await?;
    assert_eq!(body["queue_bytes_total"], TOTAL, "{body}");
    assert!(body["queue_bytes"].as_u64() <= Some(TOTAL), "{body}");
    let series = r#"switchyard_plugin_shed_total{plugin="big",reason="host_budget"}"#;
    assert_eq!(
        metric(&host, series).await?,
        Some(BIG - big_kept),
        "{series}"
    );

    // big gave up its newest: what it kept are its oldest, handled in order; small lost none.
    let _gate = Subscriber::new(&redis, &["gate"], &[]).await?;
    let answers = replies
        .take(2 + (SMALL + big_kept) as usize, PATIENCE)
        .await?;
    let answered = said(&answers);
    let from = |who: &str| -> Vec<String> {
        answered
            .iter()
            .filter(|a| a.starts_with(&format!("{who}:")))
            .cloned()
            .collect()
    };
    let expected =
        |who: &str, n: u64| -> Vec<String> { (0..n).map(|i| format!("{who}:{i}")).collect() };
    assert_eq!(from("small"), expected("small", SMALL));
    assert_eq!(from("big"), expected("big", big_kept));
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_large_messages_for_a_stalled_plugin_holds_no_more_than_its_budget()
-> anyhow::Result<()> {
    use switchyard_tests::memory::{MEMORY_MEASUREMENT, ResidentPeak};

    const MIB: u64 = 1 << 20;
    /// Each just under the default `max_payload_bytes` (1 MiB).
    const PAYLOAD: usize = 1_000_000;
    /// About six times the default per-plugin budget (64 MiB).
    const SENT: u64 = 400;
    let _alone = MEMORY_MEASUREMENT.lock().await;
    let redis = RedisServer::start().await?;
    let host = held_beside_forward(&redis, "").await?;
    redis.publish("fault:x", "hold:gate").await?;
    wait_in_flight(&host, "faulty", 1).await?;

    let peak = ResidentPeak::start()?;
    let padding = "x".repeat(PAYLOAD);
    for i in 0..SENT {
        // One at a time: the test's own client never holds more than one message.
        redis
            .publish("fault:x", format!("say:f:{i}:{padding}"))
            .await?;
    }
    let full = host
        .wait_plugin("faulty", "every message accepted or shed", |p| {
            stat(p, "accepted") + stat(p, "shed") == SENT + 1
        })
        .await?;
    let grown = peak.growth();
    let kept = stat(&full, "accepted") - 1;
    let (bytes, limit) = queue_bytes(&full);
    eprintln!(
        "{SENT} messages of {} KB for a stalled plugin: {kept} queued ({} MiB of a {} MiB \
         budget), RSS peak +{} MiB",
        PAYLOAD / 1000,
        bytes / MIB,
        limit / MIB,
        grown / MIB
    );
    assert_eq!(limit, 64 * MIB, "the default budget: {full}");
    assert!((60..=67).contains(&kept), "about 64 of 1 MB fit: {full}");
    assert_eq!(
        full["stats"]["shed_by"]["queue_full"],
        SENT - kept,
        "{full}"
    );
    // The queue's 64 MiB, plus what Redis's replies pass through on their way (the reader's
    // buffers) and the allocator's slack; 400 MB without the budget.
    assert!(grown < 160 * MIB, "RSS peak grew by {} MiB", grown / MIB);

    let _gate = Subscriber::new(&redis, &["gate"], &[]).await?;
    host.stop().await
}
