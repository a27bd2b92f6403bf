//! Containment of what plugins cause outside themselves, against a real `redis-server`, real
//! HTTP servers and the `attack` and `output-probe` fixtures: huge `send`s and `publish`es,
//! a webhook answering gigabytes or redirecting elsewhere, invalidation loops and cycles
//! between plugins, plugin text of many megabytes or full of control characters in
//! `/plugins` and the log, and stream entries over `max_payload_bytes`.
//!
//! Memory is read from `/proc/self/status` (`VmRSS`): the host runs in this process. Tests
//! that measure it take [`MEMORY_MEASUREMENT`] so that they do not measure each other.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use serde_json::Value;
use switchyard_tests::memory::{MEMORY_MEASUREMENT, ResidentPeak, resident_bytes};
use switchyard_tests::process::HostProcess;
use switchyard_tests::webhook::Webhook;
use switchyard_tests::{PATIENCE, RedisServer, Subscriber, TestHost, eventually, plugins};

const MIB: u64 = 1 << 20;

/// The attack fixture's manifest: publish grants for `publish`, then `extra` TOML.
fn attack_manifest(publish: &[&str], extra: &str) -> String {
    format!("[grants]\npublish = {publish:?}\n{extra}\n")
}

/// The `stats` of plugin `name` once `accept` holds for them.
async fn wait_stats(
    host: &TestHost,
    name: &str,
    what: &str,
    accept: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let entry = host
        .wait_plugin(name, what, |p| accept(&p["stats"]))
        .await?;
    Ok(entry["stats"].clone())
}

fn count_of(stats: &Value, key: &str) -> u64 {
    stats[key].as_u64().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_over_max_payload_bytes_is_refused_as_invalid_before_it_is_queued()
-> anyhow::Result<()> {
    let _one = MEMORY_MEASUREMENT.lock().await;
    let redis = RedisServer::start().await?;
    // Filling 30 MiB in the plugin takes longer than the default 100 ms.
    let manifest = attack_manifest(&["attacks"], "[limits]\ndeadline_ms = 5000\n");
    let host = TestHost::start(&redis, &[("attack", plugins::ATTACK, Some(&manifest))]).await?;
    let before = resident_bytes()?;

    // Ten sends of 30 MiB under the default 1 MiB limit: the first is refused at once.
    redis.publish("attack:x", "send:30:10").await?;
    let stats = wait_stats(&host, "attack", "refused", |s| count_of(s, "failed") == 1).await?;
    assert_eq!(count_of(&stats, "payload_too_large"), 1, "{stats}");
    let error = stats["last_error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with(
            "invalid: payload of 31457280 bytes is over plugins.max_payload_bytes (1048576 bytes)"
        ),
        "{error}"
    );
    let grown = resident_bytes()?.saturating_sub(before);
    eprintln!("RSS grew by {} MiB", grown / MIB);
    assert!(grown < 128 * MIB, "RSS grew by {} MiB", grown / MIB);

    let (_, metrics) = host.get("/metrics").await?;
    let metrics = metrics.as_str().unwrap_or_default();
    assert!(
        metrics.contains(
            "switchyard_plugin_refusals_total{plugin=\"attack\",reason=\"payload_too_large\"} 1"
        ),
        "{metrics}"
    );
    host.stop().await
}

