//! A TCP proxy in front of a test Redis that can stop forwarding, to stand in for a network
//! that goes silent without closing connections.
//!
//! [`Proxy`] listens on a free loopback port and forwards every connection it accepts to the
//! target port (a [`RedisServer`]'s, which survives the server's kill and restart). Point the
//! host at [`Proxy::url`] instead of the server's, then:
//!
//! - [`Proxy::blackhole`] stops forwarding in both directions while every socket stays open:
//!   what either side writes is held, as a network that drops packets holds them in TCP
//!   retransmissions. Connections accepted meanwhile are held the same way.
//! - [`Proxy::restore`] forwards again, held bytes first, in order.
//! - [`Proxy::sever`] closes every connection proxied so far (both sides see it close); new
//!   connections are accepted as before.
//!
//! A connection whose other side closes is closed too. Everything stops when the [`Proxy`]
//! is dropped.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::RedisServer;

/// Bytes read from one side before they are written to the other.
const CHUNK: usize = 16 * 1024;

/// Whether the proxy forwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flow {
    Forwarding,
    Blackholed,
}

/// A TCP proxy task on a free loopback port; see the module documentation.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    flow: watch::Sender<Flow>,
    /// Cancelled on drop: stops the listener and every connection.
    stopped: CancellationToken,
    /// The connections accepted since the last [`Proxy::sever`] end when this is cancelled.
    generation: Arc<Mutex<CancellationToken>>,
}

impl Proxy {
    /// A proxy forwarding to `server`'s port.
    pub async fn start(server: &RedisServer) -> anyhow::Result<Self> {
        Self::to_port(server.port()).await
    }

    /// A proxy forwarding to `127.0.0.1:port`.
    pub async fn to_port(port: u16) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .context("binding 127.0.0.1:0 for a test proxy")?;
        let addr = listener
            .local_addr()
            .context("reading the test proxy's address")?;
        let (flow, _) = watch::channel(Flow::Forwarding);
        let stopped = CancellationToken::new();
        let generation = Arc::new(Mutex::new(stopped.child_token()));
        tokio::spawn(accept(
            listener,
            ("127.0.0.1", port),
            flow.clone(),
            stopped.clone(),
            generation.clone(),
        ));
        Ok(Self {
            addr,
            flow,
            stopped,
            generation,
        })
    }

    /// The proxy's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `redis://127.0.0.1:PORT` of the proxy.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Stops forwarding in both directions, keeping every socket open.
    pub fn blackhole(&self) {
        self.flow.send_replace(Flow::Blackholed);
    }

    /// Forwards again, starting with what was held.
    pub fn restore(&self) {
        self.flow.send_replace(Flow::Forwarding);
    }

    /// Closes every connection proxied so far.
    pub fn sever(&self) {
        let mut generation = self.generation.lock().unwrap_or_else(|e| e.into_inner());
        generation.cancel();
        *generation = self.stopped.child_token();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stopped.cancel();
    }
}

/// Accepts connections until the proxy stops, each with its own forwarding task.
async fn accept(
    listener: TcpListener,
    target: (&'static str, u16),
    flow: watch::Sender<Flow>,
    stopped: CancellationToken,
    generation: Arc<Mutex<CancellationToken>>,
) {
    loop {
        let client = tokio::select! {
            () = stopped.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => client,
                Err(error) => {
                    tracing::warn!("test proxy: accept failed: {error}");
                    continue;
                }
            },
        };
        let severed = generation.lock().unwrap_or_else(|e| e.into_inner()).clone();
        tokio::spawn(forward(client, target, flow.subscribe(), severed));
    }
}

/// Connects to the target and forwards both ways until either side closes or the connection
/// is severed. A target that does not answer (Redis killed) closes the client at once, as a
/// refused connection would.
async fn forward(
    client: TcpStream,
    target: (&'static str, u16),
    flow: watch::Receiver<Flow>,
    severed: CancellationToken,
) {
    let server = tokio::select! {
        () = severed.cancelled() => return,
        server = TcpStream::connect(target) => match server {
            Ok(server) => server,
            Err(_) => return,
        },
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::select! {
        () = severed.cancelled() => {}
        () = pump(client_read, server_write, flow.clone()) => {}
        () = pump(server_read, client_write, flow) => {}
    }
}

/// Copies `from` to `to`, holding what it read (and an end of stream) while the flow is
/// black-holed.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut flow: watch::Receiver<Flow>) {
    let mut buffer = vec![0; CHUNK];
    loop {
        if forwarding(&mut flow).await.is_err() {
            return;
        }
        let read = from.read(&mut buffer).await;
        // Bytes read just as the network went silent are held, not forwarded.
        if forwarding(&mut flow).await.is_err() {
            return;
        }
        match read {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.write_all(&buffer[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Waits until the proxy forwards; errors if the proxy is gone.
async fn forwarding(flow: &mut watch::Receiver<Flow>) -> Result<(), watch::error::RecvError> {
    flow.wait_for(|flow| *flow == Flow::Forwarding)
        .await
        .map(drop)
}
