//! Metrics to traces: with tracing on, the buckets of `switchyard_plugin_handle_seconds` carry
//! the trace of a sampled message as an OpenMetrics exemplar, for a scraper that asks for
//! OpenMetrics; a scraper that does not gets the Prometheus text format, without exemplars.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use switchyard_tests::otlp::{OtlpReceiver, ReceivedSpan};
use switchyard_tests::{PATIENCE, RedisServer, Subscriber, TestHost};

/// Messages published; each gets a sampled consumer span.
const MESSAGES: usize = 5;

/// The name of the histogram's bucket series.
const BUCKET: &str = "switchyard_plugin_handle_seconds_bucket";

/// One exemplar on a bucket line: `SERIES VALUE # {LABELS} EXEMPLAR_VALUE TIMESTAMP`.
#[derive(Debug)]
struct Exemplar {
    /// The bucket's upper bound.
    le: f64,
    labels: BTreeMap<String, String>,
    value: f64,
    timestamp: f64,
}

/// The labels of `{name="value",...}` (values without commas or quotes, as these are).
fn labels(text: &str) -> anyhow::Result<BTreeMap<String, String>> {
    text.strip_prefix('{')
        .and_then(|rest| rest.strip_suffix('}'))
        .with_context(|| format!("labels in braces: {text}"))?
        .split(',')
        .map(|pair| {
            let (name, value) = pair
                .split_once('=')
                .with_context(|| format!("a label: {pair}"))?;
            Ok((name.to_owned(), value.trim_matches('"').to_owned()))
        })
        .collect()
}

/// The labels of a line of the forward plugin's buckets, and what follows them; `None` for
/// any other line.
fn forward_bucket(line: &str) -> anyhow::Result<Option<(BTreeMap<String, String>, &str)>> {
    let Some(rest) = line.strip_prefix(BUCKET) else {
        return Ok(None);
    };
    let (series_labels, rest) = rest
        .split_once("} ")
        .with_context(|| format!("a bucket's labels: {line}"))?;
    let series_labels = labels(&format!("{series_labels}}}"))?;
    Ok(
        (series_labels.get("plugin").map(String::as_str) == Some("forward"))
            .then_some((series_labels, rest)),
    )
}

/// The exemplar of a line of OpenMetrics text, if it is one of the forward plugin's buckets
/// and has one.
fn exemplar_of(line: &str) -> anyhow::Result<Option<Exemplar>> {
    let Some((series_labels, rest)) = forward_bucket(line)? else {
        return Ok(None);
    };
    let Some((_count, exemplar)) = rest.split_once(" # ") else {
        return Ok(None);
    };
    let le = match series_labels.get("le").map(String::as_str) {
        Some("+Inf") => f64::INFINITY,
        Some(le) => le.parse()?,
        None => anyhow::bail!("a bucket without le: {line}"),
    };
    let (exemplar_labels, numbers) = exemplar
        .split_once("} ")
        .with_context(|| format!("exemplar labels in braces: {line}"))?;
    let numbers: Vec<f64> = numbers
        .split(' ')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("exemplar value and timestamp: {line}"))?;
    let [value, timestamp] = numbers[..] else {
        anyhow::bail!("an exemplar needs a value and a timestamp: {line}");
    };
    Ok(Some(Exemplar {
        le,
        labels: labels(&format!("{exemplar_labels}}}"))?,
        value,
        timestamp,
    }))
}

/// Scrapes the host's `/metrics`, with `accept` as the `Accept` header if given; the
/// content type and the body.
async fn scrape(host: &TestHost, accept: Option<&str>) -> anyhow::Result<(String, String)> {
    let mut request = reqwest::Client::new().get(format!("http://{}/metrics", host.admin()));
    if let Some(accept) = accept {
        request = request.header(ACCEPT, accept);
    }
    let response = request.send().await?.error_for_status()?;
    let content_type = response
        .headers()
        .get(CONTENT_TYPE)
        .context("a content type")?
        .to_str()?
        .to_owned();
    Ok((content_type, response.text().await?))
}

