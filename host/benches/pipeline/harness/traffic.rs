//! The traffic of a run: a publisher of numbered messages on [`INPUT_CHANNEL`], pipelined,
//! throttled to a window or paced, and a receiver that counts what comes back.
//!
//! Every message carries a 17-byte header: the wall-clock send time (nanoseconds since the Unix
//! epoch, little-endian), a sequence number, and a kind byte (warm-up or measured). The
//! receiver counts each sequence number, so losses and duplicates are exact, and turns the send
//! time into publish-to-republish latency.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use hdrhistogram::Histogram;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{IDLE, INPUT_CHANNEL, WARM_UP, wait_for_count, wall_nanos};

/// Bytes of the header every payload starts with.
const HEADER: usize = 17;
/// Kind byte of warm-up messages: counted apart, never measured.
const KIND_WARM: u8 = 0;
/// Kind byte of measured messages.
const KIND_MEASURED: u8 = 1;

/// Counters the receiver moves and the publisher waits on.
#[derive(Default)]
struct Progress {
    warm: AtomicU64,
    measured: AtomicU64,
    changed: Notify,
}

/// What the receiver saw.
pub struct Received {
    /// Copies received per sequence number.
    pub counts: Vec<u8>,
    /// First arrival of each sequence number, in nanoseconds since [`Receiver::base`]
    /// (`u64::MAX`: never).
    pub first_arrival: Vec<u64>,
    /// The last measured arrival.
    pub last: Option<Instant>,
    /// Publish-to-arrival latency of measured messages, in microseconds.
    pub latency_us: Histogram<u64>,
    /// Measured messages received (copies included).
    pub measured: u64,
    /// Payload bytes of measured messages received.
    pub bytes: u64,
    /// Messages without our header.
    pub foreign: u64,
}

impl Received {
    /// Sequence numbers below `sent` that arrived fewer than `copies` times, counted per
    /// missing copy; and copies beyond `copies`.
    pub fn lost_and_duplicated(&self, sent: u64, copies: u8) -> (u64, u64) {
        let mut lost = 0;
        let mut duplicated = 0;
        for seq in 0..usize::try_from(sent).unwrap_or(usize::MAX) {
            let got = self.counts.get(seq).copied().unwrap_or(0);
            lost += u64::from(copies.saturating_sub(got));
            duplicated += u64::from(got.saturating_sub(copies));
        }
        (lost, duplicated)
    }
}

/// A subscriber on its own connection, counting messages in a task.
pub struct Receiver {
    progress: Arc<Progress>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Received>,
    /// The instant arrival times are measured from.
    pub base: Instant,
}

impl Receiver {
    /// Subscribes to `pattern` and starts counting.
    pub async fn start(url: &str, pattern: &str) -> anyhow::Result<Self> {
        let client = redis::Client::open(url)?;
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.psubscribe(pattern).await?;
        let progress = Arc::new(Progress::default());
        let stop = CancellationToken::new();
        let base = Instant::now();
        let task = tokio::spawn(receive(
            pubsub.into_on_message(),
            progress.clone(),
            stop.clone(),
            base,
        ));
        Ok(Self {
            progress,
            stop,
            task,
            base,
        })
    }

    /// Measured messages received so far.
    pub fn measured(&self) -> u64 {
        self.progress.measured.load(Ordering::Acquire)
    }

    /// Waits until `target` measured messages have arrived, or none for [`IDLE`]; true if
    /// all arrived.
    pub async fn wait_measured(&self, target: u64) -> bool {
        self.wait(&self.progress.measured, target).await
    }

    async fn wait(&self, counter: &AtomicU64, target: u64) -> bool {
        wait_for_count(counter, &self.progress.changed, target, IDLE).await
    }

    /// Waits until the measured count is at least `target`, with no idle limit (used for
    /// the publisher's window; the run's final wait reports losses).
    async fn wait_window(&self, target: u64) -> bool {
        self.wait(&self.progress.measured, target).await
    }

    /// Stops counting and returns what was seen.
    pub async fn finish(self) -> anyhow::Result<Received> {
        self.stop.cancel();
        Ok(self.task.await?)
    }
}

