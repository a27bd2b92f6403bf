//! Section 1: throughput of 64 B and 1 KiB messages through the relay and through
//! Switchyard with its default settings, from an unthrottled and from a throttled publisher,
//! against a ceiling (the same publisher and receiver with nothing in between).

use std::time::{Duration, Instant};

use super::bench::{Bench, compared};
use super::harness::{self, INPUT_CHANNEL, OUTPUT_PATTERN};
use super::table::{Table, bytes};

impl Bench {
    /// Section 1.
    pub(super) async fn throughput(&self) -> anyhow::Result<()> {
        let count = self.scale.messages;
        let rounds = self.scale.rounds;
        println!(
            "\n## 1. Throughput: {count} messages per run on {INPUT_CHANNEL}, counted on \
             {OUTPUT_PATTERN}; median of {rounds} rounds, relay and switchyard alternating; \
             switchyard with its default settings"
        );
        println!(
            "   rate = messages delivered / (first publish .. last arrival). publisher: this \
             process, pipelines of {} PUBLISHes; unthrottled = each pipeline sent as soon as \
             redis answered the previous one; throttled = also at most {} (64 B) / {} (1 KiB) \
             messages in flight (published, not yet arrived on {OUTPUT_PATTERN})",
            harness::PIPELINE,
            harness::window(64),
            harness::window(1024)
        );
        let rtt = self.serial_publish_rtt().await?;
        println!(
            "   context: one PUBLISH awaited at a time from this process: {:.1} µs per round \
             trip ({:.0} msg/s)",
            rtt.as_secs_f64() * 1e6,
            1.0 / rtt.as_secs_f64()
        );
        let mut table = Table::new(&[
            "payload",
            "publisher",
            "ceiling msg/s",
            "relay msg/s",
            "switchyard msg/s",
            "b/a",
            "relay range",
            "switchyard range",
            "lost a/b",
            "dup a/b",
            "switchyard shed",
            "handle µs",
            "CPU µs/msg a/b",
        ]);
        let plugins = self.forwards(1, false)?;
        for size in [64usize, 1024] {
            for (publisher, window) in [
                ("unthrottled", harness::UNTHROTTLED),
                ("throttled", harness::window(size)),
            ] {
                let ceiling =
                    harness::transfer(self.url(), "fwd:*", count, size, 1, window).await?;
                let mut relay = Vec::new();
                let mut host = Vec::new();
                for round in 0..rounds {
                    let url = self.url();
                    if round % 2 == 0 {
                        relay.push(self.relay_run(url, count, size, window).await?);
                        host.push(
                            self.switchyard_run(url, &plugins, count, size, 1, window)
                                .await?,
                        );
                    } else {
                        host.push(
                            self.switchyard_run(url, &plugins, count, size, 1, window)
                                .await?,
                        );
                        relay.push(self.relay_run(url, count, size, window).await?);
                    }
                }
                let mut row = vec![bytes(size), publisher.to_owned()];
                row.extend(compared(&ceiling, &relay, &host));
                table.row(row);
            }
        }
        table.print();
        println!(
            "   ceiling: the receiver subscribed to fwd:* directly (no relay): what publisher, \
             redis and receiver manage on this machine. a = relay, b = switchyard. lost: \
             copies that never arrived, dup: copies that arrived twice, over all {rounds} \
             rounds of {count}; (N cut): runs in which redis closed the relay's subscriber \
             connection at its output-buffer limit. switchyard shed: its /plugins counters \
             over all rounds, by reason, with subscriber reconnects if any (shed messages are \
             among the lost). handle µs: mean duration of forward's \
             handle call (switchyard_plugin_handle_seconds sum/count). CPU µs/msg: CPU time \
             of the relay / switchyard process (all threads) per message"
        );
        Ok(())
    }

    /// Mean round trip of one awaited PUBLISH (no subscriber) from this process.
    async fn serial_publish_rtt(&self) -> anyhow::Result<Duration> {
        let client = redis::Client::open(self.url())?;
        let mut connection = client.get_multiplexed_async_connection().await?;
        let payload = vec![b'x'; 64];
        let n = 5_000;
        let started = Instant::now();
        for _ in 0..n {
            redis::cmd("PUBLISH")
                .arg("bench:nobody")
                .arg(&payload)
                .query_async::<i64>(&mut connection)
                .await?;
        }
        Ok(started.elapsed() / n)
    }
}
