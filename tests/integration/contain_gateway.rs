//! What a browser (or anything that speaks HTTP to the gateway) can make the host hold, and
//! for how long, against a real host, a real redis-server and real sockets.
//!
//! - Sockets: connections that never send a complete request (idle, or a head trickled byte
//!   by byte) are closed after `request_timeout_ms` while `/readyz` keeps answering; open
//!   streams are not; pending sockets beyond `max_pending_connections`, and any beyond
//!   `max_connections + max_pending_connections`, are refused at once.
//! - Subscriptions: per connection and in total, refused with a status and a line naming the
//!   setting; a disconnect releases thousands of Redis subscriptions at once.
//! - Memory: a WebSocket frame over `max_message_bytes` closes the connection (1009) before
//!   its payload is read, and a stalled SSE client makes the host hold its subscription's
//!   ring, bounded in bytes, not every message it missed. Both measured as the process's
//!   resident memory (the host runs in the test process).
//! - What browsers see: never the host's reserved channels, even with `read = ["*"]`; no
//!   payload over `max_payload_bytes`.
//! - Who gets in: a `bearer` scheme in any case; a forged `Host` naming a DNS name does not
//!   make a page's origin the gateway's own.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::json;
use switchyard::gateway::auth::{Claims, now_secs, sign};
use switchyard_tests::gateway::{Frame, Gateway, client_frame_header, metric, until_closed};
use switchyard_tests::memory::{MEMORY_MEASUREMENT, ResidentPeak};
use switchyard_tests::process::HostProcess;
use switchyard_tests::{PATIENCE, RedisServer, TestHost, eventually};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The secret signed tokens are made with.
const SECRET: &str = "contain-gateway-secret-0123456789";
/// A static token that reads `news` and `news:*`.
const READER: &str = "reader-token-0123456789";
/// A static token that reads the plugin list.
const DASHBOARD: &str = "dashboard-token-0123456789";
/// One mebibyte.
const MIB: u64 = 1 << 20;

/// A host configuration with the gateway on a free port, the tokens above, and `settings`
/// (more `[gateway]` keys).
fn config(settings: &str) -> String {
    format!(
        r#"
[gateway]
listen = "127.0.0.1:0"
hmac_secret = "{SECRET}"
{settings}

[gateway.tokens.reader]
token = "{READER}"
read = ["news", "news:*"]

[gateway.tokens.dashboard]
token = "{DASHBOARD}"
read = ["switchyard:plugins"]
"#
    )
}

/// A host without plugins whose gateway is configured with `settings`.
async fn start(redis: &RedisServer, settings: &str) -> anyhow::Result<(TestHost, Gateway)> {
    let host = TestHost::start_configured(redis, &config(settings), &[]).await?;
    let gateway = Gateway::of(&host);
    Ok((host, gateway))
}

/// `path` with `token=` added to its query.
fn with_token(path: &str, token: &str) -> String {
    let separator = if path.contains('?') { '&' } else { '?' };
    format!("{path}{separator}token={token}")
}

/// Waits until the gateway series `series` on `/metrics` reads `value`.
async fn metric_reaches(host: &TestHost, series: &str, value: f64) -> anyhow::Result<()> {
    eventually(PATIENCE, || async {
        let now = metric(host, series).await?;
        anyhow::ensure!(now == value, "{series} is {now}, waiting for {value}");
        Ok(())
    })
    .await
}

/// Waits until the series `series` on the `/metrics` of a host process reads `value`.
async fn process_metric_reaches(
    host: &HostProcess,
    series: &str,
    value: f64,
) -> anyhow::Result<()> {
    eventually(PATIENCE, || async {
        let now = host.metric(series).await?;
        anyhow::ensure!(now == value, "{series} is {now}, waiting for {value}");
        Ok(())
    })
    .await
}

