//! Wires the stages together and runs them until told to stop.
//!
//! [`Host::start`] resolves everything that can be wrong with the configuration first (the
//! plugins folder, the Redis URL, the admin address), then starts the source, loads the
//! folder once, and starts the watcher and the admin endpoint. [`Host::stop_by`] stops
//! watching, unloads plugins (their queues drain), then closes the connection, all before one
//! deadline: past it, it gives up on what is left and says how much that was, so a stop never
//! takes longer than the operator allowed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState, Readiness, readiness};
use crate::config::{Config, RedisConfig};
use crate::effects::outputs::Outputs;
use crate::effects::{EffectLimits, Effects, Publisher, ShardedChannels};
use crate::gateway::{self, GatewaySource};
use crate::plugins::admission::Admission;
use crate::plugins::compile_cache::CompileCache;
use crate::plugins::loader::{Limits, Loader};
use crate::plugins::sources::Sources;
use crate::plugins::{Registry, WorkerSettings, watcher};
use crate::router::Router;
use crate::source::Source;
use crate::source::cluster::ClusterSource;
use crate::source::embedded::EmbeddedBroker;
use crate::source::redis::{CLIENT_NAME_PREFIX, COMMAND_TIMEOUT, RedisSource};
use crate::source::streams::{StreamBackend, StreamReaders};
use crate::stats::PluginStats;
use crate::trace::Tracing;
use crate::worker::engine::Runtime;
use crate::worker::queue::HostBudget;

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
    client_name: Option<String>,
    stop_watching: CancellationToken,
    stop_source: CancellationToken,
    stop_admin: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

/// An address from the configuration that the host cannot listen on: taken by another process,
/// or not this machine's. The operator fixes it by choosing another address, so it counts as
/// unusable configuration.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {key} {addr}: {error}; {}", listen_hint(.flag, .key, .error))]
pub struct ListenError {
    /// The configuration key, e.g. `admin.listen`.
    pub key: &'static str,
    /// The command-line flag that overrides it, e.g. `--admin`.
    pub flag: &'static str,
    /// The address.
    pub addr: SocketAddr,
    /// Why it failed (part of the message, so not a `source` that would print twice).
    pub error: std::io::Error,
}

/// What to do about a [`ListenError`].
fn listen_hint(flag: &str, key: &str, error: &std::io::Error) -> String {
    let why = if error.kind() == std::io::ErrorKind::AddrInUse {
        "another process (another switchyard?) is using it: "
    } else {
        ""
    };
    format!("{why}choose another address with {flag} ADDR or {key}")
}

/// Binds the listener for the configuration key `key` (overridden by `flag`).
async fn listen(
    key: &'static str,
    flag: &'static str,
    addr: SocketAddr,
) -> Result<tokio::net::TcpListener, ListenError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|error| ListenError {
            key,
            flag,
            addr,
            error,
        })
}

/// How a stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Every queue drained, stream readers acknowledged what was handled, and everything the
    /// plugins sent was written.
    Drained,
    /// The deadline passed first; the host gave up on the rest.
    DeadlinePassed {
        /// Messages accepted into plugin queues and neither handled nor failed (see
        /// [`Backlog::unhandled`]).
        unhandled: u64,
    },
}

/// The plugins' message counters, read after their queues are gone: what is still owed.
#[derive(Clone)]
pub struct Backlog {
    stats: Vec<Arc<PluginStats>>,
}

