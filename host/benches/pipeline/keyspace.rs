//! Section 14: keyspace notifications through a key subscription. A writer SETs numbered keys
//! `fwd:N` on a redis-server of its own with `notify-keyspace-events K$`; `forward`, with
//! `[subscriptions] keys = ["fwd:*"]` and `events = ["set"]` in its manifest, gets each
//! notification as a message on channel `fwd:N` with payload `set` and republishes it on
//! `fwded:N`. Against it, the relay in keys mode does the same job on the same notifications
//! (`PSUBSCRIBE __keyspace@0__:fwd:*`, PUBLISH `set` on `fwded:N`, pipelined), and a ceiling
//! counts the notifications themselves with nothing in between.

use switchyard_tests::RedisServer;

use super::bench::{Bench, HostRun, compared, per_message};
use super::harness::{
    self, KEY_EVENTS, KEY_PREFIX, KEYSPACE_PATTERN, KEYSPACE_PREFIX, OUTPUT_PATTERN, Relay,
    Switchyard, Transfer, WARM_UP, key_transfer,
};
use super::table::{Table, bytes};

/// Bytes of each value the writer SETs.
const VALUE: usize = 64;
/// What the receiver cuts from a republished copy's channel to leave the key's number.
const OUTPUT_PREFIX: &str = "fwded:";

impl Bench {
    /// Section 14.
    pub(super) async fn keyspace(&self) -> anyhow::Result<()> {
        let count = self.scale.messages;
        let rounds = self.scale.rounds;
        let throttled = harness::window(VALUE);
        println!(
            "\n## 14. Keyspace events: {count} SETs of {KEY_PREFIX}N ({} values) per run, \
             one set notification each, counted on {OUTPUT_PATTERN}; median of {rounds} \
             rounds, relay and switchyard alternating; switchyard with its default settings; \
             a redis-server of its own with notify-keyspace-events {KEY_EVENTS}",
            bytes(VALUE)
        );
        println!(
            "   rate = events delivered / (first SET .. last arrival). writer: this process, \
             pipelines of {} SETs; unthrottled = each pipeline sent as soon as redis answered \
             the previous one; throttled = also at most {throttled} events in flight (written, \
             not yet arrived). relay (a): PSUBSCRIBE {KEYSPACE_PATTERN}, each set event on \
             {KEY_PREFIX}N queued as PUBLISH {OUTPUT_PREFIX}N set, written as section 1's relay \
             writes. switchyard (b): forward with [subscriptions] keys = [\"{KEY_PREFIX}*\"], \
             events = [\"set\"]: message channel {KEY_PREFIX}N, payload set, sent on \
             {OUTPUT_PREFIX}N",
            harness::PIPELINE
        );
        let plugins = self.key_forward()?;
        let mut redis = RedisServer::start_with(&["--notify-keyspace-events", KEY_EVENTS]).await?;
        let measured = self.key_rows(&redis.url(), &plugins, count, rounds).await;
        redis.kill().await;
        measured?.print();
        println!(
            "   ceiling: the receiver subscribed to {KEYSPACE_PATTERN} directly (no relay): \
             what writer, redis and receiver manage on this machine. a = relay, b = \
             switchyard. lost: events that never arrived, dup: events that arrived twice, \
             over all {rounds} rounds of {count}; (N cut): runs in which redis closed the \
             relay's subscriber connection at its output-buffer limit. switchyard shed: its \
             /plugins counters over all rounds, by reason, with subscriber reconnects if any. \
             handle µs: mean duration of forward's handle call. CPU µs/msg: CPU time of the \
             relay / switchyard process (all threads) per event"
        );
        Ok(())
    }

    /// A plugins folder with `forward` listening to `set` events of `fwd:*` keys instead of
    /// its own subscription.
    fn key_forward(&self) -> anyhow::Result<std::path::PathBuf> {
        let dir = self.folder("keyspace")?;
        let manifest = format!(
            "{}\n[subscriptions]\nkeys = [\"{KEY_PREFIX}*\"]\nevents = [\"set\"]\n",
            harness::forward_manifest(None)
        );
        harness::install_plugin(&dir, "forward", self.forward, &manifest)?;
        Ok(dir)
    }

    /// The section's table: an unthrottled and a throttled row on the Redis at `url`.
    async fn key_rows(
        &self,
        url: &str,
        plugins: &std::path::Path,
        count: u64,
        rounds: usize,
    ) -> anyhow::Result<Table> {
        let mut table = Table::new(&[
            "writer",
            "ceiling ev/s",
            "relay ev/s",
            "switchyard ev/s",
            "b/a",
            "relay range",
            "switchyard range",
            "lost a/b",
            "dup a/b",
            "switchyard shed",
            "handle µs",
            "CPU µs/msg a/b",
        ]);
        for (writer, window) in [
            ("unthrottled", harness::UNTHROTTLED),
            ("throttled", harness::window(VALUE)),
        ] {
            // First, so that every measured run overwrites keys that exist.
            let ceiling =
                key_transfer(url, KEYSPACE_PATTERN, KEYSPACE_PREFIX, count, VALUE, window).await?;
            let mut relay = Vec::new();
            let mut host = Vec::new();
            for round in 0..rounds {
                if round % 2 == 0 {
                    relay.push(key_relay_run(url, count, window).await?);
                    host.push(self.key_host_run(url, plugins, count, window).await?);
                } else {
                    host.push(self.key_host_run(url, plugins, count, window).await?);
                    relay.push(key_relay_run(url, count, window).await?);
                }
            }
            let mut row = vec![writer.to_owned()];
            row.extend(compared(&ceiling, &relay, &host));
            table.row(row);
        }
        Ok(table)
    }

    /// One run through a fresh Switchyard on `plugins`.
    async fn key_host_run(
        &self,
        url: &str,
        plugins: &std::path::Path,
        count: u64,
        window: u64,
    ) -> anyhow::Result<HostRun> {
        let host = Switchyard::start(url, &self.setup(plugins)).await?;
        let cpu = harness::cpu_time(host.pid())?;
        let transfer = key_transfer(url, OUTPUT_PATTERN, OUTPUT_PREFIX, count, VALUE, window).await;
        let cpu = harness::cpu_time(host.pid())? - cpu;
        let losses = host.losses().await;
        let handle = host.mean_handle().await;
        let tail = host.log_tail();
        host.stop().await;
        let mut transfer = transfer.map_err(|e| e.context(format!("switchyard log:\n{tail}")))?;
        transfer.cpu_us = per_message(cpu, count + WARM_UP);
        Ok(HostRun {
            transfer,
            losses: losses?,
            mean_handle: handle?,
        })
    }
}

/// One run through a fresh relay in keys mode.
async fn key_relay_run(url: &str, count: u64, window: u64) -> anyhow::Result<Transfer> {
    let mut relay = Relay::start_keys(url).await?;
    let cpu = harness::cpu_time(relay.pid())?;
    let transfer = key_transfer(url, OUTPUT_PATTERN, OUTPUT_PREFIX, count, VALUE, window).await;
    let cpu = harness::cpu_time(relay.pid())? - cpu;
    let cut = relay.has_exited();
    relay.stop().await;
    let mut transfer = transfer?;
    transfer.cpu_us = per_message(cpu, count + WARM_UP);
    transfer.cut = cut;
    Ok(transfer)
}
