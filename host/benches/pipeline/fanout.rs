//! Section 3: fan-out, one stream of messages to 1, 10 and 100 `forward` copies that all
//! subscribe to it, measured by the copies that come back.

use anyhow::Context as _;

use super::bench::{Bench, HostRun};
use super::harness::{self, INPUT_CHANNEL};
use super::table::{Table, rate};

impl Bench {
    /// Section 3.
    pub(super) async fn fan_out(&self) -> anyhow::Result<()> {
        let outputs = self.scale.fanout_outputs;
        println!(
            "\n## 3. Fan-out: one stream on {INPUT_CHANNEL} to N forward copies (all on fwd:*), \
             about {outputs} output messages per run, 64 B, best of {} runs; publisher \
             throttled to {} copies in flight",
            self.scale.fanout_rounds,
            harness::window(64)
        );
        let mut table = Table::new(&[
            "plugins",
            "input msgs",
            "input msg/s",
            "output msg/s",
            "output vs 1",
            "lost",
            "shed",
        ]);
        let mut first = None;
        for copies in [1usize, 10, 100] {
            let plugins = self.forwards(copies, false)?;
            let count = (outputs / copies as u64).max(500);
            let mut best: Option<HostRun> = None;
            let mut lost = 0;
            let mut shed = 0;
            for _ in 0..self.scale.fanout_rounds {
                let run = self
                    .switchyard_run(
                        self.url(),
                        &plugins,
                        count,
                        64,
                        copies as u64,
                        harness::window(64),
                    )
                    .await?;
                lost += run.transfer.lost + run.transfer.duplicated;
                shed += run.losses.shed() + run.losses.failed;
                if best
                    .as_ref()
                    .is_none_or(|b| run.transfer.output_rate > b.transfer.output_rate)
                {
                    best = Some(run);
                }
            }
            let best = best.context("no run")?;
            let base = *first.get_or_insert(best.transfer.output_rate);
            table.row(vec![
                copies.to_string(),
                count.to_string(),
                rate(best.transfer.input_rate),
                rate(best.transfer.output_rate),
                format!("{:.2}", best.transfer.output_rate / base),
                lost.to_string(),
                shed.to_string(),
            ]);
        }
        table.print();
        Ok(())
    }
}
