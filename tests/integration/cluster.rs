//! The host on a real Redis Cluster (three primaries, one replica each): sharded channels on
//! the shard owning each slot, subscriptions surviving a failover, keyspace notifications
//! from every primary, and streams shared by two hosts.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use redis::AsyncCommands as _;
use serde_json::Value;
use switchyard_tests::cluster::RedisCluster;
use switchyard_tests::{TestHost, copy_plugin, eventually, plugins};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(30);

/// Collects what is published on `channels` anywhere in the cluster, through a cluster
/// connection (which resubscribes by itself when its node goes away).
struct Reports {
    _connection: redis::cluster_async::ClusterConnection,
    pushes: mpsc::UnboundedReceiver<redis::PushInfo>,
}

impl Reports {
    async fn new(cluster: &RedisCluster, channels: &[&str]) -> anyhow::Result<Self> {
        let (sender, pushes) = mpsc::unbounded_channel();
        let client = redis::cluster::ClusterClientBuilder::new(cluster.urls())
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(sender)
            .build()?;
        let mut connection = client.get_async_connection().await?;
        connection.subscribe(channels).await?;
        Ok(Self {
            _connection: connection,
            pushes,
        })
    }

    /// The next report (a JSON object published by the echo fixture).
    async fn next(&mut self, within: Duration) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let push = tokio::time::timeout_at(deadline, self.pushes.recv())
                .await
                .map_err(|_| anyhow::anyhow!("no report within {within:?}"))?
                .ok_or_else(|| anyhow::anyhow!("the report connection closed"))?;
            if push.kind != redis::PushKind::Message {
                continue;
            }
            if let Some(redis::Value::BulkString(payload)) = push.data.last() {
                return Ok(serde_json::from_slice(payload)?);
            }
        }
    }

    /// Reports until one satisfies `wanted`, within `within`.
    async fn until(
        &mut self,
        within: Duration,
        wanted: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let report = self.next(left).await?;
            if wanted(&report) {
                return Ok(report);
            }
        }
    }
}

/// An echo manifest: `config` holds the fixture's settings as TOML lines; `publish` is
/// granted.
fn echo(publish: &str, config: &str) -> String {
    format!("[grants]\npublish = [{publish:?}]\n[config]\nreply = {publish:?}\n{config}\n")
}

fn list(items: &[String]) -> String {
    serde_json::to_string(items).unwrap_or_default()
}

/// Starts a host on `cluster` with `plugins` (name, manifest) of the echo fixture.
async fn host(
    cluster: &RedisCluster,
    config: &str,
    plugins: &[(&str, String)],
) -> anyhow::Result<TestHost> {
    let url = cluster.seed_url().replace("redis://", "redis+cluster://");
    let host = TestHost::launch(&url, config, |dir: &Path| {
        for (name, manifest) in plugins {
            copy_plugin(dir, name, Path::new(plugins::ECHO), Some(manifest))?;
        }
        Ok(())
    })
    .await?;
    host.wait_ready().await?;
    Ok(host)
}

async fn spublish(cluster: &RedisCluster, channel: &str, payload: &str) -> anyhow::Result<i64> {
    let mut connection = cluster.connection().await?;
    Ok(redis::cmd("SPUBLISH")
        .arg(channel)
        .arg(payload)
        .query_async(&mut connection)
        .await?)
}

