//! Effects: what plugins cause outside themselves. Publishing goes out on the host's own
//! connection, never on the subscriber connection.
//!
//! Host imports run on a plugin's worker thread, not on the async runtime; they wait for
//! Redis through [`Effects::block_on`], bounded by the remaining deadline of the call, so a
//! slow Redis shows up as `error::unavailable` in the plugin, not as a stuck worker.

pub mod host;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::PluginName;
use crate::source::embedded::EmbeddedBroker;

/// Where plugins' effects go, and the runtime that carries them out.
#[derive(Clone, Debug)]
pub struct Effects {
    publisher: Publisher,
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
}

impl Effects {
    /// Effects carried out through `publisher`, awaited on `runtime`.
    pub fn new(publisher: Publisher, runtime: tokio::runtime::Handle) -> Self {
        Self { publisher, runtime }
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
