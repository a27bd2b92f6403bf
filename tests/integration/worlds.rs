//! Handlers written for other hosts' worlds run unchanged beside Switchyard's own plugins:
//! each fixture below does `forward`'s job through its own world's imports, and must
//! republish exactly what `forward` does, count a failure for its bad input, be refused a
//! publish outside its grant, and swap with `forward` under traffic without a loss.

use std::time::Duration;

use switchyard_tests::{
    FORWARD_MANIFEST, PATIENCE, RedisServer, Subscriber, TestHost, assert_each_arrived, plugins,
    read_plugin, switchyard_binary,
};

use crate::faults::stat;

/// A handler from another host's world, built with that world's own tools.
struct Case {
    /// What `/plugins` says of its world.
    world: &'static str,
    /// The built component.
    wasm: &'static str,
    /// Whether the handler sees the channel (`fwd:X` goes to `fwded:X`); a Spin Redis
    /// handler sees the payload alone and publishes on its `out_channel` variable.
    sees_channel: bool,
    /// What its error for the bad input says.
    rejection: &'static str,
}

/// Every foreign world with a fixture.
const CASES: &[Case] = &[
    Case {
        world: "wasi-messaging@0.2.0-draft",
        wasm: plugins::MESSAGING_FORWARD,
        sees_channel: true,
        rejection: "rejected",
    },
    Case {
        world: "wasmcloud-messaging@0.2.0",
        wasm: plugins::WASMCLOUD_FORWARD,
        sees_channel: true,
        rejection: "rejected",
    },
    Case {
        world: "fermyon-spin-redis",
        wasm: plugins::SPIN2_FORWARD,
        sees_channel: false,
        rejection: "returned error",
    },
    Case {
        world: "spin-redis@3.0.0",
        wasm: plugins::SPIN_FORWARD,
        sees_channel: false,
        rejection: "payload `reject` refused",
    },
];

/// The Spin handlers: Spin 2's, and Spin 3's async one.
const SPIN: [&str; 2] = [plugins::SPIN2_FORWARD, plugins::SPIN_FORWARD];

/// Where a Spin handler publishes.
const SPIN_OUT: &str = "fwded:spin";

impl Case {
    /// What these worlds cannot say for themselves: what to listen to, the grant, and for
    /// Spin the variables (the address of the host's own Redis, and where to publish).
    fn manifest(&self, redis: &RedisServer, publish: &str, out: &str) -> String {
        let mut manifest =
            format!("[subscriptions]\npatterns = [\"fwd:*\"]\n[grants]\npublish = [{publish:?}]\n");
        if !self.sees_channel {
            manifest += &format!(
                "[config]\nredis_address = {:?}\nout_channel = {out:?}\n",
                redis.url()
            );
        }
        manifest
    }