/// Asserts that the admin endpoint answers `/readyz` with 200 now.
async fn assert_ready(host: &TestHost, when: &str) -> anyhow::Result<()> {
    let (status, body) = tokio::time::timeout(PATIENCE, host.get("/readyz"))
        .await
        .with_context(|| format!("/readyz did not answer {when}"))??;
    anyhow::ensure!(status == 200, "/readyz {when}: {status} {body}");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Sockets

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_are_closed_after_the_request_timeout_while_readyz_keeps_answering()
-> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let timeout = Duration::from_millis(500);
    let (host, gateway) = start(
        &redis,
        &format!("request_timeout_ms = {}", timeout.as_millis()),
    )
    .await?;
    // A stream opened before: it is no pending socket and must outlive the timeout.
    let mut stream = gateway.ws(&with_token("/ws?channel=news", READER)).await?;
    stream.ready().await?;

    // Sockets that send nothing, half a request head, or one request and then nothing.
    let mut silent = Vec::new();
    for _ in 0..5 {
        silent.push(gateway.socket().await?);
    }
    for _ in 0..5 {
        let mut socket = gateway.socket().await?;
        socket
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n")
            .await?;
        silent.push(socket);
    }
    for _ in 0..2 {
        let mut socket = gateway.socket().await?;
        socket
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
            .await?;
        let mut answer = [0u8; 256];
        let read = socket.read(&mut answer).await?;
        anyhow::ensure!(
            answer[..read].starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&answer[..read])
        );
        silent.push(socket);
    }
    // And one that trickles its head a byte at a time, faster than the timeout, for ever.
    let opened = Instant::now();
    let (mut trickled, mut trickle) = gateway.socket().await?.into_split();
    let trickler = tokio::spawn(async move {
        for byte in b"GET /healthz HTTP/1.1\r\n".iter().cycle() {
            if trickle.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    metric_reaches(&host, "switchyard_gateway_pending_connections", 13.0).await?;
    assert_ready(&host, "while 13 idle sockets are open").await?;

    for (i, socket) in silent.iter_mut().enumerate() {
        until_closed(socket, PATIENCE)
            .await
            .with_context(|| format!("idle socket {i}"))?;
    }
    let mut trickled_bytes = Vec::new();
    tokio::time::timeout(PATIENCE, trickled.read_to_end(&mut trickled_bytes))
        .await
        .context("the trickling socket is still open")?
        .ok();
    trickler.await?;
    let closed_after = opened.elapsed();
    println!("12 idle sockets and a trickling one were closed {closed_after:?} after opening");
    assert!(
        closed_after >= timeout,
        "closed after {closed_after:?}, before the timeout"
    );
    metric_reaches(&host, "switchyard_gateway_pending_connections", 0.0).await?;
    metric_reaches(&host, "switchyard_gateway_timeouts_total", 13.0).await?;
    assert_ready(&host, "after the idle sockets were closed").await?;

    // The stream is still served.
    redis.publish("news", "still here").await?;
    let message = stream.message(PATIENCE).await?;
    assert_eq!(message["payload"], "still here");
    stream.close().await?;
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_over_the_pending_cap_are_refused_at_once_and_the_gateway_recovers()
-> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    // A long timeout: the idle sockets stay for the whole test unless the client drops them.
    let (host, gateway) = start(
        &redis,
        "max_pending_connections = 8\nrequest_timeout_ms = 600000",
    )
    .await?;
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(gateway.socket().await?);
    }
    metric_reaches(&host, "switchyard_gateway_pending_connections", 8.0).await?;

    // The ninth is answered and closed at once, without having sent anything.
    for i in 0..20 {
        let mut socket = gateway.socket().await?;
        let ended = until_closed(&mut socket, PATIENCE)
            .await
            .with_context(|| format!("refused socket {i}"))?;
        assert!(
            ended.received.starts_with("HTTP/1.1 503")
                && ended.received.contains("(gateway.max_pending_connections)"),
            "{i}: {ended:?}"
        );
    }
    assert_eq!(
        metric(
            &host,
            r#"switchyard_gateway_denied_total{reason="pending"}"#
        )
        .await?,
        20.0
    );
    assert_ready(&host, "with the gateway's pending sockets exhausted").await?;

    // The held sockets go: browsers get in again.
    drop(idle);
    metric_reaches(&host, "switchyard_gateway_pending_connections", 0.0).await?;
    let mut ws = gateway.ws(&with_token("/ws?channel=news", READER)).await?;
    ws.ready().await?;
    ws.close().await?;
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_gateway_sockets_stay_within_max_connections_plus_max_pending_connections()
-> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let (host, gateway) = start(
        &redis,
        "max_connections = 2\nmax_pending_connections = 2\nrequest_timeout_ms = 600000",
    )
    .await?;
    let path = with_token("/ws?channel=news", READER);
    let mut streams = Vec::new();
    for _ in 0..2 {
        let mut ws = gateway.ws(&path).await?;
        ws.ready().await?;
        streams.push(ws);
    }
    let _idle = [gateway.socket().await?, gateway.socket().await?];
    metric_reaches(&host, "switchyard_gateway_pending_connections", 2.0).await?;

    let mut fifth = gateway.socket().await?;
    let ended = until_closed(&mut fifth, PATIENCE).await?;
    assert!(
        ended.received.starts_with("HTTP/1.1 503")
            && ended.received.contains("gateway.max_connections"),
        "{ended:?}"
    );
    assert_eq!(
        metric(
            &host,
            r#"switchyard_gateway_denied_total{reason="sockets"}"#
        )
        .await?,
        1.0
    );
    assert_ready(&host, "with every gateway socket taken").await?;
    for ws in streams {
        ws.close().await?;
    }
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_let_go_once_its_stream_ends() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let (host, gateway) = start(
        &redis,
        "slow_clients = \"disconnect\"\nclient_buffer = 4\nrequest_timeout_ms = 500",
    )
    .await?;
    // An SSE request on a raw socket that then reads nothing at all.
    let mut stalled = gateway.socket().await?;
    stalled
        .write_all(
            format!(
                "GET {} HTTP/1.1\r\nHost: gw\r\n\r\n",
                with_token("/sse?channel=news", READER)
            )
            .as_bytes(),
        )
        .await?;
    metric_reaches(
        &host,
        r#"switchyard_gateway_connections{protocol="sse"}"#,
        1.0,
    )
    .await?;

    // Enough to fill the socket buffers both ends, then the ring: the stream ends (too slow),
    // and what is left to write can never be written.
    // In bursts: the client's lag is seen when the stream is polled for its next frame, so
    // the ring must overflow while writes still go through; one message at a time, a quick
    // writer keeps up until the socket is full, then waits on it without polling again.
    const BURST: usize = 64;
    let payload = "m".repeat(64 * 1024);
    let mut sent = 0;
    while metric(&host, "switchyard_gateway_slow_disconnects_total").await? == 0.0 {
        anyhow::ensure!(
            sent < 10_000,
            "still not disconnected after {sent} messages"
        );
        redis
            .publish_all((0..BURST).map(|_| ("news", payload.as_str())))
            .await?;
        sent += BURST;
    }
    metric_reaches(
        &host,
        r#"switchyard_gateway_connections{protocol="sse"}"#,
        0.0,
    )
    .await?;
    // Pending again, with a write that cannot go on: closed after the request timeout.
    metric_reaches(&host, "switchyard_gateway_timeouts_total", 1.0).await?;
    metric_reaches(&host, "switchyard_gateway_pending_connections", 0.0).await?;
    println!("the stalled client was disconnected after {sent} messages of 64 KiB");
    drop(stalled);
    tokio::time::timeout(PATIENCE, host.stop())
        .await
        .context("the host did not stop")?
}

// ---------------------------------------------------------------------------------------
// Subscriptions

/// `/PATH?channel=news:FIRST&...` for `count` channels, with the reader's token.
fn many_channels(path: &str, first: usize, count: usize) -> String {
    let channels: Vec<String> = (first..first + count)
        .map(|i| format!("channel=news:{i}"))
        .collect();
    with_token(&format!("{path}?{}", channels.join("&")), READER)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_over_the_per_connection_limit_are_refused_naming_the_setting()
-> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let (host, gateway) = start(&redis, "max_subscriptions_per_connection = 5").await?;

    let (status, _, body) = gateway.get(&many_channels("/sse", 0, 6), &[]).await?;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("at most 5") && body.contains("gateway.max_subscriptions_per_connection"),
        "{body}"
    );
    let refused = gateway
        .ws_refused(&many_channels("/ws", 0, 6), None)
        .await?;
    assert_eq!(refused.status, 400, "{refused:?}");
    // The same channel twice counts once.
    let mut twice = gateway
        .sse(
            &with_token(
                "/sse?channel=news&channel=news&channel=news:1&channel=news:2&channel=news:3&channel=news:4",
                READER,
            ),
            &[],
        )
        .await?;

    // Over WebSocket: the sixth subscription is an error frame; the connection stays usable.
    let mut ws = gateway.ws(&many_channels("/ws", 0, 5)).await?;
    ws.ready().await?;
    let answer = ws
        .request(json!({"type": "subscribe", "channel": "news:5", "id": 6}))
        .await?;
    assert_eq!(answer["type"], "error", "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|e| e.contains("gateway.max_subscriptions_per_connection")),
        "{answer}"
    );
    let answer = ws
        .request(json!({"type": "unsubscribe", "channel": "news:0", "id": 7}))
        .await?;
    assert_eq!(answer["type"], "ok", "{answer}");
    let answer = ws
        .request(json!({"type": "subscribe", "channel": "news:5", "id": 8}))
        .await?;
    assert_eq!(answer["type"], "ok", "{answer}");
    redis.publish("news:5", "five").await?;
    assert_eq!(ws.message(PATIENCE).await?["payload"], "five");
    redis.publish("news", "plain").await?;
    assert_eq!(twice.message(PATIENCE).await?["payload"], "plain");

    assert_eq!(
        metric(
            &host,
            r#"switchyard_gateway_denied_total{reason="subscriptions"}"#
        )
        .await?,
        3.0
    );
    ws.close().await?;
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateways_total_of_subscriptions_is_enforced_with_a_clear_error() -> anyhow::Result<()>
{
    let redis = RedisServer::start().await?;
    let (host, gateway) = start(&redis, "max_subscriptions = 3").await?;
    let mut first = gateway.ws(&many_channels("/ws", 0, 3)).await?;
    first.ready().await?;
    metric_reaches(&host, "switchyard_gateway_subscriptions", 3.0).await?;

    // A fourth channel would be a fourth Redis subscription: refused, before any upgrade.
    let refused = gateway
        .ws_refused(&many_channels("/ws", 3, 1), None)
        .await?;
    assert_eq!(refused.status, 503, "{refused:?}");
    assert!(
        refused.body.contains("gateway.max_subscriptions"),
        "{refused:?}"
    );
    let (status, _, body) = gateway.get(&many_channels("/sse", 2, 2), &[]).await?;
    assert_eq!(status, 503, "{body}");
    let answer = first
        .request(json!({"type": "subscribe", "channel": "news:9", "id": 1}))
        .await?;
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|e| e.contains("gateway.max_subscriptions")),
        "{answer}"
    );
    // A channel already held is shared, whoever asks.
    let mut second = gateway.ws(&many_channels("/ws", 1, 2)).await?;
    second.ready().await?;
    redis.publish("news:2", "shared").await?;
    assert_eq!(first.message(PATIENCE).await?["payload"], "shared");
    assert_eq!(second.message(PATIENCE).await?["payload"], "shared");
    assert_eq!(
        metric(
            &host,
            r#"switchyard_gateway_denied_total{reason="subscriptions_total"}"#
        )
        .await?,
        3.0
    );
    first.close().await?;
    second.close().await?;
    host.stop().await
}

