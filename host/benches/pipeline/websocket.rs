//! Section 10's moving parts: [`CLIENTS`] WebSocket clients in the bench process, a paced
//! publisher that writes each message's send time into its payload, and the baseline, a bare
//! WebSocket fan-out relay (`pipeline --fanout-relay URL --fanout-listen ADDR`).
//!
//! The relay is written the plain way with the crates the gateway is built on (tokio,
//! tokio-tungstenite, the `redis` crate), and runs as its own process, as the gateway does
//! inside `switchyard run`: one connection SUBSCRIBEs [`CHANNEL`]; every payload goes as it is
//! into a `tokio::sync::broadcast` ring of [`RING`] messages (the gateway's default
//! `client_buffer`, and the same primitive its hub uses); each accepted socket (with
//! TCP_NODELAY, as the gateway's) is served by a task that reads the ring and sends every
//! message as one text frame. No token, no JSON, no
//! HTTP router: what is left of the gateway's cost when those are taken away. Its variant
//! with `--fanout-read-buffer 4096` differs in one setting, tungstenite's `read_buffer_size`
//! (see [`SMALL_READ_BUFFER`]).
//!
//! Payloads are ASCII, [`PAYLOAD`] bytes: `m SEQ SENT_NANOS ` (`w` for warm-up), padded with
//! dots. A client takes the payload out of the gateway's JSON frame (`"payload":"…"`) or uses
//! the relay's frame as it is, and records, per sequence number, its receive time minus the
//! send time.

use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::{SinkExt as _, StreamExt as _};
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;

use crate::harness::{self, wall_nanos};

/// The channel every client watches.
pub const CHANNEL: &str = "fanout";
/// WebSocket clients per run.
pub const CLIENTS: usize = 1_000;
/// Bytes of every payload.
pub const PAYLOAD: usize = 64;
/// Messages the relay's ring holds (the gateway's default `client_buffer`).
pub const RING: usize = 256;
/// The static token the gateway is given, and the clients use.
const TOKEN: &str = "bench-fanout-token-0123456789";
/// Warm-up traffic before the measured messages (at least; until every client saw some).
const WARM_UP: Duration = Duration::from_millis(500);
/// How long the clients may take to see their first warm-up message.
const WARM_UP_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes each client reads at most per call, and the relay's sockets in its `small reads`
/// variant. tungstenite zeroes the free part of its read buffer before every read, also the
/// ones that find nothing; with its default (`read_buffer_size`, 128 KiB) that memset is most
/// of the work per frame. The gateway and the plain relay keep the default.
pub const SMALL_READ_BUFFER: usize = 4096;
/// Handshakes in progress at once while the clients connect.
const CONNECTING: usize = 64;
/// How often the bench looks at the clients' counters after the last publish.
const POLL: Duration = Duration::from_millis(2);
/// How long a run may see no new copy arrive before it is declared over.
const IDLE: Duration = Duration::from_secs(3);
/// Open files this process needs beyond the clients' sockets (Redis, pipes, the binary).
const SPARE_FILES: u64 = 512;

/// The `[gateway]` table of the host under test: listening on `listen`, one static token
/// that may read [`CHANNEL`], everything else default.
pub fn gateway_config(listen: &str) -> String {
    format!(
        "[gateway]\nlisten = {listen:?}\n\n[gateway.tokens.bench]\ntoken = {TOKEN:?}\n\
         read = [{CHANNEL:?}]\n"
    )
}

/// The URL a client of the gateway on `addr` connects to.
pub fn gateway_url(addr: &str) -> String {
    format!("ws://{addr}/ws?channel={CHANNEL}&token={TOKEN}")
}

/// The URL a client of the relay on `addr` connects to.
pub fn relay_url(addr: &str) -> String {
    format!("ws://{addr}/")
}

/// Makes sure this process (and the servers it starts, which inherit the limit) may open
/// [`CLIENTS`] sockets and more: raises the soft open-file limit towards the hard one with
/// `prlimit` if needed. Returns the soft limit in force.
pub fn ensure_fd_limit() -> anyhow::Result<u64> {
    let needed = CLIENTS as u64 + SPARE_FILES;
    let (soft, hard) = open_files()?;
    if soft >= needed {
        return Ok(soft);
    }
    if hard < needed {
        bail!(
            "the open-file limit is {soft} (hard {hard}), below the {needed} that {CLIENTS} \
             clients need; raise it (ulimit -n {needed}, as root if the hard limit is too low) \
             and run again"
        );
    }
    let target = hard.min(needed.max(4096));
    let raised = std::process::Command::new("prlimit")
        .arg(format!("--pid={}", std::process::id()))
        .arg(format!("--nofile={target}:{}", limit_text(hard)))
        .status();
    let (now, _) = open_files()?;
    if now < needed {
        bail!(
            "the open-file limit is {soft}, below the {needed} that {CLIENTS} clients need, and \
             `prlimit --nofile={target}` did not raise it ({raised:?}); run `ulimit -n {needed}` \
             first"
        );
    }
    Ok(now)
}

