//! Section 6: hot swap under traffic, a byte-different copy renamed over a plugin file while
//! messages flow through `forward`: how long until the new version shows and answers, and the
//! longest pause in the traffic at a swap and elsewhere.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::bench::Bench;
use super::harness::{self, HostSetup, OUTPUT_PATTERN, Publisher, Receiver, Switchyard};
use super::table::{Table, bytes, max, median};

/// After a rename, the stretch of arrivals counted as "at swap".
const SWAP_WINDOW: Duration = Duration::from_secs(1);

impl Bench {
    /// Section 6.
    pub(super) async fn hot_swap(&self) -> anyhow::Result<()> {
        let rate_ = self.scale.swap_rate;
        println!(
            "\n## 6. Hot swap under traffic: {rate_:.0} msg/s (64 B) through forward while a \
             byte-different copy is renamed over a plugin file; settle_ms default (50)"
        );
        let mut table = Table::new(&[
            "swapped",
            "size",
            "swaps",
            "to new hash med",
            "max",
            "to 1st new output med",
            "max",
            "gap at swap",
            "gap otherwise",
            "sent",
            "lost",
        ]);
        let dir = self.forwards(1, false)?;
        let stats = self
            .swap_run(&dir, "", "forward", self.forward, self.scale.swaps)
            .await?;
        table.row(stats.row("forward", self.forward.len(), true));

        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let target =
            std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
        let python = target.join("plugins/polyglot/notify-router-py.wasm");
        let mut note = None;
        if python.is_file() {
            let wasm = std::fs::read(&python)?;
            let manifest =
                std::fs::read_to_string(root.join("plugins/notify-router/notify-router.toml"))?;
            let dir = self.forwards(1, false)?;
            harness::install_plugin(&dir, "notify-router", &wasm, &manifest)?;
            let outputs = self.folder("outputs")?;
            let mut extra = String::new();
            for name in ["email", "sms", "push"] {
                extra.push_str(&format!(
                    "[outputs.{name}]\nkind = \"file\"\npath = {:?}\n\n",
                    outputs.join(format!("{name}.jsonl")).display().to_string()
                ));
            }
            let stats = self
                .swap_run(&dir, &extra, "notify-router", &wasm, self.scale.big_swaps)
                .await?;
            table.row(stats.row("notify-router-py", wasm.len(), false));
        } else {
            note = Some(format!(
                "   notify-router-py: not measured, {} is not built (`cargo test` \
                 builds it)",
                python.display()
            ));
        }
        table.print();
        println!(
            "   to new hash: rename until /plugins shows the new content hash (polled every \
             2 ms). to 1st new output: rename until the first arrival of a message published \
             after the new hash showed; the worker picks the new version for the next message \
             it takes, so this bounds the switch from above. gaps: longest pause between \
             arrivals on fwded:* within 1 s after each rename, and elsewhere (1 ms bursts). \
             For notify-router-py, forward keeps the traffic and shows whether the swap \
             (compiling a multi-megabyte component: a new hash is never in the compile cache) disturbs another plugin."
        );
        if let Some(note) = note {
            println!("{note}");
        }
        Ok(())
    }