impl Backlog {
    /// Messages accepted into plugin queues that were neither handled nor failed: waiting,
    /// being handled, or dropped oldest-first by a full queue or a parked plugin (those were
    /// counted as shed already, and were not handled either).
    pub fn unhandled(&self) -> u64 {
        self.stats
            .iter()
            .map(|stats| {
                let s = stats.snapshot();
                s.accepted.saturating_sub(s.handled + s.failed)
            })
            .sum()
    }
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
            Some(listen("admin.listen", "--admin", config.admin.listen).await?)
        } else {
            None
        };

        let gateway_listener = match config.gateway.listen {
            Some(addr) => Some(listen("gateway.listen", "--gateway", addr).await?),
            None => None,
        };

        let runtime = Runtime::new().context("cannot start the Wasm engine")?;
        let instance = instance_id();
        let router = Arc::new(Router::new(&instance, config.plugins.max_payload_bytes));
        // The name the Redis source gives its subscriber connection (CLIENT SETNAME), derived
        // from the same instance id: `switchyard status` finds this host's entry by it. The
        // cluster source names none.
        let client_name = match &broker {
            Broker::Redis(redis) if redis.cluster_seeds().is_none() => {
                Some(format!("{CLIENT_NAME_PREFIX}{instance}"))
            }
            Broker::Redis(_) | Broker::Embedded(_) => None,
        };
        let tracing = Arc::new(Tracing::start(&config.tracing.settings()).context("[tracing]")?);
        let stop_source = CancellationToken::new();
        let mut tasks = Vec::new();
        let gateway_source = match &broker {
            Broker::Redis(redis) => GatewaySource::Redis(Box::new(redis.client()?)),
            Broker::Embedded(broker) => GatewaySource::Embedded(broker.clone()),
        };
        // Replies to plugins' requests come on a subscription of their own (on a cluster, to
        // its first seed node: classic pub/sub reaches every node).
        let replies_client = match &broker {
            Broker::Redis(redis) => Some(redis.client()?),
            Broker::Embedded(_) => None,
        };
        // Where key subscriptions that name no database look: the one the URL selects.
        let database = match &broker {
            Broker::Redis(redis) => redis.database(),
            Broker::Embedded(_) => 0,
        };
        let (source, publisher) = match broker {
            Broker::Redis(redis) if redis.cluster_seeds().is_some() => {
                let seeds = redis.cluster_seeds().unwrap_or_default();
                let client = crate::source::cluster::cluster_client(
                    &redis,
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
                )
                .with_max_entry_bytes(config.plugins.max_payload_bytes)
                .with_tracing(tracing.clone());
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
                // Keepalive on the publishing connection too: a silent network fails its
                // writes within seconds instead of the kernel's retransmission minutes.
                let publishing_client =
                    crate::source::redis::client_with_dead_peer_detection(&client)
                        .context("cannot create the publishing connection")?;
                let publisher =
                    ConnectionManager::new_lazy_with_config(publishing_client, manager_config)
                        .context("cannot create the publishing connection")?;
                let (source, task) = RedisSource::start(
                    &client,
                    publisher.clone(),
                    router.clone(),
                    redis.health_timeout(),
                    redis.set_keyspace_events,
                    stop_source.clone(),
                )?;
                tasks.push(task);
                let (tracking, task) = crate::source::tracking::Tracking::start(
                    &client,
                    router.clone(),
                    stop_source.clone(),
                );
                tasks.push(task);
                let streams = StreamReaders::new(
                    StreamBackend::Single(Arc::new(client)),
                    stop_source.clone(),
                )
                .with_max_entry_bytes(config.plugins.max_payload_bytes)
                .with_tracing(tracing.clone());
                (
                    Source::Redis(source, Arc::new(streams), tracking),
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
        .with_limits(EffectLimits::from_config(config))
        .with_sharded(ShardedChannels::new(&config.redis.sharded_channels))
        .with_own_redis(config.redis.url.expose())
        .with_tracing(tracing);
        let effects = match replies_client {
            Some(client) => effects.with_replies_from(client),
            None => effects,
        };
        let limits = Limits {
            deadline: config.deadline(),
            memory: usize::try_from(config.plugins.memory_mib << 20).unwrap_or(usize::MAX),
        };
        let compile_cache = match &config.plugins.compile_cache {
            Some(dir) => Some(CompileCache::open(dir).with_context(|| {
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
        .with_streams(config.streams.clone())
        .with_database(database)
        .with_describe_deadline(config.describe_deadline());
        if let Some(cache) = compile_cache {
            loader = loader.with_compile_cache(cache);
        }
        let admission = Arc::new(Admission::from_config(&config.plugins)?);
        loader = loader.with_admission(admission.clone());
        let sources = if config.plugins.sources.is_empty() {
            None
        } else {
            Some(Arc::new(Sources::new(&config.plugins, admission)?))
        };
        let registry = Arc::new(Registry::new(
            dir.clone(),
            loader,
            source.clone(),
            WorkerSettings {
                queue_bytes: config.plugins.queue_bytes,
                queue_capacity: config.plugins.queue_capacity,
                budget: HostBudget::new(
                    usize::try_from(config.queue_bytes_total()).unwrap_or(usize::MAX),
                ),
                when_full: config.plugins.when_full,
                breaker: config.breaker(),
            },
        ));
        registry.set_settle(config.settle());

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
                    client_name: client_name.clone(),
                });
                tasks.push(admin::serve(listener, state, stop_admin.clone()));
                tracing::info!(%addr, "admin endpoint listening");
                Some(addr)
            }
            None => None,
        };

        // Registry sources first: what they install is in the folder for the first scan. A
        // registry that is away leaves readiness waiting, and the poller trying again.
        let stop_watching = CancellationToken::new();
        if let Some(sources) = sources {
            sources.sync().await;
            registry.set_sources(sources.clone());
            tasks.push(sources.spawn(stop_watching.clone()));
        }
        let mut changes = registry.reconcile().await?;
        // Files written just before the start (the demo's, a deployment's) are loaded once
        // they settle, before `start` returns. One still being written after that stays
        // pending, and readiness with it, until the watcher sees it settle.
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
            client_name,
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

    /// The name of the host's subscriber connection in Redis's `CLIENT LIST`, if it names one.
    pub fn client_name(&self) -> Option<&str> {
        self.client_name.as_deref()
    }

    /// The plugins' counters, to tell later how many messages are still owed.
    pub fn backlog(&self) -> Backlog {
        Backlog {
            stats: self
                .registry
                .metrics_view()
                .into_iter()
                .map(|plugin| plugin.stats)
                .collect(),
        }
    }

    /// [`Host::stop_by`] with a deadline `drain` from now, for callers that only wait.
    pub async fn stop(self, drain: Duration) -> anyhow::Result<()> {
        self.stop_by(Instant::now() + drain).await;
        Ok(())
    }

    /// Stops watching, unloads every plugin after its queue drains, lets stream readers
    /// acknowledge what was handled, writes what plugins sent, then closes the connection and
    /// the admin endpoint: all of it before `deadline`, one budget for every step.
    ///
    /// Past the deadline it logs a warning with the number of messages left unhandled, aborts
    /// the host's tasks and returns. Worker threads still inside a plugin call are not waited
    /// for, and neither should the caller wait for them: `switchyard run` ends the process
    /// (see `cli::main`).
    pub async fn stop_by(self, deadline: Instant) -> Stopped {
        let backlog = self.backlog();
        self.stop_watching.cancel();
        let drain = async {
            let left = deadline.saturating_duration_since(Instant::now());
            if !self.registry.shutdown(left).await {
                return false;
            }
            // Stream readers acknowledge what was handled while draining, then stop.
            self.source.stop_streams().await;
            // What plugins sent while draining is written before the connections close.
            self.effects.flush().await;
            // The spans of the last messages go too, within a few seconds, off the runtime.
            let tracing = self.effects.tracing().clone();
            let _ = tokio::task::spawn_blocking(move || tracing.shutdown()).await;
            true
        };
        let drained = tokio::time::timeout_at(deadline, drain)
            .await
            .unwrap_or(false);
        self.stop_source.cancel();
        self.stop_admin.cancel();
        for mut task in self.tasks {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                task.abort();
            }
        }
        if drained {
            Stopped::Drained
        } else {
            let unhandled = backlog.unhandled();
            tracing::warn!(
                unhandled,
                "stop deadline passed: {unhandled} queued messages left unhandled \
                 (plugins.drain_ms sets the deadline)"
            );
            Stopped::DeadlinePassed { unhandled }
        }
    }
}

/// A random identifier for this host process, so its private channels do not collide with
/// another host's on the same Redis.
fn instance_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}
