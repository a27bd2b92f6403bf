//! Messages in, effects out: subscriptions, once-per-plugin delivery, ordering, payloads.

use std::time::Duration;

use serde_json::Value;
use switchyard_tests::{PATIENCE, RedisServer, Subscriber, TestHost, echo_manifest, plugins};

/// Reports published by the echo fixture, parsed.
fn reports(received: &[switchyard_tests::Received]) -> Vec<Value> {
    received
        .iter()
        .map(|r| serde_json::from_slice(&r.payload).expect("echo reports are JSON"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_republishes_fwd_messages_on_fwded() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let host = TestHost::with_forward(&redis).await?;
    let mut out = Subscriber::new(&redis, &[], &["fwded:*"]).await?;

    redis.publish("fwd:x", "hello").await?;
    redis.publish("fwd:a:b", "nested").await?;
    redis.publish("other:x", "ignored").await?;

    let got = out.take(2, PATIENCE).await?;
    assert_eq!(got[0].channel_str(), "fwded:x");
    assert_eq!(got[0].payload_str(), "hello");
    assert_eq!(got[1].channel_str(), "fwded:a:b");
    assert_eq!(got[1].payload_str(), "nested");
    assert!(out.drain_for(Duration::from_millis(200)).await.is_empty());
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_bytes_pass_through_untouched() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let host = TestHost::with_forward(&redis).await?;
    let mut out = Subscriber::new(&redis, &["fwded:bin", "fwded:empty"], &[]).await?;

    let binary: Vec<u8> = (0..=255u8).chain([0xff, 0xfe, 0x00, 0xc3, 0x28]).collect();
    redis.publish("fwd:bin", binary.as_slice()).await?;
    redis.publish("fwd:empty", "").await?;

    let got = out.take(2, PATIENCE).await?;
    assert_eq!(got[0].payload, binary);
    assert_eq!(got[1].payload, b"");
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_channel_subscription_sees_only_its_channel() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let manifest = echo_manifest(&["orders"], &[], "seen", "");
    let host = TestHost::start(&redis, &[("echo", plugins::ECHO, Some(&manifest))]).await?;
    let mut seen = Subscriber::new(&redis, &["seen"], &[]).await?;

    for channel in ["orders", "orders2", "order", "Orders", "orders"] {
        redis.publish(channel, channel).await?;
    }
    let got = reports(&seen.take(2, PATIENCE).await?);
    assert!(
        got.iter()
            .all(|r| r["channel"] == "orders" && r["subscription"] == "channel:orders")
    );
    assert!(seen.drain_for(Duration::from_millis(200)).await.is_empty());
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_whose_subscriptions_overlap_handles_each_message_once() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    // Channels are listed first by the fixture, so for m:1 the exact channel is its first
    // matching subscription; for m:22 only m:* matches.
    let manifest = echo_manifest(&["m:1"], &["m:*", "m:?", "m*"], "seen", "");
    let host = TestHost::start(&redis, &[("echo", plugins::ECHO, Some(&manifest))]).await?;
    let mut seen = Subscriber::new(&redis, &["seen"], &[]).await?;

    // Redis itself delivers m:1 four times to the host's connection (one message, three
    // pmessages); the plugin must see it once.
    assert_eq!(redis.publish("m:1", "a").await?, 4);
    redis.publish("m:22", "b").await?;
    redis.publish("mx", "c").await?;
    redis.publish("x", "d").await?;

    let got = reports(&seen.take(3, PATIENCE).await?);
    assert_eq!(got[0]["subscription"], "channel:m:1");
    assert_eq!(got[1]["subscription"], "pattern:m:*");
    assert_eq!(got[2]["subscription"], "pattern:m*");
    assert!(
        seen.drain_for(Duration::from_millis(300)).await.is_empty(),
        "a message was delivered twice"
    );
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_plugins_sharing_a_pattern_each_get_every_message() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let a = echo_manifest(&[], &["news:*"], "seen:a", "a");
    let b = echo_manifest(&[], &["news:*"], "seen:b", "b");
    let host = TestHost::start(
        &redis,
        &[
            ("a", plugins::ECHO, Some(&a)),
            ("b", plugins::ECHO, Some(&b)),
        ],
    )
    .await?;
    let mut seen = Subscriber::new(&redis, &[], &["seen:*"]).await?;

    // One PSUBSCRIBE on the wire serves both plugins.
    assert_eq!(redis.publish("news:1", "x").await?, 1);
    let got = seen.take(2, PATIENCE).await?;
    let mut channels: Vec<String> = got.iter().map(|r| r.channel_str()).collect();
    channels.sort();
    assert_eq!(channels, ["seen:a", "seen:b"]);
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_sees_messages_in_publish_order_and_keeps_its_state() -> anyhow::Result<()> {
    const N: usize = 2000;
    let redis = RedisServer::start().await?;
    let manifest = echo_manifest(&[], &["seq:*"], "seen", "");
    let host = TestHost::start(&redis, &[("echo", plugins::ECHO, Some(&manifest))]).await?;
    let mut seen = Subscriber::new(&redis, &["seen"], &[]).await?;

    redis
        .publish_all((0..N).map(|i| (format!("seq:{}", i % 7), i.to_string())))
        .await?;

    let got = reports(&seen.take(N, PATIENCE).await?);
    for (i, report) in got.iter().enumerate() {
        assert_eq!(report["payload"], i.to_string(), "out of order at {i}");
        // `seq` counts calls on the same instance: state survived between messages.
        assert_eq!(report["seq"], i + 1);
    }
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_report_health_readiness_and_plugins() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let host = TestHost::with_forward(&redis).await?;
    let mut out = Subscriber::new(&redis, &[], &["fwded:*"]).await?;
    redis.publish("fwd:1", "x").await?;
    out.take(1, PATIENCE).await?;

    let (status, _) = host.get("/healthz").await?;
    assert_eq!(status, 200);
    let (status, ready) = host.get("/readyz").await?;
    assert_eq!(status, 200);
    assert_eq!(ready["source"]["patterns"], 1);

    let forward = host
        .wait_plugin("forward", "counted", |p| p["stats"]["handled"] == 1)
        .await?;
    assert_eq!(forward["state"], "running");
    assert_eq!(forward["version"]["declared_name"], "forward");
    assert_eq!(forward["version"]["subscriptions"][0], "pattern fwd:*");
    assert_eq!(forward["version"]["grants"]["publish"][0], "fwded:*");
    assert_eq!(forward["version"]["hash"].as_str().map(str::len), Some(16));
    assert_eq!(forward["stats"]["failed"], 0);
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_the_traffic() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let host = TestHost::with_forward(&redis).await?;
    let mut out = Subscriber::new(&redis, &[], &["fwded:*"]).await?;
    for i in 0..10 {
        redis.publish(format!("fwd:{i}"), "x").await?;
    }
    redis.publish("nobody:listens", "x").await?;
    out.take(10, PATIENCE).await?;
    host.wait_plugin("forward", "done", |p| p["stats"]["handled"] == 10)
        .await?;

    // A scrape that does not ask for OpenMetrics gets the Prometheus text format.
    let response = reqwest::get(format!("http://{}/metrics", host.admin())).await?;
    assert_eq!(
        response.headers()["content-type"].to_str()?,
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = response.text().await?;
    let value = |series: &str| -> Option<f64> {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
    };
    assert_eq!(
        value(r#"switchyard_plugin_messages_total{plugin="forward",outcome="handled"}"#),
        Some(10.0),
        "{text}"
    );
    assert_eq!(
        value(r#"switchyard_plugin_messages_total{plugin="forward",outcome="shed"}"#),
        Some(0.0)
    );
    assert_eq!(
        value(r#"switchyard_plugin_handle_seconds_count{plugin="forward"}"#),
        Some(10.0),
        "{text}"
    );
    assert_eq!(value("switchyard_redis_connected"), Some(1.0));
    assert_eq!(
        value(r#"switchyard_subscriptions{kind="pattern"}"#),
        Some(1.0)
    );
    assert_eq!(
        value(r#"switchyard_messages_received_total{source="redis"}"#),
        Some(10.0),
        "the message nobody listens to never reaches the host"
    );
    assert_eq!(
        value(r#"switchyard_plugin_reloads_total{plugin="forward",result="ok"}"#),
        Some(0.0)
    );
    assert!(
        !text.contains("fwd:"),
        "channel names must not become labels"
    );
    host.stop().await
}

/// The value of one series in an OpenMetrics text, by its name and labels as printed.
fn series(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        (series == name_and_labels).then(|| value.parse().ok())?
    })
}

async fn scrape(host: &TestHost) -> anyhow::Result<String> {
    Ok(reqwest::get(format!("http://{}/metrics", host.admin()))
        .await?
        .error_for_status()?
        .text()
        .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_scraped_mid_stream_show_the_backlog_and_counters_moving() -> anyhow::Result<()> {
    // A plugin that takes a while per message builds a backlog; scrapes taken while it works
    // through it see the queue depth, and counters that only ever go up until it is done.
    const MESSAGES: usize = 60;
    let redis = RedisServer::start().await?;
    let host = TestHost::start(
        &redis,
        &[(
            "faulty",
            plugins::FAULTY,
            Some("[grants]\npublish = [\"faults\"]\n[limits]\ndeadline_ms = 5000\n"),
        )],
    )
    .await?;
    let mut replies = Subscriber::new(&redis, &["faults"], &[]).await?;
    // Every tenth message fails; the others keep the plugin busy for a few milliseconds.
    redis
        .publish_all(
            (0..MESSAGES).map(|i| ("fault:x", if i % 10 == 9 { "error" } else { "spin:10" })),
        )
        .await?;

    let handled = r#"switchyard_plugin_messages_total{plugin="faulty",outcome="handled"}"#;
    let failed = r#"switchyard_plugin_messages_total{plugin="faulty",outcome="failed"}"#;
    let depth = r#"switchyard_plugin_queue_depth{plugin="faulty"}"#;
    let received = r#"switchyard_messages_received_total{source="redis"}"#;

    // Mid-stream: everything received, part of it handled, the rest waiting in the queue.
    let mid = switchyard_tests::eventually(PATIENCE, || async {
        let text = scrape(&host).await?;
        let waiting = series(&text, depth).unwrap_or_default();
        anyhow::ensure!(
            series(&text, received) == Some(MESSAGES as f64) && waiting > 0.0,
            "not yet a backlog: {waiting} queued"
        );
        Ok(text)
    })
    .await?;
    let mid_done =
        series(&mid, handled).unwrap_or_default() + series(&mid, failed).unwrap_or_default();
    assert!(
        mid_done + series(&mid, depth).unwrap_or_default() <= MESSAGES as f64,
        "handled, failed and queued never exceed what arrived: {mid}"
    );

    // Later scrapes never go backwards, and end with every message counted once.
    let last = std::cell::Cell::new(mid_done);
    let end = switchyard_tests::eventually(PATIENCE, || async {
        let text = scrape(&host).await?;
        let done =
            series(&text, handled).unwrap_or_default() + series(&text, failed).unwrap_or_default();
        assert!(
            done >= last.get(),
            "counters went backwards: {done} after {}",
            last.get()
        );
        last.set(done);
        anyhow::ensure!(done == MESSAGES as f64, "{done} of {MESSAGES} so far");
        Ok(text)
    })
    .await?;
    assert_eq!(
        series(&end, handled),
        Some((MESSAGES - MESSAGES / 10) as f64)
    );
    assert_eq!(series(&end, failed), Some((MESSAGES / 10) as f64));
    assert_eq!(series(&end, depth), Some(0.0));
    assert_eq!(
        series(
            &end,
            r#"switchyard_plugin_handle_seconds_count{plugin="faulty"}"#
        ),
        Some(MESSAGES as f64)
    );
    replies.take(MESSAGES - MESSAGES / 10, PATIENCE).await?;
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_and_publishes_reach_redis_in_the_order_the_plugin_made_them() -> anyhow::Result<()> {
    // Each message makes the plugin send and publish alternately; `send` does not wait and
    // `publish` does, yet both go out through one queue, in order, message after message.
    const MESSAGES: usize = 300;
    const PER_MESSAGE: usize = 6;
    let redis = RedisServer::start().await?;
    let host = TestHost::start(
        &redis,
        &[(
            "faulty",
            plugins::FAULTY,
            Some("[grants]\npublish = [\"faults\"]\n"),
        )],
    )
    .await?;
    let mut replies = Subscriber::new(&redis, &["faults"], &[]).await?;
    redis
        .publish_all((0..MESSAGES).map(|_| ("fault:x", format!("mixed:{PER_MESSAGE}"))))
        .await?;

    let got = replies.take(MESSAGES * (PER_MESSAGE + 1), PATIENCE).await?;
    let mut expected = Vec::new();
    for seq in 1..=MESSAGES {
        expected.extend((0..PER_MESSAGE).map(|i| format!("{seq}:{i}")));
        expected.push(format!("ok:{seq}"));
    }
    let got: Vec<String> = got.iter().map(|r| r.payload_str()).collect();
    assert_eq!(got, expected);
    assert!(
        replies
            .drain_for(Duration::from_millis(200))
            .await
            .is_empty()
    );
    host.stop().await
}
