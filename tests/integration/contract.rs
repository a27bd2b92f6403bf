//! The plugin contract across versions: a current plugin reads the trace context of its own
//! call (the consumer span a real OTLP receiver gets), and a plugin built for 0.4.0 loads,
//! runs, is checked and swaps beside current plugins unchanged, while a version the host does
//! not run is refused with the ones it does.

use serde_json::Value;
use switchyard_tests::otlp::{OtlpReceiver, ReceivedSpan};
use switchyard_tests::{
    FORWARD_MANIFEST, PATIENCE, RedisServer, Subscriber, TestHost, assert_each_arrived,
    echo_manifest, plugins, read_plugin, switchyard_binary,
};

use crate::faults::stat;

/// A publisher's context, chosen by the test: its trace and span ids, not sampled.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

/// What `/plugins` and `switchyard check` call the two versions.
const CURRENT: &str = "switchyard:plugin@0.6.0";
const PREVIOUS: &str = "switchyard:plugin@0.4.0";
const BEFORE: &str = "switchyard:plugin@0.5.0";

fn tracing_config(receiver: &OtlpReceiver) -> String {
    format!(
        "[tracing]\notlp_endpoint = {:?}\nexport_interval_ms = 100\n",
        receiver.endpoint()
    )
}

fn named<'a>(spans: &'a [ReceivedSpan], name: &str) -> Option<&'a ReceivedSpan> {
    spans.iter().find(|span| span.name == name)
}

/// The next report of the `echo` fixture on `reports`.
async fn next_report(reports: &mut Subscriber) -> anyhow::Result<Value> {
    let got = reports.take(1, PATIENCE).await?;
    Ok(serde_json::from_slice(&got[0].payload)?)
}