/// SPUBLISHes `label-1`, `label-2`, ... on `channel` until one is reported (a shard that just
/// changed hands may miss the first ones), within [`WAIT`].
async fn publish_until_heard(
    cluster: &RedisCluster,
    reports: &mut Reports,
    channel: &str,
    label: &str,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    for attempt in 1.. {
        let payload = format!("{label}-{attempt}");
        let _ = spublish(cluster, channel, &payload).await;
        let heard = reports
            .until(Duration::from_millis(500), |r| {
                r["payload"] == payload.as_str()
            })
            .await;
        if heard.is_ok() {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{channel} stayed silent for {WAIT:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_channels_are_read_on_their_shards_and_published_with_spublish()
-> anyhow::Result<()> {
    let cluster = RedisCluster::start(3, 1).await?;
    let rooms = cluster.names_on_distinct_primaries("room:", 3).await?;
    let mut reports = Reports::new(&cluster, &["heard"]).await?;
    // `rooms` hears every room (one per primary) and republishes on `relay`, which `relay`
    // subscribes to as sharded: the host must SPUBLISH it, or `relay` never sees it.
    let host = host(
        &cluster,
        "",
        &[
            (
                "rooms",
                echo(
                    "relay",
                    &format!("sharded = {}\ntag = \"rooms\"", list(&rooms)),
                ),
            ),
            (
                "relay",
                echo("heard", "sharded = [\"relay\"]\ntag = \"relay\""),
            ),
            (
                "news",
                echo("heard", "channels = [\"news\"]\ntag = \"news\""),
            ),
        ],
    )
    .await?;
    let status = host.get("/readyz").await?.1;
    assert_eq!(status["source"]["sharded"], 4, "{status}");

    for room in &rooms {
        assert_eq!(spublish(&cluster, room, "hello").await?, 1, "{room}");
    }
    let mut heard = BTreeSet::new();
    for _ in &rooms {
        let report = reports.next(WAIT).await?;
        assert_eq!(report["tag"], "relay");
        assert_eq!(report["subscription"], "sharded:relay");
        let inner: Value = serde_json::from_str(report["payload"].as_str().unwrap_or(""))?;
        assert_eq!(inner["tag"], "rooms");
        heard.insert(inner["channel"].as_str().unwrap_or("").to_owned());
    }
    assert_eq!(heard, rooms.iter().cloned().collect());

    // Exact channels work cluster-wide: published on any node, heard by the host.
    let mut connection = cluster.connection().await?;
    let _: i64 = connection.publish("news", "extra").await?;
    let report = reports.next(WAIT).await?;
    assert_eq!(report["tag"], "news");
    assert_eq!(report["payload"], "extra");
    host.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_come_back_after_a_primary_fails_over() -> anyhow::Result<()> {
    let mut cluster = RedisCluster::start(3, 1).await?;
    let rooms = cluster.names_on_distinct_primaries("room:", 3).await?;
    let mut reports = Reports::new(&cluster, &["heard"]).await?;
    let host = host(
        &cluster,
        "",
        &[
            (
                "rooms",
                echo(
                    "heard",
                    &format!("sharded = {}\ntag = \"rooms\"", list(&rooms)),
                ),
            ),
            (
                "news",
                echo("heard", "patterns = [\"news:*\"]\ntag = \"news\""),
            ),
        ],
    )
    .await?;
    spublish(&cluster, &rooms[0], "before").await?;
    reports.until(WAIT, |r| r["payload"] == "before").await?;

    let slot = cluster.slot(&rooms[0]).await?;
    let killed = cluster.fail_primary_of(slot, WAIT).await?;
    assert_ne!(
        cluster.primary_of(slot).await?,
        killed,
        "a replica took over"
    );

    // The room's shard has a new primary; the host subscribes there again by itself.
    // During the failover SPUBLISH itself may fail; the host resubscribes once the cluster
    // has settled.
    publish_until_heard(&cluster, &mut reports, &rooms[0], "after-failover").await?;
    // The other rooms and the pattern never stopped working.
    for room in &rooms[1..] {
        spublish(&cluster, room, room).await?;
        reports
            .until(WAIT, |r| r["payload"] == room.as_str())
            .await?;
    }
    let mut connection = cluster.connection().await?;
    let _: i64 = connection.publish("news:today", "still here").await?;
    reports
        .until(WAIT, |r| r["payload"] == "still here")
        .await?;
    host.wait_ready().await?;

    // The old primary comes back as a replica; nothing changes for the host.
    cluster.restart(killed).await?;
    cluster.wait_healthy(WAIT).await?;
    spublish(&cluster, &rooms[0], "rejoined").await?;
    reports.until(WAIT, |r| r["payload"] == "rejoined").await?;
    host.stop().await?;
    Ok(())
}

/// Turns on keyspace notifications on every node of `cluster` (replicas too, so that a
/// promoted one notifies at once).
async fn notify_keyspace_events(cluster: &RedisCluster) -> anyhow::Result<()> {
    for url in cluster.urls() {
        let mut node = redis::Client::open(url)?
            .get_multiplexed_async_connection()
            .await?;
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("notify-keyspace-events")
            .arg("KEA")
            .exec_async(&mut node)
            .await?;
    }
    Ok(())
}

/// Writes `key` (a `SET`) until the host reports its `set` event, within [`WAIT`] (a shard
/// that just changed hands may refuse writes, or write before the host hears it).
async fn write_until_heard(
    cluster: &RedisCluster,
    reports: &mut Reports,
    key: &str,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(mut connection) = cluster.connection().await {
            let _: Result<(), _> = connection.set(key, "again").await;
        }
        let heard = reports
            .until(Duration::from_millis(500), |r| r["channel"] == key)
            .await;
        if heard.is_ok() {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no event of {key} within {WAIT:?}"
        );
    }
}

/// Writes each of `keys` once (`SET` to the value `event`, or `DEL` for `del`) and checks
/// that the host reports each event exactly once, with the key as the channel and `event` as
/// the payload.
async fn each_write_heard_once(
    cluster: &RedisCluster,
    reports: &mut Reports,
    keys: &[String],
    event: &str,
) -> anyhow::Result<()> {
    let mut connection = cluster.connection().await?;
    for key in keys {
        match event {
            "del" => connection.del::<_, ()>(key).await?,
            _ => connection.set::<_, _, ()>(key, event).await?,
        }
    }
    let mut heard = Vec::new();
    for _ in keys {
        let report = reports.next(WAIT).await?;
        assert_eq!(report["payload"], event, "{report}");
        heard.push(report["channel"].as_str().unwrap_or_default().to_owned());
    }
    heard.sort();
    let mut expected = keys.to_vec();
    expected.sort();
    assert_eq!(heard, expected);
    let more = reports.next(Duration::from_millis(500)).await;
    assert!(more.is_err(), "one report per event: {more:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyspace_events_of_every_shard_arrive_once_and_follow_a_failover() -> anyhow::Result<()> {
    let mut cluster = RedisCluster::start(3, 1).await?;
    let keys = cluster.names_on_distinct_primaries("user:", 3).await?;
    let mut reports = Reports::new(&cluster, &["heard"]).await?;
    let url = cluster.seed_url().replace("redis://", "redis+cluster://");
    let manifest = "[subscriptions]\nkeys = [\"user:*\"]\n[grants]\npublish = [\"heard\"]\n\
                    [config]\nreply = \"heard\"\ntag = \"keys\"\n";
    let host = TestHost::launch(&url, "", |dir: &Path| {
        copy_plugin(dir, "keys", Path::new(plugins::ECHO), Some(manifest))
    })
    .await?;

    // Notifications are off on every node: the host is not ready, and says so.
    let body = eventually(WAIT, || async {
        let (status, body) = host.get("/readyz").await?;
        anyhow::ensure!(
            status == 503 && !body["source"]["keyspace_events"].is_null(),
            "/readyz: {status} {body}"
        );
        Ok(body)
    })
    .await?;
    let missing = &body["source"]["keyspace_events"];
    assert!(
        missing["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("on 3 of 3 primaries")),
        "{missing}"
    );
    assert_eq!(missing["missing"][0], "K", "{missing}");
    notify_keyspace_events(&cluster).await?;
    host.wait_ready().await?;

    // A key on each primary: each write is heard once, though the node-local notification
    // reaches only that primary's subscribers.
    each_write_heard_once(&cluster, &mut reports, &keys, "set").await?;

    let slot = cluster.slot(&keys[0]).await?;
    let killed = cluster.fail_primary_of(slot, WAIT).await?;
    // The promoted replica's events arrive once the host has found it.
    write_until_heard(&cluster, &mut reports, &keys[0]).await?;
    while reports.next(Duration::from_millis(500)).await.is_ok() {}
    each_write_heard_once(&cluster, &mut reports, &keys, "del").await?;

    // The old primary comes back as a replica: replicas replay writes and would notify them
    // again, but the host does not listen to them.
    cluster.restart(killed).await?;
    cluster.wait_healthy(WAIT).await?;
    each_write_heard_once(&cluster, &mut reports, &keys, "set").await?;
    host.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracked_keys_of_every_shard_are_invalidated_once_and_a_failover_flushes()
-> anyhow::Result<()> {
    let mut cluster = RedisCluster::start(3, 1).await?;
    let keys = cluster.names_on_distinct_primaries("cache:", 3).await?;
    let mut reports = Reports::new(&cluster, &["heard"]).await?;
    let url = cluster.seed_url().replace("redis://", "redis+cluster://");
    let manifest = "[subscriptions]\ntracking = [\"cache:\"]\n[grants]\npublish = [\"heard\"]\n\
                    [config]\nreply = \"heard\"\ntag = \"tracked\"\n";
    let host = TestHost::launch(&url, "", |dir: &Path| {
        copy_plugin(dir, "tracked", Path::new(plugins::ECHO), Some(manifest))
    })
    .await?;
    host.wait_ready().await?;

    // A write on each shard: each invalidation once, from the primary that owns the key.
    let mut connection = cluster.connection().await?;
    for key in &keys {
        connection.set::<_, _, ()>(key, "v").await?;
    }
    let mut heard = Vec::new();
    for _ in &keys {
        let report = reports.next(WAIT).await?;
        assert_eq!(report["payload"], "invalidate", "{report}");
        heard.push(report["channel"].as_str().unwrap_or_default().to_owned());
    }
    heard.sort();
    let mut expected = keys.clone();
    expected.sort();
    assert_eq!(heard, expected);
    assert!(reports.next(Duration::from_millis(500)).await.is_err());

    // A primary lost: a flush, and the promoted replica's keys are tracked again.
    let slot = cluster.slot(&keys[0]).await?;
    cluster.fail_primary_of(slot, WAIT).await?;
    reports.until(WAIT, |r| r["payload"] == "flush").await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(mut connection) = cluster.connection().await {
            let _: Result<(), _> = connection.set(&keys[0], "again").await;
        }
        let invalidated = reports
            .until(Duration::from_millis(500), |r| {
                r["channel"] == keys[0].as_str() && r["payload"] == "invalidate"
            })
            .await;
        if invalidated.is_ok() {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{} not tracked again within {WAIT:?}",
            keys[0]
        );
    }
    host.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_share_streams_on_different_shards() -> anyhow::Result<()> {
    let cluster = RedisCluster::start(3, 1).await?;
    let streams = cluster.names_on_distinct_primaries("orders:", 2).await?;
    let mut reports = Reports::new(&cluster, &["handled"]).await?;
    let mut hosts = Vec::new();
    for pod in ["pod-a", "pod-b"] {
        let config =
            format!("[streams]\nconsumer = {pod:?}\nbatch = 8\nblock_ms = 200\nstart = \"all\"\n");
        let manifest = echo(
            "handled",
            &format!("streams = {}\ntag = {pod:?}", list(&streams)),
        );
        hosts.push(host(&cluster, &config, &[("workers", manifest)]).await?);
    }

    const PER_STREAM: usize = 150;
    let mut connection = cluster.connection().await?;
    let mut added = BTreeSet::new();
    for i in 0..PER_STREAM {
        for stream in &streams {
            let id: String = connection
                .xadd(stream, "*", &[("payload", format!("{stream}-{i}"))])
                .await?;
            added.insert((stream.clone(), id));
        }
    }
    let mut seen = BTreeSet::new();
    let mut tags = BTreeSet::new();
    while seen.len() < added.len() {
        let report = reports.next(WAIT).await?;
        let key = (
            report["channel"].as_str().unwrap_or("").to_owned(),
            report["entry_id"].as_str().unwrap_or("").to_owned(),
        );
        assert!(seen.insert(key.clone()), "{key:?} handled twice");
        tags.insert(report["tag"].as_str().unwrap_or("").to_owned());
    }
    assert_eq!(seen, added);
    assert_eq!(tags.len(), 2, "both hosts took a share");
    for stream in &streams {
        eventually(WAIT, || async {
            let mut connection = cluster.connection().await?;
            let summary: redis::Value = redis::cmd("XPENDING")
                .arg(stream)
                .arg("workers")
                .query_async(&mut connection)
                .await?;
            let redis::Value::Array(items) = summary else {
                anyhow::bail!("unexpected XPENDING reply {summary:?}");
            };
            anyhow::ensure!(
                items.first() == Some(&redis::Value::Int(0)),
                "still pending: {items:?}"
            );
            Ok(())
        })
        .await?;
    }
    for host in hosts {
        host.stop().await?;
    }
    Ok(())
}

/// Moves `slot` (which holds no keys) from its primary to the primary at `to`, the way
/// `redis-cli --cluster reshard` does it for one slot.
async fn move_slot(cluster: &RedisCluster, slot: u16, to: usize) -> anyhow::Result<()> {
    let from = cluster.primary_of(slot).await?;
    let urls = cluster.urls();
    let node = |index: usize| redis::Client::open(urls[index].as_str());
    let mut source = node(from)?.get_multiplexed_async_connection().await?;
    let mut target = node(to)?.get_multiplexed_async_connection().await?;
    let id = |connection: &mut redis::aio::MultiplexedConnection| {
        let mut connection = connection.clone();
        async move {
            redis::cmd("CLUSTER")
                .arg("MYID")
                .query_async::<String>(&mut connection)
                .await
        }
    };
    let (source_id, target_id) = (id(&mut source).await?, id(&mut target).await?);
    let setslot = |state: &str, node: &str| {
        redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg(state)
            .arg(node)
            .to_owned()
    };
    setslot("IMPORTING", &source_id)
        .exec_async(&mut target)
        .await?;
    setslot("MIGRATING", &target_id)
        .exec_async(&mut source)
        .await?;
    setslot("NODE", &target_id).exec_async(&mut target).await?;
    setslot("NODE", &target_id).exec_async(&mut source).await?;
    eventually(WAIT, || async {
        anyhow::ensure!(
            cluster.primary_of(slot).await? == to,
            "slot {slot} not moved yet"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sharded_channel_follows_its_slot_to_another_shard() -> anyhow::Result<()> {
    let cluster = RedisCluster::start(3, 1).await?;
    let rooms = cluster.names_on_distinct_primaries("room:", 2).await?;
    let mut reports = Reports::new(&cluster, &["heard"]).await?;
    let host = host(
        &cluster,
        "",
        &[(
            "rooms",
            echo(
                "heard",
                &format!("sharded = {}\ntag = \"rooms\"", list(&rooms)),
            ),
        )],
    )
    .await?;
    spublish(&cluster, &rooms[0], "before").await?;
    reports.until(WAIT, |r| r["payload"] == "before").await?;

    // The first room's slot moves to the second room's shard.
    let slot = cluster.slot(&rooms[0]).await?;
    let to = cluster.primary_of(cluster.slot(&rooms[1]).await?).await?;
    move_slot(&cluster, slot, to).await?;

    publish_until_heard(&cluster, &mut reports, &rooms[0], "after-move").await?;
    spublish(&cluster, &rooms[1], "neighbour").await?;
    reports.until(WAIT, |r| r["payload"] == "neighbour").await?;
    host.stop().await?;
    Ok(())
}
