//! Traces, exported to a real OTLP receiver that decodes the protocol: the consumer span of a
//! message joins its publisher's trace, its effects are its children, a webhook receives the
//! same trace, a failure is the span's error, and a receiver that is down costs spans only.

use switchyard_tests::otlp::{OtlpReceiver, ReceivedSpan};
use switchyard_tests::webhook::Webhook;
use switchyard_tests::{FORWARD_MANIFEST, PATIENCE, RedisServer, Subscriber, TestHost, plugins};

use crate::faults::stat;

/// A publisher's context: trace and span ids it chose, sampled.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

fn tracing_config(receiver: &OtlpReceiver) -> String {
    format!(
        "[tracing]\notlp_endpoint = {:?}\nexport_interval_ms = 100\nservice_name = \"router-test\"\n",
        receiver.endpoint()
    )
}

fn named<'a>(spans: &'a [ReceivedSpan], prefix: &str) -> Option<&'a ReceivedSpan> {
    spans.iter().find(|span| span.name.starts_with(prefix))
}

/// A host running forward, configured with `config`.
pub(crate) async fn forward_host(redis: &RedisServer, config: &str) -> anyhow::Result<TestHost> {
    TestHost::start_configured(
        redis,
        config,
        &[("forward", plugins::FORWARD, Some(FORWARD_MANIFEST))],
    )
    .await
}

/// A host running the `faulty` fixture on `fault:*`, allowed to publish on `faults`,
/// configured with `config`.
async fn faulty_host(redis: &RedisServer, config: &str) -> anyhow::Result<TestHost> {
    let manifest = "[subscriptions]\npatterns = [\"fault:*\"]\n[grants]\npublish = [\"faults\"]\n";
    TestHost::start_configured(
        redis,
        config,
        &[("faulty", plugins::FAULTY, Some(manifest))],
    )
    .await
}

/// The spans `host` counted as `result` (`exported`, `failed`, `dropped`) so far.
async fn spans_counted(host: &TestHost, result: &str) -> anyhow::Result<u64> {
    let series = format!("switchyard_trace_spans_total{{result=\"{result}\"}}");
    Ok(crate::faults::metric(host, &series).await?.unwrap_or(0))
}

