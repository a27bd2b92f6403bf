//! Section 5: payload sizes from 64 B to 256 KiB through `forward` and through the relay.

use super::bench::Bench;
use super::harness::{self, Transfer};
use super::table::{Table, bytes, median, rate};

impl Bench {
    /// Section 5.
    pub(super) async fn payloads(&self) -> anyhow::Result<()> {
        let budget = self.scale.payload_bytes;
        let rounds = self.scale.payload_rounds;
        println!(
            "\n## 5. Payload sizes through forward vs the relay: about {} MB per run (at most \
             {} messages), median of {rounds} rounds, alternating; publisher throttled to about \
             16 MiB in flight (at most {} messages)",
            budget / 1_000_000,
            self.scale.payload_messages,
            harness::window(64)
        );
        let mut table = Table::new(&[
            "payload",
            "messages",
            "relay msg/s",
            "relay MB/s",
            "switchyard msg/s",
            "switchyard MB/s",
            "b/a",
            "CPU µs/msg a/b",
            "lost a/b",
        ]);
        let plugins = self.forwards(1, false)?;
        for size in [64usize, 1024, 16 * 1024, 256 * 1024] {
            let count = (budget / size as u64).clamp(300, self.scale.payload_messages);
            let window = harness::window(size);
            let mut relay = Vec::new();
            let mut host = Vec::new();
            for round in 0..rounds {
                if round % 2 == 0 {
                    relay.push(self.relay_run(self.url(), count, size, window).await?);
                    host.push(
                        self.switchyard_run(self.url(), &plugins, count, size, 1, window)
                            .await?
                            .transfer,
                    );
                } else {
                    host.push(
                        self.switchyard_run(self.url(), &plugins, count, size, 1, window)
                            .await?
                            .transfer,
                    );
                    relay.push(self.relay_run(self.url(), count, size, window).await?);
                }
            }
            let pick = |runs: &[Transfer], f: fn(&Transfer) -> f64| {
                median(&runs.iter().map(f).collect::<Vec<_>>())
            };
            let a = pick(&relay, |t| t.output_rate);
            let b = pick(&host, |t| t.output_rate);
            table.row(vec![
                bytes(size),
                count.to_string(),
                rate(a),
                format!("{:.1}", pick(&relay, |t| t.output_mb)),
                rate(b),
                format!("{:.1}", pick(&host, |t| t.output_mb)),
                format!("{:.2}", b / a),
                format!(
                    "{:.1}/{:.1}",
                    pick(&relay, |t| t.cpu_us),
                    pick(&host, |t| t.cpu_us)
                ),
                format!(
                    "{}/{}",
                    relay.iter().map(|t| t.lost + t.duplicated).sum::<u64>(),
                    host.iter().map(|t| t.lost + t.duplicated).sum::<u64>()
                ),
            ]);
        }
        table.print();
        println!(
            "   MB = 10^6 bytes of payload received on fwded:*; CPU µs/msg: CPU time of the \
             relay / switchyard process (all threads) per message"
        );
        Ok(())
    }
}