    /// Traffic through `forward` while `swapped` is replaced `swaps` times.
    async fn swap_run(
        &self,
        dir: &Path,
        extra: &str,
        swapped: &str,
        wasm: &[u8],
        swaps: usize,
    ) -> anyhow::Result<SwapStats> {
        let setup = HostSetup {
            plugins: dir,
            compile_cache: Some(&self.cache),
            extra,
        };
        let host = Switchyard::start(self.url(), &setup).await?;
        let receiver = Receiver::start(self.url(), OUTPUT_PATTERN).await?;
        let mut publisher = Publisher::new(self.url(), 64).await?;
        publisher.warm_up(&receiver, 1).await?;
        let next_seq = publisher.next_seq.clone();
        let stop = CancellationToken::new();
        let traffic = {
            let stop = stop.clone();
            let rate_ = self.scale.swap_rate;
            tokio::spawn(async move {
                publisher
                    .paced(rate_, Duration::from_secs(3600), &stop)
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut marks = Vec::new();
        let mut failure = None;
        for i in 0..swaps {
            let old = host.version_hash(swapped).await?;
            let bytes = switchyard_tests::rebuilt(
                wasm,
                &format!("bench-swap-{i}-{}", harness::wall_nanos()),
            );
            let renamed = harness::replace_wasm(dir, swapped, &bytes)?;
            let seen = loop {
                let now = host.version_hash(swapped).await?;
                if now.is_some() && now != old {
                    break Some((Instant::now(), next_seq.load(Ordering::Acquire)));
                }
                if renamed.elapsed() > harness::READY_TIMEOUT {
                    break None;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            };
            let Some((visible, seq)) = seen else {
                failure = Some(format!(
                    "swap {i}: no new version within {:?}:\n{}",
                    harness::READY_TIMEOUT,
                    host.log_tail()
                ));
                break;
            };
            marks.push((renamed, visible, seq));
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        stop.cancel();
        let paced = traffic.await??;
        receiver.wait_measured(paced.sent).await;
        let base = receiver.base;
        let seen = receiver.finish().await?;
        let (lost, duplicated) = seen.lost_and_duplicated(paced.sent, 1);
        let (shed, failed) = host.shed_and_failed().await?;
        host.stop().await;
        if let Some(failure) = failure {
            anyhow::bail!(failure);
        }
        let at = |nanos: u64| base + Duration::from_nanos(nanos);
        let mut arrivals: Vec<u64> = seen
            .first_arrival
            .iter()
            .copied()
            .filter(|&t| t != u64::MAX)
            .collect();
        arrivals.sort_unstable();
        let mut to_hash = Vec::new();
        let mut to_output = Vec::new();
        let mut gap_swap = Duration::ZERO;
        let mut gap_other = Duration::ZERO;
        for pair in arrivals.windows(2) {
            let gap = Duration::from_nanos(pair[1] - pair[0]);
            let when = at(pair[1]);
            let near_swap = marks
                .iter()
                .any(|(renamed, _, _)| when >= *renamed && when <= *renamed + SWAP_WINDOW);
            if near_swap {
                gap_swap = gap_swap.max(gap);
            } else {
                gap_other = gap_other.max(gap);
            }
        }
        for (renamed, visible, seq) in &marks {
            to_hash.push(visible.duration_since(*renamed));
            let first = seen
                .first_arrival
                .iter()
                .skip(usize::try_from(*seq).unwrap_or(usize::MAX))
                .find(|&&t| t != u64::MAX);
            if let Some(&first) = first {
                to_output.push(at(first).saturating_duration_since(*renamed));
            }
        }
        Ok(SwapStats {
            to_hash,
            to_output,
            gap_swap,
            gap_other,
            sent: paced.sent,
            lost: lost + duplicated + shed + failed,
        })
    }
}

/// What a hot-swap run measured.
struct SwapStats {
    to_hash: Vec<Duration>,
    to_output: Vec<Duration>,
    gap_swap: Duration,
    gap_other: Duration,
    sent: u64,
    lost: u64,
}

impl SwapStats {
    fn row(&self, name: &str, size: usize, own_output: bool) -> Vec<String> {
        let ms = |d: &[Duration]| d.iter().map(|d| d.as_secs_f64() * 1e3).collect::<Vec<_>>();
        let hash = ms(&self.to_hash);
        let output = ms(&self.to_output);
        let (out_med, out_max) = if own_output {
            (
                format!("{:.1} ms", median(&output)),
                format!("{:.1} ms", max(&output)),
            )
        } else {
            ("n/a".to_owned(), "n/a".to_owned())
        };
        vec![
            name.to_owned(),
            bytes(size),
            self.to_hash.len().to_string(),
            format!("{:.1} ms", median(&hash)),
            format!("{:.1} ms", max(&hash)),
            out_med,
            out_max,
            format!("{:.1} ms", self.gap_swap.as_secs_f64() * 1e3),
            format!("{:.1} ms", self.gap_other.as_secs_f64() * 1e3),
            self.sent.to_string(),
            self.lost.to_string(),
        ]
    }
}