/// Publishes `messages` on `channel`, checks that forward delivered every one to `out`, then
/// waits until `host` has counted more than `before` spans as `result`; returns the count.
async fn forward_all_then_count_spans(
    redis: &RedisServer,
    out: &mut Subscriber,
    host: &TestHost,
    channel: &str,
    messages: usize,
    result: &str,
    before: u64,
) -> anyhow::Result<u64> {
    redis
        .publish_all((0..messages).map(|i| (channel, i.to_string())))
        .await?;
    let got = out.take(messages, PATIENCE).await?;
    assert_eq!(got.len(), messages, "{channel}: every message forwarded");
    switchyard_tests::eventually(PATIENCE, || async {
        let now = spans_counted(host, result).await?;
        anyhow::ensure!(now > before, "{channel}: no span counted as {result} yet");
        Ok(now)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_entry_s_trace_continues_through_the_plugin_to_its_publish_and_webhook()
-> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let receiver = OtlpReceiver::start().await?;
    let webhook = Webhook::start().await?;
    let config = format!(
        "{}\n[outputs.hook]\nkind = \"http\"\nurl = {:?}\n",
        tracing_config(&receiver),
        webhook.url("/hook")
    );
    let manifest = "[subscriptions]\nstreams = [\"orders\"]\n[grants]\npublish = \
                    [\"probe-results\"]\noutputs = [\"hook\"]\n[config]\noutput = \"hook\"\n";
    let host = TestHost::start_configured(
        &redis,
        &config,
        &[("probe", plugins::OUTPUT_PROBE, Some(manifest))],
    )
    .await?;
    let mut results = Subscriber::new(&redis, &["probe-results"], &[]).await?;
    let mut connection = redis.connection().await?;
    let entry: String = redis::cmd("XADD")
        .arg("orders")
        .arg("*")
        .arg("traceparent")
        .arg(format!("00-{TRACE_ID}-{PARENT_ID}-01"))
        .arg("payload")
        .arg(r#"{"order":42}"#)
        .query_async(&mut connection)
        .await?;
    results.take(1, PATIENCE).await?;

    let spans = receiver
        .wait_for_spans(
            "the message's consumer span and its effects",
            PATIENCE,
            |spans| {
                named(spans, "process orders").is_some()
                    && named(spans, "call hook").is_some()
                    && (named(spans, "publish probe-results").is_some()
                        || named(spans, "send probe-results").is_some())
            },
        )
        .await?;
    let consumer = named(&spans, "process orders").expect("waited for");
    assert_eq!(consumer.trace_id, TRACE_ID, "{consumer:?}");
    assert_eq!(consumer.parent_span_id.as_deref(), Some(PARENT_ID));
    assert_eq!(consumer.kind, "consumer");
    assert_eq!(consumer.attributes["switchyard.plugin"], "probe");
    assert_eq!(consumer.attributes["messaging.message.id"], entry);
    assert_eq!(consumer.attributes["messaging.destination.name"], "orders");
    assert_eq!(consumer.resource["service.name"], "router-test");
    let call = named(&spans, "call hook").expect("waited for");
    let publish = named(&spans, "publish probe-results")
        .or_else(|| named(&spans, "send probe-results"))
        .expect("waited for");
    for child in [call, publish] {
        assert_eq!(child.trace_id, TRACE_ID, "{child:?}");
        assert_eq!(
            child.parent_span_id.as_deref(),
            Some(consumer.span_id.as_str())
        );
    }
    assert_eq!(call.kind, "client");
    assert_eq!(call.attributes["http.response.status_code"], "200");
    assert_eq!(publish.kind, "producer");

    // The webhook received the call's context: the same trace, the call's span as parent.
    let request = webhook.requests().pop().expect("the webhook was called");
    let traceparent = request
        .headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    // The request's own span, the first attempt, is the call's child.
    let attempt = spans
        .iter()
        .find(|span| span.name == "POST")
        .expect("exported with the call");
    assert_eq!(
        attempt.parent_span_id.as_deref(),
        Some(call.span_id.as_str())
    );
    assert_eq!(attempt.kind, "client");
    assert_eq!(attempt.attributes["http.response.status_code"], "200");
    assert!(!attempt.attributes.contains_key("http.request.resend_count"));
    assert_eq!(traceparent, format!("00-{TRACE_ID}-{}-01", attempt.span_id));

    // The entry's acknowledgement joins its trace; the read that brought it is linked to it.
    let spans = receiver
        .wait_for_spans("the entry's ack and read", PATIENCE, |spans| {
            named(spans, "ack orders").is_some() && named(spans, "receive orders").is_some()
        })
        .await?;
    let ack = named(&spans, "ack orders").expect("waited for");
    assert_eq!(ack.trace_id, TRACE_ID);
    assert_eq!(
        ack.parent_span_id.as_deref(),
        Some(consumer.span_id.as_str())
    );
    assert_eq!(ack.attributes["messaging.operation.type"], "settle");
    let read = named(&spans, "receive orders").expect("waited for");
    assert_eq!(read.attributes["messaging.operation.type"], "receive");
    assert_eq!(read.attributes["messaging.batch.message_count"], "1");
    assert_eq!(
        read.links,
        vec![(TRACE_ID.to_owned(), PARENT_ID.to_owned())],
        "{read:?}"
    );
    host.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_s_retries_dead_letter_and_a_webhook_s_retries_are_in_its_trace()
-> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let receiver = OtlpReceiver::start().await?;
    // The first answer is a 500: the call is retried once.
    let webhook = Webhook::failing_first(1).await?;
    let config = format!(
        "{}\n[streams]\nblock_ms = 100\n\n[outputs.hook]\nkind = \"http\"\nurl = {:?}\nbackoff_ms = 10\n",
        tracing_config(&receiver),
        webhook.url("/hook")
    );
    let manifest = "[subscriptions]\nstreams = [\"jobs\"]\n[stream]\nmax_deliveries = 2\n\
                    retry_backoff_ms = 20\n[grants]\npublish = [\"probe-results\"]\n\
                    outputs = [\"hook\"]\n[config]\noutput = \"hook\"\n";
    let host = TestHost::start_configured(
        &redis,
        &config,
        &[("probe", plugins::OUTPUT_PROBE, Some(manifest))],
    )
    .await?;
    let mut connection = redis.connection().await?;
    let _: String = redis::cmd("XADD")
        .arg("jobs")
        .arg("*")
        .arg("traceparent")
        .arg(format!("00-{TRACE_ID}-{PARENT_ID}-01"))
        .arg("payload")
        .arg("x")
        .query_async(&mut connection)
        .await?;
    let spans = receiver
        .wait_for_spans("two attempts of the webhook call", PATIENCE, |spans| {
            spans.iter().filter(|span| span.name == "POST").count() == 2
        })
        .await?;
    let call = named(&spans, "call hook").expect("exported before its attempts ended");
    let attempts: Vec<&ReceivedSpan> = spans.iter().filter(|span| span.name == "POST").collect();
    for attempt in &attempts {
        assert_eq!(
            attempt.parent_span_id.as_deref(),
            Some(call.span_id.as_str())
        );
    }
    let statuses: Vec<&str> = attempts
        .iter()
        .map(|span| span.attributes["http.response.status_code"].as_str())
        .collect();
    assert_eq!(statuses, ["503", "200"], "{attempts:?}");
    assert_eq!(attempts[0].status_code, "error");
    assert_eq!(attempts[1].attributes["http.request.resend_count"], "1");
    // Each request carried its own attempt's context.
    let sent: Vec<String> = webhook
        .requests()
        .iter()
        .map(|r| {
            r.headers
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    let expected: Vec<String> = attempts
        .iter()
        .map(|a| format!("00-{TRACE_ID}-{}-01", a.span_id))
        .collect();
    assert_eq!(sent, expected);
    host.stop().await?;

    // A plugin that fails on every delivery: retried, then dead-lettered, all in the trace.
    let failing = "[subscriptions]\nstreams = [\"jobs2\"]\n[stream]\nmax_deliveries = 2\n\
                   retry_backoff_ms = 20\n[grants]\npublish = [\"faults\"]\n";
    let host = TestHost::start_configured(
        &redis,
        &config,
        &[("faulty", plugins::FAULTY, Some(failing))],
    )
    .await?;
    let _: String = redis::cmd("XADD")
        .arg("jobs2")
        .arg("*")
        .arg("traceparent")
        .arg(format!("00-{TRACE_ID}-{PARENT_ID}-01"))
        .arg("payload")
        .arg("error")
        .query_async(&mut connection)
        .await?;
    let spans = receiver
        .wait_for_spans("the entry's retry and dead letter", PATIENCE, |spans| {
            named(spans, "dead-letter jobs2").is_some()
                && spans.iter().filter(|s| s.name == "process jobs2").count() == 2
        })
        .await?;
    let handles: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|span| span.name == "process jobs2")
        .collect();
    let retry = named(&spans, "retry jobs2").expect("before the second delivery");
    let dead = named(&spans, "dead-letter jobs2").expect("waited for");
    for span in [retry, dead] {
        assert_eq!(span.trace_id, TRACE_ID, "{span:?}");
    }
    // The retry hangs under the first handling, the dead letter under the last.
    let parents: Vec<Option<&str>> = [retry, dead]
        .iter()
        .map(|span| span.parent_span_id.as_deref())
        .collect();
    let handle_ids: Vec<Option<&str>> = handles.iter().map(|h| Some(h.span_id.as_str())).collect();
    assert_eq!(parents, handle_ids, "{spans:#?}");
    assert_eq!(retry.attributes["switchyard.deliveries"], "1");
    assert_eq!(dead.kind, "producer");
    assert_eq!(dead.attributes["messaging.destination.name"], "jobs2:dead");
    assert!(
        dead.attributes["switchyard.dead.error"].contains("failed"),
        "{dead:?}"
    );
    host.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_carry_their_context_in_the_payload_only_when_asked() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let receiver = OtlpReceiver::start().await?;
    let incoming = format!(r#"{{"n":1,"traceparent":"00-{TRACE_ID}-{PARENT_ID}-01"}}"#);
    for write in [false, true] {
        let config = format!(
            "{}payload_field = \"traceparent\"\nwrite_payload_field = {write}\n",
            tracing_config(&receiver)
        );
        let host = TestHost::start_configured(
            &redis,
            &config,
            &[("forward", plugins::FORWARD, Some(FORWARD_MANIFEST))],
        )
        .await?;
        let mut out = Subscriber::new(&redis, &[], &["fwded:*"]).await?;
        let channel = format!("fwd:{write}");
        redis.publish(&channel, incoming.as_str()).await?;
        let got = out.take(1, PATIENCE).await?;
        let payload = String::from_utf8(got[0].payload.to_vec())?;
        if write {
            let spans = receiver
                .wait_for_spans("the forward's publish", PATIENCE, |spans| {
                    named(spans, "send fwded:true").is_some()
                        || named(spans, "publish fwded:true").is_some()
                })
                .await?;
            let publish = named(&spans, "send fwded:true")
                .or_else(|| named(&spans, "publish fwded:true"))
                .expect("waited for");
            assert_eq!(publish.trace_id, TRACE_ID);
            assert_eq!(
                payload,
                format!(
                    r#"{{"n":1,"traceparent":"00-{TRACE_ID}-{}-01"}}"#,
                    publish.span_id
                )
            );
        } else {
            assert_eq!(payload, incoming, "untouched unless asked");
        }
        host.stop().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_message_s_span_carries_the_error_and_a_payload_field_can_parent_it()
-> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let receiver = OtlpReceiver::start().await?;
    let config = format!(
        "{}payload_field = \"traceparent\"\n",
        tracing_config(&receiver)
    );
    let host = faulty_host(&redis, &config).await?;
    // Not JSON: a new trace. The fixture fails on `error`.
    redis.publish("fault:x", "error").await?;
    let spans = receiver
        .wait_for_spans("the failed message's span", PATIENCE, |spans| {
            named(spans, "process fault:x").is_some()
        })
        .await?;
    let failed = named(&spans, "process fault:x").expect("waited for");
    assert_eq!(failed.status_code, "error", "{failed:?}");
    assert!(failed.status_message.contains("failed"), "{failed:?}");
    assert_eq!(failed.attributes["error.type"], "error");
    assert_eq!(failed.parent_span_id, None, "a new trace");
    host.wait_plugin("faulty", "counting the failure", |p| stat(p, "failed") == 1)
        .await?;

    // A JSON payload's traceparent field parents the span (the fixture answers `ok` to
    // anything it does not know).
    redis
        .publish(
            "fault:json",
            format!(r#"{{"traceparent":"00-{TRACE_ID}-{PARENT_ID}-01","order":1}}"#).as_str(),
        )
        .await?;
    let spans = receiver
        .wait_for_spans("the JSON message's span", PATIENCE, |spans| {
            named(spans, "process fault:json").is_some()
        })
        .await?;
    let joined = named(&spans, "process fault:json").expect("waited for");
    assert_eq!(joined.trace_id, TRACE_ID);
    assert_eq!(joined.parent_span_id.as_deref(), Some(PARENT_ID));
    assert_eq!(joined.status_code, "unset");
    host.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_is_down_costs_spans_not_messages() -> anyhow::Result<()> {
    const MESSAGES: usize = 500;
    let redis = RedisServer::start().await?;
    let mut receiver = OtlpReceiver::start().await?;
    let host = forward_host(&redis, &tracing_config(&receiver)).await?;
    receiver.stop().await;
    let mut out = Subscriber::new(&redis, &[], &["fwded:*"]).await?;
    forward_all_then_count_spans(&redis, &mut out, &host, "fwd:x", MESSAGES, "failed", 0).await?;

    // Back up: spans flow again.
    receiver.restart().await?;
    redis.publish("fwd:after", "1").await?;
    receiver
        .wait_for_spans("a span after the receiver came back", PATIENCE, |spans| {
            named(spans, "process fwd:after").is_some()
        })
        .await?;
    host.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_beyond_the_exporter_s_queue_are_dropped_and_counted_not_messages()
-> anyhow::Result<()> {
    const MESSAGES: usize = 6_000;
    let redis = RedisServer::start().await?;
    // A collector that takes connections and never answers: every export waits for its
    // timeout while spans pile up behind it.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", silent.local_addr()?);
    let held = tokio::spawn(async move {
        let mut connections = Vec::new();
        while let Ok((connection, _)) = silent.accept().await {
            connections.push(connection);
        }
    });
    let config = format!("[tracing]\notlp_endpoint = {endpoint:?}\nexport_interval_ms = 100\n");
    let host = forward_host(&redis, &config).await?;
    let mut out = Subscriber::new(&redis, &[], &["fwded:*"]).await?;
    let dropped =
        forward_all_then_count_spans(&redis, &mut out, &host, "fwd:x", MESSAGES, "dropped", 0)
            .await?;
    // Two spans a message (process, and send or publish), far more than the queue holds.
    assert!(dropped <= 2 * MESSAGES as u64, "{dropped}");
    held.abort();
    host.stop().await?;
    Ok(())
}

/// `[tracing]` exporting to `receiver` over gRPC.
fn grpc_tracing_config(receiver: &OtlpReceiver) -> String {
    format!("{}protocol = \"grpc\"\n", tracing_config(receiver))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_grpc_a_message_s_consumer_span_and_its_publish_reach_the_collector()
-> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let receiver = OtlpReceiver::start_grpc().await?;
    let config = format!(
        "{}payload_field = \"traceparent\"\n",
        grpc_tracing_config(&receiver)
    );
    let host = faulty_host(&redis, &config).await?;
    // The fixture answers anything it does not know with a publish on `faults`.
    redis
        .publish(
            "fault:grpc",
            format!(r#"{{"traceparent":"00-{TRACE_ID}-{PARENT_ID}-01","order":7}}"#).as_str(),
        )
        .await?;
    let spans = receiver
        .wait_for_spans(
            "the message's consumer span and its publish",
            PATIENCE,
            |spans| {
                named(spans, "process fault:grpc").is_some()
                    && named(spans, "publish faults").is_some()
            },
        )
        .await?;
    let consumer = named(&spans, "process fault:grpc").expect("waited for");
    assert_eq!(consumer.trace_id, TRACE_ID, "{consumer:?}");
    assert_eq!(consumer.parent_span_id.as_deref(), Some(PARENT_ID));
    assert_eq!(consumer.kind, "consumer");
    assert_eq!(consumer.attributes["switchyard.plugin"], "faulty");
    assert_eq!(consumer.resource["service.name"], "router-test");
    let publish = named(&spans, "publish faults").expect("waited for");
    assert_eq!(publish.trace_id, TRACE_ID, "{publish:?}");
    assert_eq!(
        publish.parent_span_id.as_deref(),
        Some(consumer.span_id.as_str())
    );
    assert_eq!(publish.kind, "producer");
    assert_eq!(receiver.rejections(), Vec::<String>::new());
    host.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_grpc_a_collector_that_is_down_costs_spans_and_export_resumes_when_it_is_back()
-> anyhow::Result<()> {
    const MESSAGES: usize = 500;
    let redis = RedisServer::start().await?;
    let mut receiver = OtlpReceiver::start_grpc().await?;
    let host = forward_host(&redis, &grpc_tracing_config(&receiver)).await?;
    let mut out = Subscriber::new(&redis, &[], &["fwded:*"]).await?;

    // Down before the exporter ever connected, then with a connection it had made: each time
    // every message is forwarded, spans fail and are counted, and export resumes once the
    // collector is back.
    for round in ["never-connected", "reconnected"] {
        receiver.stop().await;
        let before = spans_counted(&host, "failed").await?;
        let channel = format!("fwd:{round}");
        forward_all_then_count_spans(
            &redis, &mut out, &host, &channel, MESSAGES, "failed", before,
        )
        .await?;

        receiver.restart().await?;
        let after = format!("fwd:after-{round}");
        redis.publish(&after, "1").await?;
        receiver
            .wait_for_spans(
                &format!("{round}: a span after the collector came back"),
                PATIENCE,
                |spans| named(spans, &format!("process {after}")).is_some(),
            )
            .await?;
        out.take(1, PATIENCE).await?;
    }
    host.stop().await?;
    Ok(())
}
