//! How a reader talks to Redis: over a connection of its own, to one server or to a cluster,
//! one command at a time or several written at once as a pipeline, with a response timeout
//! that leaves room for its blocking reads.

use std::time::Duration;

use redis::Value;

use super::StreamBackend;

/// Extra time a blocking read may take on the wire beyond its `BLOCK` time.
const READ_MARGIN: Duration = Duration::from_secs(5);

/// A reader's own connection: a blocking `XREADGROUP` must not hold up anyone else's
/// commands, so readers share nothing.
pub(super) enum Connection {
    Single(redis::aio::MultiplexedConnection),
    Cluster(Box<redis::cluster_async::ClusterConnection>),
}

impl Connection {
    pub(super) async fn query(&mut self, cmd: &redis::Cmd) -> redis::RedisResult<Value> {
        match self {
            Connection::Single(c) => cmd.query_async(c).await,
            Connection::Cluster(c) => cmd.query_async(c.as_mut()).await,
        }
    }

    /// Sends `pipe` as one write; the replies of the commands not ignored, in order.
    pub(super) async fn query_pipe(
        &mut self,
        pipe: &redis::Pipeline,
    ) -> redis::RedisResult<Vec<Value>> {
        match self {
            Connection::Single(c) => pipe.query_async(c).await,
            Connection::Cluster(c) => pipe.query_async(c.as_mut()).await,
        }
    }
}

impl StreamBackend {
    pub(super) async fn connect(&self, block: Duration) -> redis::RedisResult<Connection> {
        let timeout = block + READ_MARGIN;
        match self {
            StreamBackend::Single(client) => {
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(5)))
                    .set_response_timeout(Some(timeout));
                Ok(Connection::Single(
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?,
                ))
            }
            StreamBackend::Cluster(client) => {
                let config = redis::cluster::ClusterConfig::new()
                    .set_connection_timeout(Duration::from_secs(5))
                    .set_response_timeout(timeout);
                Ok(Connection::Cluster(Box::new(
                    client.get_async_connection_with_config(config).await?,
                )))
            }
        }
    }
}