    /// Where the copy of a message on `fwd:REST` goes.
    fn copy_of(&self, rest: &str) -> String {
        if self.sees_channel {
            format!("fwded:{rest}")
        } else {
            SPIN_OUT.to_owned()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_from_other_hosts_do_what_forward_does() -> anyhow::Result<()> {
    for case in CASES {
        let redis = RedisServer::start().await?;
        let manifest = case.manifest(&redis, "fwded:*", SPIN_OUT);
        let host = TestHost::start(&redis, &[("fwd", case.wasm, Some(&manifest))]).await?;
        let entry = host.plugin("fwd").await?.expect("fwd is listed");
        assert_eq!(entry["state"], "running", "{}", case.world);
        assert_eq!(entry["version"]["world"], case.world);

        let mut out = Subscriber::new(&redis, &[], &["fwded:*"]).await?;
        let payloads: [&[u8]; 3] = [b"hello", b"", &[0, 159, 146, 150, 255]];
        for (i, payload) in payloads.iter().enumerate() {
            redis.publish(format!("fwd:{i}").as_str(), *payload).await?;
        }
        let got = out.take(payloads.len(), PATIENCE).await?;
        for (i, (received, payload)) in got.iter().zip(payloads).enumerate() {
            assert_eq!(
                received.channel_str(),
                case.copy_of(&i.to_string()),
                "{}",
                case.world
            );
            assert_eq!(&received.payload[..], payload, "{}", case.world);
        }

        // The bad input is a failure of the handler, counted as forward's errors are.
        redis.publish("fwd:bad", "reject").await?;
        let entry = host
            .wait_plugin("fwd", "counting the rejected message", |p| {
                stat(p, "failed") == 1
            })
            .await?;
        assert!(
            entry["stats"]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains(case.rejection)),
            "{}: {entry}",
            case.world
        );
        host.stop().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_outside_the_grant_is_refused_to_other_hosts_handlers() -> anyhow::Result<()> {
    for case in CASES {
        let redis = RedisServer::start().await?;
        // Granted fwded:ok only. A Spin handler publishes where its variable says: there,
        // on fwded:no.
        let manifest = case.manifest(&redis, "fwded:ok", "fwded:no");
        let host = TestHost::start(&redis, &[("fwd", case.wasm, Some(&manifest))]).await?;
        let mut out = Subscriber::new(&redis, &[], &["fwded:*"]).await?;
        redis.publish("fwd:no", "x").await?;
        if case.sees_channel {
            redis.publish("fwd:ok", "y").await?;
            let got = out.take(1, PATIENCE).await?;
            assert_eq!(got[0].channel_str(), "fwded:ok", "{}", case.world);
        }
        // The copy can arrive before the worker counts the call that sent it: wait for both.
        let handled = u64::from(case.sees_channel);
        host.wait_plugin(
            "fwd",
            "counting the denied publish and the handled one",
            |p| stat(p, "denied") == 1 && stat(p, "handled") == handled,
        )
        .await?;
        assert!(
            out.next(Duration::from_millis(300)).await.is_err(),
            "{}: nothing else",
            case.world
        );
        host.stop().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wasmcloud_request_is_answered_through_its_reply_to_or_fails_without_one()
-> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    // The same component on both sides: `asker` turns `ask:X` into a request on `svc:X` and
    // publishes the reply on `answered:X`; `answerer` answers every request it gets, on its
    // reply-to, which needs no grant.
    let asker = "[subscriptions]\npatterns = [\"ask:*\"]\n\
                 [grants]\npublish = [\"svc:*\", \"answered:*\"]\n\
                 [limits]\ndeadline_ms = 10000\n";
    let answerer = "[subscriptions]\npatterns = [\"svc:yes*\"]\n";
    let host = TestHost::start(
        &redis,
        &[
            ("asker", plugins::WASMCLOUD_FORWARD, Some(asker)),
            ("answerer", plugins::WASMCLOUD_FORWARD, Some(answerer)),
        ],
    )
    .await?;
    let mut answered = Subscriber::new(&redis, &[], &["answered:*"]).await?;
    let mut requests = Subscriber::new(&redis, &[], &["svc:*"]).await?;

    redis.publish("ask:yes1", "hello").await?;
    let got = answered.take(1, PATIENCE).await?;
    assert_eq!(got[0].channel_str(), "answered:yes1");
    assert_eq!(&got[0].payload[..], b"re: hello");
    // Other subscribers see the request as sent: the reply channel, then the body.
    let request = requests.take(1, PATIENCE).await?;
    assert_eq!(request[0].channel_str(), "svc:yes1");
    let wire = &request[0].payload[..];
    assert!(
        wire.starts_with(b"\0switchyard-reply-to:__switchyard:reply:")
            && wire.ends_with(b"\nhello"),
        "{}",
        String::from_utf8_lossy(wire)
    );

    // Nobody answers on svc:no*: the request fails when its timeout is spent.
    redis.publish("ask:no1", "anyone?").await?;
    let entry = host
        .wait_plugin("asker", "failing the unanswered request", |p| {
            stat(p, "failed") == 1
        })
        .await?;
    assert!(
        entry["stats"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("no reply to the request on \"svc:no1\" within 2000 ms")),
        "{entry}"
    );
    assert_eq!(stat(&entry, "handled"), 1, "{entry}");
    let answerer = host.plugin("answerer").await?.expect("answerer is listed");
    assert_eq!(stat(&answerer, "handled"), 1, "{answerer}");
    assert_eq!(stat(&answerer, "denied"), 0, "{answerer}");
    assert!(answered.next(Duration::from_millis(300)).await.is_err());
    host.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_foreign_component_holds_in_the_host_counts_against_its_memory_cap()
-> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    // The WASI messaging fixture, given `hoard`, makes 64 KiB messages in the host without
    // end. The deadline is long, so only the memory cap can stop it.
    let manifest = "[subscriptions]\npatterns = [\"fwd:*\"]\n[grants]\npublish = [\"fwded:*\"]\n\
                    [limits]\nmemory_mib = 16\ndeadline_ms = 30000\n";
    let host = TestHost::start(
        &redis,
        &[("fwd", plugins::MESSAGING_FORWARD, Some(manifest))],
    )
    .await?;
    let mut out = Subscriber::new(&redis, &[], &["fwded:*"]).await?;
    redis.publish("fwd:hoard", "hoard").await?;
    let entry = host
        .wait_plugin("fwd", "failing the hoarding call", |p| {
            stat(p, "failed") == 1
        })
        .await?;
    let error = entry["stats"]["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("host resources") && error.contains("memory cap"),
        "{entry}"
    );
    // The plugin goes on with a fresh instance.
    redis.publish("fwd:after", "still here").await?;
    let got = out.take(1, PATIENCE).await?;
    assert_eq!(got[0].channel_str(), "fwded:after");
    host.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_world_needs_subscriptions_in_its_manifest() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    for case in CASES {
        let host = TestHost::start(&redis, &[("fwd", case.wasm, None)]).await?;
        let entry = host
            .wait_plugin("fwd", "rejecting the file", |p| {
                p["load_error"]["kind"] == "manifest"
            })
            .await?;
        let message = entry["load_error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(case.world) && message.contains("[subscriptions]"),
            "{message}"
        );
        host.stop().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_and_other_hosts_handlers_swap_under_traffic_without_a_loss() -> anyhow::Result<()>
{
    const MESSAGES: usize = 3000;
    let redis = RedisServer::start().await?;
    let host =
        TestHost::start(&redis, &[("fwd", plugins::FORWARD, Some(FORWARD_MANIFEST))]).await?;
    let mut out = Subscriber::new(&redis, &[], &["fwded:*"]).await?;
    let publisher = redis.publish_steadily("fwd:x", MESSAGES).await?;
    // forward → each foreign handler → forward again, while the publisher runs.
    let mut swaps: Vec<(&str, Vec<u8>, String)> = CASES
        .iter()
        .map(|case| {
            let manifest = case.manifest(&redis, "fwded:*", SPIN_OUT);
            (case.world, read_plugin(case.wasm), manifest)
        })
        .collect();
    swaps.push((
        "switchyard:plugin@0.6.0",
        read_plugin(plugins::FORWARD),
        FORWARD_MANIFEST.to_owned(),
    ));
    for (world, wasm, manifest) in &swaps {
        host.install("fwd", wasm, Some(manifest))?;
        // Each world's component may be compiled here for the first time in the test run,
        // while the other tests load the machine.
        host.wait_plugin_within("fwd", "running the new world", PATIENCE * 3, |p| {
            p["version"]["world"] == *world
        })
        .await?;
    }
    assert_each_arrived(&mut out, publisher, MESSAGES).await?;
    host.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spin_handler_may_open_only_the_hosts_own_redis() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let elsewhere = "[subscriptions]\npatterns = [\"fwd:*\"]\n[grants]\npublish = [\"fwded:*\"]\n\
                     [config]\nredis_address = \"redis://127.0.0.1:1/\"\nout_channel = \"fwded:x\"\n";
    for wasm in SPIN {
        let host = TestHost::start(&redis, &[("fwd", wasm, Some(elsewhere))]).await?;
        let mut out = Subscriber::new(&redis, &[], &["fwded:*"]).await?;
        redis.publish("fwd:x", "hello").await?;
        let entry = host
            .wait_plugin("fwd", "failing the message", |p| stat(p, "failed") == 1)
            .await?;
        assert_eq!(stat(&entry, "handled"), 0, "{entry}");
        assert!(
            out.next(Duration::from_millis(300)).await.is_err(),
            "nothing was published"
        );
        host.stop().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spin_handlers_del_invalidates_within_its_grant_and_other_commands_are_refused()
-> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let manifest = format!(
        "[subscriptions]\npatterns = [\"fwd:*\"]\n[grants]\ninvalidate = [\"cache:*\"]\n\
         [config]\nredis_address = {:?}\n",
        redis.url()
    );
    let host = TestHost::start(&redis, &[("fwd", plugins::SPIN_FORWARD, Some(&manifest))]).await?;
    let mut connection = redis.connection().await?;
    for key in ["cache:user:42", "db:user:42"] {
        redis::cmd("SET")
            .arg(key)
            .arg("v")
            .query_async::<()>(&mut connection)
            .await?;
    }

    // `del` of a granted key is the host's invalidation: the key goes.
    redis.publish("fwd:x", "del:cache:user:42").await?;
    host.wait_plugin("fwd", "handling the del", |p| stat(p, "handled") == 1)
        .await?;
    let exists: i64 = redis::cmd("EXISTS")
        .arg("cache:user:42")
        .query_async(&mut connection)
        .await?;
    assert_eq!(exists, 0, "the granted key was deleted");

    // Outside the grant: denied, counted, and the key stays.
    redis.publish("fwd:x", "del:db:user:42").await?;
    let entry = host
        .wait_plugin("fwd", "denying the del", |p| stat(p, "denied") == 1)
        .await?;
    let exists: i64 = redis::cmd("EXISTS")
        .arg("db:user:42")
        .query_async(&mut connection)
        .await?;
    assert_eq!(exists, 1, "{entry}");

    // A command with no mapping is refused with an error naming it.
    redis.publish("fwd:x", "get:db:user:42").await?;
    let entry = host
        .wait_plugin("fwd", "failing the get", |p| stat(p, "failed") == 2)
        .await?;
    let error = entry["stats"]["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("get is not available to plugins"), "{entry}");
    host.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_each_world_and_lists_them_for_a_component_of_none() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let dir = tempfile::tempdir()?;
    for case in CASES {
        let wasm = dir.path().join("fwd.wasm");
        std::fs::copy(case.wasm, &wasm)?;
        std::fs::write(
            dir.path().join("fwd.toml"),
            case.manifest(&redis, "fwded:*", SPIN_OUT),
        )?;
        let output = tokio::process::Command::new(switchyard_binary()?)
            .args(["check", "--json"])
            .arg(&wasm)
            .output()
            .await?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{}: {stderr}", case.world);
        let report: serde_json::Value = serde_json::from_slice(&output.stdout)?;
        assert_eq!(report["world"], case.world, "{report}");
        assert_eq!(report["grants"]["publish"][0], "fwded:*", "{report}");
    }

    let wasm = dir.path().join("command.wasm");
    std::fs::copy(plugins::NOT_A_PLUGIN, &wasm)?;
    let output = tokio::process::Command::new(switchyard_binary()?)
        .arg("check")
        .arg(&wasm)
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    for case in CASES {
        assert!(stderr.contains(case.world), "{}: {stderr}", case.world);
    }
    assert!(stderr.contains("switchyard:plugin"), "{stderr}");
    Ok(())
}
