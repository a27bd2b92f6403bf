//! The traffic of the keyspace section: a writer that SETs numbered keys under [`KEY_PREFIX`]
//! in pipelines, so that Redis (with `notify-keyspace-events` including `K$`) publishes one
//! `set` notification per write, and a receiver that counts what arrives per key.
//!
//! A notification carries no payload of ours (its payload is the event name), so the key is
//! the message's identity: measured writes go to `fwd:N`, warm-up writes to `fwd:warm-N`, and
//! the receiver reads `N` from the channel it is told to cut (`fwded:` for the republished
//! copies, `__keyspace@0__:fwd:` for the notifications themselves). Each key is written once
//! per run, so lost and duplicated copies are exact.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{IDLE, PIPELINE, Transfer, WARM_UP, wait_for_count};

/// The prefix of every key the writer writes.
pub const KEY_PREFIX: &str = "fwd:";
/// The keyspace notifications of those keys in database 0.
pub const KEYSPACE_PATTERN: &str = "__keyspace@0__:fwd:*";
/// What a receiver of the notifications themselves cuts from each channel.
pub const KEYSPACE_PREFIX: &str = "__keyspace@0__:fwd:";
/// The `notify-keyspace-events` flags the section needs: keyspace channels, string events.
pub const KEY_EVENTS: &str = "K$";
/// What the warm-up keys start with after [`KEY_PREFIX`].
const WARM: &str = "warm-";

/// Counters the receiver moves and the writer waits on.
#[derive(Default)]
struct Progress {
    warm: AtomicU64,
    measured: AtomicU64,
    changed: Notify,
}

/// What a [`KeyReceiver`] saw.
struct Seen {
    /// Copies received per key number.
    counts: Vec<u8>,
    /// The last measured arrival.
    last: Option<Instant>,
    /// Measured copies received (duplicates included).
    measured: u64,
}

/// A subscriber on its own connection counting, per key number, the messages whose channel
/// is `PREFIX` followed by the number.
pub struct KeyReceiver {
    progress: Arc<Progress>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Seen>,
}

impl KeyReceiver {
    /// Subscribes to `pattern` and starts counting channels that start with `prefix`.
    pub async fn start(url: &str, pattern: &str, prefix: &str) -> anyhow::Result<Self> {
        let client = redis::Client::open(url)?;
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.psubscribe(pattern).await?;
        let progress = Arc::new(Progress::default());
        let stop = CancellationToken::new();
        let task = tokio::spawn(receive(
            pubsub.into_on_message(),
            prefix.to_owned(),
            progress.clone(),
            stop.clone(),
        ));
        Ok(Self {
            progress,
            stop,
            task,
        })
    }

    fn measured(&self) -> u64 {
        self.progress.measured.load(Ordering::Acquire)
    }

    async fn wait(&self, counter: &AtomicU64, target: u64) -> bool {
        wait_for_count(counter, &self.progress.changed, target, IDLE).await
    }

    async fn finish(self) -> anyhow::Result<Seen> {
        self.stop.cancel();
        Ok(self.task.await?)
    }
}

async fn receive(
    mut stream: redis::aio::PubSubStream,
    prefix: String,
    progress: Arc<Progress>,
    stop: CancellationToken,
) -> Seen {
    let mut seen = Seen {
        counts: Vec::new(),
        last: None,
        measured: 0,
    };
    loop {
        let message = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            message = stream.next() => match message {
                Some(message) => message,
                None => break,
            },
        };
        let channel = message.get_channel_name();
        let Some(rest) = channel.strip_prefix(prefix.as_str()) else {
            continue;
        };
        if rest.starts_with(WARM) {
            progress.warm.fetch_add(1, Ordering::Release);
            progress.changed.notify_one();
            continue;
        }
        let Some(index) = rest.parse::<usize>().ok().filter(|&i| i <= 100_000_000) else {
            continue;
        };
        if index >= seen.counts.len() {
            let size = (index + 1).max(seen.counts.len() * 2);
            seen.counts.resize(size, 0);
        }
        seen.counts[index] = seen.counts[index].saturating_add(1);
        seen.measured += 1;
        seen.last = Some(Instant::now());
        progress.measured.fetch_add(1, Ordering::Release);
        progress.changed.notify_one();
    }
    seen
}

/// Writes keys under [`KEY_PREFIX`] in pipelines of [`PIPELINE`] SETs on its own connection.
pub struct KeyWriter {
    connection: redis::aio::MultiplexedConnection,
    value: Vec<u8>,
}

