//! Named outputs from a plugin's point of view: HTTP methods, timeouts, retries and replies,
//! stdout, the invalidation broadcast, and the calling plugin's deadline.
//!
//! Most tests run the `output-probe` fixture, which calls an output for each message and
//! publishes what it got back (the reply, or the error) on `probe-results`.

use std::time::Duration;

use anyhow::Context as _;
use serde_json::{Value, json};
use switchyard_tests::process::HostProcess;
use switchyard_tests::webhook::{Answer, Webhook};
use switchyard_tests::{
    FORWARD_MANIFEST, PATIENCE, RedisServer, Subscriber, TestHost, eventually,
    notify_manifest_with_deadline, notify_router_outputs, plugins,
};

const CACHE_MANIFEST: &str = include_str!("../../plugins/cache-invalidator/cache-invalidator.toml");

/// The probe's manifest: may publish its results and call `outputs`, with a deadline roomy
/// enough that only the outputs' own limits matter.
fn probe_manifest(outputs: &[&str]) -> String {
    format!(
        "[grants]\npublish = [\"probe-results\"]\noutputs = {outputs:?}\n[limits]\ndeadline_ms = 5000\n"
    )
}

/// Starts a host configured by `config` with the probe allowed to call `outputs`, and a
/// subscriber on its results.
async fn probe_host(
    redis: &RedisServer,
    config: &str,
    outputs: &[&str],
) -> anyhow::Result<(TestHost, Subscriber)> {
    let manifest = probe_manifest(outputs);
    let host = TestHost::start_configured(
        redis,
        config,
        &[(
            "output-probe",
            plugins::OUTPUT_PROBE,
            Some(manifest.as_str()),
        )],
    )
    .await?;
    let results = Subscriber::new(redis, &["probe-results"], &[]).await?;
    Ok((host, results))
}

/// Publishes `payload` for the probe and returns its report.
async fn probe(
    redis: &RedisServer,
    results: &mut Subscriber,
    payload: &Value,
) -> anyhow::Result<Value> {
    redis.publish("probe:x", payload.to_string()).await?;
    let report = results.next(PATIENCE).await?;
    Ok(serde_json::from_slice(&report.payload)?)
}

/// The `/plugins` counters of output `name`.
async fn output_counters(host: &TestHost, name: &str) -> anyhow::Result<Value> {
    let (_, listing) = host.get("/plugins").await?;
    listing["outputs"]
        .as_array()
        .and_then(|outputs| outputs.iter().find(|o| o["name"] == name).cloned())
        .with_context(|| format!("output {name} is not listed: {listing}"))
}

