//! Effects: what plugins cause outside themselves: publishing and invalidating on the host's
//! own Redis connection (never the subscriber connection), and calls to named [`outputs`].
//!
//! Host imports run on a plugin's worker thread, not on the async runtime; they wait for
//! Redis through [`Effects::block_on`], bounded by the remaining deadline of the call, so a
//! slow Redis shows up as `error::unavailable` in the plugin, not as a stuck worker.

pub mod host;
pub mod loop_guard;
pub mod outputs;
pub mod rate;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::PluginName;
use crate::source::embedded::EmbeddedBroker;
use outputs::{OutputError, Outputs, Reply};

/// Where plugins' effects go, and the runtime that carries them out.
#[derive(Clone, Debug)]
pub struct Effects {
    publisher: Publisher,
    outputs: Arc<Outputs>,
    /// The channel every invalidation is announced on, if any.
    broadcast: Option<Bytes>,
    runtime: tokio::runtime::Handle,
}

/// The connection plugins publish through.
#[derive(Clone)]
pub enum Publisher {
    /// A Redis connection that reconnects by itself; while Redis is away, calls fail fast.
    Redis(redis::aio::ConnectionManager),
    /// The in-process broker (`switchyard demo`, `switchyard test`).
    Embedded(Arc<EmbeddedBroker>),
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Publisher::Redis(_) => f.write_str("Publisher::Redis"),
            Publisher::Embedded(_) => f.write_str("Publisher::Embedded"),
        }
    }
}

/// Why an effect did not happen.
#[derive(Debug, thiserror::Error)]
pub enum EffectError {
    /// The backend could not be reached or answered with an error.
    #[error("{0}")]
    Unavailable(String),
    /// The call's deadline passed while waiting.
    #[error("no answer within the plugin's deadline ({0:?} left)")]
    Timeout(Duration),
    /// An output call failed.
    #[error(transparent)]
    Output(#[from] OutputError),
}

impl Effects {
    /// Effects carried out through `publisher` and `outputs`, awaited on `runtime`.
    /// Invalidations are announced on `broadcast` unless it is empty.
    pub fn new(
        publisher: Publisher,
        outputs: Arc<Outputs>,
        broadcast: &str,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        let broadcast =
            (!broadcast.is_empty()).then(|| Bytes::copy_from_slice(broadcast.as_bytes()));
        Self {
            publisher,
            outputs,
            broadcast,
            runtime,
        }
    }

    /// The outputs plugins may call.
    pub fn outputs(&self) -> &Arc<Outputs> {
        &self.outputs
    }

    /// Deletes `keys` (UNLINK) and announces it on the broadcast channel; returns how many
    /// keys existed.
    pub fn invalidate(
        &self,
        from: &PluginName,
        keys: &[String],
        within: Duration,
    ) -> Result<u32, EffectError> {
        let notice = self.broadcast.as_ref().map(|channel| {
            let notice = serde_json::json!({ "keys": keys, "source": from.as_str() });
            (channel.clone(), Bytes::from(notice.to_string()))
        });
        match &self.publisher {
            Publisher::Redis(connection) => {
                let mut connection = connection.clone();
                let mut pipe = redis::pipe();
                pipe.cmd("UNLINK").arg(keys);
                if let Some((channel, notice)) = &notice {
                    pipe.cmd("PUBLISH")
                        .arg(channel.as_ref())
                        .arg(notice.as_ref())
                        .ignore();
                }
                self.block_on(within, async move {
                    let (removed,): (u32,) = pipe
                        .query_async(&mut connection)
                        .await
                        .map_err(|e| EffectError::Unavailable(format!("UNLINK failed: {e}")))?;
                    Ok(removed)
                })
            }
            Publisher::Embedded(broker) => {
                let removed = broker.unlink(keys);
                if let Some((channel, notice)) = notice {
                    broker.publish_from(Some(from), channel, notice);
                }
                Ok(removed)
            }
        }
    }

    /// Calls the output `name` with `payload`.
    pub fn call_output(
        &self,
        from: &PluginName,
        name: &str,
        payload: &[u8],
        within: Duration,
    ) -> Result<Reply, EffectError> {
        let outputs = self.outputs.clone();
        self.block_on(within, async move {
            Ok(outputs.call(name, from.as_str(), payload, within).await?)
        })
    }

    /// Publishes and returns the number of receivers, as `PUBLISH` does.
    ///
    /// Must be called from a worker thread, never from inside the async runtime.
    pub fn publish(
        &self,
        from: &PluginName,
        channel: &[u8],
        payload: &[u8],
        within: Duration,
    ) -> Result<u32, EffectError> {
        match &self.publisher {
            Publisher::Redis(connection) => {
                let mut connection = connection.clone();
                let command = redis::cmd("PUBLISH").arg(channel).arg(payload).to_owned();
                self.block_on(within, async move {
                    command
                        .query_async::<u32>(&mut connection)
                        .await
                        .map_err(|e| EffectError::Unavailable(format!("PUBLISH failed: {e}")))
                })
            }
            Publisher::Embedded(broker) => Ok(broker.publish_from(
                Some(from),
                Bytes::copy_from_slice(channel),
                Bytes::copy_from_slice(payload),
            )),
        }
    }

    /// Runs `future` to completion from a worker thread, giving up after `within`.
    fn block_on<T>(
        &self,
        within: Duration,
        future: impl Future<Output = Result<T, EffectError>>,
    ) -> Result<T, EffectError> {
        self.runtime
            .block_on(async { tokio::time::timeout(within, future).await })
            .unwrap_or(Err(EffectError::Timeout(within)))
    }
}