/// Channels Redis has subscribers for among `news:*` (`PUBSUB CHANNELS`).
async fn redis_channels(redis: &RedisServer) -> anyhow::Result<usize> {
    let mut connection = redis.connection().await?;
    let channels: Vec<String> = redis::cmd("PUBSUB")
        .arg("CHANNELS")
        .arg("news:*")
        .query_async(&mut connection)
        .await?;
    Ok(channels.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_thousand_subscriptions_are_released_at_once_when_their_clients_go()
-> anyhow::Result<()> {
    // Heavy enough to disturb a memory measurement running beside it.
    let _alone = MEMORY_MEASUREMENT.lock().await;
    const CLIENTS: usize = 10;
    const EACH: usize = 3000;
    let redis = RedisServer::start().await?;
    let (host, gateway) = start(
        &redis,
        &format!("max_subscriptions_per_connection = {EACH}\nmax_subscriptions = 30000"),
    )
    .await?;

    let started = Instant::now();
    let mut clients = Vec::new();
    for client in 0..CLIENTS {
        clients.push(
            gateway
                .sse(&many_channels("/sse", client * EACH, EACH), &[])
                .await?,
        );
    }
    let total = (CLIENTS * EACH) as f64;
    metric_reaches(&host, "switchyard_gateway_subscriptions", total).await?;
    assert_eq!(redis_channels(&redis).await?, CLIENTS * EACH);
    println!(
        "{CLIENTS} SSE clients subscribed {} channels in {:?}",
        CLIENTS * EACH,
        started.elapsed()
    );

    let left = Instant::now();
    drop(clients);
    metric_reaches(&host, "switchyard_gateway_subscriptions", 0.0).await?;
    eventually(PATIENCE, || async {
        let held = redis_channels(&redis).await?;
        anyhow::ensure!(held == 0, "Redis still has {held} of them");
        Ok(())
    })
    .await?;
    println!(
        "their {} Redis subscriptions were released {:?} after the clients went",
        CLIENTS * EACH,
        left.elapsed()
    );
    assert_ready(&host, "after the release").await?;
    host.stop().await
}

// ---------------------------------------------------------------------------------------
// Memory

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_frame_over_the_limit_closes_the_connection_before_its_payload_is_read()
-> anyhow::Result<()> {
    /// Connections that each announce a frame of [`ANNOUNCED`] bytes and try to send it.
    const ATTACKERS: usize = 40;
    /// What tungstenite accepted per frame before (16 MiB): 640 MiB for forty connections.
    const ANNOUNCED: u64 = 16 * MIB;
    /// What the host may grow by meanwhile: forty sessions and their read buffers (it grew
    /// by 1.5 MiB here; taking in the frames would be 640 MiB).
    const BOUND: u64 = 32 * MIB;
    let _alone = MEMORY_MEASUREMENT.lock().await;
    let redis = RedisServer::start().await?;
    let (host, gateway) = start(&redis, "").await?;
    let path = with_token("/ws", READER);

    // One frame announced over the limit (64 KiB): closed with 1009 though only its header
    // and a first kilobyte were sent.
    let mut ws = gateway.ws(&path).await?;
    ws.write_raw(&client_frame_header(64 * 1024 + 1)).await?;
    ws.write_raw(&[b'x'; 1024]).await?;
    match ws.frame(PATIENCE).await? {
        Frame::Close(code, _) => assert_eq!(code, 1009),
        other => panic!("expected a close, got {other:?}"),
    }

    let peak = ResidentPeak::start()?;
    let chunk = vec![b'x'; 64 * 1024];
    let mut attacks = Vec::new();
    for _ in 0..ATTACKERS {
        let mut ws = gateway.ws(&path).await?;
        let chunk = chunk.clone();
        attacks.push(tokio::spawn(async move {
            ws.write_raw(&client_frame_header(ANNOUNCED)).await?;
            let mut sent = 0u64;
            // The server reads none of it: the writes fail (or fill the socket buffers)
            // long before the announced size.
            while sent < ANNOUNCED {
                if ws.write_raw(&chunk).await.is_err() {
                    break;
                }
                sent += chunk.len() as u64;
                if sent == 4 * chunk.len() as u64 {
                    // Closed with 1009, or reset once the server dropped what it never read.
                    let frame = ws.frame(PATIENCE).await?;
                    anyhow::ensure!(
                        matches!(frame, Frame::Close(1009, _) | Frame::Ended(_)),
                        "{frame:?}"
                    );
                }
            }
            anyhow::Ok(sent)
        }));
    }
    let mut most = 0;
    for attack in attacks {
        most = most.max(attack.await??);
    }
    let growth = peak.growth();
    println!(
        "{ATTACKERS} frames announcing {} MiB each: the host grew by at most {:.1} MiB \
         (bound {} MiB); at most {} KiB of one was written before the server stopped it",
        ANNOUNCED / MIB,
        growth as f64 / MIB as f64,
        BOUND / MIB,
        most / 1024
    );
    assert!(
        growth < BOUND,
        "resident memory grew by {growth} bytes, over {BOUND}"
    );
    assert!(
        most < ANNOUNCED,
        "a whole frame over the limit was taken in"
    );
    assert_eq!(
        metric(&host, r#"switchyard_gateway_denied_total{reason="size"}"#).await?,
        (ATTACKERS + 1) as f64
    );
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_sse_client_makes_the_host_hold_its_ring_not_every_message_it_missed()
-> anyhow::Result<()> {
    /// Messages published while the client reads nothing, each at `max_payload_bytes`.
    const MESSAGES: usize = 256;
    /// What the host may grow by: the ring (4 MiB), a message in flight at each step (the
    /// Redis reply, its rendering, the SSE event, the write buffer) and what the allocator
    /// keeps of them on each thread: 41 to 57 MiB here. Holding every message it missed, as
    /// before, would be 256 MiB and more.
    const BOUND: u64 = 96 * MIB;
    // Its other memory tests measure the test process: this one's publishing stays out of it.
    let _alone = MEMORY_MEASUREMENT.lock().await;
    let redis = RedisServer::start().await?;
    // A process of its own, so that its memory is the host's alone, whatever other tests
    // hold in the test process meanwhile.
    let mut host = HostProcess::builder(&redis)
        .config(&config(""))
        .start()
        .await?;
    let gateway = Gateway::at(host.gateway().context("the gateway listens")?);
    let mut stalled = gateway
        .sse(&with_token("/sse?channel=news", READER), &[])
        .await?;

    let peak = host.resident_peak()?;
    let payload = vec![b'p'; MIB as usize];
    let mut connection = redis.connection().await?;
    for sent in 1..=MESSAGES {
        redis::cmd("PUBLISH")
            .arg("news")
            .arg(&payload)
            .query_async::<i64>(&mut connection)
            .await?;
        // At the gateway's pace: Redis cuts a subscriber 32 MiB behind (its pubsub output
        // buffer limit), which would end the test, not show what the host holds.
        if sent % 8 == 0 {
            process_metric_reaches(
                &host,
                r#"switchyard_gateway_messages_total{direction="out"}"#,
                sent as f64,
            )
            .await?;
        }
    }
    // Over max_payload_bytes: never rendered, never held.
    let oversize = vec![b'o'; 4 * MIB as usize];
    for _ in 0..4 {
        redis::cmd("PUBLISH")
            .arg("news")
            .arg(&oversize)
            .query_async::<i64>(&mut connection)
            .await?;
    }
    drop(oversize);
    process_metric_reaches(&host, "switchyard_gateway_oversize_total", 4.0).await?;
    process_metric_reaches(
        &host,
        r#"switchyard_gateway_messages_total{direction="out"}"#,
        MESSAGES as f64,
    )
    .await?;
    let held = host.metric("switchyard_gateway_buffered_bytes").await?;
    let growth = peak.growth();
    println!(
        "{MESSAGES} messages of 1 MiB for a stalled SSE client: the host grew by at most \
         {:.1} MiB (bound {} MiB); its ring holds {:.1} MiB",
        growth as f64 / MIB as f64,
        BOUND / MIB,
        held / MIB as f64
    );
    assert!(
        growth < BOUND,
        "resident memory grew by {growth} bytes, over {BOUND}"
    );
    // The ring's budget (4 MiB) and the newest message over it.
    assert!(
        held <= (5 * MIB + 4096) as f64,
        "the ring holds {held} bytes"
    );

    // The client reads at last: what it missed is announced, the rest arrives in order.
    let mut got = 0;
    let mut dropped = 0;
    while got + dropped < MESSAGES {
        let event = stalled
            .event(PATIENCE)
            .await
            .with_context(|| format!("after {got} messages and {dropped} dropped"))?;
        match event.event.as_str() {
            "message" => got += 1,
            "dropped" => {
                let count: serde_json::Value = serde_json::from_str(&event.data)?;
                dropped += count["dropped"].as_u64().context("a count")? as usize;
            }
            other => panic!("unexpected event {other}: {}", event.data),
        }
    }
    assert!(
        dropped > 0,
        "a stalled client cannot have got every message"
    );
    assert_eq!(got + dropped, MESSAGES);
    process_metric_reaches(&host, "switchyard_gateway_buffered_bytes", 0.0).await?;
    host.kill().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_over_max_payload_bytes_are_not_sent_to_browsers() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let (host, gateway) = start(&redis, "max_payload_bytes = 100").await?;
    let mut ws = gateway.ws(&with_token("/ws?channel=news", READER)).await?;
    ws.ready().await?;
    redis.publish("news", "x".repeat(101)).await?;
    redis.publish("news", "y".repeat(100)).await?;
    assert_eq!(ws.message(PATIENCE).await?["payload"], "y".repeat(100));
    assert_eq!(
        metric(&host, "switchyard_gateway_oversize_total").await?,
        1.0
    );
    ws.close().await?;
    host.stop().await
}

// ---------------------------------------------------------------------------------------
// What browsers see, and who gets in

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_channels_never_reach_a_client_that_may_read_everything() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let (host, gateway) = start(&redis, "").await?;
    let everything = sign(
        SECRET.as_bytes(),
        &Claims {
            sub: "root".to_owned(),
            exp: now_secs() + 600,
            read: vec!["*".to_owned()],
            write: vec![],
        },
    );
    let mut ws = gateway
        .ws(&with_token("/ws?channel=*", &everything))
        .await?;
    ws.ready().await?;
    let mut sse = gateway
        .sse(&with_token("/sse?channel=*", &everything), &[])
        .await?;

    redis.publish("__switchyard:probe", "internal").await?;
    redis.publish("visible", "public").await?;
    let first = ws.message(PATIENCE).await?;
    assert_eq!(first["channel"], "visible", "{first}");
    let first = sse.message(PATIENCE).await?;
    assert_eq!(first["channel"], "visible", "{first}");

    // Nor can a reserved channel be asked for by name.
    let answer = ws
        .request(json!({"type": "subscribe", "channel": "__switchyard:probe", "id": 1}))
        .await?;
    assert_eq!(answer["type"], "error", "{answer}");
    ws.close().await?;
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_is_matched_in_any_case() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let (host, gateway) = start(&redis, "").await?;
    let mut streams = Vec::new();
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let header = format!("{scheme} {READER}");
        streams.push(
            gateway
                .sse("/sse?channel=news", &[("Authorization", &header)])
                .await
                .with_context(|| format!("scheme {scheme}"))?,
        );
    }
    let (status, _, body) = gateway
        .get(
            "/sse?channel=news",
            &[("Authorization", &format!("Basic {READER}"))],
        )
        .await?;
    assert_eq!(status, 401, "{body}");
    redis.publish("news", "hello").await?;
    for sse in &mut streams {
        assert_eq!(sse.message(PATIENCE).await?["payload"], "hello");
    }
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_host_does_not_make_a_pages_origin_the_gateways_own() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let (host, gateway) = start(&redis, "").await?;
    let port = gateway.addr().port();
    let plugins = with_token("/api/plugins", DASHBOARD);

    // DNS rebinding: a page on evil.example, whose name now points at the gateway, sends
    // its own name as both Host and Origin.
    let evil_host = format!("evil.example:{port}");
    let evil_origin = format!("http://{evil_host}");
    let (status, body) = gateway
        .raw_get(&plugins, &[("Host", &evil_host), ("Origin", &evil_origin)])
        .await?;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("origin not allowed"), "{body}");
    let refused = gateway
        .ws_with(
            &with_token("/ws?channel=news", READER),
            &[("Host", &evil_host), ("Origin", &evil_origin)],
        )
        .await?
        .err()
        .context("the rebound page's WebSocket was accepted")?;
    assert_eq!(refused.status, 403, "{refused:?}");
    assert_eq!(
        metric(&host, r#"switchyard_gateway_denied_total{reason="origin"}"#).await?,
        2.0
    );

    // The gateway's own pages, reached by its address, still connect.
    let own_host = format!("127.0.0.1:{port}");
    let (status, body) = gateway
        .raw_get(
            &plugins,
            &[("Host", &own_host), ("Origin", &gateway.origin())],
        )
        .await?;
    assert_eq!(status, 200, "{body}");
    host.stop().await?;

    // With its public origin configured, that origin is the gateway's own, and the Host is
    // not consulted.
    let (host, gateway) = start(&redis, r#"public_origins = ["https://gw.example.com"]"#).await?;
    let (status, body) = gateway
        .raw_get(
            &plugins,
            &[
                ("Host", "gw.example.com"),
                ("Origin", "https://gw.example.com"),
            ],
        )
        .await?;
    assert_eq!(status, 200, "{body}");
    let own_host = format!("127.0.0.1:{}", gateway.addr().port());
    let (status, body) = gateway
        .raw_get(
            &plugins,
            &[("Host", &own_host), ("Origin", &gateway.origin())],
        )
        .await?;
    assert_eq!(status, 403, "{body}");
    host.stop().await
}