/// A loopback port nothing listens on.
fn closed_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_carries_the_configured_headers_and_the_reply_reaches_the_plugin()
-> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let server = Webhook::answering(Answer {
        status: 201,
        body: r#"{"id":7}"#.to_owned(),
        ..Answer::default()
    })
    .await?;
    let config = format!(
        "[outputs.store]\nkind = \"http\"\nurl = \"{}\"\nmethod = \"PUT\"\n\
         headers = {{ \"Content-Type\" = \"application/json\", \"X-Api-Key\" = \"k-123\" }}\n",
        server.url("/items/7")
    );
    let (host, mut results) = probe_host(&redis, &config, &["store"]).await?;

    let payload = json!({"output": "store", "name": "seven"});
    let report = probe(&redis, &mut results, &payload).await?;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["status"], 201, "{report}");
    assert_eq!(report["body"], r#"{"id":7}"#, "{report}");

    let requests = server.requests();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(request.method, "PUT");
    assert_eq!(request.path, "/items/7");
    assert_eq!(request.headers["content-type"], "application/json");
    assert_eq!(request.headers["x-api-key"], "k-123");
    assert_eq!(request.body, payload.to_string().into_bytes());
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_past_timeout_ms_fails_with_an_error_naming_the_timeout() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let server = Webhook::slow(Duration::from_secs(30)).await?;
    let config = format!(
        "[outputs.slow]\nkind = \"http\"\nurl = \"{}\"\ntimeout_ms = 100\nretries = 0\n",
        server.url("/slow")
    );
    let (host, mut results) = probe_host(&redis, &config, &["slow"]).await?;

    let report = probe(&redis, &mut results, &json!({"output": "slow"})).await?;
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(report["error"], "unavailable", "{report}");
    let text = report["text"].as_str().unwrap_or_default();
    assert!(
        text.contains("timed out") && text.contains("timeout_ms (100 ms)"),
        "{text}"
    );
    assert!(!text.contains("127.0.0.1"), "the URL leaked: {text}");
    assert_eq!(server.requests().len(), 1);
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_retried_then_fails() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let port = closed_port()?;
    let config = format!(
        "[outputs.gone]\nkind = \"http\"\nurl = \"http://127.0.0.1:{port}/hook?token=s3cret\"\n\
         retries = 2\nbackoff_ms = 10\n"
    );
    let (host, mut results) = probe_host(&redis, &config, &["gone"]).await?;

    let report = probe(&redis, &mut results, &json!({"output": "gone"})).await?;
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(report["error"], "unavailable", "{report}");
    let text = report["text"].as_str().unwrap_or_default();
    assert!(
        text.contains("request failed") && text.contains("(after 3 attempts)"),
        "{text}"
    );
    assert!(
        !text.contains("s3cret") && !text.contains(&port.to_string()),
        "the URL leaked: {text}"
    );
    let counters = output_counters(&host, "gone").await?;
    assert_eq!(counters["calls"], 1, "{counters}");
    assert_eq!(counters["errors"], 1, "{counters}");
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_failing_every_time_gets_every_retry_with_doubling_backoff_and_its_last_reply_returned()
-> anyhow::Result<()> {
    const RETRIES: usize = 3;
    const BACKOFF: Duration = Duration::from_millis(40);
    let redis = RedisServer::start().await?;
    let server = Webhook::answering(Answer {
        status: 503,
        body: "overloaded".to_owned(),
        ..Answer::default()
    })
    .await?;
    let config = format!(
        "[outputs.flaky]\nkind = \"http\"\nurl = \"{}\"\nretries = {RETRIES}\nbackoff_ms = {}\n",
        server.url("/flaky"),
        BACKOFF.as_millis()
    );
    let (host, mut results) = probe_host(&redis, &config, &["flaky"]).await?;

    let report = probe(&redis, &mut results, &json!({"output": "flaky"})).await?;
    // The last answer, not an error: the plugin decides what a 503 means.
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["status"], 503, "{report}");
    assert_eq!(report["body"], "overloaded", "{report}");

    let requests = server.requests();
    assert_eq!(
        requests.len(),
        RETRIES + 1,
        "one attempt and {RETRIES} retries"
    );
    // Each retry waits at least the backoff, doubled after every retry.
    for (retry, pair) in requests.windows(2).enumerate() {
        let gap = pair[1].arrived - pair[0].arrived;
        let backoff = BACKOFF * 2u32.pow(retry as u32);
        assert!(
            gap >= backoff,
            "retry {} came {gap:?} after the attempt before it, less than its backoff {backoff:?}",
            retry + 1
        );
    }
    // Retries exhausted on 5xx count as an error of the output.
    let counters = output_counters(&host, "flaky").await?;
    assert_eq!(counters["calls"], 1, "{counters}");
    assert_eq!(counters["errors"], 1, "{counters}");
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stdout_output_writes_one_line_per_call_to_the_hosts_stdout() -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt as _;

    let redis = RedisServer::start().await?;
    let manifest = format!(
        "{}[config]\noutput = \"console\"\n",
        probe_manifest(&["console"])
    );
    // A process of its own, to read what it writes on stdout.
    let mut host = HostProcess::builder(&redis)
        .config("[outputs.console]\nkind = \"stdout\"\n")
        .plugin("output-probe", plugins::OUTPUT_PROBE, Some(&manifest))
        .stdout()
        .start()
        .await?;
    let mut stdout = host.stdout()?;
    let mut results = Subscriber::new(&redis, &["probe-results"], &[]).await?;
    eventually(PATIENCE, || async {
        anyhow::ensure!(redis.pubsub_numpat().await? >= 1, "not subscribed yet");
        Ok(())
    })
    .await?;
    let payloads = [json!({"n": 1}), json!({"n": 2}), json!("three")];
    for payload in &payloads {
        redis.publish("probe:x", payload.to_string()).await?;
    }
    for report in results.take(payloads.len(), PATIENCE).await? {
        let report: Value = serde_json::from_slice(&report.payload)?;
        assert_eq!(report["ok"], true, "{report}");
        assert_eq!(report["status"], 0, "{report}");
    }
    // Every call had written its line before its report was published; stop the host and
    // read everything it wrote.
    host.kill().await?;
    let mut written = String::new();
    stdout.read_to_string(&mut written).await?;
    let lines: Vec<Value> = written
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| format!("stdout holds only JSON lines: {written:?}"))?;
    let expected: Vec<Value> = payloads
        .iter()
        .map(|payload| json!({"plugin": "output-probe", "payload": payload}))
        .collect();
    assert_eq!(lines, expected, "{written}");
    Ok(())
}

