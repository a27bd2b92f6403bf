//! Key subscriptions: writes to keys reach a plugin as keyspace events, once each, only the
//! events it asked for; and readiness says why when Redis publishes no notifications.

use std::time::Duration;

use serde_json::Value;
use switchyard_tests::{PATIENCE, RedisServer, Subscriber, TestHost, eventually, plugins};

/// The key subscription most tests use.
const USER_KEYS: &str = "keys = [\"user:*\"]";

/// The echo fixture with `subscriptions` as its `[subscriptions]`, reporting on `seen`.
fn keys_manifest(subscriptions: &str) -> String {
    format!(
        "[grants]\npublish = [\"seen\"]\n[subscriptions]\n{subscriptions}\n\
         [config]\nreply = \"seen\"\n"
    )
}

/// Starts a host with the echo fixture listening to [`USER_KEYS`] and `extra` lines of
/// `[subscriptions]`, configured by `config`, without waiting for readiness.
async fn launch(redis: &RedisServer, config: &str, extra: &str) -> anyhow::Result<TestHost> {
    launch_with(redis, config, &format!("{USER_KEYS}\n{extra}")).await
}

/// Starts a host with the echo fixture and `subscriptions`, configured by `config`, without
/// waiting for readiness.
async fn launch_with(
    redis: &RedisServer,
    config: &str,
    subscriptions: &str,
) -> anyhow::Result<TestHost> {
    let manifest = keys_manifest(subscriptions);
    TestHost::launch(&redis.url(), config, |dir| {
        switchyard_tests::copy_plugin(
            dir,
            "echo",
            std::path::Path::new(plugins::ECHO),
            Some(&manifest),
        )
    })
    .await
}

/// Runs one command, given as its words, on `connection`.
async fn command(
    connection: &mut redis::aio::MultiplexedConnection,
    words: &[&str],
) -> anyhow::Result<()> {
    let (name, args) = words.split_first().expect("a command has a name");
    redis::cmd(name).arg(args).exec_async(connection).await?;
    Ok(())
}

/// Starts a host with one plugin, `name`, of the component `wasm` with `manifest`, and waits
/// until it is ready.
async fn start_plugin(
    redis: &RedisServer,
    name: &str,
    wasm: &str,
    manifest: &str,
) -> anyhow::Result<TestHost> {
    let host = TestHost::launch(&redis.url(), "", |dir| {
        switchyard_tests::copy_plugin(dir, name, std::path::Path::new(wasm), Some(manifest))
    })
    .await?;
    host.wait_ready().await?;
    Ok(host)
}

