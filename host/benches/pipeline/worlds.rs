//! Section 12: what a message costs in each world Switchyard runs. The same job (`forward`:
//! republish every message) written for Switchyard's own world and, unchanged, for the worlds
//! of other hosts (the integration tests' fixtures, built with those hosts' SDKs), each run
//! alone in a fresh Switchyard with default settings, round by round in turn.

use std::path::PathBuf;

use super::bench::{Bench, HostRun, handle_micros, total_losses};
use super::harness::{self, INPUT_CHANNEL, OUTPUT_PATTERN};
use super::table::{Table, median, range, rate};

/// A world and the component that does `forward`'s job in it.
struct Contender {
    world: &'static str,
    wasm: Vec<u8>,
    /// What the manifest adds to the subscription and grant every contender has.
    config: String,
}

impl Bench {
    /// Section 12.
    pub(super) async fn worlds(&self) -> anyhow::Result<()> {
        let count = self.scale.messages / 2;
        let rounds = self.scale.rounds;
        let window = harness::window(64);
        println!(
            "\n## 12. Worlds: {count} messages of 64 B per run on {INPUT_CHANNEL}, counted on \
             {OUTPUT_PATTERN}; the job of forward in each world, alone in a fresh switchyard \
             with its default settings; median of {rounds} rounds, the worlds in turn; \
             publisher throttled to {window} copies in flight"
        );
        let spin_config = format!(
            "[config]\nredis_address = {:?}\nout_channel = \"fwded:x\"\n",
            self.url()
        );
        let fixture = |path: &str| -> anyhow::Result<Vec<u8>> {
            std::fs::read(path).map_err(|e| anyhow::anyhow!("reading {path}: {e}"))
        };
        use switchyard_tests::plugins;
        let contenders = [
            Contender {
                world: "switchyard:plugin@0.6.0",
                wasm: self.forward.to_vec(),
                config: String::new(),
            },
            Contender {
                world: "wasi-messaging@0.2.0-draft",
                wasm: fixture(plugins::MESSAGING_FORWARD)?,
                config: String::new(),
            },
            Contender {
                world: "wasmcloud-messaging@0.2.0",
                wasm: fixture(plugins::WASMCLOUD_FORWARD)?,
                config: String::new(),
            },
            Contender {
                world: "fermyon-spin-redis",
                wasm: fixture(plugins::SPIN2_FORWARD)?,
                config: spin_config.clone(),
            },
            Contender {
                world: "spin-redis@3.0.0",
                wasm: fixture(plugins::SPIN_FORWARD)?,
                config: spin_config,
            },
        ];
        let folders = contenders
            .iter()
            .map(|contender| self.world_folder(contender))
            .collect::<anyhow::Result<Vec<PathBuf>>>()?;

        let mut runs: Vec<Vec<HostRun>> = contenders.iter().map(|_| Vec::new()).collect();
        for round in 0..rounds {
            // Each round starts with another world, so no world always runs first.
            for i in 0..contenders.len() {
                let i = (i + round) % contenders.len();
                let run = self
                    .switchyard_run(self.url(), &folders[i], count, 64, 1, window)
                    .await?;
                runs[i].push(run);
            }
        }

        let mut table = Table::new(&[
            "world",
            "msg/s",
            "range",
            "vs forward",
            "handle µs",
            "handle vs forward",
            "CPU µs/msg",
            "lost",
            "dup",
            "shed",
        ]);
        let rates = |runs: &[HostRun]| -> Vec<f64> {
            runs.iter().map(|r| r.transfer.output_rate).collect()
        };
        let handle = |runs: &[HostRun]| -> f64 { median(&handle_micros(runs)) };
        let (forward_rate, forward_handle) = (median(&rates(&runs[0])), handle(&runs[0]));
        for (contender, runs) in contenders.iter().zip(&runs) {
            let losses = total_losses(runs);
            table.row(vec![
                contender.world.to_owned(),
                rate(median(&rates(runs))),
                range(&rates(runs)),
                format!("{:.2}", median(&rates(runs)) / forward_rate),
                format!("{:.1}", handle(runs)),
                format!("{:.2}", handle(runs) / forward_handle),
                format!(
                    "{:.1}",
                    median(&runs.iter().map(|r| r.transfer.cpu_us).collect::<Vec<_>>())
                ),
                runs.iter()
                    .map(|r| r.transfer.lost)
                    .sum::<u64>()
                    .to_string(),
                runs.iter()
                    .map(|r| r.transfer.duplicated)
                    .sum::<u64>()
                    .to_string(),
                losses.describe(),
            ]);
        }
        table.print();
        println!(
            "   forward = the switchyard:plugin row, measured in the same rounds. handle µs: \
             mean duration of the handler call (switchyard_plugin_handle_seconds sum/count), \
             which holds what differs between worlds: building the world's message, the call, \
             and the world's imports (a Spin handler opens a connection and reads two \
             variables per message). CPU µs/msg: the whole switchyard process per message. \
             lost, dup: copies over all {rounds} rounds; shed: the host's counters by reason"
        );
        Ok(())
    }

    /// A plugins folder holding `contender` as `forward`, listening to `fwd:*` and granted
    /// `fwded:*`.
    fn world_folder(&self, contender: &Contender) -> anyhow::Result<PathBuf> {
        let dir = self.folder("world")?;
        let manifest = format!(
            "{}{}",
            harness::forward_manifest(Some(&["fwd:*".to_owned()])),
            contender.config
        );
        harness::install_plugin(&dir, "forward", &contender.wasm, &manifest)?;
        Ok(dir)
    }
}