impl KeyWriter {
    /// A writer of `size`-byte values.
    pub async fn new(url: &str, size: usize) -> anyhow::Result<Self> {
        let client = redis::Client::open(url)?;
        let connection = client.get_multiplexed_async_connection().await?;
        Ok(Self {
            connection,
            value: vec![b'x'; size],
        })
    }

    /// SETs keys `first..first + count` (`fwd:N`, or `fwd:warm-N` if `warm`) as one pipeline.
    async fn send(&mut self, first: u64, count: u64, warm: bool) -> anyhow::Result<()> {
        let mut pipe = redis::pipe();
        let warm = if warm { WARM } else { "" };
        for n in first..first + count {
            pipe.cmd("SET")
                .arg(format!("{KEY_PREFIX}{warm}{n}"))
                .arg(&self.value[..])
                .ignore();
        }
        pipe.query_async::<()>(&mut self.connection)
            .await
            .context("SET pipeline failed")
    }

    /// Writes [`WARM_UP`] warm-up keys, at most `window` in flight, and waits until each was
    /// heard of.
    async fn warm_up(&mut self, receiver: &KeyReceiver, window: u64) -> anyhow::Result<()> {
        let most = PIPELINE.min(window);
        let mut sent = 0;
        while sent < WARM_UP {
            let count = most.min(WARM_UP - sent);
            if sent + count > window {
                receiver
                    .wait(&receiver.progress.warm, sent + count - window)
                    .await;
            }
            self.send(sent, count, true).await?;
            sent += count;
        }
        if !receiver.wait(&receiver.progress.warm, WARM_UP).await {
            bail!(
                "warm-up: {} of {WARM_UP} key events came back",
                receiver.progress.warm.load(Ordering::Acquire)
            );
        }
        Ok(())
    }

    /// Writes keys `0..count` as fast as the pipeline goes, keeping at most `window` writes
    /// not yet heard of by `receiver`. Returns when the first was sent.
    async fn windowed(
        &mut self,
        count: u64,
        window: u64,
        receiver: &KeyReceiver,
    ) -> anyhow::Result<Instant> {
        let most = PIPELINE.min(window.max(1));
        let started = Instant::now();
        let mut sent = 0;
        while sent < count {
            let batch = most.min(count - sent);
            let allowed = sent + batch;
            if allowed > window
                && receiver.measured() < allowed - window
                && !receiver
                    .wait(&receiver.progress.measured, allowed - window)
                    .await
            {
                eprintln!(
                    "warning: nothing arrived for {IDLE:?} with {} key events outstanding; \
                     writing on",
                    allowed - receiver.measured()
                );
            }
            self.send(sent, batch, false).await?;
            sent += batch;
        }
        Ok(started)
    }
}

/// Writes `count` keys with `size`-byte values, at most `window` not yet heard of
/// ([`super::UNTHROTTLED`]: no limit), and counts one copy of each on `receive_pattern`,
/// whose channels are `prefix` followed by the key's number.
pub async fn key_transfer(
    url: &str,
    receive_pattern: &str,
    prefix: &str,
    count: u64,
    size: usize,
    window: u64,
) -> anyhow::Result<Transfer> {
    let receiver = KeyReceiver::start(url, receive_pattern, prefix).await?;
    let mut writer = KeyWriter::new(url, size).await?;
    writer.warm_up(&receiver, super::window(size)).await?;
    let started = writer.windowed(count, window, &receiver).await?;
    receiver.wait(&receiver.progress.measured, count).await;
    let seen = receiver.finish().await?;
    let elapsed = seen.last.map_or(Duration::ZERO, |last| last - started);
    let mut lost = 0;
    let mut duplicated = 0;
    for n in 0..usize::try_from(count).unwrap_or(usize::MAX) {
        let got = seen.counts.get(n).copied().unwrap_or(0);
        lost += u64::from(1u8.saturating_sub(got));
        duplicated += u64::from(got.saturating_sub(1));
    }
    let secs = elapsed.as_secs_f64().max(1e-9);
    Ok(Transfer {
        input_rate: count as f64 / secs,
        output_rate: seen.measured as f64 / secs,
        // Not measured: a notification's payload is the event name.
        output_mb: 0.0,
        lost,
        duplicated,
        cpu_us: f64::NAN,
        cut: false,
    })
}
