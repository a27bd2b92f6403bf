//! Section 10: the browser gateway's fan-out to [`websocket::CLIENTS`] WebSocket clients on
//! one channel, against a bare WebSocket fan-out relay (`websocket.rs` holds the clients and
//! the relay).

use std::path::Path;

use anyhow::Context as _;
use switchyard_tests::free_port;

use super::bench::Bench;
use super::harness::{FanoutRelay, HostSetup, Switchyard};
use super::table::{Table, max, median, min, quantile, rate};
use super::websocket;

impl Bench {
    /// Section 10.
    pub(super) async fn gateway(&self) -> anyhow::Result<()> {
        let rounds = self.scale.gateway_rounds;
        let clients = websocket::CLIENTS;
        let files = websocket::ensure_fd_limit()?;
        println!(
            "\n## 10. Gateway fan-out: {clients} WebSocket clients on one channel ({}), \
             messages of {} B published at a fixed pace, publish to arrival at every client; \
             {rounds} rounds per pace, the three cases alternating",
            websocket::CHANNEL,
            websocket::PAYLOAD,
        );
        println!(
            "   baseline: a bare WebSocket relay (tokio-tungstenite server, TCP_NODELAY, one \
             SUBSCRIBE, a broadcast ring of {} messages, one task per socket, the payload as \
             the frame); \
             baseline, 4 KiB reads: the same with read_buffer_size {} instead of tungstenite's \
             128 KiB; gateway: switchyard run with [gateway], no plugins, client_buffer default; \
             clients (tokio-tungstenite, read_buffer_size {}) and publisher in the bench \
             process; open-file limit {files}",
            websocket::RING,
            websocket::SMALL_READ_BUFFER,
            websocket::SMALL_READ_BUFFER
        );
        let mut table = Table::new(&[
            "offered msg/s",
            "process",
            "msgs",
            "1st client p50 ms",
            "median client p50",
            "p99",
            "max",
            "last client p50",
            "p99",
            "max",
            "p50 by run",
            "lost",
            "CPU µs/copy srv/bench/redis",
        ]);
        let plugins = self.folder("plugins")?;
        let mut slowest = f64::INFINITY;
        let mut other = 0;
        let mut duplicated = 0;
        for (rate, messages) in self.scale.gateway_paces {
            let mut baseline = Vec::new();
            let mut small = Vec::new();
            let mut gateway = Vec::new();
            for round in 0..rounds {
                // baseline, small reads, gateway; then the other way round.
                for step in 0..3 {
                    let case = if round % 2 == 0 { step } else { 2 - step };
                    match case {
                        0 => baseline.push(self.fanout_baseline(rate, messages, None).await?),
                        1 => small.push(
                            self.fanout_baseline(
                                rate,
                                messages,
                                Some(websocket::SMALL_READ_BUFFER),
                            )
                            .await?,
                        ),
                        _ => gateway.push(self.fanout_gateway(&plugins, rate, messages).await?),
                    }
                }
            }
            for run in baseline.iter().chain(&small).chain(&gateway) {
                slowest = slowest.min(run.achieved / rate);
                other += run.other;
                duplicated += run.duplicated;
            }
            let a = FanoutSummary::new(&baseline);
            let b = FanoutSummary::new(&gateway);
            table.row(a.row(rate, "baseline"));
            table.row(FanoutSummary::new(&small).row(rate, "baseline, 4 KiB reads"));
            table.row(b.row(rate, "gateway"));
            let ratio = |b: f64, a: f64| format!("{:.2}", b / a);
            table.row(vec![
                String::new(),
                "gateway / baseline".to_owned(),
                String::new(),
                ratio(b.first[0], a.first[0]),
                ratio(b.median[0], a.median[0]),
                ratio(b.median[1], a.median[1]),
                ratio(b.median[2], a.median[2]),
                ratio(b.last[0], a.last[0]),
                ratio(b.last[1], a.last[1]),
                ratio(b.last[2], a.last[2]),
                String::new(),
                String::new(),
                format!(
                    "{}/{}/{}",
                    ratio(b.cpu[0], a.cpu[0]),
                    ratio(b.cpu[1], a.cpu[1]),
                    ratio(b.cpu[2], a.cpu[2])
                ),
            ]);
        }
        table.print();
        println!(
            "   per message: latency = a client's receive time - the send time in the payload \
             (wall clock, same machine); 1st / median / last client = the fastest, the median \
             and the slowest of the {clients} clients for that message; then p50/p99/max over \
             the messages of all rounds (the ones every client received); p50 by run: the last \
             client's p50 in the fastest and the slowest run, ms. lost: messages some \
             client never received, (client, message) copies missing in brackets, over all \
             rounds. CPU µs/copy: CPU time from the first measured publish to the last arrival \
             per copy delivered (median of rounds), of the server (relay or switchyard), of the \
             bench process (clients and publisher), and of redis-server"
        );
        if slowest < 0.97 || other + duplicated > 0 {
            println!(
                "   note: the slowest publisher reached {:.0}% of its pace; {other} frames that \
                 were not messages (dropped notices), {duplicated} duplicated copies",
                slowest * 100.0
            );
        }
        Ok(())
    }

