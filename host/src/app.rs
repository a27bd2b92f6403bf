//! Wires the stages together and runs them until told to stop.
//!
//! [`Host::start`] resolves everything that can be wrong with the configuration first (the
//! plugins folder, the Redis URL, the admin address), then starts the source, loads the
//! folder once, and starts the watcher and the admin endpoint. [`Host::stop`] stops watching,
//! unloads plugins (their queues drain), then closes the connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState};
use crate::config::{Config, RedisConfig};
use crate::effects::outputs::Outputs;
use crate::effects::{Effects, Publisher, ShardedChannels};
use crate::gateway::{self, GatewaySource};
use crate::plugins::compile_cache::CompileCache;
use crate::plugins::loader::{Limits, Loader};
use crate::plugins::{Registry, WorkerSettings, watcher};
use crate::router::Router;
use crate::source::cluster::ClusterSource;
use crate::source::embedded::EmbeddedBroker;
use crate::source::redis::{COMMAND_TIMEOUT, RedisSource};
use crate::source::streams::{StreamBackend, StreamReaders};
use crate::source::{Source, SourceStatus};
use crate::worker::engine::Runtime;

/// Which broker the host talks to.
pub enum Broker {
    /// A Redis server.
    Redis(RedisConfig),
    /// The in-process broker.
    Embedded(Arc<EmbeddedBroker>),
}

/// How often start-up looks again at files that were still being written; after that the
/// watcher takes over.
const MAX_STARTUP_RESCANS: usize = 20;

/// A running host.
pub struct Host {
    registry: Arc<Registry>,
    effects: Effects,
    router: Arc<Router>,
    source: Source,
    admin_addr: Option<SocketAddr>,
    gateway_addr: Option<SocketAddr>,
    stop_watching: CancellationToken,
    stop_source: CancellationToken,
    stop_admin: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

/// Whether the host is ready to route, and why not.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Readiness {
    /// Subscribed and every plugin in the folder loaded or rejected.
    pub ready: bool,
    /// The subscriber connection's state.
    pub source: SourceStatus,
    /// Whether the plugins folder has been scanned and loaded once.
    pub plugins_scanned: bool,
}

impl Host {
    /// Starts a host with `config` on `broker`, on the current (multi-threaded) tokio
    /// runtime. The admin endpoint listens on
    /// `config.admin.listen` unless `admin` is false. Outputs come from the configuration
    /// unless `outputs` supplies them (the demo captures them instead).
    pub async fn start(
        config: &Config,
        broker: Broker,
        admin: bool,
        outputs: Option<Arc<Outputs>>,
    ) -> anyhow::Result<Self> {
        // Workers wait for effects with `Handle::block_on`, which only makes progress on a
        // current-thread runtime while some other code happens to be driving it.
        if tokio::runtime::Handle::current().runtime_flavor()
            == tokio::runtime::RuntimeFlavor::CurrentThread
        {
            anyhow::bail!("the host needs a multi-threaded tokio runtime");
        }
        let dir = &config.plugins.dir;
        if !dir.is_dir() {
            anyhow::bail!(
                "plugins.dir {} is not a folder (create it, or pass --plugins DIR)",
                dir.display()
            );
        }
        let admin_listener = if admin {
            let addr = config.admin.listen;
            Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on admin.listen {addr}"))?,
            )
        } else {
            None
        };

