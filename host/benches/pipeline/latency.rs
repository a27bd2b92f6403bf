//! Section 2: the latency Switchyard adds, publish to arrival of the republished copy, at
//! fixed offered rates from a paced publisher, against the relay's.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::bench::Bench;
use super::harness::{self, OUTPUT_PATTERN, Publisher, Receiver, Relay, Switchyard};
use super::table::{Table, rate};

/// How long after the end of a paced run its messages may still arrive.
const LATENCY_GRACE: Duration = Duration::from_secs(2);

impl Bench {
    /// Section 2.
    pub(super) async fn latency(&self) -> anyhow::Result<()> {
        let secs = self.scale.latency_secs;
        println!(
            "\n## 2. Added latency: publish to arrival of the republished copy, 64 B, paced \
             publisher (1 ms bursts) for {secs} s per run"
        );
        let mut table = Table::new(&[
            "offered msg/s",
            "process",
            "achieved",
            "p50 µs",
            "p99 µs",
            "p99.9 µs",
            "max µs",
            "missing",
            "note",
        ]);
        for target in self.scale.latency_rates {
            let relay = {
                let relay = Relay::start(self.url()).await?;
                let run = self.paced_run(target, secs).await;
                relay.stop().await;
                run?
            };
            let host = {
                let plugins = self.forwards(1, false)?;
                let host = Switchyard::start(self.url(), &self.setup(&plugins)).await?;
                let run = self.paced_run(target, secs).await;
                host.stop().await;
                run?
            };
            for (name, run) in [("relay", &relay), ("switchyard", &host)] {
                table.row(run.row(target, name));
            }
            if relay.sustained && host.sustained {
                let diff = |q: f64| {
                    host.seen.latency_us.value_at_quantile(q) as i64
                        - relay.seen.latency_us.value_at_quantile(q) as i64
                };
                table.row(vec![
                    String::new(),
                    "difference".to_owned(),
                    String::new(),
                    format!("{:+}", diff(0.5)),
                    format!("{:+}", diff(0.99)),
                    format!("{:+}", diff(0.999)),
                    String::new(),
                    String::new(),
                    "switchyard - relay".to_owned(),
                ]);
            } else {
                table.row(vec![
                    String::new(),
                    "difference".to_owned(),
                    String::new(),
                    "-".to_owned(),
                    "-".to_owned(),
                    "-".to_owned(),
                    String::new(),
                    String::new(),
                    "not comparable: a rate was not sustained".to_owned(),
                ]);
            }
        }
        table.print();
        println!(
            "   sustained = every message arrived within {} s of the end and the delivered \
             rate was within 3% of the offered one; otherwise percentiles would measure a \
             growing backlog, so they are not shown. missing: not arrived by then (a backlog, \
             not necessarily lost)",
            LATENCY_GRACE.as_secs()
        );
        Ok(())
    }

    /// A paced run of `secs` at `target` messages/s through whatever is running.
    async fn paced_run(&self, target: f64, secs: f64) -> anyhow::Result<PacedRun> {
        let receiver = Receiver::start(self.url(), OUTPUT_PATTERN).await?;
        let mut publisher = Publisher::new(self.url(), 64).await?;
        publisher.warm_up(&receiver, 1).await?;
        let started = Instant::now();
        let paced = publisher
            .paced(
                target,
                Duration::from_secs_f64(secs),
                &CancellationToken::new(),
            )
            .await?;
        let all = tokio::time::timeout(LATENCY_GRACE, receiver.wait_measured(paced.sent))
            .await
            .unwrap_or(false);
        let seen = receiver.finish().await?;
        let (lost, duplicated) = seen.lost_and_duplicated(paced.sent, 1);
        let delivered = seen.last.map_or(0.0, |last| {
            seen.measured as f64 / last.duration_since(started).as_secs_f64()
        });
        let sustained = all
            && lost == 0
            && paced.achieved >= 0.97 * target
            && delivered >= 0.97 * paced.achieved;
        Ok(PacedRun {
            achieved: paced.achieved,
            delivered,
            lost: lost + duplicated,
            sustained,
            seen,
        })
    }
}

/// A paced run's outcome.
struct PacedRun {
    achieved: f64,
    delivered: f64,
    lost: u64,
    sustained: bool,
    seen: harness::Received,
}

impl PacedRun {
    fn row(&self, target: f64, process: &str) -> Vec<String> {
        let q = |q: f64| self.seen.latency_us.value_at_quantile(q).to_string();
        let (p50, p99, p999, max, note) = if self.sustained {
            (
                q(0.5),
                q(0.99),
                q(0.999),
                self.seen.latency_us.max().to_string(),
                String::new(),
            )
        } else {
            let dash = || "-".to_owned();
            (
                dash(),
                dash(),
                dash(),
                dash(),
                format!(
                    "NOT SUSTAINED: delivered {} msg/s (p50 would be {} µs)",
                    rate(self.delivered),
                    q(0.5)
                ),
            )
        };
        vec![
            rate(target),
            process.to_owned(),
            rate(self.achieved),
            p50,
            p99,
            p999,
            max,
            self.lost.to_string(),
            note,
        ]
    }
}