/// Sends `count` payloads of `mib` MiB from the attack fixture on a host configured by
/// `config`, while Redis takes no writes for the first `pause_ms`, and returns how much the
/// process's memory grew at the peak and how much of that it kept once all were written.
async fn measure_sends(
    config: &str,
    mib: u64,
    count: u64,
    pause_ms: u64,
) -> anyhow::Result<(u64, u64)> {
    let redis = RedisServer::start().await?;
    let manifest = attack_manifest(&["attacks"], "[limits]\ndeadline_ms = 20000\n");
    let host = TestHost::start_configured(
        &redis,
        config,
        &[("attack", plugins::ATTACK, Some(&manifest))],
    )
    .await?;
    let peak = ResidentPeak::start()?;
    let before = resident_bytes()?;
    let started = Instant::now();
    // The `ok` the fixture publishes after its sends waits for its reply, which comes after
    // every send before it has been written: handled means all went out. The pause starts
    // right after the command reached the host, before any of its sends.
    let mut connection = redis.connection().await?;
    let mut pipe = redis::pipe();
    pipe.cmd("PUBLISH")
        .arg("attack:x")
        .arg(format!("send:{mib}:{count}"))
        .ignore();
    if pause_ms > 0 {
        pipe.cmd("CLIENT")
            .arg("PAUSE")
            .arg(pause_ms)
            .arg("WRITE")
            .ignore();
    }
    pipe.query_async::<()>(&mut connection).await?;
    // Hundreds of megabytes through Redis: longer than the usual patience on a busy machine.
    let stats = eventually(Duration::from_secs(120), || async {
        let stats = host.plugin("attack").await?.context("listed")?["stats"].clone();
        anyhow::ensure!(
            count_of(&stats, "handled") + count_of(&stats, "failed") == 1,
            "not done: {stats}"
        );
        Ok(stats)
    })
    .await?;
    let peak = peak.growth();
    let kept = resident_bytes()?.saturating_sub(before);
    assert_eq!(count_of(&stats, "handled"), 1, "{stats}");
    assert_eq!(count_of(&stats, "send_failed"), 0, "{stats}");
    eprintln!(
        "{count} sends of {mib} MiB written in {:?}: RSS peak +{} MiB, kept +{} MiB",
        started.elapsed(),
        peak / MIB,
        kept / MIB
    );
    host.stop().await?;
    Ok((peak, kept))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_sends_to_a_stalled_redis_holds_no_more_than_the_outgoing_budget()
-> anyhow::Result<()> {
    let _one = MEMORY_MEASUREMENT.lock().await;
    // 256 MiB in sends of 1 MiB (the largest payload by default) while Redis takes no
    // writes for 1.5 s: the queue fills to its 64 MiB budget and the plugin waits for room
    // (its deadline is 20 s), then everything goes out, a pipeline of at most 1 MiB (and a
    // message) at a time.
    let (peak, kept) = measure_sends("", 1, 256, 1500).await?;
    assert!(peak < 128 * MIB, "RSS peak grew by {} MiB", peak / MIB);
    // The host asks the allocator to give back what it freed once the queue drained.
    assert!(kept < 64 * MIB, "RSS kept {} MiB", kept / MIB);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_sends_allowed_by_a_raised_payload_limit_stay_within_the_budget() -> anyhow::Result<()>
{
    let _one = MEMORY_MEASUREMENT.lock().await;
    // Payloads of 30 MiB allowed (`max_payload_bytes` raised to 32 MiB): ten of them. Before
    // the byte budget the same sends took RSS to 2.35 GB and kept 958 MiB.
    let (peak, kept) =
        measure_sends("[plugins]\nmax_payload_bytes = 33554432\n", 30, 10, 0).await?;
    // The budget (64 MiB: two messages), the message waiting for room, the one being written
    // and its copies on the way to the socket, and the plugin's own 30 MiB.
    assert!(peak < 400 * MIB, "RSS peak grew by {} MiB", peak / MIB);
    // What stays is sized by the largest message, not by how many were sent: the plugin's
    // memory, the connection's write buffer and the allocator's free space of about two
    // messages per thread that copied one (glibc keeps the free top of a thread's heap up to
    // twice its largest recent allocation, and cannot be asked to give that back).
    assert!(kept < 320 * MIB, "RSS kept {} MiB", kept / MIB);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_wait_for_room_while_redis_stalls_then_fail_at_the_deadline() -> anyhow::Result<()> {
    let _one = MEMORY_MEASUREMENT.lock().await;
    let redis = RedisServer::start().await?;
    let config = "[effects]\noutgoing_bytes = 8388608\n";
    let manifest = attack_manifest(&["attacks"], "[limits]\ndeadline_ms = 1000\n");
    let host = TestHost::start_configured(
        &redis,
        config,
        &[("attack", plugins::ATTACK, Some(&manifest))],
    )
    .await?;
    let peak = ResidentPeak::start()?;

    // The command reaches the host, then Redis stops taking writes (PUBLISH included) for
    // 3 s: the 400 sends of 1 MiB fill the 8 MiB budget and the call waits for room until
    // its deadline.
    let started = Instant::now();
    let mut connection = redis.connection().await?;
    redis::pipe()
        .cmd("PUBLISH")
        .arg("attack:x")
        .arg("send:1:400")
        .ignore()
        .cmd("CLIENT")
        .arg("PAUSE")
        .arg(3000)
        .arg("WRITE")
        .ignore()
        .query_async::<()>(&mut connection)
        .await?;
    let stats = wait_stats(&host, "attack", "refused", |s| count_of(s, "failed") == 1).await?;
    let waited = started.elapsed();
    let peak = peak.growth();
    assert_eq!(count_of(&stats, "outgoing_full"), 1, "{stats}");
    let error = stats["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("effects.outgoing_bytes (8388608 bytes)"),
        "{error}"
    );
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_millis(2900),
        "failed after {waited:?}, not at the 1 s deadline"
    );
    eprintln!(
        "outgoing budget full: failed after {waited:?}, RSS peak +{} MiB",
        peak / MIB
    );
    assert!(peak < 128 * MIB, "RSS peak grew by {} MiB", peak / MIB);

    // Once Redis takes writes again, what was queued goes out (all of it: nothing is lost
    // for the wait), then what the plugin does next.
    let mut replies = Subscriber::new(&redis, &["attacks"], &[]).await?;
    redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query_async::<()>(&mut connection)
        .await?;
    redis.publish("attack:x", "hello").await?;
    let mut queued = 0;
    loop {
        let got = replies.next(PATIENCE).await?;
        if got.payload == b"ok:2" {
            break;
        }
        anyhow::ensure!(
            got.payload.len() == 1 << 20,
            "a message of {} bytes",
            got.payload.len()
        );
        queued += 1;
    }
    // As many 1 MiB messages as the 8 MiB budget holds with their overhead.
    assert_eq!(queued, 7);
    let stats = wait_stats(&host, "attack", "handled", |s| count_of(s, "handled") == 1).await?;
    assert_eq!(count_of(&stats, "send_failed"), 0, "{stats}");
    host.stop().await
}

/// A server whose every answer is a body of `size` bytes, announced in `Content-Length`,
/// streamed in 64 KiB chunks as fast as the client reads them.
struct Flood {
    addr: std::net::SocketAddr,
    /// Bytes handed to the connection so far.
    streamed: Arc<AtomicU64>,
    /// Set when the body stream was dropped: finished, or abandoned by the client.
    ended: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

/// Marks the flood's body as ended when dropped.
struct EndGuard(Arc<AtomicBool>);

impl Drop for EndGuard {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl Flood {
    async fn start(size: u64) -> anyhow::Result<Self> {
        const CHUNK: usize = 64 << 10;
        let streamed = Arc::new(AtomicU64::new(0));
        let ended = Arc::new(AtomicBool::new(false));
        let chunk = Bytes::from(vec![b'a'; CHUNK]);
        let app = {
            let (streamed, ended) = (streamed.clone(), ended.clone());
            axum::Router::new().fallback(move || {
                let (streamed, ended, chunk) = (streamed.clone(), ended.clone(), chunk.clone());
                async move {
                    let guard = EndGuard(ended);
                    let body = futures::stream::unfold((0_u64, guard), move |(sent, guard)| {
                        let (streamed, chunk) = (streamed.clone(), chunk.clone());
                        async move {
                            if sent >= size {
                                return None;
                            }
                            let part = chunk.slice(..CHUNK.min((size - sent) as usize));
                            streamed.fetch_add(part.len() as u64, Ordering::Relaxed);
                            let sent = sent + part.len() as u64;
                            Some((Ok::<_, Infallible>(part), (sent, guard)))
                        }
                    });
                    axum::response::Response::builder()
                        .status(200)
                        .header("content-length", size)
                        .body(axum::body::Body::from_stream(body))
                        .unwrap_or_default()
                }
            })
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            addr,
            streamed,
            ended,
            task,
        })
    }

    fn url(&self) -> String {
        format!("http://{}/flood", self.addr)
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The probe's manifest: it calls output `output` for every message, with a roomy deadline.
fn probe_manifest(output: &str) -> String {
    format!(
        "[grants]\npublish = [\"probe-results\"]\noutputs = [{output:?}]\n[limits]\ndeadline_ms = 20000\n[config]\noutput = {output:?}\n"
    )
}

/// The `/plugins` counters of output `name`.
async fn output_counters(host: &TestHost, name: &str) -> anyhow::Result<Value> {
    let (_, listing) = host.get("/plugins").await?;
    listing["outputs"]
        .as_array()
        .and_then(|outputs| outputs.iter().find(|o| o["name"] == name).cloned())
        .with_context(|| format!("output {name} is not listed: {listing}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_reply_of_three_gigabytes_is_cut_at_max_reply_bytes_as_it_arrives()
-> anyhow::Result<()> {
    let _one = MEMORY_MEASUREMENT.lock().await;
    let redis = RedisServer::start().await?;
    let flood = Flood::start(3 << 30).await?;
    // The probe publishes the body it got in its report: 4 MiB payloads let a 1 MiB body
    // through. The reply cap is the default, 1 MiB.
    let config = format!(
        "[plugins]\nmax_payload_bytes = 4194304\n[effects]\noutgoing_bytes = 8388608\n\
         [outputs.flood]\nkind = \"http\"\nurl = {:?}\ntimeout_ms = 15000\nretries = 0\n",
        flood.url()
    );
    let manifest = probe_manifest("flood");
    let host = TestHost::start_configured(
        &redis,
        &config,
        &[("output-probe", plugins::OUTPUT_PROBE, Some(&manifest))],
    )
    .await?;
    let mut results = Subscriber::new(&redis, &["probe-results"], &[]).await?;
    let peak = ResidentPeak::start()?;
    let started = Instant::now();

    redis.publish("probe:x", "{}").await?;
    let report: Value = serde_json::from_slice(&results.next(PATIENCE).await?.payload)?;
    let took = started.elapsed();
    let shown: String = report.to_string().chars().take(300).collect();
    assert_eq!(report["ok"], true, "{shown}");
    assert_eq!(report["status"], 200);
    let body = report["body"].as_str().unwrap_or_default();
    assert_eq!(body.len(), 1 << 20, "the body is cut at exactly 1 MiB");
    assert!(body.bytes().all(|b| b == b'a'));

    // The host stopped reading at the cap and dropped the connection: the server saw its
    // stream abandoned long before the end.
    eventually(PATIENCE, || async {
        anyhow::ensure!(
            flood.ended.load(Ordering::SeqCst),
            "the body stream still runs"
        );
        Ok(())
    })
    .await?;
    let streamed = flood.streamed.load(Ordering::Relaxed);
    let peak = peak.growth();
    eprintln!(
        "3 GiB reply: cut after {:?}; {} MiB streamed by the server; RSS peak +{} MiB",
        took,
        streamed / MIB,
        peak / MIB
    );
    assert!(streamed < 64 * MIB, "{} MiB were streamed", streamed / MIB);
    // Before: the whole body was read, then cut (RSS 6 GB for a 3 GB reply).
    assert!(peak < 128 * MIB, "RSS peak grew by {} MiB", peak / MIB);
    let counters = output_counters(&host, "flood").await?;
    assert_eq!(counters["truncated"], 1, "{counters}");
    assert_eq!(counters["errors"], 0, "{counters}");
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_max_reply_bytes_cuts_replies_there() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let flood = Flood::start(100_000).await?;
    let config = format!(
        "[outputs.flood]\nkind = \"http\"\nurl = {:?}\nmax_reply_bytes = 10\n",
        flood.url()
    );
    let manifest = probe_manifest("flood");
    let host = TestHost::start_configured(
        &redis,
        &config,
        &[("output-probe", plugins::OUTPUT_PROBE, Some(&manifest))],
    )
    .await?;
    let mut results = Subscriber::new(&redis, &["probe-results"], &[]).await?;
    redis.publish("probe:x", "{}").await?;
    let report: Value = serde_json::from_slice(&results.next(PATIENCE).await?.payload)?;
    assert_eq!(report["body"], "aaaaaaaaaa", "{report}");
    host.stop().await
}

/// A server that answers every request with `307 Temporary Redirect` to `location`.
async fn redirecting_to(location: String) -> anyhow::Result<(String, tokio::task::JoinHandle<()>)> {
    let app = axum::Router::new().fallback(move || {
        let location = location.clone();
        async move {
            axum::response::Response::builder()
                .status(307)
                .header("location", location)
                .body(axum::body::Body::from("moved"))
                .unwrap_or_default()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((url, task))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_redirect_is_returned_to_the_plugin_and_never_followed() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    // Another host (another port) that would collect the operator's token.
    let elsewhere = Webhook::start().await?;
    let (url, server) = redirecting_to(elsewhere.url("/collect")).await?;
    let config = format!(
        "[outputs.hook]\nkind = \"http\"\nurl = {url:?}\nheaders = {{ X-Api-Key = \"operator-secret-token\" }}\n"
    );
    let manifest = probe_manifest("hook");
    let host = TestHost::start_configured(
        &redis,
        &config,
        &[("output-probe", plugins::OUTPUT_PROBE, Some(&manifest))],
    )
    .await?;
    let mut results = Subscriber::new(&redis, &["probe-results"], &[]).await?;
    redis.publish("probe:x", "{\"n\":1}").await?;
    let report: Value = serde_json::from_slice(&results.next(PATIENCE).await?.payload)?;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["status"], 307, "{report}");
    assert_eq!(report["body"], "moved", "{report}");
    // A followed redirect would have reached the other host before the reply came back.
    assert!(
        elsewhere.requests().is_empty(),
        "the redirect was followed: {:?}",
        elsewhere.requests()
    );
    server.abort();
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_invalidating_on_every_notice_is_stopped_by_the_loop_guard() -> anyhow::Result<()>
{
    let redis = RedisServer::start().await?;
    // Every notice on cache:invalidate (the default broadcast) makes it invalidate again,
    // which announces another notice.
    let manifest = attack_manifest(
        &["attacks"],
        "invalidate = [\"*\"]\n[config]\npatterns = [\"attack:*\", \"cache:invalidate\"]\n\
         invalidate_notices = \"cache:invalidate\"\nnotice_key = \"cached:page\"\n",
    );
    let host = TestHost::start(&redis, &[("attack", plugins::ATTACK, Some(&manifest))]).await?;
    redis.publish("attack:x", "invalidate:first").await?;
    wait_stats(&host, "attack", "stopped by the guard", |s| {
        count_of(s, "loop_limited") >= 1
    })
    .await?;
    let settled = settled_stats(&host, &["attack"]).await?;
    let notices = count_of(&settled[0], "handled") + count_of(&settled[0], "failed");
    eprintln!("invalidation loop cut after {notices} messages");
    // The burst allowance (200) and what the rate refills meanwhile, then the cut.
    assert!((150..=1000).contains(&notices), "{notices} messages");
    assert_eq!(count_of(&settled[0], "loop_limited"), 1, "{}", settled[0]);
    let error = settled[0]["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("loop guard: the invalidation notice on \"cache:invalidate\" feeds plugin attack's own subscriptions"),
        "{error}"
    );
    assert!(error.ends_with("nothing was deleted"), "{error}");
    host.stop().await
}

/// The stats of `names` once none of them has handled or failed anything for 300 ms (the
/// loop they were in has ended).
async fn settled_stats(host: &TestHost, names: &[&str]) -> anyhow::Result<Vec<Value>> {
    let snapshot = || async {
        let mut all = Vec::new();
        for name in names {
            let entry = host.plugin(name).await?.context("listed")?;
            all.push(entry["stats"].clone());
        }
        anyhow::Ok(all)
    };
    let done = |stats: &[Value]| -> Vec<u64> {
        stats
            .iter()
            .map(|s| count_of(s, "handled") + count_of(s, "failed"))
            .collect()
    };
    let started = Instant::now();
    let mut last = snapshot().await?;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = snapshot().await?;
        if done(&now) == done(&last) {
            return Ok(now);
        }
        anyhow::ensure!(
            started.elapsed() < PATIENCE,
            "still moving after {PATIENCE:?}: {now:?}"
        );
        last = now;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_plugins_relaying_to_each_other_are_cut_as_a_cycle() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let ping = attack_manifest(
        &["attacks", "pong:x"],
        "[config]\npatterns = [\"ping:*\"]\nrelay_to = \"pong:x\"\n",
    );
    let pong = attack_manifest(
        &["attacks", "ping:x"],
        "[config]\npatterns = [\"pong:*\"]\nrelay_to = \"ping:x\"\n",
    );
    let host = TestHost::start(
        &redis,
        &[
            ("ping", plugins::ATTACK, Some(&ping)),
            ("pong", plugins::ATTACK, Some(&pong)),
        ],
    )
    .await?;
    redis.publish("ping:x", "ball").await?;
    eventually(PATIENCE, || async {
        let mut limited = 0;
        for name in ["ping", "pong"] {
            let entry = host.plugin(name).await?.context("listed")?;
            limited += count_of(&entry["stats"], "loop_limited");
        }
        anyhow::ensure!(limited >= 1, "no publish was limited yet");
        Ok(())
    })
    .await?;
    let settled = settled_stats(&host, &["ping", "pong"]).await?;
    let hops: u64 = settled
        .iter()
        .map(|s| count_of(s, "handled") + count_of(s, "failed"))
        .sum();
    let limited: u64 = settled.iter().map(|s| count_of(s, "loop_limited")).sum();
    eprintln!("ping/pong cut after {hops} hops");
    // Each has a burst of 200 publishes that come back to it.
    assert!((150..=1500).contains(&hops), "{hops} hops");
    assert_eq!(limited, 1, "{settled:?}");
    let errors: Vec<&str> = settled
        .iter()
        .filter_map(|s| s["last_error"].as_str())
        .collect();
    assert!(
        errors
            .iter()
            .any(|e| e.contains("whose publishes lead back to plugin")),
        "{errors:?}"
    );
    host.stop().await
}

/// The end of `text`, for messages.
fn text_tail(text: &str) -> &str {
    let mut start = text.len().saturating_sub(200);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_text_is_cut_in_plugins_and_escaped_in_the_human_log() -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt as _;

    let redis = RedisServer::start().await?;
    // A file name with a newline and an escape sequence in it.
    let name = "atk\u{1b}[2J\nFORGED-BY-NAME";
    // Building and cutting 20 MB of text takes longer than the default 100 ms, and a debug
    // build of the host on a loaded machine can take seconds: a deadline here would change
    // what fails, and this test is not about deadlines.
    let manifest = attack_manifest(&["attacks"], "[limits]\ndeadline_ms = 30000\n");
    // A process of its own, to read its log.
    let mut process = HostProcess::builder(&redis)
        .plugin(name, plugins::ATTACK, Some(&manifest))
        .stderr()
        .start()
        .await?;
    let mut stderr = process.stderr()?;
    let log = tokio::spawn(async move {
        let mut text = Vec::new();
        let _ = stderr.read_to_end(&mut text).await;
        text
    });
    let stats = || async { anyhow::Ok(process.plugin(name).await?["stats"].clone()) };
    eventually(PATIENCE, || async {
        anyhow::ensure!(redis.pubsub_numpat().await? >= 1, "not subscribed yet");
        Ok(())
    })
    .await?;

    // An error text of 20 MB.
    redis.publish("attack:x", "error:20000000").await?;
    let after_error = eventually(PATIENCE, || async {
        let stats = stats().await?;
        anyhow::ensure!(count_of(&stats, "failed") == 1, "{stats}");
        Ok(stats)
    })
    .await?;
    let error = after_error["last_error"].as_str().unwrap_or_default();
    assert!(error.len() <= 4096, "last_error of {} bytes", error.len());
    assert!(
        error.starts_with("failed: eeee") && error.ends_with("(20000008 bytes in all, cut)"),
        "{}",
        text_tail(error)
    );

    // A publish on a channel name of 8 MiB, refused for want of a grant.
    redis.publish("attack:x", "deny:8388608").await?;
    let after_deny = eventually(PATIENCE, || async {
        let stats = stats().await?;
        anyhow::ensure!(count_of(&stats, "failed") == 2, "{stats}");
        Ok(stats)
    })
    .await?;
    assert_eq!(count_of(&after_deny, "denied"), 1, "{after_deny}");
    let error = after_deny["last_error"].as_str().unwrap_or_default();
    assert!(error.len() < 1000, "last_error of {} bytes", error.len());
    assert!(error.contains("(8388608 bytes in all, cut)"), "{error}");

    // A log line with newlines, carriage returns and terminal escape sequences.
    let mut replies = Subscriber::new(&redis, &["attacks"], &[]).await?;
    redis.publish("attack:x", "inject").await?;
    assert_eq!(replies.next(PATIENCE).await?.payload_str(), "ok:3");

    process.kill().await?;
    let log = String::from_utf8_lossy(&log.await?).into_owned();
    assert!(log.len() < 256 << 10, "{} bytes of log", log.len());
    assert!(
        !log.contains(['\u{1b}', '\r', '\u{7}', '\u{9b}']),
        "control characters reached the log: {log:?}"
    );
    for line in log.lines() {
        assert!(
            !line.starts_with("ERROR forged line") && !line.starts_with("FORGED-BY-NAME"),
            "a plugin forged a log line: {line:?}"
        );
    }
    let injected = log
        .lines()
        .find(|line| line.contains("first\\nERROR forged line"))
        .with_context(|| format!("the plugin's line is not in the log: {log}"))?;
    assert!(
        injected
            .contains("first\\nERROR forged line\\r\\u{1b}[31mred\\u{1b}[0m\\u{7}\\u{9b}2J end"),
        "{injected}"
    );
    assert!(
        injected.contains("plugin=atk\\u{1b}[2J\\nFORGED-BY-NAME"),
        "{injected}"
    );
    assert!(
        !log.contains(&"e".repeat(10_000)) && !log.contains(&"d".repeat(10_000)),
        "plugin text reached the log uncut"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_entry_over_max_payload_bytes_is_dead_lettered_unhandled() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let config =
        "[plugins]\nmax_payload_bytes = 65536\n[streams]\nblock_ms = 200\nstart = \"all\"\n";
    let manifest = attack_manifest(&["attacks"], "[subscriptions]\nstreams = [\"jobs\"]\n");
    let mut connection = redis.connection().await?;
    let big = vec![b'a'; 100_000];
    let big_id: String = redis::cmd("XADD")
        .arg("jobs")
        .arg("*")
        .arg("payload")
        .arg(&big)
        .query_async(&mut connection)
        .await?;
    let _: String = redis::cmd("XADD")
        .arg("jobs")
        .arg("*")
        .arg("payload")
        .arg("small")
        .query_async(&mut connection)
        .await?;
    let mut replies = Subscriber::new(&redis, &["attacks"], &[]).await?;
    let host = TestHost::start_configured(
        &redis,
        config,
        &[("attack", plugins::ATTACK, Some(&manifest))],
    )
    .await?;

    // The small entry is handled; the large one never reaches the plugin.
    assert_eq!(replies.next(PATIENCE).await?.payload_str(), "ok:1");
    let stats = wait_stats(&host, "attack", "done with both", |s| {
        count_of(s, "stream_dead_lettered") == 1 && count_of(s, "stream_acked") == 2
    })
    .await?;
    assert_eq!(count_of(&stats, "accepted"), 1, "{stats}");
    assert_eq!(count_of(&stats, "failed"), 0, "{stats}");

    let dead: Vec<(String, Vec<Vec<u8>>)> = redis::cmd("XRANGE")
        .arg("jobs:dead")
        .arg("-")
        .arg("+")
        .query_async(&mut connection)
        .await?;
    assert_eq!(dead.len(), 1, "one dead letter");
    let fields: std::collections::HashMap<String, Vec<u8>> = dead[0]
        .1
        .chunks(2)
        .filter_map(|pair| match pair {
            [name, value] => Some((String::from_utf8_lossy(name).into_owned(), value.clone())),
            _ => None,
        })
        .collect();
    let field = |name: &str| String::from_utf8_lossy(&fields[name]).into_owned();
    assert_eq!(field("dead.id"), big_id);
    assert_eq!(field("dead.version"), "none");
    assert_eq!(
        field("dead.error"),
        "entry of 100007 bytes (fields and their names) is over plugins.max_payload_bytes \
         (65536 bytes); no plugin was given it"
    );
    assert_eq!(
        fields["payload"], big,
        "the dead letter keeps the entry whole"
    );
    let pending: redis::Value = redis::cmd("XPENDING")
        .arg("jobs")
        .arg("attack")
        .query_async(&mut connection)
        .await?;
    assert!(
        matches!(&pending, redis::Value::Array(items) if matches!(items.first(), Some(redis::Value::Int(0)))),
        "{pending:?}"
    );
    host.stop().await
}