async fn receive(
    mut stream: redis::aio::PubSubStream,
    progress: Arc<Progress>,
    stop: CancellationToken,
    base: Instant,
) -> Received {
    let mut seen = Received {
        counts: Vec::new(),
        first_arrival: Vec::new(),
        last: None,
        // 1 µs to 10 minutes, 3 significant digits.
        latency_us: Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds"),
        measured: 0,
        bytes: 0,
        foreign: 0,
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
        let now = Instant::now();
        let wall = wall_nanos();
        let payload = message.get_payload_bytes();
        let Some(header) = payload.get(..HEADER) else {
            seen.foreign += 1;
            continue;
        };
        let sent = u64::from_le_bytes(header[0..8].try_into().unwrap_or_default());
        let seq = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
        match header[16] {
            KIND_WARM => {
                progress.warm.fetch_add(1, Ordering::Release);
                progress.changed.notify_one();
                continue;
            }
            KIND_MEASURED => {}
            _ => {
                seen.foreign += 1;
                continue;
            }
        }
        let Ok(index) = usize::try_from(seq) else {
            seen.foreign += 1;
            continue;
        };
        if index >= seen.counts.len() {
            if index > 100_000_000 {
                seen.foreign += 1;
                continue;
            }
            let size = (index + 1).max(seen.counts.len() * 2);
            seen.counts.resize(size, 0);
            seen.first_arrival.resize(size, u64::MAX);
        }
        seen.counts[index] = seen.counts[index].saturating_add(1);
        if seen.first_arrival[index] == u64::MAX {
            seen.first_arrival[index] =
                u64::try_from(now.duration_since(base).as_nanos()).unwrap_or(u64::MAX - 1);
        }
        seen.latency_us
            .saturating_record((wall.saturating_sub(sent) / 1000).max(1));
        seen.bytes += payload.len() as u64;
        seen.measured += 1;
        seen.last = Some(now);
        progress.measured.fetch_add(1, Ordering::Release);
        progress.changed.notify_one();
    }
    seen
}

/// The most PUBLISH commands the publisher sends as one pipeline (fewer for payloads above
/// 1 KiB: about 256 KiB per pipeline).
pub const PIPELINE: u64 = 256;

/// Publishes numbered messages on [`INPUT_CHANNEL`] in pipelines.
pub struct Publisher {
    connection: redis::aio::MultiplexedConnection,
    payload: Vec<u8>,
    batch: u64,
    /// The next sequence number to be given out.
    pub next_seq: Arc<AtomicU64>,
}

/// What a paced run did.
pub struct Paced {
    /// Messages published.
    pub sent: u64,
    /// Offered rate actually achieved, messages per second.
    pub achieved: f64,
}

impl Publisher {
    /// A publisher of `size`-byte payloads on its own connection.
    pub async fn new(url: &str, size: usize) -> anyhow::Result<Self> {
        let client = redis::Client::open(url)?;
        let connection = client.get_multiplexed_async_connection().await?;
        let mut payload = vec![b'x'; size.max(HEADER)];
        payload[16] = KIND_MEASURED;
        // About 256 KiB per pipeline, at most PIPELINE commands.
        let batch = (256 * 1024 / payload.len()).clamp(1, PIPELINE as usize) as u64;
        Ok(Self {
            connection,
            payload,
            batch,
            next_seq: Arc::new(AtomicU64::new(0)),
        })
    }

    async fn send(&mut self, first: u64, count: u64, kind: u8) -> anyhow::Result<()> {
        let mut pipe = redis::pipe();
        for seq in first..first + count {
            self.payload[0..8].copy_from_slice(&wall_nanos().to_le_bytes());
            self.payload[8..16].copy_from_slice(&seq.to_le_bytes());
            self.payload[16] = kind;
            pipe.cmd("PUBLISH")
                .arg(INPUT_CHANNEL)
                .arg(&self.payload[..])
                .ignore();
        }
        pipe.query_async::<()>(&mut self.connection)
            .await
            .context("PUBLISH pipeline failed")
    }

    /// Sends [`WARM_UP`] warm-up messages, at most the throttled [`window`] of copies in
    /// flight, and waits until `copies` of each came back.
    pub async fn warm_up(&mut self, receiver: &Receiver, copies: u64) -> anyhow::Result<()> {
        // The warm-up is not measured: it must not flood a process that has just started
        // (500 messages of 256 KiB sent at once made Redis cut a fresh subscriber at its
        // 32 MiB output-buffer limit).
        let window = window(self.payload.len());
        let most = self.batch.min((window / copies.max(1)).max(1));
        let mut sent = 0;
        while sent < WARM_UP {
            let count = most.min(WARM_UP - sent);
            let allowed = (sent + count) * copies;
            if allowed > window {
                // On no progress, send on: the check below reports what came back.
                receiver
                    .wait(&receiver.progress.warm, allowed - window)
                    .await;
            }
            self.send(sent, count, KIND_WARM).await?;
            sent += count;
        }
        if !receiver
            .wait(&receiver.progress.warm, WARM_UP * copies)
            .await
        {
            bail!(
                "warm-up: {} of {} messages came back",
                receiver.progress.warm.load(Ordering::Acquire),
                WARM_UP * copies
            );
        }
        Ok(())
    }

