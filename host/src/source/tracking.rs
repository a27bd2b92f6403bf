//! Tracked keys on a single Redis server: the server is the one node of a
//! [`NodeSubscriptions`], which holds its tracking connection (see [`super::nodes`]). A task
//! applies the plugins' prefixes as they change and, each second, opens the connection
//! again if it was lost (the loss itself was a flush).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis::ConnectionAddr;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::nodes::NodeSubscriptions;
use crate::router::Router;

/// How often a lost tracking connection is opened again.
const RECONNECT_INTERVAL: Duration = Duration::from_secs(1);

/// Handle to the tracking task of a single server.
#[derive(Clone)]
pub struct Tracking {
    updates: mpsc::Sender<(BTreeSet<Bytes>, oneshot::Sender<()>)>,
}

impl Tracking {
    /// Starts the task for the server of `client`, handing invalidations to `router`, until
    /// `shutdown`.
    pub fn start(
        client: &redis::Client,
        router: Arc<Router>,
        shutdown: CancellationToken,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let address = match client.get_connection_info().addr() {
            ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
                Some(format!("{host}:{port}"))
            }
            _ => None,
        };
        let mut nodes = NodeSubscriptions::new(client, router, false);
        let (updates, mut incoming) = mpsc::channel::<(BTreeSet<Bytes>, oneshot::Sender<()>)>(4);
        let task = tokio::spawn(async move {
            let server: BTreeSet<String> = address.iter().cloned().collect();
            let mut tick = tokio::time::interval(RECONNECT_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failing = false;
            loop {
                let done = tokio::select! {
                    () = shutdown.cancelled() => return,
                    update = incoming.recv() => {
                        let Some((prefixes, done)) = update else { return };
                        if address.is_none() && !prefixes.is_empty() {
                            tracing::error!(
                                "key tracking needs a TCP connection to Redis; a Unix socket \
                                 redis.url tracks nothing"
                            );
                        }
                        nodes.set_tracking(&prefixes).await;
                        Some(done)
                    }
                    _ = tick.tick() => None,
                };
                match nodes.follow(&server).await {
                    Ok(()) if failing => {
                        failing = false;
                        tracing::info!("key tracking is on again");
                    }
                    Ok(()) => {}
                    Err(e) if !failing => {
                        failing = true;
                        tracing::error!("{e}; retrying every {RECONNECT_INTERVAL:?}");
                    }
                    Err(_) => {}
                }
                if let Some(done) = done {
                    let _ = done.send(());
                }
            }
        });
        (Self { updates }, task)
    }

    /// Tracks `prefixes` from now on; returns once the server was asked to (or the task has
    /// stopped).
    pub async fn update(&self, prefixes: BTreeSet<Bytes>) {
        let (done, applied) = oneshot::channel();
        if self.updates.send((prefixes, done)).await.is_ok() {
            let _ = applied.await;
        }
    }
}
