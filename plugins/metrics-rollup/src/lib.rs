//! `metrics-rollup`: rolls metric samples up per source for a live dashboard.
//!
//! Subscribes to `metrics:*`; the rest of the channel name is the source (`metrics:web-1` comes
//! from `web-1`). Each payload is a JSON object with any of the numbers `cpu`, `memory` and
//! `requests` (other fields are ignored):
//!
//! ```json
//! {"cpu": 0.42, "memory": 512, "requests": 120}
//! ```
//!
//! The plugin keeps, per source, how many messages it sent and, per metric, the number of
//! samples, their sum and their maximum. The totals live in the instance: they cover every
//! message since the instance started and are lost when it is rebuilt (after a trap or for a
//! new version).
//!
//! Settings:
//! - `interval_ms` (default 1000): the least time between two summaries, measured on the
//!   messages' `received_at` (plugins have no clock). 0 publishes after every message.
//!
//! After recording a message, the plugin publishes a summary on `dashboard:summary` if it has
//! not published one yet or if `interval_ms` has passed since the last one it published:
//!
//! ```json
//! {"at": 1700000000000, "sources": {"web-1": {"count": 3,
//!   "cpu": {"mean": 0.5, "max": 0.9, "samples": 3}}}}
//! ```
//!
//! `at` is the triggering message's `received_at` in milliseconds since the Unix epoch; sources
//! are in name order, and a source lists only the metrics it has sent. A malformed message fails
//! with `invalid` and changes nothing. A failed publish is returned as the message's error (the
//! message is still counted) and the next message tries again.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};
use switchyard_plugin::{Error, Message, Plugin, PluginInfo};

const DEFAULT_INTERVAL_MS: u64 = 1000;
const SUMMARY_CHANNEL: &str = "dashboard:summary";
/// The metrics a payload may carry, in the order `Sample` holds them.
const METRICS: [&str; 3] = ["cpu", "memory", "requests"];
const NANOS_PER_MILLI: u64 = 1_000_000;

/// One message's values, in `METRICS` order; `None` where the payload lacks the metric.
type Sample = [Option<f64>; 3];

/// Running totals of one metric of one source.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Stats {
    samples: u64,
    sum: f64,
    max: f64,
}

impl Stats {
    fn add(&mut self, value: f64) {
        // The default max of 0 would hide all-negative series, so the first sample sets it.
        self.max = if self.samples == 0 {
            value
        } else {
            self.max.max(value)
        };
        self.samples += 1;
        self.sum += value;
    }

    fn to_json(self) -> Value {
        json!({
            "mean": self.sum / self.samples as f64,
            "max": self.max,
            "samples": self.samples,
        })
    }
}

/// Running totals of one source.
#[derive(Debug, Default)]
struct SourceStats {
    count: u64,
    metrics: [Stats; 3],
}

/// Every source's totals, in name order so summaries list them stably.
#[derive(Debug, Default)]
struct Rollup {
    sources: BTreeMap<String, SourceStats>,
}

impl Rollup {
    fn record(&mut self, source: &str, sample: &Sample) {
        // Look up before inserting: an allocation per message only for a new source.
        let stats = match self.sources.get_mut(source) {
            Some(stats) => stats,
            None => self.sources.entry(source.to_owned()).or_default(),
        };
        stats.count += 1;
        for (metric, value) in stats.metrics.iter_mut().zip(sample) {
            if let Some(value) = value {
                metric.add(*value);
            }
        }
    }

    fn summary(&self, at_ns: u64) -> Value {
        let sources: Map<String, Value> = self
            .sources
            .iter()
            .map(|(name, stats)| {
                let mut source = Map::new();
                source.insert("count".to_owned(), stats.count.into());
                for (metric, totals) in METRICS.iter().zip(stats.metrics) {
                    if totals.samples > 0 {
                        source.insert((*metric).to_owned(), totals.to_json());
                    }
                }
                (name.clone(), Value::Object(source))
            })
            .collect();
        json!({"at": at_ns / NANOS_PER_MILLI, "sources": sources})
    }
}

/// Reads the metrics of one payload; the error names the offending field.
fn parse_sample(payload: &[u8]) -> Result<Sample, String> {
    let value: Value =
        serde_json::from_slice(payload).map_err(|e| format!("payload is not JSON: {e}"))?;
    let Value::Object(fields) = value else {
        return Err("payload must be a JSON object".to_owned());
    };
    let mut sample: Sample = [None; 3];
    for (slot, metric) in sample.iter_mut().zip(METRICS) {
        if let Some(value) = fields.get(metric) {
            let number = value
                .as_f64()
                .ok_or_else(|| format!("field `{metric}` must be a number, got {value}"))?;
            *slot = Some(number);
        }
    }
    if sample.iter().all(Option::is_none) {
        return Err("payload has none of the fields `cpu`, `memory`, `requests`".to_owned());
    }
    Ok(sample)
}

/// Whether a summary is due at `now_ns`, given when the last one went out.
fn due(last_published_ns: Option<u64>, now_ns: u64, interval_ms: u64) -> bool {
    match last_published_ns {
        None => true,
        // A `received_at` earlier than the last summary counts as no time passed.
        Some(last) => now_ns.saturating_sub(last) >= interval_ms.saturating_mul(NANOS_PER_MILLI),
    }
}