/// Soft and hard `Max open files` of this process (`u64::MAX`: unlimited).
fn open_files() -> anyhow::Result<(u64, u64)> {
    let limits = std::fs::read_to_string("/proc/self/limits")?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("no Max open files in /proc/self/limits")?;
    let mut values = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .map(|v| {
            if v == "unlimited" {
                Ok(u64::MAX)
            } else {
                v.parse::<u64>()
            }
        });
    let mut next = || -> anyhow::Result<u64> {
        values
            .next()
            .context("short Max open files line")?
            .context("bad Max open files value")
    };
    Ok((next()?, next()?))
}

fn limit_text(value: u64) -> String {
    if value == u64::MAX {
        "unlimited".to_owned()
    } else {
        value.to_string()
    }
}

/// Exits the process when the bench closes our standard input (even when it is killed).
fn exit_with_stdin() {
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
}

/// Runs the bare fan-out relay on `listen` until the bench closes our standard input; its
/// sockets read at most `read_buffer` bytes per call if given (else tungstenite's default).
pub fn relay_main(url: &str, listen: &str, read_buffer: Option<usize>) -> anyhow::Result<()> {
    exit_with_stdin();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let (ring, _) = broadcast::channel::<Utf8Bytes>(RING);
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let client = redis::Client::open(url)?;
        let mut subscriber = client.get_async_pubsub().await?;
        subscriber.subscribe(CHANNEL).await?;
        let accepting = ring.clone();
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        // As the gateway does: a small frame goes out at once instead of
                        // waiting for the ACK of the one before.
                        if let Err(e) = stream.set_nodelay(true) {
                            eprintln!("fan-out relay: cannot set TCP_NODELAY: {e}");
                        }
                        tokio::spawn(serve(stream, accepting.subscribe(), read_buffer));
                    }
                    Err(e) => eprintln!("fan-out relay: accept failed: {e}"),
                }
            }
        });
        // On a worker thread, as the gateway's dispatch is: woken from `block_on`'s thread,
        // the 1,000 socket tasks would all go through the runtime's global queue.
        let forwarding = tokio::spawn(async move {
            let mut messages = subscriber.into_on_message();
            while let Some(message) = messages.next().await {
                let payload = bytes::Bytes::from(message.get_payload_bytes().to_vec());
                match Utf8Bytes::try_from(payload) {
                    // No receiver yet is not an error.
                    Ok(text) => drop(ring.send(text)),
                    Err(e) => eprintln!("fan-out relay: payload is not UTF-8: {e}"),
                }
            }
        });
        println!("ready");
        std::io::stdout().flush()?;
        forwarding.await?;
        anyhow::Ok(())
    })
}