async fn set(redis: &RedisServer, key: &str) -> anyhow::Result<()> {
    let mut connection = redis.connection().await?;
    let () = redis::cmd("SET")
        .arg(key)
        .arg("cached")
        .query_async(&mut connection)
        .await?;
    Ok(())
}

async fn exists(redis: &RedisServer, key: &str) -> anyhow::Result<bool> {
    let mut connection = redis.connection().await?;
    let n: i64 = redis::cmd("EXISTS")
        .arg(key)
        .query_async(&mut connection)
        .await?;
    Ok(n == 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidations_are_announced_on_the_configured_channel_or_not_at_all() -> anyhow::Result<()>
{
    let redis = RedisServer::start().await?;
    let plugin = [(
        "cache-invalidator",
        plugins::CACHE_INVALIDATOR,
        Some(CACHE_MANIFEST),
    )];
    let mut notices = Subscriber::new(&redis, &["app:cache-drop", "cache:invalidate"], &[]).await?;

    // A custom channel: the notice goes there, and not to the default one.
    let host = TestHost::start_configured(
        &redis,
        "[invalidation]\nbroadcast = \"app:cache-drop\"\n",
        &plugin,
    )
    .await?;
    set(&redis, "cache:user:1").await?;
    redis
        .publish("events:user.updated", r#"{"entity":"user","id":1}"#)
        .await?;
    let notice = notices.next(PATIENCE).await?;
    assert_eq!(notice.channel_str(), "app:cache-drop");
    assert_eq!(
        serde_json::from_slice::<Value>(&notice.payload)?,
        json!({"keys": ["cache:user:1"], "source": "cache-invalidator"})
    );
    assert!(!exists(&redis, "cache:user:1").await?);
    host.stop().await?;

    // An empty channel: keys still vanish, and nothing is announced anywhere.
    let host =
        TestHost::start_configured(&redis, "[invalidation]\nbroadcast = \"\"\n", &plugin).await?;
    set(&redis, "cache:user:2").await?;
    redis
        .publish("events:user.updated", r#"{"entity":"user","id":2}"#)
        .await?;
    host.wait_plugin("cache-invalidator", "done", |p| p["stats"]["handled"] == 1)
        .await?;
    assert!(!exists(&redis, "cache:user:2").await?);
    let announced = notices.drain_for(Duration::from_millis(200)).await;
    assert!(announced.is_empty(), "announced: {announced:?}");
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_webhook_ends_in_a_timeout_the_plugin_handles_while_other_plugins_flow()
-> anyhow::Result<()> {
    const SLOW_CALLS: u64 = 2;
    const FORWARDED: usize = 20;
    let redis = RedisServer::start().await?;
    // Far slower than the plugin's deadline, and than the attempt's own timeout.
    let gateway = Webhook::slow(Duration::from_secs(60)).await?;
    let config = notify_router_outputs(&gateway.url("/email"), "timeout_ms = 30000");
    let manifest = notify_manifest_with_deadline(1500);
    let host = TestHost::start_configured(
        &redis,
        &config,
        &[
            (
                "notify-router",
                plugins::NOTIFY_ROUTER,
                Some(manifest.as_str()),
            ),
            ("forward", plugins::FORWARD, Some(FORWARD_MANIFEST)),
        ],
    )
    .await?;
    let mut dead = Subscriber::new(&redis, &["notifications:dead"], &[]).await?;
    let mut forwarded = Subscriber::new(&redis, &["fwded:x"], &[]).await?;

    for i in 0..SLOW_CALLS {
        let email = json!({"to": "a@b.c", "subject": format!("slow {i}")});
        redis
            .publish("notifications:email", email.to_string())
            .await?;
    }
    gateway.wait_for(1, PATIENCE).await?;
    // While notify-router waits on the gateway, forward handles everything it gets.
    for i in 0..FORWARDED {
        redis.publish("fwd:x", format!("m{i}")).await?;
    }
    let got = forwarded.take(FORWARDED, PATIENCE).await?;
    let router = host.plugin("notify-router").await?.unwrap_or_default();
    let settled = router["stats"]["handled"].as_u64().unwrap_or_default()
        + router["stats"]["failed"].as_u64().unwrap_or_default();
    assert!(
        settled < SLOW_CALLS,
        "forward was only done after the slow calls were: {router}"
    );
    let payloads: Vec<String> = got.iter().map(|m| m.payload_str()).collect();
    let expected: Vec<String> = (0..FORWARDED).map(|i| format!("m{i}")).collect();
    assert_eq!(payloads, expected);

    // Each slow call ends as a timeout error the plugin sees in time to dead-letter the
    // message, not as the plugin's own deadline trap.
    for letter in dead.take(SLOW_CALLS as usize, PATIENCE).await? {
        let letter: Value = serde_json::from_slice(&letter.payload)?;
        let reason = letter["reason"].as_str().unwrap_or_default();
        assert!(
            reason.starts_with("output email failed: ") && reason.contains("timed out"),
            "{reason}"
        );
        assert!(reason.contains("deadline"), "{reason}");
    }
    let router = host
        .wait_plugin("notify-router", "done", |p| {
            p["stats"]["failed"] == SLOW_CALLS
        })
        .await?;
    let last_error = router["stats"]["last_error"].as_str().unwrap_or_default();
    assert!(
        last_error.starts_with("unavailable: ") && last_error.contains("timed out"),
        "a deadline trap rather than an error value: {last_error}"
    );
    assert_eq!(
        gateway.requests().len(),
        SLOW_CALLS as usize,
        "no retry fits"
    );
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_router_dead_letters_the_last_5xx_reply_with_its_status() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let gateway = Webhook::answering(Answer {
        status: 502,
        body: "bad gateway".to_owned(),
        ..Answer::default()
    })
    .await?;
    let host = TestHost::with_notify_router(
        &redis,
        &gateway.url("/email"),
        "retries = 1\nbackoff_ms = 10",
        5000,
    )
    .await?;
    let mut dead = Subscriber::new(&redis, &["notifications:dead"], &[]).await?;
    redis
        .publish("notifications:email", r#"{"to":"a@b.c","subject":"s"}"#)
        .await?;
    let letter: Value = serde_json::from_slice(&dead.next(PATIENCE).await?.payload)?;
    assert_eq!(
        letter["reason"],
        "output email failed: gateway answered HTTP status 502"
    );
    assert_eq!(gateway.requests().len(), 2, "one attempt and one retry");
    let router = host
        .wait_plugin("notify-router", "failed", |p| p["stats"]["failed"] == 1)
        .await?;
    assert_eq!(
        router["stats"]["last_error"],
        "unavailable: gateway answered HTTP status 502"
    );
    host.stop().await
}
