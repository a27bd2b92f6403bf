//! The four scenarios users build on Redis pub/sub, with the example plugins, real Redis
//! clients as publisher and observer, and a real HTTP server for webhooks. Plus the
//! capability rules every scenario relies on: deny by default, grants, the loop guard.

use std::time::Duration;

use anyhow::bail;
use serde_json::{Value, json};
use switchyard_tests::webhook::Webhook;
use switchyard_tests::{
    NOTIFY_MANIFEST, PATIENCE, RedisServer, Subscriber, TestHost, assert_forwards, echo_manifest,
    eventually, plugins,
};

const CHAT_MANIFEST: &str = include_str!("../../plugins/chat-moderator/chat-moderator.toml");
const CACHE_MANIFEST: &str = include_str!("../../plugins/cache-invalidator/cache-invalidator.toml");
/// The manifest that turns cache-invalidator's keyspace mode on, for `db:user:*`.
const CACHE_KEYSPACE_MANIFEST: &str =
    include_str!("../../plugins/cache-invalidator/keyspace/cache-invalidator.toml");

fn json_of(received: &switchyard_tests::Received) -> Value {
    serde_json::from_slice(&received.payload).unwrap_or(Value::Null)
}

async fn exists(redis: &RedisServer, key: &str) -> anyhow::Result<bool> {
    let mut connection = redis.connection().await?;
    let n: i64 = redis::cmd("EXISTS")
        .arg(key)
        .query_async(&mut connection)
        .await?;
    Ok(n == 1)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_reach_every_kind_of_output_and_bad_ones_are_dead_lettered()
-> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let other_redis = RedisServer::start().await?;
    let gateway = Webhook::start().await?;
    let sms_log = tempfile::tempdir()?;
    let sms_path = sms_log.path().join("sms.jsonl");
    // email: a webhook with a header from the environment; sms: a file; push: another Redis.
    // SAFETY: set once, before the host reads its configuration.
    unsafe { std::env::set_var("SWITCHYARD_TEST_GATEWAY_TOKEN", "s3cret") };
    let config = format!(
        r#"
[outputs.email]
kind = "http"
url = "{}"
headers = {{ Authorization = "Bearer ${{SWITCHYARD_TEST_GATEWAY_TOKEN}}" }}

[outputs.sms]
kind = "file"
path = "{}"

[outputs.push]
kind = "redis"
url = "{}"
channel = "push:outbox"
"#,
        gateway.url("/email"),
        sms_path.display(),
        other_redis.url()
    );
    let host = TestHost::start_configured(
        &redis,
        &config,
        &[(
            "notify-router",
            plugins::NOTIFY_ROUTER,
            Some(NOTIFY_MANIFEST),
        )],
    )
    .await?;
    let mut dead = Subscriber::new(&redis, &["notifications:dead"], &[]).await?;
    let mut push_outbox = Subscriber::new(&other_redis, &["push:outbox"], &[]).await?;

    let email = json!({"to": "ana@example.com", "subject": "Welcome", "body": "Hi"});
    let sms = json!({"phone": "+15550100", "message": "code 4711"});
    let push = json!({"device_id": "ios-42"});
    redis
        .publish("notifications:email", email.to_string())
        .await?;
    redis.publish("notifications:sms", sms.to_string()).await?;
    redis
        .publish("notifications:push", push.to_string())
        .await?;
    redis
        .publish("notifications:email", r#"{"to":"x@example.com"}"#)
        .await?;
    redis.publish("notifications:sms", "not json").await?;
    redis
        .publish("notifications:push", r#"{"device_id":""}"#)
        .await?;

    let requests = gateway.wait_for(1, PATIENCE).await?;
    assert_eq!(requests[0].method, "POST");
    assert_eq!(requests[0].path, "/email");
    assert_eq!(requests[0].json(), email);
    assert_eq!(requests[0].headers["authorization"], "Bearer s3cret");

    let pushed = push_outbox.take(1, PATIENCE).await?;
    assert_eq!(json_of(&pushed[0]), push);

    let dead_letters: Vec<Value> = dead.take(3, PATIENCE).await?.iter().map(json_of).collect();
    assert_eq!(dead_letters[0]["channel"], "notifications:email");
    assert_eq!(dead_letters[0]["reason"], r#"missing field "subject""#);
    assert_eq!(dead_letters[1]["channel"], "notifications:sms");
    assert_eq!(dead_letters[1]["reason"], "payload is not valid JSON");
    assert_eq!(dead_letters[2]["payload"], r#"{"device_id":""}"#);

    let line = eventually(PATIENCE, || async {
        match std::fs::read_to_string(&sms_path) {
            Ok(text) if !text.is_empty() => Ok(text),
            _ => bail!("nothing appended to {} yet", sms_path.display()),
        }
    })
    .await?;
    let entry: Value = serde_json::from_str(line.trim())?;
    assert_eq!(entry, json!({"plugin": "notify-router", "payload": sms}));

    // Exactly one request: the invalid email never reached the gateway.
    assert!(dead.drain_for(Duration::from_millis(200)).await.is_empty());
    assert_eq!(gateway.requests().len(), 1);
    let (_, listing) = host.get("/plugins").await?;
    let email_output = listing["outputs"]
        .as_array()
        .and_then(|o| o.iter().find(|o| o["name"] == "email").cloned())
        .unwrap_or_default();
    assert_eq!(email_output["calls"], 1);
    assert_eq!(email_output["errors"], 0);
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_5xx_answers_are_retried_with_backoff() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let gateway = Webhook::failing_first(2).await?;
    let host = TestHost::with_notify_router(
        &redis,
        &gateway.url("/email"),
        "retries = 3\nbackoff_ms = 20",
        5000,
    )
    .await?;
    let mut dead = Subscriber::new(&redis, &["notifications:dead"], &[]).await?;

    redis
        .publish("notifications:email", r#"{"to":"a@b.c","subject":"s"}"#)
        .await?;
    let requests = gateway.wait_for(3, PATIENCE).await?;
    assert!(requests.iter().all(|r| r.path == "/email"));
    host.wait_plugin("notify-router", "done", |p| p["stats"]["handled"] == 1)
        .await?;
    assert_eq!(gateway.requests().len(), 3, "two 503s, then one success");
    assert!(dead.drain_for(Duration::from_millis(200)).await.is_empty());
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_without_a_grant_is_denied_and_counted() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let gateway = Webhook::start().await?;
    let config = format!(
        "[outputs.email]\nkind = \"http\"\nurl = \"{0}\"\n[outputs.push]\nkind = \"http\"\nurl = \"{0}\"\n",
        gateway.url("/hook")
    );
    // Granted the dead-letter channel and email, not push.
    let manifest = "[grants]\npublish = [\"notifications:dead\"]\noutputs = [\"email\"]\n";
    let host = TestHost::start_configured(
        &redis,
        &config,
        &[("notify-router", plugins::NOTIFY_ROUTER, Some(manifest))],
    )
    .await?;
    let mut dead = Subscriber::new(&redis, &["notifications:dead"], &[]).await?;

    redis
        .publish("notifications:push", r#"{"device_id":"d1"}"#)
        .await?;
    let letter = json_of(&dead.take(1, PATIENCE).await?[0]);
    let reason = letter["reason"].as_str().unwrap_or_default();
    assert!(reason.contains(r#"no grant for output "push""#), "{reason}");
    let entry = host
        .wait_plugin("notify-router", "counted", |p| p["stats"]["failed"] == 1)
        .await?;
    assert_eq!(entry["stats"]["denied"], 1);
    assert!(
        gateway.requests().is_empty(),
        "a denied call reached the gateway"
    );
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_invalidator_deletes_keys_and_broadcasts_the_invalidation() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let host = TestHost::start(
        &redis,
        &[(
            "cache-invalidator",
            plugins::CACHE_INVALIDATOR,
            Some(CACHE_MANIFEST),
        )],
    )
    .await?;
    for key in [
        "cache:user:42",
        "cache:user:42:avatar",
        "cache:user:7",
        "session:9",
    ] {
        set(&redis, key).await?;
    }
    let mut notices = Subscriber::new(&redis, &["cache:invalidate"], &[]).await?;

    redis
        .publish(
            "events:user.updated",
            r#"{"entity":"user","id":42,"keys":["cache:user:42:avatar"]}"#,
        )
        .await?;
    let notice = json_of(&notices.take(1, PATIENCE).await?[0]);
    assert_eq!(
        notice,
        json!({"keys": ["cache:user:42", "cache:user:42:avatar"], "source": "cache-invalidator"})
    );
    assert!(!exists(&redis, "cache:user:42").await?);
    assert!(!exists(&redis, "cache:user:42:avatar").await?);

    // A key outside the grant refuses the whole call: nothing is deleted or announced.
    redis
        .publish(
            "events:user.updated",
            r#"{"entity":"user","id":7,"keys":["session:9"]}"#,
        )
        .await?;
    let entry = host
        .wait_plugin("cache-invalidator", "the denied message to fail", |p| {
            p["stats"]["failed"] == 1
        })
        .await?;
    assert_eq!(entry["stats"]["denied"], 1);
    assert!(
        entry["stats"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains(r#"no invalidate grant for key "session:9""#)),
        "the error names the key outside the grant: {entry}"
    );
    assert!(exists(&redis, "cache:user:7").await?);
    assert!(exists(&redis, "session:9").await?);
    assert!(
        notices
            .drain_for(Duration::from_millis(200))
            .await
            .is_empty()
    );
    host.stop().await
}

/// Runs one command on `redis`.
async fn command(redis: &RedisServer, args: &[&str]) -> anyhow::Result<()> {
    let mut connection = redis.connection().await?;
    let mut command = redis::cmd(args[0]);
    for arg in &args[1..] {
        command.arg(*arg);
    }
    command.exec_async(&mut connection).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_invalidator_invalidates_on_writes_to_source_keys_without_a_publish()
-> anyhow::Result<()> {
    // The flags the manifest's events need, and no more: the host is ready only if they do.
    let redis = RedisServer::start_with(&["--notify-keyspace-events", "Kg$hxe"]).await?;
    // Source keys written before the host listens: only later writes count.
    command(&redis, &["HSET", "db:user:44", "name", "Cy"]).await?;
    command(&redis, &["SET", "db:user:45", r#"{"name":"Di"}"#]).await?;
    let host = TestHost::start(
        &redis,
        &[(
            "cache-invalidator",
            plugins::CACHE_INVALIDATOR,
            Some(CACHE_KEYSPACE_MANIFEST),
        )],
    )
    .await?;
    for n in 42..=45 {
        set(&redis, &format!("cache:user:{n}")).await?;
    }
    set(&redis, "cache:order:1").await?;
    let mut notices = Subscriber::new(&redis, &["cache:invalidate"], &[]).await?;

    // Each write to a db:user: key, with no publish, deletes its cache key and is announced,
    // one at a time: the cache keys of later writes are still there.
    let writes: [(&[&str], u32); 4] = [
        (&["HSET", "db:user:42", "name", "Ana"], 42),
        (&["SET", "db:user:43", r#"{"name":"Bo"}"#], 43),
        (&["DEL", "db:user:44"], 44),
        // `expire` is not among the manifest's events: only `expired`, once the key is gone.
        (&["PEXPIRE", "db:user:45", "50"], 45),
    ];
    for (write, n) in writes {
        command(&redis, write).await?;
        let notice = json_of(&notices.take(1, PATIENCE).await?[0]);
        let key = format!("cache:user:{n}");
        assert_eq!(
            notice,
            json!({"keys": [key], "source": "cache-invalidator"}),
            "after {write:?}"
        );
        assert!(!exists(&redis, &key).await?, "{key} after {write:?}");
        for later in n + 1..=45 {
            assert!(exists(&redis, &format!("cache:user:{later}")).await?);
        }
    }
    // The source keys are the application's: the grant covers cache:* only.
    assert!(exists(&redis, "db:user:42").await?);
    assert!(exists(&redis, "db:user:43").await?);

    // A key outside db:user:* is not listened to; the events:* mode works beside.
    command(&redis, &["SET", "db:order:1", "x"]).await?;
    redis
        .publish("events:order.paid", r#"{"entity":"order","id":1}"#)
        .await?;
    let notice = json_of(&notices.take(1, PATIENCE).await?[0]);
    assert_eq!(
        notice,
        json!({"keys": ["cache:order:1"], "source": "cache-invalidator"})
    );
    assert!(
        notices
            .drain_for(Duration::from_millis(300))
            .await
            .is_empty(),
        "an event was handled twice, or one the manifest does not list was"
    );
    let entry = host
        .wait_plugin("cache-invalidator", "five handled messages", |p| {
            p["stats"]["handled"] == 5
        })
        .await?;
    assert_eq!(entry["stats"]["failed"], 0, "{entry}");
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_moderator_masks_drops_and_rebroadcasts() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let host = TestHost::start(
        &redis,
        &[(
            "chat-moderator",
            plugins::CHAT_MODERATOR,
            Some(CHAT_MANIFEST),
        )],
    )
    .await?;
    let mut room = Subscriber::new(&redis, &["chat:lobby"], &[]).await?;
    let mut notices = Subscriber::new(&redis, &["chat:notice:lobby"], &[]).await?;
    let before_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;

    for message in [
        json!({"user_id": "ana", "message": "hello"}),
        json!({"user_id": "troll42", "message": "buy now"}),
        json!({"user_id": "bob", "message": "x".repeat(281)}),
        json!({"user_id": 7, "message": "no SPAM here, spammer"}),
    ] {
        redis.publish("chat:in:lobby", message.to_string()).await?;
    }
    let got: Vec<Value> = room.take(2, PATIENCE).await?.iter().map(json_of).collect();
    assert_eq!(got[0]["user_id"], "ana");
    assert_eq!(got[0]["message"], "hello");
    assert_eq!(got[0]["moderated"], false);
    assert_eq!(got[1]["user_id"], "7");
    assert_eq!(got[1]["message"], "no **** here, spammer");
    assert_eq!(got[1]["moderated"], true);
    assert_eq!(got[1]["room"], "lobby");
    let ts = got[1]["ts"].as_u64().unwrap_or_default();
    assert!(
        ts >= before_ms && ts < before_ms + 60_000,
        "ts {ts} is not the server time"
    );
    // The muted and the oversize message each produce a notice, in order, keys alphabetical.
    let noticed: Vec<String> = notices
        .take(2, PATIENCE)
        .await?
        .iter()
        .map(|received| received.payload_str())
        .collect();
    assert_eq!(
        noticed,
        [
            r#"{"reason":"muted","room":"lobby","user_id":"troll42"}"#,
            r#"{"length":281,"limit":280,"reason":"too_long","room":"lobby","user_id":"bob"}"#,
        ]
    );
    assert!(
        room.drain_for(Duration::from_millis(200)).await.is_empty(),
        "a muted or oversize message got through"
    );
    assert!(
        notices
            .drain_for(Duration::from_millis(200))
            .await
            .is_empty(),
        "a message that was let through produced a notice"
    );
    let entry = host
        .wait_plugin("chat-moderator", "done", |p| p["stats"]["handled"] == 4)
        .await?;
    assert_eq!(entry["stats"]["failed"], 0);
    assert_eq!(entry["stats"]["denied"], 0);
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_moderator_drops_even_when_its_notices_are_not_granted() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let grant = r#"publish = ["chat:*"]"#;
    assert!(CHAT_MANIFEST.contains(grant), "{CHAT_MANIFEST}");
    let manifest = CHAT_MANIFEST.replace(grant, r#"publish = ["chat:lobby"]"#);
    let host = TestHost::start(
        &redis,
        &[(
            "chat-moderator",
            plugins::CHAT_MODERATOR,
            Some(manifest.as_str()),
        )],
    )
    .await?;
    let mut room = Subscriber::new(&redis, &["chat:lobby"], &[]).await?;
    let mut notices = Subscriber::new(&redis, &["chat:notice:lobby"], &[]).await?;

    for message in [
        json!({"user_id": "troll42", "message": "buy now"}),
        json!({"user_id": "bob", "message": "x".repeat(281)}),
        json!({"user_id": "ana", "message": "hello"}),
    ] {
        redis.publish("chat:in:lobby", message.to_string()).await?;
    }
    let got = json_of(&room.next(PATIENCE).await?);
    assert_eq!(got["user_id"], "ana");
    assert_eq!(got["message"], "hello");
    // The refused notices are denied, but the drops still count as handled, not failed.
    let entry = host
        .wait_plugin("chat-moderator", "done", |p| p["stats"]["handled"] == 3)
        .await?;
    assert_eq!(entry["stats"]["failed"], 0);
    assert_eq!(entry["stats"]["denied"], 2);
    assert!(
        room.drain_for(Duration::from_millis(200)).await.is_empty(),
        "a muted or oversize message got through"
    );
    assert!(
        notices
            .drain_for(Duration::from_millis(200))
            .await
            .is_empty(),
        "a notice was published without a grant"
    );
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_rollup_keeps_state_and_paces_its_summaries() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let every = "[grants]\npublish = [\"dashboard:summary\"]\n[config]\ninterval_ms = 0\n";
    let paced = "[grants]\npublish = [\"dashboard:summary\"]\n[config]\ninterval_ms = 600000\n";
    let host = TestHost::start(
        &redis,
        &[
            ("rollup", plugins::METRICS_ROLLUP, Some(every)),
            ("slow-rollup", plugins::METRICS_ROLLUP, Some(paced)),
        ],
    )
    .await?;
    let mut summaries = Subscriber::new(&redis, &["dashboard:summary"], &[]).await?;

    for (source, payload) in [
        ("web-1", json!({"cpu": 0.4, "memory": 500, "requests": 100})),
        ("web-2", json!({"cpu": 0.9})),
        ("web-1", json!({"cpu": 0.6, "memory": 700, "requests": 300})),
    ] {
        redis
            .publish(format!("metrics:{source}"), payload.to_string())
            .await?;
    }
    // Three from the unpaced instance, one from the paced one; order between them is free.
    let got: Vec<Value> = summaries
        .take(4, PATIENCE)
        .await?
        .iter()
        .map(json_of)
        .collect();
    let last = got
        .iter()
        .rev()
        .find(|s| s["sources"]["web-1"]["count"] == 2)
        .cloned()
        .unwrap_or_default();
    let web1 = &last["sources"]["web-1"];
    assert!((web1["cpu"]["mean"].as_f64().unwrap_or_default() - 0.5).abs() < 1e-9);
    assert_eq!(web1["cpu"]["max"], 0.6);
    assert_eq!(web1["memory"]["mean"], 600.0);
    assert_eq!(web1["memory"]["max"], 700.0);
    assert_eq!(web1["requests"]["mean"], 200.0);
    assert_eq!(web1["requests"]["max"], 300.0);
    assert_eq!(web1["requests"]["samples"], 2);
    assert_eq!(last["sources"]["web-2"]["cpu"]["samples"], 1);
    assert!(
        summaries
            .drain_for(Duration::from_millis(300))
            .await
            .is_empty()
    );
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_get_nothing_they_were_not_granted() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    // forward asks for fwded:* in describe, but nobody granted it.
    let host = TestHost::start(&redis, &[("forward", plugins::FORWARD, None)]).await?;
    let mut out = Subscriber::new(&redis, &[], &["fwded:*"]).await?;
    redis.publish("fwd:x", "hello").await?;
    let entry = host
        .wait_plugin("forward", "the denied message to fail", |p| {
            p["stats"]["failed"] == 1
        })
        .await?;
    assert_eq!(entry["stats"]["denied"], 1);
    assert!(
        entry["stats"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains(r#"no publish grant for channel "fwded:x""#)),
        "{entry}"
    );
    assert_eq!(entry["version"]["requested"]["publish"][0], "fwded:*");
    assert_eq!(entry["version"]["grants"]["publish"], json!([]));
    assert!(out.drain_for(Duration::from_millis(200)).await.is_empty());
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_describe_grants_what_plugins_ask_for() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let host = TestHost::start_configured(
        &redis,
        "[plugins]\npolicy = \"trust-describe\"\n",
        &[("forward", plugins::FORWARD, None)],
    )
    .await?;
    assert_forwards(&redis, "hello").await?;
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_in_the_host_config_apply_by_plugin_name() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let host = TestHost::start_configured(
        &redis,
        "[grants.forward]\npublish = [\"fwded:*\"]\n",
        &[("forward", plugins::FORWARD, None)],
    )
    .await?;
    assert_forwards(&redis, "granted").await?;
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_feeding_its_own_subscription_is_stopped_by_the_loop_guard() -> anyhow::Result<()>
{
    let redis = RedisServer::start().await?;
    // echo replies on loop:echo, which its own loop:* subscription receives again.
    let manifest = echo_manifest(&[], &["loop:*"], "loop:echo", "");
    let host = TestHost::start(&redis, &[("echo", plugins::ECHO, Some(manifest.as_str()))]).await?;

    redis.publish("loop:start", "go").await?;
    host.wait_plugin("echo", "stopped by the guard", |p| {
        p["stats"]["loop_limited"] == 1
    })
    .await?;
    // Let the message whose publish was cut finish.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let entry = host.plugin("echo").await?.unwrap_or_default();
    assert_eq!(entry["queue_depth"], 0);
    // The burst allowance went through, then the chain was cut.
    let handled = entry["stats"]["handled"].as_u64().unwrap_or_default();
    assert!((150..=400).contains(&handled), "handled {handled}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let later = host.plugin("echo").await?.unwrap_or_default();
    assert_eq!(
        later["stats"]["handled"], entry["stats"]["handled"],
        "the loop went on"
    );
    let (status, _) = host.get("/readyz").await?;
    assert_eq!(status, 200);
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_in_the_manifest_replace_what_the_plugin_describes() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    // echo describes `described:here`; the operator's manifest points it at `override:here`.
    let manifest = format!(
        "{}[subscriptions]\nchannels = [\"override:here\"]\n",
        echo_manifest(&["described:here"], &[], "echo:out", "")
    );
    let host = TestHost::start(&redis, &[("echo", plugins::ECHO, Some(manifest.as_str()))]).await?;
    let mut out = Subscriber::new(&redis, &["echo:out"], &[]).await?;

    // Published first on the one connection, so Redis would deliver it first if the host
    // listened to it.
    redis.publish("described:here", "ignored").await?;
    redis.publish("override:here", "seen").await?;
    let report = json_of(&out.next(PATIENCE).await?);
    assert_eq!(report["channel"], "override:here", "{report}");
    assert_eq!(report["subscription"], "channel:override:here", "{report}");
    assert_eq!(report["seq"], 1, "nothing was handled before it: {report}");
    assert!(out.drain_for(Duration::from_millis(200)).await.is_empty());
    let entry = host.plugin("echo").await?.unwrap_or_default();
    assert_eq!(entry["stats"]["accepted"], 1, "{entry}");
    host.stop().await
}