/// The (key, event) pairs of echo reports, after checking each came through the keyspace
/// pattern.
fn events(received: &[switchyard_tests::Received]) -> Vec<(String, String)> {
    received
        .iter()
        .map(|r| {
            let report: Value = serde_json::from_slice(&r.payload).expect("echo reports are JSON");
            assert_eq!(report["subscription"], "keys:user:*");
            (
                report["channel"].as_str().unwrap_or_default().to_owned(),
                report["payload"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
    expected
        .iter()
        .map(|(key, event)| ((*key).to_owned(), (*event).to_owned()))
        .collect()
}

/// Runs the writes every test makes: a string set, a hash set, a delete, a key that expires
/// (awaited), and a write to a key no subscription matches.
async fn write_keys(redis: &RedisServer) -> anyhow::Result<()> {
    let mut connection = redis.connection().await?;
    command(&mut connection, &["SET", "user:1", "a"]).await?;
    command(&mut connection, &["HSET", "user:2", "f", "v"]).await?;
    command(&mut connection, &["DEL", "user:1"]).await?;
    command(&mut connection, &["SET", "other:1", "x"]).await?;
    command(&mut connection, &["SET", "user:3", "v", "PX", "50"]).await?;
    // Gone, by Redis's active expiry or by this very read (which expires it lazily): either
    // way Redis has published `expired`.
    eventually(PATIENCE, || {
        let mut connection = connection.clone();
        async move {
            let exists: i64 = redis::cmd("EXISTS")
                .arg("user:3")
                .query_async(&mut connection)
                .await?;
            anyhow::ensure!(exists == 0, "user:3 has not expired yet");
            Ok(())
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_key_change_reaches_the_plugin_once_with_its_event() -> anyhow::Result<()> {
    let redis = RedisServer::start_with(&["--notify-keyspace-events", "KEA"]).await?;
    // Redis sends two notifications for user:1, one per pattern: the plugin sees one.
    let host = launch_with(&redis, "", "keys = [\"user:*\", \"user:1\"]").await?;
    host.wait_ready().await?;
    let mut seen = Subscriber::new(&redis, &["seen"], &[]).await?;

    write_keys(&redis).await?;

    let got = events(&seen.take(6, PATIENCE).await?);
    assert_eq!(
        got,
        pairs(&[
            ("user:1", "set"),
            ("user:2", "hset"),
            ("user:1", "del"),
            ("user:3", "set"),
            // SET with PX also sets the time to live.
            ("user:3", "expire"),
            ("user:3", "expired"),
        ])
    );
    assert!(
        seen.drain_for(Duration::from_millis(300)).await.is_empty(),
        "an event was delivered twice, or one of other:1 was delivered"
    );
    let plugin = host.plugin("echo").await?.expect("echo is loaded");
    assert_eq!(
        plugin["version"]["keys"],
        serde_json::json!([
            "keys user:* in database 0 (every event)",
            "keys user:1 in database 0 (every event)"
        ])
    );
    assert_eq!(redis.pubsub_numpat().await?, 2);
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_events_list_keeps_the_other_events_from_the_plugin() -> anyhow::Result<()> {
    let redis = RedisServer::start_with(&["--notify-keyspace-events", "KEA"]).await?;
    let host = launch(&redis, "", "events = [\"del\"]").await?;
    host.wait_ready().await?;
    let mut seen = Subscriber::new(&redis, &["seen"], &[]).await?;

    write_keys(&redis).await?;

    let got = seen.take(1, PATIENCE).await?;
    assert_eq!(events(&got), pairs(&[("user:1", "del")]));
    // The plugin's first call: it was never called for the set and hset before.
    let report: Value = serde_json::from_slice(&got[0].payload)?;
    assert_eq!(report["seq"], 1);
    assert!(
        seen.drain_for(Duration::from_millis(300)).await.is_empty(),
        "an event it did not ask for reached the plugin"
    );
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_notifications_readiness_names_the_missing_flags() -> anyhow::Result<()> {
    // The harness's server, like Redis by default, publishes no keyspace notifications.
    let redis = RedisServer::start().await?;
    assert_eq!(redis.config_get("notify-keyspace-events").await?, "");
    let host = launch(&redis, "", "events = [\"set\", \"hset\", \"expired\"]").await?;

    let body = eventually(PATIENCE, || async {
        let (status, body) = host.get("/readyz").await?;
        anyhow::ensure!(
            status == 503 && !body["source"]["keyspace_events"].is_null(),
            "/readyz: {status} {body}"
        );
        Ok(body)
    })
    .await?;
    let missing = &body["source"]["keyspace_events"];
    assert_eq!(missing["missing"], serde_json::json!(["K", "$", "h", "x"]));
    let reason = missing["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("notify-keyspace-events") && reason.contains("flags K, $, h, x missing"),
        "{reason}"
    );
    assert!(reason.contains("redis.set_keyspace_events"), "{reason}");
    assert_eq!(body["source"]["connected"], true);

    // The operator fixes Redis: the host sees it without a restart, and events flow.
    let mut connection = redis.connection().await?;
    command(
        &mut connection,
        &["CONFIG", "SET", "notify-keyspace-events", "K$hx"],
    )
    .await?;
    let body = host.wait_readiness(200).await?;
    assert!(body["source"]["keyspace_events"].is_null(), "{body}");
    let mut seen = Subscriber::new(&redis, &["seen"], &[]).await?;
    command(&mut connection, &["SET", "user:7", "v"]).await?;
    assert_eq!(
        events(&seen.take(1, PATIENCE).await?),
        pairs(&[("user:7", "set")])
    );
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_turns_notifications_on_when_allowed() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    // Flags already set are kept.
    let mut connection = redis.connection().await?;
    command(
        &mut connection,
        &["CONFIG", "SET", "notify-keyspace-events", "El"],
    )
    .await?;
    let host = launch(
        &redis,
        "[redis]\nset_keyspace_events = true\n",
        "events = [\"set\", \"del\"]",
    )
    .await?;
    host.wait_ready().await?;
    let configured = redis.config_get("notify-keyspace-events").await?;
    for flag in ['K', 'E', 'g', '$', 'l'] {
        assert!(configured.contains(flag), "{flag} not in {configured:?}");
    }

    let mut seen = Subscriber::new(&redis, &["seen"], &[]).await?;
    write_keys(&redis).await?;
    assert_eq!(
        events(&seen.take(3, PATIENCE).await?),
        pairs(&[("user:1", "set"), ("user:1", "del"), ("user:3", "set")])
    );
    assert!(seen.drain_for(Duration::from_millis(300)).await.is_empty());
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_that_lost_the_setting_the_host_sets_it_again() -> anyhow::Result<()> {
    let mut redis = RedisServer::start().await?;
    let host = launch(&redis, "[redis]\nset_keyspace_events = true\n", "").await?;
    host.wait_ready().await?;
    assert!(
        redis
            .config_get("notify-keyspace-events")
            .await?
            .contains('K')
    );

    // A server restarted from its configuration has lost what CONFIG SET changed.
    redis.restart().await?;
    assert_eq!(redis.config_get("notify-keyspace-events").await?, "");

    let mut seen = Subscriber::new(&redis, &["seen"], &[]).await?;
    let mut connection = redis.connection().await?;
    // Writes until one is reported: the host reconnects, sets the flags again, and then
    // hears of every write.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        command(&mut connection, &["SET", "user:9", "v"]).await?;
        match seen.next(Duration::from_millis(200)).await {
            Ok(got) => {
                assert_eq!(events(&[got]), pairs(&[("user:9", "set")]));
                break;
            }
            Err(_) if tokio::time::Instant::now() < deadline => continue,
            Err(e) => return Err(e.context("no key event after the restart")),
        }
    }
    // Reports of earlier writes that were slow to come are all of the same set.
    let late = seen.drain_for(Duration::from_millis(300)).await;
    assert!(
        events(&late)
            .iter()
            .all(|pair| pair == &pairs(&[("user:9", "set")])[0])
    );
    assert!(
        redis
            .config_get("notify-keyspace-events")
            .await?
            .contains('K')
    );
    command(&mut connection, &["DEL", "user:9"]).await?;
    assert_eq!(
        events(&seen.take(1, PATIENCE).await?),
        pairs(&[("user:9", "del")])
    );
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misspelt_event_rejects_the_manifest_naming_the_field() -> anyhow::Result<()> {
    let redis = RedisServer::start_with(&["--notify-keyspace-events", "KEA"]).await?;
    let host = launch(&redis, "", "events = [\"set\", \"expird\"]").await?;
    host.wait_ready().await?;
    let entry = host
        .wait_plugin("echo", "rejected", |p| p["state"] == "failed")
        .await?;
    assert_eq!(entry["load_error"]["kind"], "manifest", "{entry}");
    let message = entry["load_error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("subscriptions.events") && message.contains("\"expird\""),
        "{message}"
    );
    // Nothing subscribes to keyspace channels for it.
    assert_eq!(redis.pubsub_numpat().await?, 0);
    host.stop().await
}

/// The (channel, payload) of the next echo report, within [`PATIENCE`].
async fn next_report(seen: &mut Subscriber) -> anyhow::Result<(String, String, String)> {
    let received = seen.take(1, PATIENCE).await?;
    let report: Value = serde_json::from_slice(&received[0].payload)?;
    let text = |field: &str| report[field].as_str().unwrap_or_default().to_owned();
    Ok((text("channel"), text("payload"), text("subscription")))
}

/// The id of the host's tracking connection, the one client with tracking on.
async fn tracking_client(redis: &RedisServer) -> anyhow::Result<i64> {
    let mut connection = redis.connection().await?;
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut connection)
        .await?;
    let ids: Vec<i64> = list
        .lines()
        .filter(|line| {
            line.split(' ').any(|field| {
                field
                    .strip_prefix("flags=")
                    .is_some_and(|f| f.contains('t'))
            })
        })
        .filter_map(|line| line.strip_prefix("id=")?.split(' ').next()?.parse().ok())
        .collect();
    anyhow::ensure!(ids.len() == 1, "one tracking client, not {ids:?}:\n{list}");
    Ok(ids[0])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracked_prefixes_get_each_invalidation_and_a_flush_when_tracking_is_lost()
-> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let host = launch_with(&redis, "", "tracking = [\"cache:\", \"cache:user:\"]").await?;
    host.wait_ready().await?;
    let entry = host.plugin("echo").await?.expect("echo is listed");
    assert_eq!(
        entry["version"]["tracking"],
        serde_json::json!(["cache:", "cache:user:"])
    );
    let mut seen = Subscriber::new(&redis, &["seen"], &[]).await?;
    let mut writer = redis.connection().await?;

    // A write by another client to a tracked key: one invalidation, under the first prefix
    // that matches. A key outside the prefixes: none.
    command(&mut writer, &["SET", "other:1", "x"]).await?;
    command(&mut writer, &["SET", "cache:user:1", "x"]).await?;
    let (channel, payload, subscription) = next_report(&mut seen).await?;
    assert_eq!(
        (channel.as_str(), payload.as_str()),
        ("cache:user:1", "invalidate")
    );
    assert_eq!(subscription, "tracking:cache:");

    // Redis flushing its keys is a null invalidation: one flush message.
    command(&mut writer, &["FLUSHALL"]).await?;
    let (channel, payload, _) = next_report(&mut seen).await?;
    assert_eq!((channel.as_str(), payload.as_str()), ("", "flush"));

    // The tracking connection killed: a flush, then tracking resumes by itself.
    let killed = tracking_client(&redis).await?;
    redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(killed)
        .exec_async(&mut writer)
        .await?;
    let (channel, payload, _) = next_report(&mut seen).await?;
    assert_eq!((channel.as_str(), payload.as_str()), ("", "flush"));
    let resumed = eventually(PATIENCE, || async {
        let id = tracking_client(&redis).await?;
        anyhow::ensure!(id != killed, "still the killed client");
        Ok(id)
    })
    .await?;
    assert_ne!(resumed, killed);
    command(&mut writer, &["DEL", "cache:2"]).await?;
    command(&mut writer, &["SET", "cache:2", "y"]).await?;
    let (channel, payload, _) = next_report(&mut seen).await?;
    assert_eq!(
        (channel.as_str(), payload.as_str()),
        ("cache:2", "invalidate")
    );
    assert!(
        seen.next(Duration::from_millis(300)).await.is_err(),
        "one message per invalidation"
    );
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_tracked_prefixes_asked_for_in_describe_reach_the_plugin() -> anyhow::Result<()> {
    let redis = RedisServer::start_with(&["--notify-keyspace-events", "KEA"]).await?;
    // No [subscriptions]: the echo fixture asks in describe, from its settings.
    let manifest = "[grants]\npublish = [\"seen\"]\n[config]\nreply = \"seen\"\n\
                    keys = [\"user:*\"]\nevents = [\"set\"]\ntracking = [\"cache:\"]\n";
    let host = start_plugin(&redis, "echo", plugins::ECHO, manifest).await?;
    let entry = host.plugin("echo").await?.expect("echo is listed");
    assert_eq!(
        entry["version"]["world"], "switchyard:plugin@0.6.0",
        "{entry}"
    );
    assert_eq!(
        entry["version"]["tracking"],
        serde_json::json!(["cache:"]),
        "{entry}"
    );
    let mut seen = Subscriber::new(&redis, &["seen"], &[]).await?;
    let mut writer = redis.connection().await?;

    // hset is not among the events asked for: only the set arrives.
    command(&mut writer, &["HSET", "user:2", "f", "v"]).await?;
    command(&mut writer, &["SET", "user:1", "a"]).await?;
    let (channel, payload, subscription) = next_report(&mut seen).await?;
    assert_eq!((channel.as_str(), payload.as_str()), ("user:1", "set"));
    assert_eq!(subscription, "keys:user:*");

    command(&mut writer, &["SET", "cache:1", "a"]).await?;
    let (channel, payload, subscription) = next_report(&mut seen).await?;
    assert_eq!(
        (channel.as_str(), payload.as_str()),
        ("cache:1", "invalidate")
    );
    assert_eq!(subscription, "tracking:cache:");
    assert!(seen.next(Duration::from_millis(300)).await.is_err());
    host.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_0_5_0_plugin_gets_its_manifest_key_subscription_as_the_pattern_redis_matched()
-> anyhow::Result<()> {
    let redis = RedisServer::start_with(&["--notify-keyspace-events", "KEA"]).await?;
    let manifest = "[subscriptions]\npatterns = [\"fwd:*\"]\nkeys = [\"user:*\"]\n\
                    tracking = [\"cache:\"]\n[grants]\npublish = [\"fwded:*\", \"seen\"]\n";
    let host = start_plugin(&redis, "old", plugins::FORWARD_0_5, manifest).await?;
    let entry = host.plugin("old").await?.expect("old is listed");
    assert_eq!(
        entry["version"]["world"], "switchyard:plugin@0.5.0",
        "{entry}"
    );
    let mut seen = Subscriber::new(&redis, &["seen"], &["fwded:*"]).await?;
    redis.publish("fwd:a", "plain").await?;
    let forwarded = seen.take(1, PATIENCE).await?;
    assert_eq!(forwarded[0].channel_str(), "fwded:a");

    let mut writer = redis.connection().await?;
    command(&mut writer, &["SET", "user:1", "a"]).await?;
    let report = seen.take(1, PATIENCE).await?;
    assert_eq!(
        String::from_utf8_lossy(&report[0].payload),
        "pattern:__keyspace@0__:user:* user:1 set"
    );
    command(&mut writer, &["SET", "cache:1", "a"]).await?;
    let report = seen.take(1, PATIENCE).await?;
    assert_eq!(
        String::from_utf8_lossy(&report[0].payload),
        "pattern:cache:* cache:1 invalidate"
    );
    host.stop().await
}