        let gateway_listener = match config.gateway.listen {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on gateway.listen {addr}"))?,
            ),
            None => None,
        };

        let runtime = Runtime::new().context("cannot start the Wasm engine")?;
        let router = Arc::new(Router::new(
            &instance_id(),
            config.plugins.max_payload_bytes,
        ));
        let stop_source = CancellationToken::new();
        let mut tasks = Vec::new();
        let gateway_source = match &broker {
            Broker::Redis(redis) => GatewaySource::Redis(Box::new(redis.client()?)),
            Broker::Embedded(broker) => GatewaySource::Embedded(broker.clone()),
        };
        let (source, publisher) = match broker {
            Broker::Redis(redis) if redis.cluster_seeds().is_some() => {
                let seeds = redis.cluster_seeds().unwrap_or_default();
                let client = redis.cluster_client(
                    &seeds,
                    None::<tokio::sync::mpsc::UnboundedSender<redis::PushInfo>>,
                )?;
                let (source, task) =
                    ClusterSource::start(&redis, &seeds, router.clone(), stop_source.clone())?;
                tasks.push(task);
                // Connects when first used: the host starts (not ready) while the cluster is
                // away.
                let publisher = client
                    .get_async_connection()
                    .await
                    .context("cannot connect to the Redis Cluster")?;
                let streams = StreamReaders::new(
                    StreamBackend::Cluster(Arc::new(client)),
                    stop_source.clone(),
                );
                (
                    Source::Cluster(source, Arc::new(streams)),
                    Publisher::Cluster(publisher),
                )
            }
            Broker::Redis(redis) => {
                let client = redis.client()?;
                let manager_config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(COMMAND_TIMEOUT))
                    .set_response_timeout(Some(COMMAND_TIMEOUT))
                    .set_number_of_retries(1);
                // Lazy: the host starts (and reports not ready) while Redis is away.
                let publisher =
                    ConnectionManager::new_lazy_with_config(client.clone(), manager_config)
                        .context("cannot create the publishing connection")?;
                let (source, task) = RedisSource::start(
                    &client,
                    publisher.clone(),
                    router.clone(),
                    stop_source.clone(),
                )?;
                tasks.push(task);
                let streams = StreamReaders::new(
                    StreamBackend::Single(Arc::new(client)),
                    stop_source.clone(),
                );
                (
                    Source::Redis(source, Arc::new(streams)),
                    Publisher::Redis(publisher),
                )
            }
            Broker::Embedded(broker) => {
                broker.attach(router.clone());
                (
                    Source::Embedded(broker.clone()),
                    Publisher::Embedded(broker),
                )
            }
        };

        let outputs = match outputs {
            Some(outputs) => outputs,
            None => Arc::new(Outputs::from_config(&config.outputs)?),
        };
        let effects = Effects::new(
            publisher,
            outputs.clone(),
            &config.invalidation.broadcast,
            tokio::runtime::Handle::current(),
        )
        .with_sharded(ShardedChannels::new(&config.redis.sharded_channels));
        let limits = Limits {
            deadline: config.deadline(),
            memory: usize::try_from(config.plugins.memory_mib << 20).unwrap_or(usize::MAX),
        };
        let compile_cache = match &config.plugins.compile_cache {
            Some(dir) => Some(CompileCache::open(dir, runtime.engine()).with_context(|| {
                format!("plugins.compile_cache: cannot create {}", dir.display())
            })?),
            None => None,
        };
        let mut loader = Loader::new(
            runtime,
            effects.clone(),
            limits,
            config.plugins.policy,
            config.grants.clone(),
        )
        .with_max_size(config.plugins.max_wasm_mib << 20)
        .with_streams(config.streams.clone());
        if let Some(cache) = compile_cache {
            loader = loader.with_compile_cache(cache);
        }
        let registry = Arc::new(Registry::new(
            dir.clone(),
            loader,
            source.clone(),
            WorkerSettings {
                queue_capacity: config.plugins.queue_capacity,
                when_full: config.plugins.when_full,
                breaker: config.breaker(),
            },
        ));

        let stop_admin = CancellationToken::new();
        let gateway = match gateway_listener {
            Some(listener) => {
                let gateway = gateway::start(
                    &config.gateway,
                    listener,
                    gateway_source,
                    registry.clone(),
                    stop_admin.clone(),
                )?;
                let addr = gateway.addr;
                let stats = gateway.stats.clone();
                tasks.push(gateway.task);
                Some((addr, stats))
            }
            None => None,
        };
        let admin_addr = match admin_listener {
            Some(listener) => {
                let addr = listener.local_addr()?;
                let state = Arc::new(AdminState {
                    metrics: admin::metrics::registry(
                        registry.clone(),
                        source.clone(),
                        router.clone(),
                        outputs.clone(),
                        gateway.as_ref().map(|(_, stats)| stats.clone()),
                    ),
                    registry: registry.clone(),
                    source: source.clone(),
                    router: router.clone(),
                    outputs: outputs.clone(),
                });
                tasks.push(admin::serve(listener, state, stop_admin.clone()));
                tracing::info!(%addr, "admin endpoint listening");
                Some(addr)
            }
            None => None,
        };

        let mut changes = registry.reconcile().await?;
        // A file still being written when the host started was skipped; the watcher, not yet
        // running, saw none of its writes. Look again until the folder has settled.
        for _ in 0..MAX_STARTUP_RESCANS {
            if changes.unsettled.is_empty() {
                break;
            }
            tokio::time::sleep(config.settle()).await;
            let again = registry.reconcile().await?;
            changes.added.extend(again.added);
            changes.rejected.extend(again.rejected);
            changes.unsettled = again.unsettled;
        }
        tracing::info!(
            loaded = changes.added.len(),
            rejected = changes.rejected.len(),
            folder = %dir.display(),
            "plugins folder loaded"
        );
        let stop_watching = CancellationToken::new();
        tasks.push(watcher::spawn(
            registry.clone(),
            config.settle(),
            stop_watching.clone(),
        )?);
        // Changes between the first scan and the watcher's start reached no one: one more look
        // (unchanged files cost a stat each) closes that gap.
        registry.reconcile().await?;

        Ok(Self {
            registry,
            effects,
            router,
            source,
            admin_addr,
            gateway_addr: gateway.map(|(addr, _)| addr),
            stop_watching,
            stop_source,
            stop_admin,
            tasks,
        })
    }

    /// Where the admin endpoint listens, if it does.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Where the browser gateway listens, if it does.
    pub fn gateway_addr(&self) -> Option<SocketAddr> {
        self.gateway_addr
    }

    /// The plugin registry.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The router.
    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }

    /// Whether the host is ready.
    pub fn readiness(&self) -> Readiness {
        readiness(&self.source, &self.registry)
    }

    /// Stops watching, unloads every plugin after its queue drains (up to `drain`), then
    /// closes the connection and the admin endpoint.
    pub async fn stop(self, drain: Duration) -> anyhow::Result<()> {
        self.stop_watching.cancel();
        let drained = self.registry.shutdown(drain).await;
        if !drained {
            tracing::warn!(?drain, "plugin queues did not drain in time");
        }
        // Stream readers acknowledge what was handled while draining, then stop.
        if tokio::time::timeout(drain, self.source.stop_streams())
            .await
            .is_err()
        {
            tracing::warn!(?drain, "stream readers did not finish in time");
        }
        // What plugins sent while draining is written before the connections close.
        if tokio::time::timeout(drain, self.effects.flush())
            .await
            .is_err()
        {
            tracing::warn!(
                ?drain,
                "messages sent by plugins were not all written in time"
            );
        }
        self.stop_source.cancel();
        self.stop_admin.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
        Ok(())
    }
}

/// Readiness from its parts.
pub(crate) fn readiness(source: &Source, registry: &Registry) -> Readiness {
    let source = source.status();
    let plugins_scanned = registry.scanned();
    Readiness {
        ready: source.connected && plugins_scanned,
        source,
        plugins_scanned,
    }
}

/// A random identifier for this host process, so its private channels do not collide with
/// another host's on the same Redis.
fn instance_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}