    /// Sends `count` measured messages as fast as the pipeline goes, keeping at most
    /// `window` expected copies outstanding (sent × `copies` − received). Returns when the
    /// first was sent.
    pub async fn windowed(
        &mut self,
        count: u64,
        copies: u64,
        window: u64,
        receiver: &Receiver,
    ) -> anyhow::Result<Instant> {
        // A batch must fit in the window, or the first one would wait for itself.
        let most = self.batch.min((window / copies.max(1)).max(1));
        let started = Instant::now();
        let mut sent = 0;
        while sent < count {
            let batch = most.min(count - sent);
            let allowed = (sent + batch) * copies;
            if allowed > window
                && receiver.measured() < allowed - window
                && !receiver.wait_window(allowed - window).await
            {
                eprintln!(
                    "warning: nothing arrived for {IDLE:?} with {} copies outstanding; \
                     publishing on",
                    allowed - receiver.measured()
                );
            }
            let first = self.next_seq.fetch_add(batch, Ordering::AcqRel);
            self.send(first, batch, KIND_MEASURED).await?;
            sent += batch;
        }
        Ok(started)
    }

    /// Sends measured messages at `rate` per second (in 1 ms bursts) for `duration`, or
    /// until `stop`.
    pub async fn paced(
        &mut self,
        rate: f64,
        duration: Duration,
        stop: &CancellationToken,
    ) -> anyhow::Result<Paced> {
        let started = Instant::now();
        let mut sent = 0u64;
        loop {
            let elapsed = started.elapsed();
            if elapsed >= duration || stop.is_cancelled() {
                break;
            }
            let due = (rate * elapsed.as_secs_f64()) as u64 + 1;
            if due > sent {
                let count = (due - sent).min(self.batch.max(64));
                let first = self.next_seq.fetch_add(count, Ordering::AcqRel);
                self.send(first, count, KIND_MEASURED).await?;
                sent += count;
            } else {
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
        }
        let ended = Instant::now();
        Ok(Paced {
            sent,
            achieved: sent as f64 / ended.duration_since(started).as_secs_f64(),
        })
    }
}

/// One windowed run: how fast `count` messages went through, and what was lost.
pub struct Transfer {
    /// Input messages per second.
    pub input_rate: f64,
    /// Received (output) messages per second.
    pub output_rate: f64,
    /// Payload megabytes (10^6) per second received.
    pub output_mb: f64,
    /// Copies expected but not received.
    pub lost: u64,
    /// Copies received more often than expected.
    pub duplicated: u64,
    /// CPU time of the process under test per message handled (warm-up included), in µs;
    /// filled in by the caller, who knows the process.
    pub cpu_us: f64,
    /// Whether Redis closed the subscriber connection of the process under test during the
    /// run (past its output-buffer limit); filled in by the caller.
    pub cut: bool,
}

/// Sends `count` messages of `size` bytes on [`INPUT_CHANNEL`], with at most `window` copies
/// outstanding ([`UNTHROTTLED`]: no limit), and counts `copies` of each on `receive_pattern`.
pub async fn transfer(
    url: &str,
    receive_pattern: &str,
    count: u64,
    size: usize,
    copies: u64,
    window: u64,
) -> anyhow::Result<Transfer> {
    let receiver = Receiver::start(url, receive_pattern).await?;
    let mut publisher = Publisher::new(url, size).await?;
    publisher.warm_up(&receiver, copies).await?;
    let started = publisher.windowed(count, copies, window, &receiver).await?;
    receiver.wait_measured(count * copies).await;
    let seen = receiver.finish().await?;
    let elapsed = seen.last.map_or(Duration::ZERO, |last| last - started);
    let (lost, duplicated) =
        seen.lost_and_duplicated(count, u8::try_from(copies).unwrap_or(u8::MAX));
    let secs = elapsed.as_secs_f64().max(1e-9);
    Ok(Transfer {
        input_rate: count as f64 / secs,
        output_rate: seen.measured as f64 / secs,
        output_mb: seen.bytes as f64 / secs / 1e6,
        lost,
        duplicated,
        cpu_us: f64::NAN,
        cut: false,
    })
}

/// A publisher window that never holds the publisher back: it sends its pipelines one after
/// another, each as soon as Redis answered the previous one.
pub const UNTHROTTLED: u64 = u64::MAX;

/// The throttled publisher's window for a payload size: about 16 MiB of messages allowed in
/// flight (published, not yet received back), between 64 and 20,000.
pub fn window(size: usize) -> u64 {
    (16 * 1024 * 1024 / size.max(1)).clamp(64, 20_000) as u64
}
