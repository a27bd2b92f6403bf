//! Section 13: what tracing costs per message. Forward with tracing off (the default), on at
//! a sample ratio of 0.01, and on at 1.0, exporting to an OTLP receiver in this process,
//! against the relay in the same rounds.

use super::bench::{Bench, HostRun};
use super::harness::{self, HostSetup, INPUT_CHANNEL, OUTPUT_PATTERN};
use super::table::{Table, median, range, rate};

/// A tracing setting and its configuration.
struct Case {
    label: &'static str,
    config: String,
}

impl Bench {
    /// Section 13.
    pub(super) async fn tracing(&self) -> anyhow::Result<()> {
        let count = self.scale.messages / 2;
        let rounds = self.scale.rounds;
        let window = harness::window(64);
        let receiver = switchyard_tests::otlp::OtlpReceiver::start().await?;
        println!(
            "\n## 13. Tracing: {count} messages of 64 B per run on {INPUT_CHANNEL}, counted on \
             {OUTPUT_PATTERN}, through forward; tracing off (the default), and on at sample \
             ratios 0.01 and 1.0, exporting over OTLP/HTTP to a receiver in the bench process \
             that decodes every request; median of {rounds} rounds, the relay and the three \
             cases in turn; publisher throttled to {window} copies in flight"
        );
        let on = |ratio: f64| {
            format!(
                "\n[tracing]\notlp_endpoint = {:?}\nsample_ratio = {ratio}\n",
                receiver.endpoint()
            )
        };
        let cases = [
            Case {
                label: "off",
                config: String::new(),
            },
            Case {
                label: "on, ratio 0.01",
                config: on(0.01),
            },
            Case {
                label: "on, ratio 1.0",
                config: on(1.0),
            },
        ];
        let plugins = self.forwards(1, false)?;
        let mut relay = Vec::new();
        let mut runs: Vec<Vec<HostRun>> = cases.iter().map(|_| Vec::new()).collect();
        for round in 0..rounds {
            relay.push(self.relay_run(self.url(), count, 64, window).await?);
            for i in 0..cases.len() {
                let i = (i + round) % cases.len();
                let setup = HostSetup {
                    extra: &cases[i].config,
                    ..self.setup(&plugins)
                };
                runs[i].push(
                    self.switchyard_run_with(self.url(), &setup, count, 64, 1, window)
                        .await?,
                );
            }
        }
        let a: Vec<f64> = relay.iter().map(|t| t.output_rate).collect();
        let mut table = Table::new(&[
            "tracing",
            "relay msg/s",
            "switchyard msg/s",
            "b/a",
            "switchyard range",
            "lost a/b",
            "CPU µs/msg a/b",
            "handle µs",
        ]);
        for (case, runs) in cases.iter().zip(&runs) {
            let b: Vec<f64> = runs.iter().map(|r| r.transfer.output_rate).collect();
            table.row(vec![
                case.label.to_owned(),
                rate(median(&a)),
                rate(median(&b)),
                format!("{:.2}", median(&b) / median(&a)),
                range(&b),
                format!(
                    "{}/{}",
                    relay.iter().map(|t| t.lost).sum::<u64>(),
                    runs.iter().map(|r| r.transfer.lost).sum::<u64>()
                ),
                format!(
                    "{:.1}/{:.1}",
                    median(&relay.iter().map(|t| t.cpu_us).collect::<Vec<_>>()),
                    median(&runs.iter().map(|r| r.transfer.cpu_us).collect::<Vec<_>>())
                ),
                format!(
                    "{:.1}",
                    median(
                        &runs
                            .iter()
                            .filter_map(|r| r.mean_handle)
                            .map(|d| d.as_secs_f64() * 1e6)
                            .collect::<Vec<_>>()
                    )
                ),
            ]);
        }
        table.print();
        println!(
            "   a = relay, b = switchyard. spans received by the receiver over the section: {} \
             (in {} export requests). CPU µs/msg: the whole process per message, the exporter's \
             thread included",
            receiver.spans().len(),
            receiver.requests()
        );
        Ok(())
    }
}