    /// One fan-out run through a fresh bare relay, its sockets reading at most `read_buffer`
    /// bytes per call if given.
    async fn fanout_baseline(
        &self,
        rate: f64,
        messages: usize,
        read_buffer: Option<usize>,
    ) -> anyhow::Result<websocket::Run> {
        let listen = format!("127.0.0.1:{}", free_port()?);
        let relay = FanoutRelay::start(self.url(), &listen, read_buffer).await?;
        let pids = websocket::Pids {
            server: relay.pid(),
            redis: self.redis_pid()?,
        };
        let url = websocket::relay_url(&listen);
        let run = websocket::run(self.url(), &url, rate, messages, &pids).await;
        relay.stop().await;
        run.context("baseline")
    }

    /// One fan-out run through a fresh Switchyard with the gateway on.
    async fn fanout_gateway(
        &self,
        plugins: &Path,
        rate: f64,
        messages: usize,
    ) -> anyhow::Result<websocket::Run> {
        let listen = format!("127.0.0.1:{}", free_port()?);
        let extra = websocket::gateway_config(&listen);
        let setup = HostSetup {
            plugins,
            compile_cache: Some(&self.cache),
            extra: &extra,
        };
        let host = Switchyard::start(self.url(), &setup).await?;
        let pids = websocket::Pids {
            server: host.pid(),
            redis: self.redis_pid()?,
        };
        let url = websocket::gateway_url(&listen);
        let run = websocket::run(self.url(), &url, rate, messages, &pids).await;
        let tail = host.log_tail();
        host.stop().await;
        run.with_context(|| format!("gateway; switchyard log:\n{tail}"))
    }
}

/// Section 10's figures for one process, over all its rounds: p50, p99 and max (µs) of the
/// first, median and last client's latency per message, and CPU µs per copy.
struct FanoutSummary {
    first: [f64; 3],
    median: [f64; 3],
    last: [f64; 3],
    /// The last client's p50 in each run, lowest and highest.
    last_runs: [f64; 2],
    cpu: [f64; 3],
    sent: usize,
    lost: usize,
    missing: u64,
}

impl FanoutSummary {
    fn new(runs: &[websocket::Run]) -> Self {
        let spreads: Vec<websocket::Spread> =
            runs.iter().flat_map(|r| r.complete.clone()).collect();
        let quantiles = |f: fn(&websocket::Spread) -> f64| {
            let mut values: Vec<f64> = spreads.iter().map(f).collect();
            values.sort_by(f64::total_cmp);
            [
                quantile(&values, 0.5),
                quantile(&values, 0.99),
                values.last().copied().unwrap_or(f64::NAN),
            ]
        };
        let cpu = |f: fn(&websocket::Run) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
        let last_runs: Vec<f64> = runs
            .iter()
            .map(|r| {
                let mut last: Vec<f64> = r.complete.iter().map(|s| s.last_us).collect();
                last.sort_by(f64::total_cmp);
                quantile(&last, 0.5)
            })
            .collect();
        Self {
            last_runs: [min(&last_runs), max(&last_runs)],
            first: quantiles(|s| s.first_us),
            median: quantiles(|s| s.median_us),
            last: quantiles(|s| s.last_us),
            cpu: [
                cpu(|r| r.server_us),
                cpu(|r| r.clients_us),
                cpu(|r| r.redis_us),
            ],
            sent: runs.iter().map(|r| r.sent).sum(),
            lost: runs.iter().map(|r| r.lost).sum(),
            missing: runs.iter().map(|r| r.missing).sum(),
        }
    }

    fn row(&self, target: f64, process: &str) -> Vec<String> {
        let ms = |us: f64| format!("{:.2}", us / 1e3);
        vec![
            rate(target),
            process.to_owned(),
            self.sent.to_string(),
            ms(self.first[0]),
            ms(self.median[0]),
            ms(self.median[1]),
            ms(self.median[2]),
            ms(self.last[0]),
            ms(self.last[1]),
            ms(self.last[2]),
            format!(
                "{:.0}-{:.0}",
                self.last_runs[0] / 1e3,
                self.last_runs[1] / 1e3
            ),
            format!("{} ({})", self.lost, self.missing),
            format!("{:.1}/{:.1}/{:.2}", self.cpu[0], self.cpu[1], self.cpu[2]),
        ]
    }
}