fn consumer_spans(spans: &[ReceivedSpan]) -> Vec<&ReceivedSpan> {
    spans
        .iter()
        .filter(|span| span.kind == "consumer" && span.name.starts_with("process fwd:"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handle_time_buckets_carry_the_trace_of_a_sampled_message_for_openmetrics_scrapers()
-> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let receiver = OtlpReceiver::start().await?;
    let config = format!(
        "[tracing]\notlp_endpoint = {:?}\nexport_interval_ms = 100\nsample_ratio = 1.0\n",
        receiver.endpoint()
    );
    let host = crate::tracing::forward_host(&redis, &config).await?;
    let mut out = Subscriber::new(&redis, &[], &["fwded:*"]).await?;
    let before = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64();
    for i in 0..MESSAGES {
        redis.publish(format!("fwd:{i}"), "x").await?;
    }
    out.take(MESSAGES, PATIENCE).await?;
    host.wait_plugin("forward", "every message handled", |p| {
        p["stats"]["handled"] == MESSAGES
    })
    .await?;
    let spans = receiver
        .wait_for_spans("a consumer span per message", PATIENCE, |spans| {
            consumer_spans(spans).len() >= MESSAGES
        })
        .await?;
    let consumers = consumer_spans(&spans);

    // A scraper asking for OpenMetrics, as Prometheus does, gets exemplars.
    let (content_type, text) =
        scrape(&host, Some("application/openmetrics-text; version=1.0.0")).await?;
    let after = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64();
    assert_eq!(
        content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(text.ends_with("# EOF\n"), "{text}");
    let mut exemplars = Vec::new();
    for line in text.lines() {
        exemplars.extend(exemplar_of(line)?);
    }
    assert!(!exemplars.is_empty(), "no exemplar on a bucket:\n{text}");
    for exemplar in &exemplars {
        let names: Vec<&str> = exemplar.labels.keys().map(String::as_str).collect();
        assert_eq!(names, ["span_id", "trace_id"], "{exemplar:?}");
        let span = consumers
            .iter()
            .find(|span| span.trace_id == exemplar.labels["trace_id"])
            .with_context(|| {
                format!("no consumer span the receiver got has the trace of {exemplar:?}")
            })?;
        assert_eq!(span.span_id, exemplar.labels["span_id"], "{exemplar:?}");
        assert!(
            exemplar.value > 0.0 && exemplar.value <= exemplar.le,
            "the exemplar's value belongs in its bucket: {exemplar:?}"
        );
        assert!(
            (before..=after).contains(&exemplar.timestamp),
            "the exemplar's timestamp is when the call ended: {exemplar:?}"
        );
    }
    // Every other line of the histogram is as before: no exemplar on `_sum` or `_count`.
    assert!(
        text.lines().any(|line| line
            == format!(r#"switchyard_plugin_handle_seconds_count{{plugin="forward"}} {MESSAGES}"#)),
        "{text}"
    );

    // Without that header: the Prometheus text format, which has no place for exemplars.
    let (content_type, text) = scrape(&host, None).await?;
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    assert!(!text.contains("# EOF"), "{text}");
    assert!(!text.contains("trace_id"), "{text}");
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        assert!(
            !line.contains(" # "),
            "an exemplar in Prometheus text: {line}"
        );
    }
    let mut buckets = 0;
    for line in text.lines() {
        buckets += usize::from(forward_bucket(line)?.is_some());
    }
    assert_eq!(buckets, 12, "the same buckets:\n{text}");
    assert!(
        text.lines().any(|line| line
            == format!(r#"switchyard_plugin_handle_seconds_count{{plugin="forward"}} {MESSAGES}"#)),
        "{text}"
    );
    host.stop().await
}