/// One relay client: the handshake, then every message of the ring as a text frame.
async fn serve(
    stream: tokio::net::TcpStream,
    mut ring: broadcast::Receiver<Utf8Bytes>,
    read_buffer: Option<usize>,
) {
    let config = read_buffer.map(|size| WebSocketConfig::default().read_buffer_size(size));
    let Ok(socket) = tokio_tungstenite::accept_async_with_config(stream, config).await else {
        return;
    };
    let (mut sink, mut incoming) = socket.split();
    loop {
        tokio::select! {
            message = ring.recv() => match message {
                Ok(text) => {
                    if sink.send(Message::Text(text)).await.is_err() {
                        break;
                    }
                }
                // The client misses them, and the bench counts them as lost.
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => break,
            },
            frame = incoming.next() => match frame {
                Some(Ok(Message::Close(_)) | Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
        }
    }
}

/// Counters the clients move and the publisher polls (a wake-up per copy would cost the bench
/// process more than the counting).
#[derive(Default)]
struct Progress {
    /// Clients that have seen a warm-up message.
    ready: AtomicUsize,
    /// Measured copies received, all clients together.
    received: AtomicU64,
    /// Frames that were neither warm-up nor measured messages (the gateway's `dropped`
    /// notices, for instance).
    other: AtomicU64,
}

/// What one client saw: per sequence number, receive time minus send time in nanoseconds
/// (`u64::MAX`: never arrived), and copies received more than once.
struct Seen {
    latency_ns: Vec<u64>,
    duplicated: u64,
}

/// Connects [`CLIENTS`] clients to `url` (at most [`CONNECTING`] handshakes at once) and
/// starts each one's reading task.
async fn connect_clients(
    url: &str,
    messages: usize,
    progress: &Arc<Progress>,
    stop: &CancellationToken,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<Seen>>> {
    let config = WebSocketConfig::default().read_buffer_size(SMALL_READ_BUFFER);
    let sockets: Vec<_> = futures::stream::iter(0..CLIENTS)
        .map(|_| tokio_tungstenite::connect_async_with_config(url, Some(config), false))
        .buffer_unordered(CONNECTING)
        .collect()
        .await;
    let mut tasks = Vec::with_capacity(CLIENTS);
    for (i, socket) in sockets.into_iter().enumerate() {
        let (socket, _) = socket.with_context(|| format!("client {i} cannot connect to {url}"))?;
        tasks.push(tokio::spawn(client(
            socket,
            messages,
            progress.clone(),
            stop.clone(),
        )));
    }
    Ok(tasks)
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One client: reads frames until `stop`, recording the latency of each measured message.
async fn client(
    mut socket: Socket,
    messages: usize,
    progress: Arc<Progress>,
    stop: CancellationToken,
) -> Seen {
    let mut seen = Seen {
        latency_ns: vec![u64::MAX; messages],
        duplicated: 0,
    };
    let mut ready = false;
    loop {
        let frame = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            frame = socket.next() => frame,
        };
        let text = match frame {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(_)) | Err(_)) | None => break,
            Some(Ok(_)) => continue,
        };
        let now = wall_nanos();
        match parse(text.as_str()) {
            Some((b'w', _, _)) => {
                if !ready {
                    ready = true;
                    progress.ready.fetch_add(1, Ordering::AcqRel);
                }
            }
            Some((b'm', seq, sent)) if seq < messages => {
                let slot = &mut seen.latency_ns[seq];
                if *slot == u64::MAX {
                    *slot = now.saturating_sub(sent);
                    progress.received.fetch_add(1, Ordering::AcqRel);
                } else {
                    seen.duplicated += 1;
                }
            }
            _ => {
                progress.other.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    // Closing politely would only add work to the server being measured next.
    drop(socket);
    seen
}

/// Kind, sequence number and send time of a frame: the gateway's JSON object, or the bare
/// payload.
fn parse(frame: &str) -> Option<(u8, usize, u64)> {
    let payload = if frame.starts_with('{') {
        if !frame.contains(r#""type":"message""#) {
            return None;
        }
        let rest = frame.split_once(r#""payload":""#)?.1;
        &rest[..rest.find('"')?]
    } else {
        frame
    };
    let mut fields = payload.split(' ');
    let kind = match fields.next()? {
        "m" => b'm',
        "w" => b'w',
        _ => return None,
    };
    let seq = fields.next()?.parse().ok()?;
    let sent = fields.next()?.parse().ok()?;
    Some((kind, seq, sent))
}

/// A payload of [`PAYLOAD`] bytes.
fn payload(kind: char, seq: usize, sent: u64) -> String {
    let mut text = format!("{kind} {seq} {sent} ");
    while text.len() < PAYLOAD {
        text.push('.');
    }
    text
}

/// One message's fan-out: from its publish to its arrival at the first client, the median
/// client and the last one, in microseconds.
#[derive(Clone, Copy)]
pub struct Spread {
    pub first_us: f64,
    pub median_us: f64,
    pub last_us: f64,
}

/// What one run measured.
pub struct Run {
    /// Messages every client received, in publish order.
    pub complete: Vec<Spread>,
    /// Messages published.
    pub sent: usize,
    /// Offered rate achieved by the publisher, messages per second.
    pub achieved: f64,
    /// Messages at least one client never received.
    pub lost: usize,
    /// (client, message) copies never received.
    pub missing: u64,
    /// Copies received twice.
    pub duplicated: u64,
    /// Frames that were not our messages (the gateway's `dropped` notices).
    pub other: u64,
    /// CPU time per copy delivered, in µs: the server, the bench process (the clients and
    /// the publisher), redis-server.
    pub server_us: f64,
    pub clients_us: f64,
    pub redis_us: f64,
}

/// The pids whose CPU time a run reports.
#[derive(Clone, Copy)]
pub struct Pids {
    pub server: u32,
    pub redis: u32,
}

/// CPU time of the server, this process and redis-server so far.
fn cpu(pids: &Pids) -> anyhow::Result<[Duration; 3]> {
    Ok([
        harness::cpu_time(pids.server)?,
        harness::cpu_time(std::process::id())?,
        harness::cpu_time(pids.redis)?,
    ])
}

/// One run against the server at `url` (already started): connect the clients, warm up,
/// publish `messages` on [`CHANNEL`] at `rate` per second through `redis_url`, and wait for
/// every copy.
pub async fn run(
    redis_url: &str,
    url: &str,
    rate: f64,
    messages: usize,
    pids: &Pids,
) -> anyhow::Result<Run> {
    let progress = Arc::new(Progress::default());
    let stop = CancellationToken::new();
    // Whatever happens, the clients' tasks end with the run.
    let _stop_clients = stop.clone().drop_guard();
    let clients = connect_clients(url, messages, &progress, &stop).await?;
    // The publisher has a thread and a runtime of its own, so that its pace and its Redis
    // connection do not wait behind the 1,000 client tasks on the bench's runtime.
    let measured = {
        let (redis_url, progress, pids, count) =
            (redis_url.to_owned(), progress.clone(), *pids, clients.len());
        tokio::task::spawn_blocking(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(publish_and_wait(
                    &redis_url, rate, messages, &progress, &pids, count,
                ))
        })
        .await?
    };
    stop.cancel();
    let mut seen = Vec::new();
    for task in clients {
        seen.push(task.await?);
    }
    let (sent, achieved, cpu) = measured?;
    let mut complete = Vec::with_capacity(sent);
    let mut lost = 0;
    let mut missing = 0;
    let mut latencies = Vec::with_capacity(seen.len());
    for seq in 0..sent {
        latencies.clear();
        latencies.extend(
            seen.iter()
                .map(|s| s.latency_ns[seq])
                .filter(|&l| l != u64::MAX),
        );
        let absent = (seen.len() - latencies.len()) as u64;
        if absent > 0 || latencies.is_empty() {
            lost += 1;
            missing += absent;
            continue;
        }
        latencies.sort_unstable();
        let us = |ns: u64| ns as f64 / 1e3;
        complete.push(Spread {
            first_us: us(latencies[0]),
            median_us: us(latencies[(latencies.len() - 1) / 2]),
            last_us: us(latencies[latencies.len() - 1]),
        });
    }
    let copies = (sent as u64 * CLIENTS as u64)
        .saturating_sub(missing)
        .max(1);
    let per_copy = |d: Duration| d.as_secs_f64() * 1e6 / copies as f64;
    Ok(Run {
        complete,
        sent,
        achieved,
        lost,
        missing,
        duplicated: seen.iter().map(|s| s.duplicated).sum(),
        other: progress.other.load(Ordering::Acquire),
        server_us: per_copy(cpu[0]),
        clients_us: per_copy(cpu[1]),
        redis_us: per_copy(cpu[2]),
    })
}

/// Warms up until every client saw a message, then publishes the measured messages at
/// `rate` and waits until every copy arrived (or none for [`IDLE`]). Returns the messages
/// sent, the achieved rate and the CPU time each process spent meanwhile.
async fn publish_and_wait(
    redis_url: &str,
    rate: f64,
    messages: usize,
    progress: &Progress,
    pids: &Pids,
    clients: usize,
) -> anyhow::Result<(usize, f64, [Duration; 3])> {
    let client = redis::Client::open(redis_url)?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let started = Instant::now();
    let mut n = 0u32;
    while started.elapsed() < WARM_UP || progress.ready.load(Ordering::Acquire) < clients {
        if started.elapsed() > WARM_UP_TIMEOUT {
            bail!(
                "warm-up: {} of {clients} clients received a message within {WARM_UP_TIMEOUT:?}",
                progress.ready.load(Ordering::Acquire)
            );
        }
        tokio::time::sleep_until((started + interval * n).into()).await;
        publish(&mut connection, &payload('w', n as usize, wall_nanos())).await?;
        n += 1;
    }
    let before = cpu(pids)?;
    let started = Instant::now();
    for seq in 0..messages {
        tokio::time::sleep_until((started + interval * seq as u32).into()).await;
        publish(&mut connection, &payload('m', seq, wall_nanos())).await?;
    }
    let achieved = messages as f64 / started.elapsed().as_secs_f64();
    let target = (messages * clients) as u64;
    let mut count = progress.received.load(Ordering::Acquire);
    let mut moved = Instant::now();
    loop {
        let now = progress.received.load(Ordering::Acquire);
        if now >= target {
            break;
        }
        if now != count {
            count = now;
            moved = Instant::now();
        }
        if moved.elapsed() > IDLE {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    let after = cpu(pids)?;
    let spent = [0, 1, 2].map(|i| after[i].saturating_sub(before[i]));
    Ok((messages, achieved, spent))
}

async fn publish(
    connection: &mut redis::aio::MultiplexedConnection,
    payload: &str,
) -> anyhow::Result<()> {
    redis::cmd("PUBLISH")
        .arg(CHANNEL)
        .arg(payload)
        .query_async::<i64>(connection)
        .await
        .context("PUBLISH failed")?;
    Ok(())
}
