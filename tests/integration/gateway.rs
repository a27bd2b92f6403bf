//! The browser gateway's protocol, against a real host and a real redis-server.
//!
//! - Who gets in: no, bad, forged or expired token → 401; a foreign `Origin` → 403 before
//!   any upgrade (the gateway's own, a listed one and none are fine); a channel or pattern
//!   outside the token's `read` grants → 403, or an error frame once connected; a publish
//!   outside its `write` grants → an error frame, and nothing on Redis.
//! - What flows: the same JSON to WebSocket and SSE clients, with the pattern that matched
//!   and `payload_base64` for payloads that are not UTF-8.
//! - What is shared: one Redis subscription per channel however many browsers watch it.
//! - What is limited: frame size (1009), request rate (`"rate limit"`, then 1008), and slow
//!   clients, who lose messages (and are told, or are disconnected) while everyone else,
//!   plugins included, carries on.
//! - What is counted: `switchyard_gateway_*` on the admin `/metrics`.
//!
//! Clients come from `switchyard_tests::gateway`: WebSocket frames are read as JSON, SSE
//! streams as events; every wait has a deadline.

use std::time::Duration;

use anyhow::Context as _;
use serde_json::{Value, json};
use switchyard::gateway::auth::{Claims, now_secs, sign};
use switchyard_tests::gateway::{Frame, Gateway, Ws, metric};
use switchyard_tests::{
    FORWARD_MANIFEST, PATIENCE, RedisServer, Subscriber, TestHost, assert_forwards, eventually,
    plugins,
};

/// The secret signed tokens are made with.
const SECRET: &str = "gateway-test-secret-0123456789";
/// A static token that reads `news`, `news:*` and `chat:*`, and writes `chat:in:*`.
const READER: &str = "reader-token-0123456789";
/// A static token that reads `dashboard:*` and the plugin list.
const DASHBOARD: &str = "dashboard-token-0123456789";
/// The one origin besides its own whose pages the gateway accepts.
const ALLOWED_ORIGIN: &str = "https://app.example.com";
/// How long to watch for something that must not happen.
const QUIET: Duration = Duration::from_millis(300);

/// A host configuration with the gateway on a free port, the tokens above, and `settings`
/// (more `[gateway]` keys).
fn config(settings: &str) -> String {
    format!(
        r#"
[gateway]
listen = "127.0.0.1:0"
hmac_secret = "{SECRET}"
allowed_origins = ["{ALLOWED_ORIGIN}"]
{settings}

[gateway.tokens.reader]
token = "{READER}"
read = ["news", "news:*", "chat:*"]
write = ["chat:in:*"]

[gateway.tokens.dashboard]
token = "{DASHBOARD}"
read = ["dashboard:*", "switchyard:plugins"]
"#
    )
}

/// A host without plugins whose gateway is configured with `settings`.
async fn start(redis: &RedisServer, settings: &str) -> anyhow::Result<(TestHost, Gateway)> {
    let host = TestHost::start_configured(redis, &config(settings), &[]).await?;
    let gateway = Gateway::of(&host);
    Ok((host, gateway))
}

/// Like [`start`], with `forward` installed.
async fn start_with_forward(
    redis: &RedisServer,
    settings: &str,
) -> anyhow::Result<(TestHost, Gateway)> {
    let host = TestHost::start_configured(
        redis,
        &config(settings),
        &[("forward", plugins::FORWARD, Some(FORWARD_MANIFEST))],
    )
    .await?;
    let gateway = Gateway::of(&host);
    Ok((host, gateway))
}

/// A token signed with [`SECRET`] for `alice`, expiring at `exp`.
fn signed(exp: u64, read: &[&str], write: &[&str]) -> String {
    sign(
        SECRET.as_bytes(),
        &Claims {
            sub: "alice".to_owned(),
            exp,
            read: read.iter().map(|s| (*s).to_owned()).collect(),
            write: write.iter().map(|s| (*s).to_owned()).collect(),
        },
    )
}

/// `path` with `token=` added to its query.
fn with_token(path: &str, token: &str) -> String {
    let separator = if path.contains('?') { '&' } else { '?' };
    format!("{path}{separator}token={token}")
}