fn interval_ms() -> Result<u64, Error> {
    match switchyard_plugin::config("interval_ms") {
        None => Ok(DEFAULT_INTERVAL_MS),
        Some(text) => text.trim().parse().map_err(|_| {
            Error::Failed(format!(
                "setting `interval_ms` must be a whole number of milliseconds, got {text:?}"
            ))
        }),
    }
}

#[derive(Default)]
struct MetricsRollup {
    rollup: Rollup,
    /// `received_at` of the message that triggered the last successful summary.
    last_published_ns: Option<u64>,
}

impl Plugin for MetricsRollup {
    fn describe(&self) -> PluginInfo {
        PluginInfo::new("metrics-rollup", env!("CARGO_PKG_VERSION"))
            .pattern("metrics:*")
            .publishes(SUMMARY_CHANNEL)
    }

    fn handle(&mut self, message: Message) -> Result<(), Error> {
        // Checked before anything is counted: with a broken setting every message fails (and
        // shows in the host's counters) while the totals keep matching the handled messages.
        let interval_ms = interval_ms()?;
        let source = match message.channel_suffix("metrics:") {
            Some("") => {
                return Err(Error::Invalid(format!(
                    "channel {} names no source after `metrics:`",
                    message.channel
                )));
            }
            Some(source) => source,
            None => {
                return Err(Error::Invalid(format!(
                    "channel {} is not a metrics: channel",
                    message.channel
                )));
            }
        };
        let sample = parse_sample(&message.payload).map_err(Error::Invalid)?;
        self.rollup.record(source, &sample);

        if due(self.last_published_ns, message.received_at, interval_ms) {
            let summary = self.rollup.summary(message.received_at);
            switchyard_plugin::publish(SUMMARY_CHANNEL, summary.to_string().as_bytes())?;
            // Only a summary that went out starts a new interval: after a failure the next
            // message retries instead of leaving the dashboard stale for a whole interval.
            self.last_published_ns = Some(message.received_at);
        }
        Ok(())
    }
}

switchyard_plugin::export!(MetricsRollup);

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(payload: &str) -> Sample {
        parse_sample(payload.as_bytes()).unwrap()
    }

    fn error(payload: &str) -> String {
        parse_sample(payload.as_bytes()).unwrap_err()
    }

    #[test]
    fn reads_the_three_metrics_and_ignores_other_fields() {
        assert_eq!(
            sample(r#"{"cpu":0.42,"memory":512,"requests":120,"host":"x"}"#),
            [Some(0.42), Some(512.0), Some(120.0)]
        );
        assert_eq!(sample(r#"{"memory":-1}"#), [None, Some(-1.0), None]);
    }

    #[test]
    fn rejects_malformed_payloads_naming_the_field() {
        assert!(error("nope").starts_with("payload is not JSON"));
        assert_eq!(error("[1]"), "payload must be a JSON object");
        assert_eq!(
            error(r#"{"cpu":"high"}"#),
            r#"field `cpu` must be a number, got "high""#
        );
        assert_eq!(
            error(r#"{"cpu":1,"requests":null}"#),
            "field `requests` must be a number, got null"
        );
        assert_eq!(
            error(r#"{"load":1}"#),
            "payload has none of the fields `cpu`, `memory`, `requests`"
        );
    }

    #[test]
    fn summarises_per_source_in_name_order() {
        let mut rollup = Rollup::default();
        rollup.record("web-2", &sample(r#"{"requests":10}"#));
        rollup.record("web-1", &sample(r#"{"cpu":0.1,"memory":100}"#));
        rollup.record("web-1", &sample(r#"{"cpu":0.9}"#));
        rollup.record("web-1", &sample(r#"{"cpu":0.5,"memory":300}"#));
        let summary = rollup.summary(1_700_000_000_123_456_789);
        assert_eq!(
            summary,
            json!({
                "at": 1_700_000_000_123u64,
                "sources": {
                    "web-1": {
                        "count": 3,
                        "cpu": {"mean": (0.1 + 0.9 + 0.5) / 3.0, "max": 0.9, "samples": 3},
                        "memory": {"mean": 200.0, "max": 300.0, "samples": 2},
                    },
                    "web-2": {
                        "count": 1,
                        "requests": {"mean": 10.0, "max": 10.0, "samples": 1},
                    },
                },
            })
        );
        let names: Vec<&String> = summary["sources"].as_object().unwrap().keys().collect();
        assert_eq!(names, ["web-1", "web-2"]);
    }

    #[test]
    fn the_first_sample_sets_the_max() {
        let mut stats = Stats::default();
        stats.add(-3.0);
        stats.add(-5.0);
        assert_eq!(stats.max, -3.0);
    }

    #[test]
    fn publishes_at_most_once_per_interval() {
        let ms = NANOS_PER_MILLI;
        assert!(due(None, 0, 1000));
        assert!(!due(Some(5_000 * ms), 5_999 * ms, 1000));
        assert!(due(Some(5_000 * ms), 6_000 * ms, 1000));
        assert!(!due(Some(5_000 * ms), 4_000 * ms, 1000));
        assert!(due(Some(5_000 * ms), 5_000 * ms, 0));
        assert!(!due(Some(0), u64::MAX - 1, u64::MAX));
    }
}