/// A W3C `traceparent`, split: (trace id, span id, flags).
fn split_traceparent(report: &Value) -> (String, String, String) {
    let traceparent = report["traceparent"].as_str().unwrap_or_default();
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "a traceparent has four parts: {report}");
    assert_eq!(parts[0], "00", "version 00: {report}");
    (
        parts[1].to_owned(),
        parts[2].to_owned(),
        parts[3].to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_reads_the_context_of_the_span_the_host_traces_its_call_with() -> anyhow::Result<()>
{
    let redis = RedisServer::start().await?;
    let receiver = OtlpReceiver::start().await?;
    let manifest = format!(
        "{}streams = [\"orders\"]\n",
        echo_manifest(&["traced"], &[], "reports", "trace")
    );
    let host = TestHost::start_configured(
        &redis,
        &tracing_config(&receiver),
        &[("echo", plugins::ECHO, Some(&manifest))],
    )
    .await?;
    let mut reports = Subscriber::new(&redis, &["reports"], &[]).await?;

    // A stream entry whose publisher did not sample its trace: the host's span continues it,
    // unsampled, and the plugin still gets its context, flags 00.
    let mut connection = redis.connection().await?;
    let _: String = redis::cmd("XADD")
        .arg("orders")
        .arg("*")
        .arg("traceparent")
        .arg(format!("00-{TRACE_ID}-{PARENT_ID}-00"))
        .arg("payload")
        .arg("unsampled")
        .query_async(&mut connection)
        .await?;
    let report = next_report(&mut reports).await?;
    let (trace, span, flags) = split_traceparent(&report);
    assert_eq!(trace, TRACE_ID, "the publisher's trace: {report}");
    assert_ne!(span, PARENT_ID, "a span of the host's own: {report}");
    assert_eq!(flags, "00", "not sampled: {report}");

    // A pub/sub message starts a trace, sampled (the default ratio is 1): the traceparent the
    // plugin read names the consumer span the receiver got.
    redis.publish("traced", "hello").await?;
    let report = next_report(&mut reports).await?;
    let (trace, span, flags) = split_traceparent(&report);
    assert_eq!(flags, "01", "sampled: {report}");
    let spans = receiver
        .wait_for_spans(
            "the message's consumer span and its publish",
            PATIENCE,
            |spans| {
                named(spans, "process traced").is_some()
                    && named(spans, "publish reports").is_some()
            },
        )
        .await?;
    let consumer = named(&spans, "process traced").expect("waited for");
    assert_eq!(consumer.kind, "consumer");
    assert_eq!(consumer.trace_id, trace, "{consumer:?}");
    assert_eq!(consumer.span_id, span, "{consumer:?}");
    // The publish of the report is a child of that span.
    let publish = named(&spans, "publish reports").expect("waited for");
    assert_eq!(publish.parent_span_id.as_deref(), Some(span.as_str()));
    // The unsampled entry's span was never recorded.
    assert!(
        spans.iter().all(|span| span.trace_id != TRACE_ID),
        "{spans:?}"
    );
    host.stop().await?;

    // With tracing off, there is no context to read.
    let host = TestHost::start(&redis, &[("echo", plugins::ECHO, Some(&manifest))]).await?;
    redis.publish("traced", "untraced").await?;
    let report = next_report(&mut reports).await?;
    assert_eq!(report["payload"], "untraced");
    assert_eq!(report["traceparent"], Value::Null, "{report}");
    host.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_built_for_0_4_0_runs_beside_current_plugins_under_the_same_grants_and_spans()
-> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let receiver = OtlpReceiver::start().await?;
    // Granted fwded:* except what the test keeps out of reach: fwded:ok only.
    let old_manifest = "[grants]\npublish = [\"fwded:ok\", \"fwded:x\"]\n";
    let host = TestHost::start_configured(
        &redis,
        &tracing_config(&receiver),
        &[
            ("old", plugins::FORWARD_0_4, Some(old_manifest)),
            ("new", plugins::FORWARD, Some(FORWARD_MANIFEST)),
        ],
    )
    .await?;
    let old = host.plugin("old").await?.expect("old is listed");
    assert_eq!(old["state"], "running", "{old}");
    assert_eq!(old["version"]["world"], PREVIOUS, "{old}");
    assert_eq!(old["version"]["declared_name"], "forward-0-4", "{old}");
    assert_eq!(old["version"]["subscriptions"][0], "pattern fwd:*", "{old}");
    let new = host.plugin("new").await?.expect("new is listed");
    assert_eq!(new["version"]["world"], CURRENT, "{new}");

    // Both forward every message, bytes unchanged: two copies of each.
    let mut out = Subscriber::new(&redis, &[], &["fwded:*"]).await?;
    let payloads: [&[u8]; 3] = [b"hello", b"", &[0, 159, 146, 150, 255]];
    for payload in payloads {
        redis.publish("fwd:ok", payload).await?;
    }
    let got = out.take(2 * payloads.len(), PATIENCE).await?;
    for payload in payloads {
        let copies = got
            .iter()
            .filter(|m| m.channel_str() == "fwded:ok" && m.payload[..] == *payload)
            .count();
        assert_eq!(copies, 2, "{payload:?} from each plugin: {got:?}");
    }

    // The host's calls keep their grants: outside them, the old plugin is denied, counted.
    redis.publish("fwd:no", "x").await?;
    host.wait_plugin("old", "counting the denied send", |p| {
        stat(p, "denied") == 1 && stat(p, "failed") == 1
    })
    .await?;
    let entry = host.plugin("old").await?.expect("old is listed");
    let error = entry["stats"]["last_error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("denied: ") && error.contains("fwded:no"),
        "the denial comes back to the plugin, which returns it: {entry}"
    );

    // And their spans: the old plugin's send is a child of its consumer span.
    redis.publish("fwd:x", "traced").await?;
    let spans = receiver
        .wait_for_spans("the old plugin's span and its send", PATIENCE, |spans| {
            spans.iter().any(|span| {
                span.name == "send fwded:x" && span.attributes["switchyard.plugin"] == "old"
            })
        })
        .await?;
    let send = spans
        .iter()
        .find(|span| span.name == "send fwded:x" && span.attributes["switchyard.plugin"] == "old")
        .expect("waited for");
    let parent = spans
        .iter()
        .find(|span| Some(&span.span_id) == send.parent_span_id.as_ref())
        .expect("the send's parent is exported");
    assert_eq!(parent.name, "process fwd:x");
    assert_eq!(parent.attributes["switchyard.plugin"], "old");
    host.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_0_4_0_plugin_and_its_current_rebuild_swap_under_traffic_without_a_loss()
-> anyhow::Result<()> {
    const MESSAGES: usize = 2000;
    let redis = RedisServer::start().await?;
    let host = TestHost::start(
        &redis,
        &[("fwd", plugins::FORWARD_0_4, Some(FORWARD_MANIFEST))],
    )
    .await?;
    let mut out = Subscriber::new(&redis, &[], &["fwded:*"]).await?;
    let publisher = redis.publish_steadily("fwd:x", MESSAGES).await?;
    for (world, wasm) in [
        (CURRENT, plugins::FORWARD),
        (PREVIOUS, plugins::FORWARD_0_4),
        (CURRENT, plugins::FORWARD),
    ] {
        host.install("fwd", &read_plugin(wasm), Some(FORWARD_MANIFEST))?;
        host.wait_plugin("fwd", "running the other version", |p| {
            p["version"]["world"] == world
        })
        .await?;
    }
    assert_each_arrived(&mut out, publisher, MESSAGES).await?;
    host.stop().await?;
    Ok(())
}

/// `switchyard check ARGS... FILE`: (success, stdout, stderr).
async fn check(args: &[&str], wasm: &std::path::Path) -> anyhow::Result<(bool, String, String)> {
    let output = tokio::process::Command::new(switchyard_binary()?)
        .arg("check")
        .args(args)
        .arg(wasm)
        .output()
        .await?;
    Ok((
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_the_version_a_plugin_was_built_for() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let wasm = dir.path().join("old.wasm");
    std::fs::copy(plugins::FORWARD_0_4, &wasm)?;
    std::fs::write(dir.path().join("old.toml"), FORWARD_MANIFEST)?;

    let (ok, stdout, stderr) = check(&["--json"], &wasm).await?;
    assert!(ok, "{stderr}");
    let report: Value = serde_json::from_str(&stdout)?;
    assert_eq!(
        report["world"], "switchyard:plugin/plugin@0.4.0",
        "{report}"
    );
    assert_eq!(report["describe"]["name"], "forward-0-4", "{report}");
    assert_eq!(report["grants"]["publish"][0], "fwded:*", "{report}");
    let exports = report["exports"].to_string();
    assert!(
        exports.contains("switchyard:plugin/handler@0.4.0"),
        "{report}"
    );

    let (ok, stdout, stderr) = check(&[], &wasm).await?;
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("a Switchyard plugin for switchyard:plugin/plugin@0.4.0"),
        "{stdout}"
    );
    assert!(stdout.contains("describe:      forward-0-4"), "{stdout}");

    // The current version, for contrast.
    let current = dir.path().join("new.wasm");
    std::fs::copy(plugins::FORWARD, &current)?;
    let (ok, stdout, stderr) = check(&["--json"], &current).await?;
    assert!(ok, "{stderr}");
    let report: Value = serde_json::from_str(&stdout)?;
    assert_eq!(
        report["world"], "switchyard:plugin/plugin@0.6.0",
        "{report}"
    );
    Ok(())
}

/// `wasm` with every `from` replaced by `to`, of the same length: the same component, its
/// names changed.
fn renamed(wasm: &[u8], from: &str, to: &str) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let (from, to) = (from.as_bytes(), to.as_bytes());
    let mut out = wasm.to_vec();
    let mut at = 0;
    let mut replaced = 0;
    while let Some(found) = out[at..].windows(from.len()).position(|w| w == from) {
        out[at + found..at + found + from.len()].copy_from_slice(to);
        at += found + from.len();
        replaced += 1;
    }
    assert!(replaced > 0, "the component names {from:?}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_the_host_does_not_run_is_refused_naming_those_it_does() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let dir = tempfile::tempdir()?;
    // The 0.4.0 fixture as if built for a later contract: its interfaces renamed 0.7.0.
    let future = renamed(
        &read_plugin(plugins::FORWARD_0_4),
        "switchyard:plugin/handler@0.4.0",
        "switchyard:plugin/handler@0.7.0",
    );
    let wasm = dir.path().join("future.wasm");
    std::fs::write(&wasm, &future)?;
    let (ok, _, stderr) = check(&[], &wasm).await?;
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("built for switchyard:plugin@0.7.0")
            && stderr.contains(&format!("it runs {CURRENT}, {BEFORE} and {PREVIOUS}")),
        "{stderr}"
    );

    let host = TestHost::start(&redis, &[]).await?;
    host.install("future", &future, Some(FORWARD_MANIFEST))?;
    let entry = host
        .wait_plugin("future", "rejecting the file", |p| {
            p["load_error"]["kind"] == "world"
        })
        .await?;
    let message = entry["load_error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("built for switchyard:plugin@0.7.0")
            && message.contains(CURRENT)
            && message.contains(PREVIOUS),
        "{entry}"
    );
    host.stop().await?;
    Ok(())
}
