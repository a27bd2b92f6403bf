//! The baselines, written the plain way with the same `redis` crate (1.8, tokio), each run as
//! its own process so that it pays for the same process boundary and sockets as Switchyard: a
//! bare relay (`pipeline --relay URL`) and a bare stream consumer.
//!
//! One connection PSUBSCRIBEs `fwd:*`; each message is republished on `fwded:REST` through a
//! multiplexed connection. The relay does not wait for each PUBLISH reply before reading the
//! next message: up to [`IN_FLIGHT`] publishes are outstanding (`StreamExt::buffered`), which
//! keeps replies, and therefore publishes, in arrival order. This is the one non-naive choice;
//! a relay awaiting each reply would be bound by the round trip, as Switchyard's worker is.
//!
//! The stream consumer (`pipeline --stream-consumer URL --stream-group NAME`) is the baseline
//! of the streams section, the shortest strong consumer we know how to write with the crate:
//! one multiplexed connection; after the first
//! `XREADGROUP GROUP NAME baseline COUNT 64 BLOCK 100 STREAMS KEY >`, each batch's `XACK`
//! goes in one pipeline with the next `XREADGROUP`, so a batch costs one round trip and one
//! write, never an acknowledgement's round trip of its own. With `--stream-publish` it also
//! does what `forward` does with each entry: the batch's PUBLISHes on `fwded:REST` (REST: the
//! key after `fwd:`) go first in that same pipeline.

use std::io::Write as _;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt as _;
use redis::AsyncCommands as _;
use redis::streams::{StreamReadOptions, StreamReadReply};

/// PUBLISH commands the relay keeps outstanding on its publishing connection.
pub const IN_FLIGHT: usize = 256;

/// Entries the stream consumer reads per `XREADGROUP` (and acknowledges per `XACK`): the
/// host's default `streams.batch`, which the bench also sets for Switchyard.
pub const STREAM_BATCH: usize = 64;
/// How long one `XREADGROUP` of the stream consumer blocks, in milliseconds; the bench gives
/// Switchyard the same `streams.block_ms`.
pub const STREAM_BLOCK_MS: usize = 100;
/// The stream consumer's name in its group.
const STREAM_CONSUMER: &str = "baseline";
/// Time a blocking read may take on the wire beyond its `BLOCK` (the crate's default response
/// timeout, 500 ms, is too short on a busy machine).
const RESPONSE_MARGIN: Duration = Duration::from_secs(5);

/// Exits the process when the bench closes our standard input (even when it is killed).
fn exit_with_stdin() {
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
}

/// Runs the relay until the bench closes our standard input.
pub fn main(url: &str) -> anyhow::Result<()> {
    exit_with_stdin();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let client = redis::Client::open(url)?;
        let publisher = client.get_multiplexed_async_connection().await?;
        let mut subscriber = client.get_async_pubsub().await?;
        subscriber.psubscribe("fwd:*").await?;
        println!("ready");
        std::io::stdout().flush()?;
        subscriber
            .into_on_message()
            .map(|message| {
                let channel = message.get_channel_name();
                let rest = channel.strip_prefix("fwd:").unwrap_or(channel);
                let mut command = redis::cmd("PUBLISH");
                command
                    .arg(format!("fwded:{rest}"))
                    .arg(message.get_payload_bytes());
                let mut connection = publisher.clone();
                async move { command.query_async::<i64>(&mut connection).await }
            })
            .buffered(IN_FLIGHT)
            .for_each(|published| async move {
                if let Err(e) = published {
                    eprintln!("relay: PUBLISH failed: {e}");
                }
            })
            .await;
        anyhow::Ok(())
    })
}

/// Runs the bare stream consumer on `key` through `group` (which the bench has created),
/// republishing each payload if `publish`, until the bench closes our standard input.
pub fn consume(url: &str, key: &str, group: &str, publish: bool) -> anyhow::Result<()> {
    exit_with_stdin();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let client = redis::Client::open(url)?;
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(
            Duration::from_millis(STREAM_BLOCK_MS as u64) + RESPONSE_MARGIN,
        ));
        let mut connection = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let options = StreamReadOptions::default()
            .group(group, STREAM_CONSUMER)
            .count(STREAM_BATCH)
            .block(STREAM_BLOCK_MS);
        let channel = format!("fwded:{}", key.strip_prefix("fwd:").unwrap_or(key));
        println!("ready");
        std::io::stdout().flush()?;
        let mut ids = Vec::with_capacity(STREAM_BATCH);
        let mut payloads = Vec::with_capacity(STREAM_BATCH);
        // The first read has nothing to acknowledge; every later one rides with an XACK.
        let mut reply: Option<StreamReadReply> = connection
            .xread_options(&[key], &[">"], &options)
            .await
            .context("stream consumer: XREADGROUP failed")?;
        loop {
            ids.clear();
            payloads.clear();
            for mut entry in reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
                // What a plugin is handed: the entry's `payload` field.
                if let Some(redis::Value::BulkString(payload)) = entry.map.remove("payload") {
                    payloads.push(payload);
                }
                ids.push(entry.id);
            }
            if ids.is_empty() {
                reply = connection
                    .xread_options(&[key], &[">"], &options)
                    .await
                    .context("stream consumer: XREADGROUP failed")?;
                continue;
            }
            let mut pipe = redis::pipe();
            if publish {
                for payload in &payloads {
                    pipe.cmd("PUBLISH").arg(&channel).arg(payload).ignore();
                }
            } else {
                std::hint::black_box(&payloads);
            }
            pipe.xack(key, group, &ids)
                .ignore()
                .xread_options(&[key], &[">"], &options);
            let (next,): (Option<StreamReadReply>,) = pipe
                .query_async(&mut connection)
                .await
                .context("stream consumer: XACK and XREADGROUP pipeline failed")?;
            reply = next;
        }
    })
}
