//! The baselines, written the plain way with the same `redis` crate (1.8, tokio), each run as
//! its own process so that it pays for the same process boundary and sockets as Switchyard: a
//! bare relay (`pipeline --relay URL`) and a bare stream consumer.
//!
//! One connection PSUBSCRIBEs `fwd:*`; a reader task turns each message into a PUBLISH of its
//! payload on `fwded:REST` and hands it to a writer task through a bounded channel. The writer
//! sends whatever has accumulated since its last write, up to [`MAX_BATCH`] commands, as one
//! pipeline on its own connection, with one pipeline in flight: the way Switchyard's own
//! outgoing queue writes (`host/src/effects/mod.rs`), so that under load one round trip carries
//! hundreds of messages, in arrival order. A full channel makes the reader wait; meanwhile the
//! crate keeps what Redis delivers in its own unbounded buffer, so the relay never makes Redis
//! hold messages for it, and its memory has no bound.
//!
//! In keys mode (`pipeline --relay URL --relay-keys`, the baseline of the keyspace section)
//! the same relay listens to keyspace notifications instead: `PSUBSCRIBE
//! __keyspace@0__:fwd:*`, and for each `set` event on key `fwd:REST` it queues a PUBLISH of the
//! event name on `fwded:REST`, which is what `forward` does with a key subscription's message
//! (channel: the key, payload: the event name). Events other than `set` are dropped, as the
//! host drops events a key subscription did not ask for.
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

/// The most PUBLISH commands the relay writes as one pipeline (Switchyard's `MAX_BATCH`).
pub const MAX_BATCH: usize = 512;
/// Messages waiting between the relay's reader and its writer (Switchyard's outgoing queue
/// holds as many).
pub const QUEUE: usize = 16_384;
/// How long the relay's writer waits for a pipeline's replies (the crate's default, 500 ms,
/// is too short for a pipeline of hundreds on a busy machine).
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

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

/// What a relay listens to: the pattern it subscribes, what it cuts from each channel to
/// leave `REST` (it republishes on `fwded:REST`), and the one payload it relays, if only one.
struct Source {
    pattern: &'static str,
    prefix: &'static str,
    only: Option<&'static [u8]>,
}

/// The relay of `fwd:*` messages.
const MESSAGES: Source = Source {
    pattern: "fwd:*",
    prefix: "fwd:",
    only: None,
};

/// The relay of `set` notifications on `fwd:*` keys in database 0.
const KEYS: Source = Source {
    pattern: "__keyspace@0__:fwd:*",
    prefix: "__keyspace@0__:fwd:",
    only: Some(b"set"),
};

/// Runs the relay until the bench closes our standard input, on keyspace notifications if
/// `keys`. Exits with status 1 if Redis closes the subscriber connection (as it does to a
/// client past its output-buffer limit).
pub fn main(url: &str, keys: bool) -> anyhow::Result<()> {
    let source = if keys { KEYS } else { MESSAGES };
    exit_with_stdin();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let client = redis::Client::open(url)?;
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(WRITE_TIMEOUT));
        let publisher = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let mut subscriber = client.get_async_pubsub().await?;
        subscriber.psubscribe(source.pattern).await?;
        let (queue, outgoing) = tokio::sync::mpsc::channel(QUEUE);
        let writer = tokio::spawn(write(publisher, outgoing));
        println!("ready");
        std::io::stdout().flush()?;
        let mut messages = subscriber.into_on_message();
        while let Some(message) = messages.next().await {
            if let Some(only) = source.only
                && message.get_payload_bytes() != only
            {
                continue;
            }
            let channel = message.get_channel_name();
            let rest = channel.strip_prefix(source.prefix).unwrap_or(channel);
            let publish = (
                format!("fwded:{rest}"),
                message.get_payload_bytes().to_vec(),
            );
            if queue.send(publish).await.is_err() {
                break;
            }
        }
        drop(queue);
        let _ = writer.await;
        // One line for the bench's output, which shows the relay's standard error.
        eprintln!("relay: redis closed the subscriber connection; exiting");
        std::process::exit(1)
    })
}

/// Writes what the reader queued: everything that accumulated, up to [`MAX_BATCH`], as one
/// pipeline, one pipeline in flight.
async fn write(
    mut connection: redis::aio::MultiplexedConnection,
    mut queue: tokio::sync::mpsc::Receiver<(String, Vec<u8>)>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let mut pipe = redis::pipe();
        for (channel, payload) in &batch {
            pipe.cmd("PUBLISH").arg(channel).arg(payload).ignore();
        }
        if let Err(e) = pipe.query_async::<()>(&mut connection).await {
            eprintln!("relay: {} PUBLISHes failed: {e}", batch.len());
        }
        batch.clear();
    }
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