/// Subscribers Redis counts for `channel` (`PUBSUB NUMSUB`).
async fn numsub(redis: &RedisServer, channel: &str) -> anyhow::Result<i64> {
    let mut connection = redis.connection().await?;
    let (_, count): (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(channel)
        .query_async(&mut connection)
        .await?;
    Ok(count)
}

/// Asserts that the one-line refusal `(status, content type, body)` is `status`, and plain
/// text: the refused client gets a reason, not a stream.
fn assert_refused(got: &(u16, String, String), status: u16, why: &str, what: &str) {
    let (got_status, content_type, body) = got;
    assert_eq!(*got_status, status, "{what}: {got:?}");
    assert!(
        content_type.starts_with("text/plain"),
        "{what}: a refusal is plain text: {got:?}"
    );
    assert_eq!(body.lines().count(), 1, "{what}: one line: {got:?}");
    assert!(body.contains(why), "{what}: {body:?} should say {why:?}");
}

/// `{"type":"message",...}` as the gateway sends it for a UTF-8 payload.
fn message(channel: &str, pattern: Option<&str>, payload: &str) -> Value {
    json!({"type": "message", "channel": channel, "pattern": pattern, "payload": payload})
}

// ---------------------------------------------------------------------------------------
// Tokens

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_valid_token_are_refused_with_401_and_get_nothing() -> anyhow::Result<()>
{
    let redis = RedisServer::start().await?;
    let (host, gateway) = start(&redis, "").await?;
    let expired = signed(now_secs() - 1, &["news"], &[]);
    let forged = sign(
        b"another-secret-0123456789",
        &Claims {
            sub: "mallory".to_owned(),
            exp: now_secs() + 600,
            read: vec!["*".to_owned()],
            write: vec!["*".to_owned()],
        },
    );

    for path in ["/sse?channel=news", "/ws?channel=news", "/api/plugins"] {
        let no_token = gateway.get(path, &[]).await?;
        assert_refused(
            &no_token,
            401,
            "token is required",
            &format!("{path}, no token"),
        );
        let empty = gateway.get(&with_token(path, ""), &[]).await?;
        assert_refused(&empty, 401, "token is required", &format!("{path}, token="));
        for (label, token) in [("unknown", "not-a-token-0123456789"), ("forged", &forged)] {
            let query = gateway.get(&with_token(path, token), &[]).await?;
            assert_refused(&query, 401, "invalid token", &format!("{path}, {label}"));
            let bearer = format!("Bearer {token}");
            let header = gateway.get(path, &[("Authorization", &bearer)]).await?;
            assert_refused(
                &header,
                401,
                "invalid token",
                &format!("{path}, {label} bearer"),
            );
        }
        let old = gateway.get(&with_token(path, &expired), &[]).await?;
        assert_refused(&old, 401, "expired", &format!("{path}, expired"));
    }
    // A real handshake is refused the same way, before the upgrade.
    for (label, token, why) in [
        ("no token", None, "token is required"),
        ("unknown", Some("not-a-token-0123456789"), "invalid token"),
        ("forged", Some(forged.as_str()), "invalid token"),
        ("expired", Some(expired.as_str()), "expired"),
    ] {
        let path = match token {
            Some(token) => with_token("/ws?channel=news", token),
            None => "/ws?channel=news".to_owned(),
        };
        let refused = gateway.ws_refused(&path, None).await?;
        assert_eq!(refused.status, 401, "{label}: {refused:?}");
        assert!(refused.body.contains(why), "{label}: {refused:?}");
    }

    // Nothing was opened or subscribed for them: a message on news has no receiver.
    assert_eq!(redis.publish("news", "for nobody").await?, 0);
    assert_eq!(numsub(&redis, "news").await?, 0);
    assert_eq!(
        metric(&host, r#"switchyard_gateway_connections{protocol="ws"}"#).await?,
        0.0
    );
    assert_eq!(
        metric(&host, r#"switchyard_gateway_connections{protocol="sse"}"#).await?,
        0.0
    );
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_taken_from_the_query_or_a_bearer_header_static_or_signed() -> anyhow::Result<()>
{
    let redis = RedisServer::start().await?;
    let (host, gateway) = start(&redis, "").await?;
    let alice = signed(now_secs() + 600, &["news"], &[]);

    let mut by_query = gateway
        .sse(&with_token("/sse?channel=news", READER), &[])
        .await?;
    let bearer = format!("Bearer {alice}");
    let mut by_header = gateway
        .sse("/sse?channel=news", &[("Authorization", &bearer)])
        .await?;
    let mut signed_ws = gateway.ws(&with_token("/ws?channel=news", &alice)).await?;
    signed_ws.ready().await?;

    redis.publish("news", "hello").await?;
    let expected = message("news", None, "hello");
    assert_eq!(by_query.message(PATIENCE).await?, expected);
    assert_eq!(by_header.message(PATIENCE).await?, expected);
    assert_eq!(signed_ws.message(PATIENCE).await?, expected);
    signed_ws.close().await?;
    host.stop().await
}

// ---------------------------------------------------------------------------------------
// Origins

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_from_a_foreign_origin_is_refused_with_403_before_the_upgrade() -> anyhow::Result<()>
{
    let redis = RedisServer::start().await?;
    let (host, gateway) = start(&redis, "").await?;
    let path = with_token("/ws?channel=news", READER);
    let other_port = format!("http://127.0.0.1:{}", gateway.addr().port() ^ 1);

    for origin in [
        "https://evil.example",
        "https://app.example.com.evil.example",
        "http://app.example.com",
        other_port.as_str(),
        "null",
    ] {
        let refused = gateway.ws_refused(&path, Some(origin)).await?;
        assert_eq!(refused.status, 403, "{origin}: {refused:?}");
        assert!(refused.body.contains("origin not allowed"), "{refused:?}");
        let sse = gateway
            .get(
                &with_token("/sse?channel=news", READER),
                &[("Origin", origin)],
            )
            .await?;
        assert_refused(&sse, 403, "origin not allowed", origin);
    }
    assert_eq!(numsub(&redis, "news").await?, 0);
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateways_own_origin_a_listed_origin_and_no_origin_are_accepted() -> anyhow::Result<()>
{
    let redis = RedisServer::start().await?;
    let (host, gateway) = start(&redis, "").await?;
    let path = with_token("/ws?channel=news", READER);
    let own = gateway.origin();

    let mut clients = Vec::new();
    for origin in [Some(own.as_str()), Some(ALLOWED_ORIGIN), None] {
        let mut ws = gateway
            .ws_from(&path, origin)
            .await
            .with_context(|| format!("origin {origin:?}"))?;
        ws.ready().await?;
        clients.push(ws);
    }
    let mut sse = gateway
        .sse(
            &with_token("/sse?channel=news", READER),
            &[("Origin", &own)],
        )
        .await?;

    redis.publish("news", "welcome").await?;
    for ws in &mut clients {
        assert_eq!(
            ws.message(PATIENCE).await?,
            message("news", None, "welcome")
        );
    }
    assert_eq!(
        sse.message(PATIENCE).await?,
        message("news", None, "welcome")
    );
    for ws in clients {
        ws.close().await?;
    }
    host.stop().await
}

// ---------------------------------------------------------------------------------------
// Channel grants

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_a_channel_outside_the_read_grants_is_refused_with_403() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let (host, gateway) = start(&redis, "").await?;

    for query in [
        "channel=secret",
        "channel=news&channel=secret",
        "channel=dashboard:summary",
        "channel=newsroom",
    ] {
        let sse = gateway
            .get(&with_token(&format!("/sse?{query}"), READER), &[])
            .await?;
        assert_refused(&sse, 403, "not allowed to read", query);
        let refused = gateway
            .ws_refused(&with_token(&format!("/ws?{query}"), READER), None)
            .await?;
        assert_eq!(refused.status, 403, "{query}: {refused:?}");
        assert!(refused.body.contains("not allowed to read"), "{refused:?}");
    }
    // Nothing was subscribed on the refused clients' behalf, not even the granted channel.
    assert_eq!(numsub(&redis, "news").await?, 0);
    assert_eq!(numsub(&redis, "secret").await?, 0);

    // The grants themselves work: an exact channel matched by a granted pattern.
    let mut sse = gateway
        .sse(&with_token("/sse?channel=news:sports", READER), &[])
        .await?;
    redis.publish("news:sports", "goal").await?;
    assert_eq!(
        sse.message(PATIENCE).await?,
        message("news:sports", None, "goal")
    );
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pattern_subscription_is_allowed_only_when_it_equals_a_read_grant() -> anyhow::Result<()>
{
    let redis = RedisServer::start().await?;
    let (host, gateway) = start(&redis, "").await?;

    // Narrower, wider or merely overlapping patterns are refused (`%3F` is `?`).
    for pattern in ["*", "n*", "news*", "news:s*", "news:%3F", "chat:*:x"] {
        let query = format!("/sse?channel={pattern}");
        let sse = gateway.get(&with_token(&query, READER), &[]).await?;
        assert_refused(&sse, 403, "not allowed to read", pattern);
    }
    let mut ws = gateway.ws(&with_token("/ws", READER)).await?;
    let refused = ws
        .request(json!({"type": "subscribe", "channel": "news:s*", "id": 1}))
        .await?;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["request"], 1);

    // The granted pattern itself is allowed, over both protocols.
    let mut sse = gateway
        .sse(&with_token("/sse?channel=news:*", READER), &[])
        .await?;
    let ok = ws
        .request(json!({"type": "subscribe", "channel": "news:*", "id": 2}))
        .await?;
    assert_eq!(ok, json!({"type": "ok", "request": 2}));
    redis.publish("news:sports", "goal").await?;
    let expected = message("news:sports", Some("news:*"), "goal");
    assert_eq!(sse.message(PATIENCE).await?, expected);
    assert_eq!(ws.message(PATIENCE).await?, expected);
    ws.close().await?;
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribing_to_an_ungranted_channel_over_websocket_gets_an_error_frame_and_the_connection_stays_usable()
-> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let (host, gateway) = start(&redis, "").await?;
    let mut ws = gateway.ws(&with_token("/ws?channel=news", READER)).await?;

    let refused = ws
        .request(json!({"type": "subscribe", "channel": "secret", "id": 7}))
        .await?;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["request"], 7);
    assert!(
        refused["error"]
            .as_str()
            .is_some_and(|e| e.contains("not allowed to read secret")),
        "{refused}"
    );
    assert_eq!(numsub(&redis, "secret").await?, 0);

    // Still connected, still subscribed, and still taking requests.
    let ok = ws
        .request(json!({"type": "subscribe", "channel": "news:sports", "id": 8}))
        .await?;
    assert_eq!(ok, json!({"type": "ok", "request": 8}));
    redis.publish("secret", "classified").await?;
    redis.publish("news", "first").await?;
    redis.publish("news:sports", "second").await?;
    // Order is kept per channel; messages of two channels may interleave either way.
    let mut got = vec![ws.message(PATIENCE).await?, ws.message(PATIENCE).await?];
    got.sort_by_key(|m| m["payload"].as_str().unwrap_or_default().to_owned());
    assert_eq!(
        got,
        [
            message("news", None, "first"),
            message("news:sports", None, "second")
        ]
    );

    // Unsubscribing stops the deliveries, and the Redis subscription with them.
    let ok = ws
        .request(json!({"type": "unsubscribe", "channel": "news:sports", "id": 9}))
        .await?;
    assert_eq!(ok, json!({"type": "ok", "request": 9}));
    assert_eq!(numsub(&redis, "news:sports").await?, 0);
    redis.publish("news:sports", "unseen").await?;
    redis.publish("news", "third").await?;
    assert_eq!(ws.message(PATIENCE).await?, message("news", None, "third"));
    ws.close().await?;
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_outside_the_write_grants_is_refused_and_nothing_reaches_redis()
-> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let (host, gateway) = start(&redis, "").await?;
    let mut seen = Subscriber::new(&redis, &[], &["chat*", "news*"]).await?;
    let mut ws = gateway.ws(&with_token("/ws", READER)).await?;

    for (id, channel) in [
        (1, "chat:lobby"),
        (2, "chat:in"),
        (3, "news"),
        (4, "switchyard:barrier"),
    ] {
        let refused = ws
            .request(json!({"type": "publish", "channel": channel, "payload": "spoof", "id": id}))
            .await?;
        assert_eq!(refused["type"], "error", "{channel}: {refused}");
        assert_eq!(refused["request"], id);
        assert!(
            refused["error"]
                .as_str()
                .is_some_and(|e| e.contains("not allowed to publish")),
            "{refused}"
        );
    }
    // A dashboard token writes nothing at all.
    let mut dashboard = gateway.ws(&with_token("/ws", DASHBOARD)).await?;
    let refused = dashboard
        .request(json!({"type": "publish", "channel": "chat:in:lobby", "payload": "x", "id": 5}))
        .await?;
    assert_eq!(refused["type"], "error", "{refused}");

    let ok = ws
        .request(
            json!({"type": "publish", "channel": "chat:in:lobby", "payload": "hi all", "id": 6}),
        )
        .await?;
    assert_eq!(ok, json!({"type": "ok", "request": 6}));

    // Redis saw exactly the granted publish: had any refused one got through, it would have
    // come first.
    let got = seen.next(PATIENCE).await?;
    assert_eq!(got.channel_str(), "chat:in:lobby");
    assert_eq!(got.payload_str(), "hi all");
    assert_eq!(seen.drain_for(QUIET).await, vec![]);
    ws.close().await?;
    dashboard.close().await?;
    host.stop().await
}

// ---------------------------------------------------------------------------------------
// Messages

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_and_sse_clients_both_receive_a_published_message_as_json() -> anyhow::Result<()>
{
    let redis = RedisServer::start().await?;
    let (host, gateway) = start(&redis, "").await?;
    let mut ws = gateway.ws(&with_token("/ws?channel=news", READER)).await?;
    ws.ready().await?;
    let mut sse = gateway
        .sse(&with_token("/sse?channel=news", READER), &[])
        .await?;

    for payload in ["breaking", "", "ünïcödé ✓", r#"{"nested":"json"}"#] {
        redis.publish("news", payload).await?;
    }
    for payload in ["breaking", "", "ünïcödé ✓", r#"{"nested":"json"}"#] {
        let expected = message("news", None, payload);
        assert_eq!(ws.message(PATIENCE).await?, expected);
        let event = sse.event(PATIENCE).await?;
        assert_eq!(event.event, "message");
        let data: Value = serde_json::from_str(&event.data)?;
        assert_eq!(data["channel"], "news");
        assert_eq!(data["pattern"], Value::Null);
        assert_eq!(data["payload"], payload);
        assert!(data.get("payload_base64").is_none(), "{data}");
    }
    assert_eq!(
        metric(
            &host,
            r#"switchyard_gateway_messages_total{direction="out"}"#
        )
        .await?,
        8.0
    );
    ws.close().await?;
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pattern_subscription_delivers_each_message_with_its_pattern() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let (host, gateway) = start(&redis, "").await?;
    let mut ws = gateway
        .ws(&with_token("/ws?channel=news:*", READER))
        .await?;
    ws.ready().await?;
    let mut sse = gateway
        .sse(&with_token("/sse?channel=news:*&channel=news", READER), &[])
        .await?;

    redis.publish("news:sports", "goal").await?;
    redis.publish("news:weather", "rain").await?;
    redis.publish("news", "headline").await?;

    assert_eq!(
        ws.message(PATIENCE).await?,
        message("news:sports", Some("news:*"), "goal")
    );
    assert_eq!(
        ws.message(PATIENCE).await?,
        message("news:weather", Some("news:*"), "rain")
    );
    assert_eq!(
        sse.message(PATIENCE).await?,
        message("news:sports", Some("news:*"), "goal")
    );
    assert_eq!(
        sse.message(PATIENCE).await?,
        message("news:weather", Some("news:*"), "rain")
    );
    // The SSE client also watches the exact channel, delivered without a pattern.
    assert_eq!(
        sse.message(PATIENCE).await?,
        message("news", None, "headline")
    );
    ws.close().await?;
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_that_is_not_utf8_also_comes_as_payload_base64() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let (host, gateway) = start(&redis, "").await?;
    let mut ws = gateway.ws(&with_token("/ws?channel=news", READER)).await?;
    ws.ready().await?;
    let mut sse = gateway
        .sse(&with_token("/sse?channel=news", READER), &[])
        .await?;

    redis
        .publish("news", [0xff_u8, 0xfe, b'h', b'i', 0x00].as_slice())
        .await?;
    let expected = json!({
        "type": "message",
        "channel": "news",
        "pattern": null,
        "payload": "\u{fffd}\u{fffd}hi\u{0}",
        "payload_base64": "//5oaQA=",
    });
    assert_eq!(ws.message(PATIENCE).await?, expected);
    let data = sse.message(PATIENCE).await?;
    assert_eq!(data["payload_base64"], "//5oaQA=", "{data}");
    assert_eq!(data["payload"], "\u{fffd}\u{fffd}hi\u{0}", "{data}");
    ws.close().await?;
    host.stop().await
}

// ---------------------------------------------------------------------------------------
// Shared subscriptions

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_watching_one_channel_share_one_redis_subscription() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let (host, gateway) = start(&redis, "").await?;
    let subscriptions = "switchyard_gateway_subscriptions";
    assert_eq!(metric(&host, subscriptions).await?, 0.0);

    let mut sockets = Vec::new();
    for _ in 0..3 {
        let mut ws = gateway.ws(&with_token("/ws?channel=news", READER)).await?;
        ws.ready().await?;
        sockets.push(ws);
    }
    let mut streams = Vec::new();
    for _ in 0..2 {
        streams.push(
            gateway
                .sse(&with_token("/sse?channel=news", READER), &[])
                .await?,
        );
    }
    assert_eq!(numsub(&redis, "news").await?, 1, "the gateway's connection");
    assert_eq!(metric(&host, subscriptions).await?, 1.0);
    assert_eq!(
        metric(&host, r#"switchyard_gateway_connections{protocol="ws"}"#).await?,
        3.0
    );
    assert_eq!(
        metric(&host, r#"switchyard_gateway_connections{protocol="sse"}"#).await?,
        2.0
    );

    // One PUBLISH, one receiver on Redis, five deliveries; each client gets it once.
    assert_eq!(redis.publish("news", "one").await?, 1);
    redis.publish("news", "two").await?;
    for ws in &mut sockets {
        assert_eq!(ws.message(PATIENCE).await?, message("news", None, "one"));
        assert_eq!(ws.message(PATIENCE).await?, message("news", None, "two"));
    }
    for sse in &mut streams {
        assert_eq!(sse.message(PATIENCE).await?, message("news", None, "one"));
        assert_eq!(sse.message(PATIENCE).await?, message("news", None, "two"));
    }

    // The subscription stays while anyone watches, and goes with the last one.
    let last = sockets.pop().context("three sockets")?;
    for ws in sockets {
        ws.close().await?;
    }
    drop(streams);
    eventually(PATIENCE, || async {
        let ws = metric(&host, r#"switchyard_gateway_connections{protocol="ws"}"#).await?;
        let sse = metric(&host, r#"switchyard_gateway_connections{protocol="sse"}"#).await?;
        anyhow::ensure!(ws == 1.0 && sse == 0.0, "ws {ws}, sse {sse}");
        Ok(())
    })
    .await?;
    assert_eq!(numsub(&redis, "news").await?, 1);
    assert_eq!(metric(&host, subscriptions).await?, 1.0);

    last.close().await?;
    eventually(PATIENCE, || async {
        let redis_count = numsub(&redis, "news").await?;
        let gauge = metric(&host, subscriptions).await?;
        anyhow::ensure!(
            redis_count == 0 && gauge == 0.0,
            "NUMSUB {redis_count}, gauge {gauge}"
        );
        Ok(())
    })
    .await?;
    assert_eq!(redis.publish("news", "nobody left").await?, 0);
    host.stop().await
}

// ---------------------------------------------------------------------------------------
// Limits

/// A publish frame for `chat:in:lobby` exactly `size` bytes long.
fn publish_frame_of(size: usize) -> String {
    let frame = |payload: &str| {
        json!({"type": "publish", "channel": "chat:in:lobby", "payload": payload, "id": 1})
            .to_string()
    };
    let overhead = frame("").len();
    let text = frame(&"x".repeat(size - overhead));
    assert_eq!(text.len(), size);
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_over_max_message_bytes_closes_the_connection_with_1009() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let (host, gateway) = start(&redis, "max_message_bytes = 1024").await?;
    let mut seen = Subscriber::new(&redis, &["chat:in:lobby"], &[]).await?;
    let path = with_token("/ws", READER);

    // At the limit: carried out.
    let mut ws = gateway.ws(&path).await?;
    let at_limit = publish_frame_of(1024);
    ws.send_text(at_limit.clone()).await?;
    assert_eq!(
        ws.json(PATIENCE).await?,
        json!({"type": "ok", "request": 1})
    );
    let published: Value = serde_json::from_str(&at_limit)?;
    assert_eq!(
        seen.next(PATIENCE).await?.payload_str(),
        published["payload"].as_str().context("a payload")?
    );

    // One byte over, or far over: closed with 1009, and not published.
    for size in [1025, 100_000] {
        let mut ws = gateway.ws(&path).await?;
        ws.send_text(publish_frame_of(size)).await?;
        match ws.frame(PATIENCE).await? {
            Frame::Close(code, _) => assert_eq!(code, 1009, "{size} bytes"),
            other => panic!("{size} bytes: expected a close, got {other:?}"),
        }
    }
    assert_eq!(seen.drain_for(QUIET).await, vec![]);
    ws.close().await?;
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_rate_limit_are_refused_and_ten_refusals_in_a_row_close_with_1008()
-> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let (host, gateway) = start(&redis, "max_messages_per_sec = 2").await?;
    let mut ws = gateway.ws(&with_token("/ws", READER)).await?;

    let mut answers = Vec::new();
    let end = loop {
        anyhow::ensure!(answers.len() < 50, "never closed: {answers:?}");
        let id = answers.len();
        ws.send(&json!({"type": "subscribe", "channel": "news", "id": id}))
            .await?;
        match ws.frame(PATIENCE).await? {
            Frame::Json(answer) => answers.push(answer),
            end => break end,
        }
    };
    let Frame::Close(code, reason) = end else {
        panic!("expected a close after {answers:?}, got {end:?}");
    };
    assert_eq!(code, 1008, "{reason}");

    let rate_limited =
        |answer: &Value| answer["type"] == "error" && answer["error"] == "rate limit";
    // The burst (twice the rate) passes.
    let first_refusal = answers
        .iter()
        .position(rate_limited)
        .with_context(|| format!("never rate limited: {answers:?}"))?;
    assert!(first_refusal >= 4, "{answers:?}");
    for (id, answer) in answers[..first_refusal].iter().enumerate() {
        assert_eq!(*answer, json!({"type": "ok", "request": id}));
    }
    // Nine error frames, and the tenth refusal in a row closes (should a token trickle in on
    // a slow machine, the run restarts after the request it lets through).
    let run = answers.iter().rev().take_while(|a| rate_limited(a)).count();
    assert_eq!(run, 9, "{answers:?}");
    assert!(metric(&host, r#"switchyard_gateway_denied_total{reason="rate"}"#).await? >= 10.0);
    host.stop().await
}

// ---------------------------------------------------------------------------------------
// Slow clients

/// Messages published past a stuck client: with 1 KiB each, far more than the kernel's
/// socket buffers hold, so the gateway cannot hand them all over.
const FLOOD: usize = 20_000;
/// Messages published at a time: half the rings' 16 slots, so a client that reads never
/// falls behind.
const BATCH: usize = 8;

/// The `i`th flood message: its number and padding, 1 KiB.
fn numbered(i: usize) -> String {
    format!("{i:06}:{}", "x".repeat(1024 - 7))
}

/// The number of a flood message.
fn number_of(message: &Value) -> anyhow::Result<usize> {
    let payload = message["payload"].as_str().context("a text payload")?;
    anyhow::ensure!(payload.len() == 1024, "payload of {} bytes", payload.len());
    Ok(payload[..6].parse()?)
}

/// Publishes [`FLOOD`] numbered messages on `news`, each batch once `reader` has received
/// the previous one, and checks that it receives every one, in order.
async fn flood(redis: &RedisServer, reader: &mut Ws) -> anyhow::Result<()> {
    let mut connection = redis.connection().await?;
    for start in (0..FLOOD).step_by(BATCH) {
        let batch = start..(start + BATCH).min(FLOOD);
        let mut pipe = redis::pipe();
        for i in batch.clone() {
            pipe.cmd("PUBLISH").arg("news").arg(numbered(i)).ignore();
        }
        pipe.query_async::<()>(&mut connection).await?;
        for i in batch {
            let got = reader
                .json(PATIENCE)
                .await
                .with_context(|| format!("the reading client waiting for message {i}"))?;
            anyhow::ensure!(
                got["type"] == "message" && number_of(&got)? == i,
                "the reading client expected message {i}, got {}",
                got.to_string().chars().take(120).collect::<String>()
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_loses_messages_and_is_told_while_the_others_and_plugins_get_every_one()
-> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let (host, gateway) = start_with_forward(&redis, "client_buffer = 16").await?;
    let path = with_token("/ws?channel=news", READER);
    // The slow client is kept, but not read until the flood is over.
    let mut slow = gateway.ws(&path).await?;
    slow.ready().await?;
    let mut reader = gateway.ws(&path).await?;
    reader.ready().await?;

    flood(&redis, &mut reader).await?;
    // Plugins are not held up by a stuck browser either.
    assert_forwards(&redis, "while a browser is stuck").await?;

    // Now the slow client reads: what it got, in order, and how many it was told it lost.
    let mut got = Vec::new();
    let mut told = 0;
    while got.last() != Some(&(FLOOD - 1)) {
        let frame = slow
            .json(PATIENCE)
            .await
            .with_context(|| format!("the slow client after {} messages", got.len()))?;
        match frame["type"].as_str() {
            Some("message") => got.push(number_of(&frame)?),
            Some("dropped") => told += frame["dropped"].as_u64().context("a count")? as usize,
            _ => panic!("unexpected frame {frame}"),
        }
    }
    assert!(told > 0, "the slow client was never told it lost messages");
    assert_eq!(got.len() + told, FLOOD, "received + dropped");
    assert!(got.windows(2).all(|w| w[0] < w[1]), "in order");
    assert_eq!(
        metric(&host, "switchyard_gateway_dropped_total").await?,
        told as f64
    );
    assert_eq!(
        metric(&host, "switchyard_gateway_slow_disconnects_total").await?,
        0.0
    );

    // Both carry on.
    redis.publish("news", "after").await?;
    assert_eq!(
        reader.message(PATIENCE).await?,
        message("news", None, "after")
    );
    assert_eq!(
        slow.message(PATIENCE).await?,
        message("news", None, "after")
    );
    slow.close().await?;
    reader.close().await?;
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_slow_clients_disconnect_a_slow_client_is_closed_with_1008() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let settings = "client_buffer = 16\nslow_clients = \"disconnect\"";
    let (host, gateway) = start_with_forward(&redis, settings).await?;
    let path = with_token("/ws?channel=news", READER);
    let mut slow = gateway.ws(&path).await?;
    slow.ready().await?;
    let mut reader = gateway.ws(&path).await?;
    reader.ready().await?;

    flood(&redis, &mut reader).await?;
    assert_forwards(&redis, "while a browser is stuck").await?;

    let (frames, end) = slow.until_closed(PATIENCE).await?;
    assert!(
        matches!(&end, Frame::Close(1008, reason) if reason == "too slow"),
        "{end:?}"
    );
    assert!(frames.len() < FLOOD, "it cannot have got everything");
    let numbers = frames
        .iter()
        .map(number_of)
        .collect::<anyhow::Result<Vec<_>>>()?;
    assert_eq!(numbers.first(), Some(&0));
    assert!(
        numbers.windows(2).all(|w| w[0] + 1 == w[1]),
        "no gap before the close"
    );
    assert_eq!(
        metric(&host, "switchyard_gateway_slow_disconnects_total").await?,
        1.0
    );
    assert!(metric(&host, "switchyard_gateway_dropped_total").await? > 0.0);

    // The reader keeps its subscription.
    redis.publish("news", "after").await?;
    assert_eq!(
        reader.message(PATIENCE).await?,
        message("news", None, "after")
    );
    assert_eq!(numsub(&redis, "news").await?, 1);
    reader.close().await?;
    host.stop().await
}

// ---------------------------------------------------------------------------------------
// The plugin list

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plugin_list_is_served_only_to_tokens_that_may_read_switchyard_plugins()
-> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let (host, gateway) = start_with_forward(&redis, "").await?;

    let bearer = format!("Bearer {DASHBOARD}");
    for (path, headers) in [
        (with_token("/api/plugins", DASHBOARD), vec![]),
        (
            "/api/plugins".to_owned(),
            vec![("Authorization", bearer.as_str())],
        ),
    ] {
        let (status, content_type, body) = gateway.get(&path, &headers).await?;
        assert_eq!(status, 200, "{body}");
        assert!(
            content_type.starts_with("application/json"),
            "{content_type}"
        );
        let list: Value = serde_json::from_str(&body)?;
        let list = list.as_array().context("a JSON array")?;
        assert_eq!(list.len(), 1, "{body}");
        assert_eq!(list[0]["name"], "forward");
        assert_eq!(list[0]["state"], "running");
        let admin = host
            .plugin("forward")
            .await?
            .context("admin lists forward")?;
        assert_eq!(list[0]["version"], admin["version"]);
    }

    let refused = gateway
        .get(&with_token("/api/plugins", READER), &[])
        .await?;
    assert_refused(
        &refused,
        403,
        "not allowed to read switchyard:plugins",
        "reader",
    );
    let chat_user = signed(now_secs() + 600, &["chat:*"], &["chat:in:*"]);
    let refused = gateway
        .get(&with_token("/api/plugins", &chat_user), &[])
        .await?;
    assert_refused(&refused, 403, "switchyard:plugins", "chat user");
    let wide = signed(now_secs() + 600, &["switchyard:*"], &[]);
    let (status, _, _) = gateway.get(&with_token("/api/plugins", &wide), &[]).await?;
    assert_eq!(status, 200, "a grant matching switchyard:plugins");
    host.stop().await
}

// ---------------------------------------------------------------------------------------
// Refusals on /metrics

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_counted_by_reason() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let (host, gateway) =
        start(&redis, "max_message_bytes = 1024\nmax_messages_per_sec = 2").await?;
    let denied = |reason: &str| format!(r#"switchyard_gateway_denied_total{{reason="{reason}"}}"#);
    let counts = || async {
        let mut counts = Vec::new();
        for reason in ["token", "origin", "channel", "rate", "size", "capacity"] {
            counts.push((reason, metric(&host, &denied(reason)).await?));
        }
        anyhow::Ok(counts)
    };
    assert!(counts().await?.iter().all(|(_, n)| *n == 0.0));

    // token: none, and a bad one.
    gateway.get("/sse?channel=news", &[]).await?;
    gateway
        .ws_refused("/ws?channel=news&token=not-a-token-0123456789", None)
        .await?;
    // origin
    gateway
        .ws_refused(&with_token("/ws", READER), Some("https://evil.example"))
        .await?;
    // channel: reading, publishing, and the plugin list.
    gateway
        .get(&with_token("/sse?channel=secret", READER), &[])
        .await?;
    let mut ws = gateway.ws(&with_token("/ws", READER)).await?;
    let refused = ws
        .request(json!({"type": "publish", "channel": "chat:lobby", "payload": "x", "id": 1}))
        .await?;
    assert_eq!(refused["type"], "error");
    gateway
        .get(&with_token("/api/plugins", READER), &[])
        .await?;
    // rate: requests until the first refusal (the burst is 4, and that connection made one
    // request already).
    let mut passed = 0;
    loop {
        let answer = ws
            .request(json!({"type": "unsubscribe", "channel": "news"}))
            .await?;
        if answer["error"] == "rate limit" {
            break;
        }
        passed += 1;
        anyhow::ensure!(passed < 20, "never rate limited: {answer}");
    }
    ws.close().await?;
    // size
    let mut big = gateway.ws(&with_token("/ws", READER)).await?;
    big.send_text(publish_frame_of(1500)).await?;
    assert!(matches!(big.frame(PATIENCE).await?, Frame::Close(1009, _)));
    // A client that vanishes without a close frame is not a refusal of any kind.
    let mut gone = gateway.ws(&with_token("/ws?channel=news", READER)).await?;
    gone.ready().await?;
    drop(gone);
    eventually(PATIENCE, || async {
        let open = metric(&host, r#"switchyard_gateway_connections{protocol="ws"}"#).await?;
        anyhow::ensure!(open == 0.0, "{open} open");
        Ok(())
    })
    .await?;

    assert_eq!(
        counts().await?,
        vec![
            ("token", 2.0),
            ("origin", 1.0),
            ("channel", 3.0),
            ("rate", 1.0),
            ("size", 1.0),
            ("capacity", 0.0),
        ]
    );
    host.stop().await
}
