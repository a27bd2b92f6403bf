//! Section 4: pattern scaling, one `forward` that matches and idle plugins whose patterns
//! never match (1, 100 and 10,000 patterns in all), against the relay while another
//! connection holds the same patterns.

use std::path::Path;

use anyhow::Context as _;
use switchyard_tests::RedisServer;

use super::bench::{Bench, HostRun};
use super::harness::{self, INPUT_CHANNEL, Transfer};
use super::table::{Table, rate};

impl Bench {
    /// Section 4.
    pub(super) async fn patterns(&self) -> anyhow::Result<()> {
        let count = self.scale.pattern_messages;
        println!(
            "\n## 4. Pattern scaling: one forward plugin matches {INPUT_CHANNEL}, the other \
             patterns never match; {count} messages of 64 B per run, best of {}; publisher \
             throttled to {} messages in flight",
            self.scale.pattern_rounds,
            harness::window(64)
        );
        let mut table = Table::new(&[
            "patterns",
            "plugins",
            "switchyard msg/s",
            "vs 1",
            "relay+idle msg/s",
            "vs 1",
            "b/a",
            "lost a/b",
        ]);
        // (plugins besides forward, patterns each; forward's own non-matching patterns)
        let cases: [(usize, usize, usize); 3] = [(0, 0, 0), (99, 1, 0), (99, 100, 99)];
        let mut base: Option<(f64, f64)> = None;
        for (idle_plugins, each, own) in cases {
            let dir = self.folder("patterns")?;
            let mut idle_patterns = Vec::new();
            let mut forward_patterns: Vec<String> =
                (0..own).map(|i| format!("nomatch:forward:{i}:*")).collect();
            idle_patterns.extend(forward_patterns.iter().cloned());
            forward_patterns.push("fwd:*".to_owned());
            harness::install_plugin(
                &dir,
                "forward",
                self.forward,
                &harness::forward_manifest(Some(&forward_patterns)),
            )?;
            for p in 0..idle_plugins {
                let patterns: Vec<String> = (0..each).map(|i| format!("idle:{p}:{i}:*")).collect();
                idle_patterns.extend(patterns.iter().cloned());
                harness::install_plugin(
                    &dir,
                    &format!("idle-{p:03}"),
                    self.forward,
                    &harness::forward_manifest(Some(&patterns)),
                )?;
            }
            let total = idle_patterns.len() + 1;
            // A fresh server per case: redis 7.0 does not shrink its pattern table after
            // PUNSUBSCRIBE, and PUBLISH walks the whole table, so a server that once held
            // 10,000 patterns stays slow for every later measurement.
            let mut redis = RedisServer::start().await?;
            let measured = self
                .pattern_case(&redis.url(), &dir, &idle_patterns, count)
                .await;
            redis.kill().await;
            let (a, b, lost) = measured?;
            let (a1, b1) = *base.get_or_insert((a, b));
            table.row(vec![
                total.to_string(),
                (idle_plugins + 1).to_string(),
                rate(b),
                format!("{:.2}", b / b1),
                rate(a),
                format!("{:.2}", a / a1),
                format!("{:.2}", b / a),
                format!("{}/{}", lost.0, lost.1),
            ]);
        }
        table.print();
        println!(
            "   relay+idle: the relay while another connection holds the same non-matching \
             patterns, so redis does the same per-PUBLISH pattern matching. 10,000 patterns: \
             forward lists 99 non-matching patterns before fwd:*, so the host's once-per-plugin \
             check tests them for every message. Each case runs on its own redis-server"
        );
        Ok(())
    }

    /// Best relay and Switchyard rates (and losses) for one pattern case on `url`.
    async fn pattern_case(
        &self,
        url: &str,
        dir: &Path,
        idle_patterns: &[String],
        count: u64,
    ) -> anyhow::Result<(f64, f64, (u64, u64))> {
        {
            let mut host_best: Option<HostRun> = None;
            let mut relay_best: Option<Transfer> = None;
            let mut lost = (0, 0);
            for _ in 0..self.scale.pattern_rounds {
                let run = self
                    .switchyard_run(url, dir, count, 64, 1, harness::window(64))
                    .await?;
                lost.1 += run.transfer.lost + run.transfer.duplicated + run.losses.shed();
                if host_best
                    .as_ref()
                    .is_none_or(|b| run.transfer.output_rate > b.transfer.output_rate)
                {
                    host_best = Some(run);
                }
                // The same patterns held, idle, by another connection, so that redis pays the
                // same matching cost per PUBLISH for the relay.
                let client = redis::Client::open(url)?;
                let mut holder = client.get_async_pubsub().await?;
                for chunk in idle_patterns.chunks(1000) {
                    holder.psubscribe(chunk).await?;
                }
                let run = self.relay_run(url, count, 64, harness::window(64)).await?;
                for chunk in idle_patterns.chunks(1000) {
                    holder.punsubscribe(chunk).await?;
                }
                drop(holder);
                lost.0 += run.lost + run.duplicated;
                if relay_best
                    .as_ref()
                    .is_none_or(|b| run.output_rate > b.output_rate)
                {
                    relay_best = Some(run);
                }
            }
            let b = host_best.context("no run")?.transfer.output_rate;
            let a = relay_best.context("no run")?.output_rate;
            Ok((a, b, lost))
        }
    }
}
