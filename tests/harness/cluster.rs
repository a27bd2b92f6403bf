//! A real Redis Cluster of real `redis-server` processes for integration tests.
//!
//! [`RedisCluster`] starts `masters × (1 + replicas_per_master)` [`RedisServer`]s in cluster
//! mode and joins them with `redis-cli --cluster create`. It guarantees:
//!
//! - every node is a [`RedisServer`]: its own free loopback port and private temporary `--dir`,
//!   no persistence, SIGKILLed and reaped on drop, so dropping the cluster (also while a test
//!   unwinds from a panic) leaves no process behind;
//! - each node's cluster bus listens on a free port of its own (`--cluster-port`), never on the
//!   default client port + 10000, which may be taken or lie beyond 65535;
//! - a node's cluster state (`nodes.conf`) lives in its directory, so a node brought back with
//!   [`RedisCluster::restart`] keeps its identity and rejoins the cluster (a former primary
//!   whose slots were taken over comes back as a replica of its successor);
//! - [`RedisCluster::start`] returns only once the cluster is healthy (every node reports
//!   `cluster_state:ok`, every one of the 16384 slots is served by a live primary and all nodes
//!   agree on which) and every replica's link to its primary is up, so a failover works from the
//!   first moment;
//! - failures are detected fast (node timeout 1 s) and replicas may always take over
//!   (`cluster-replica-validity-factor 0`), so [`RedisCluster::fail_primary_of`] promotes a
//!   replica within seconds;
//! - every probe of a node runs over a fresh connection under a short timeout, so a dead node
//!   never hangs the harness, and every wait has a deadline whose error says what was last
//!   observed (including the last `CLUSTER INFO`).
//!
//! Nodes keep no data across a restart: a restarted replica resyncs from its primary.
//! Node indexes are positions in [`RedisCluster::urls`] and stay the same for the cluster's
//! life. `redis-cli --cluster create` refuses fewer than 3 primaries, and so does
//! [`RedisCluster::start`].
//!
//! The binaries are `redis-server` (see [`RedisServer`]) and `redis-cli` from `PATH`, or the
//! path in the `REDIS_CLI` environment variable when that is set.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fmt::Display;
use std::future::Future;
use std::io::ErrorKind;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail, ensure};
use redis::Value;
use tokio::process::Command;
use tokio::time::Instant;

use crate::redis::RedisServer;

/// The number of hash slots of a Redis Cluster.
const SLOTS: usize = 16384;
/// Cluster settings every node starts with (`RedisServer` already disables persistence and
/// makes its temporary directory the `--dir`, where `nodes.conf` goes).
const NODE_ARGS: &[&str] = &[
    "--cluster-enabled",
    "yes",
    "--cluster-config-file",
    "nodes.conf",
    "--cluster-node-timeout",
    "1000",
    "--cluster-replica-validity-factor",
    "0",
    // A primary otherwise waits 5 s for more replicas before starting a (diskless) full sync,
    // which is most of the time a new cluster or a rejoining replica takes to settle.
    "--repl-diskless-sync-delay",
    "0",
];
/// How many fresh cluster bus ports a node start tries when the chosen one is taken.
const BUS_PORT_ATTEMPTS: usize = 3;
/// How long `redis-cli --cluster create` may take (it waits for the nodes to meet).
const CREATE_DEADLINE: Duration = Duration::from_secs(30);
/// How long a new cluster may take to become healthy, and then to sync its replicas.
const FORMATION_DEADLINE: Duration = Duration::from_secs(30);
/// How long a restarted node may take to rejoin (a former primary first waits ~2 s before it
/// serves again, then learns that it was replaced).
const REJOIN_DEADLINE: Duration = Duration::from_secs(30);
/// How long [`RedisCluster::connection`] may take to connect and fetch the slot map.
const CONNECT_DEADLINE: Duration = Duration::from_secs(10);
/// Bound on each step (connect, one command or pipeline) of a probe of one node.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Interval between polls of the cluster's state.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How many names [`RedisCluster::names_on_distinct_primaries`] tries before giving up.
const NAME_CANDIDATES: usize = 100_000;

/// A Redis Cluster of `redis-server` child processes on free loopback ports, killed on drop.
#[derive(Debug)]
pub struct RedisCluster {
    /// The nodes, in the order they were given to `redis-cli --cluster create`.
    nodes: Vec<RedisServer>,
    /// Whether each node is running (false after [`RedisCluster::kill`], until
    /// [`RedisCluster::restart`]).
    alive: Vec<bool>,
}

/// What one node said about the cluster, in one round trip.
struct NodeReport {
    /// `CLUSTER INFO`.
    info: String,
    /// The primary's port of every slot, from `CLUSTER SLOTS`.
    slots: Vec<Option<u16>>,
    /// `CLUSTER NODES`.
    nodes: String,
    /// `INFO replication`.
    replication: String,
}

/// Why the cluster is not (yet) in the state waited for.
struct Problem {
    /// The node concerned, whose `CLUSTER INFO` goes into the error on timeout.
    node: Option<usize>,
    message: String,
}

impl Problem {
    fn new(node: Option<usize>, message: impl Into<String>) -> Self {
        Self {
            node,
            message: message.into(),
        }
    }
}

impl RedisCluster {
    /// Starts `masters` primaries with `replicas_per_master` replicas each (e.g. 3 and 1 → six
    /// processes), joins them into one cluster and waits until it is healthy and every replica
    /// is in sync with its primary. `masters` must be at least 3.
    pub async fn start(masters: usize, replicas_per_master: usize) -> anyhow::Result<Self> {
        ensure!(
            masters >= 3,
            "a Redis Cluster needs at least 3 primaries (`redis-cli --cluster create` refuses \
             fewer), not {masters}"
        );
        let started = Instant::now();
        let count = masters * (1 + replicas_per_master);
        let bus_ports = free_ports(count)?;
        let nodes = futures::future::try_join_all(bus_ports.into_iter().map(start_node))
            .await
            .with_context(|| format!("starting the {count} nodes of a Redis Cluster"))?;
        let cluster = Self {
            alive: vec![true; nodes.len()],
            nodes,
        };
        tracing::debug!(elapsed = ?started.elapsed(), "Redis Cluster nodes started");
        let created = cluster.create(replicas_per_master).await?;
        tracing::debug!(elapsed = ?started.elapsed(), "Redis Cluster created");
        cluster
            .wait_healthy(FORMATION_DEADLINE)
            .await
            .with_context(|| format!("the new cluster did not become healthy; {created}"))?;
        tracing::debug!(elapsed = ?started.elapsed(), "Redis Cluster healthy");
        cluster
            .wait_settled(FORMATION_DEADLINE)
            .await
            .context("the new cluster's replicas did not all sync with their primaries")?;
        tracing::info!(
            nodes = count,
            elapsed = ?started.elapsed(),
            "Redis Cluster started: {}",
            cluster.urls().join(" ")
        );
        Ok(cluster)
    }

    /// Seed URL of the first node: `redis://127.0.0.1:PORT` (whether it is running or not).
    pub fn seed_url(&self) -> String {
        self.nodes.first().map(RedisServer::url).unwrap_or_default()
    }

    /// All node URLs (`redis://127.0.0.1:PORT`), indexed like every other method's `index`,
    /// running or not.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// A `redis::cluster::ClusterClient` (RESP2) for test-side commands, seeded with the nodes
    /// running now (all nodes if none is).
    pub fn client(&self) -> redis::cluster::ClusterClient {
        let live: Vec<String> = self.live().map(|index| self.nodes[index].url()).collect();
        let seeds = if live.is_empty() { self.urls() } else { live };
        // Building only parses the URLs (no I/O); ours are plain redis://127.0.0.1:PORT URLs
        // without credentials, which are always accepted.
        redis::cluster::ClusterClient::new(seeds)
            .expect("redis://127.0.0.1:PORT URLs are always valid cluster seeds")
    }

    /// A cluster async connection for test-side commands (PUBLISH, SPUBLISH, XADD, ...); it
    /// follows MOVED redirections and topology changes by itself.
    pub async fn connection(&self) -> anyhow::Result<redis::cluster_async::ClusterConnection> {
        match tokio::time::timeout(CONNECT_DEADLINE, self.client().get_async_connection()).await {
            Ok(connection) => connection.with_context(|| {
                format!(
                    "connecting to the Redis Cluster at {}",
                    self.urls().join(" ")
                )
            }),
            Err(_) => bail!(
                "connecting to the Redis Cluster at {} took longer than {CONNECT_DEADLINE:?}",
                self.urls().join(" ")
            ),
        }
    }

    /// The hash slot of `key` (asks a running node: `CLUSTER KEYSLOT`).
    pub async fn slot(&self, key: &str) -> anyhow::Result<u16> {
        let (index, mut connection) = self.live_connection().await?;
        probe(
            format!("CLUSTER KEYSLOT {key:?} on {}", self.label(index)),
            redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(key)
                .query_async(&mut connection),
        )
        .await
    }

    /// Index (into the node list) of the node currently serving `slot` as primary, according to
    /// `CLUSTER SLOTS` of the first running node that answers. While a failover is under way
    /// that may still be the dead primary.
    pub async fn primary_of(&self, slot: u16) -> anyhow::Result<usize> {
        ensure!(
            usize::from(slot) < SLOTS,
            "slot {slot} does not exist (0..{SLOTS})"
        );
        let (index, owners) = self.owners().await?;
        owners[usize::from(slot)].with_context(|| {
            format!(
                "slot {slot} is served by no primary according to {}",
                self.label(index)
            )
        })
    }

    /// Kills node `index` (SIGKILL) and waits until the process is gone. Does nothing if it is
    /// already killed.
    ///
    /// # Panics
    ///
    /// If `index` is not a node index (a bug in the test).
    pub async fn kill(&mut self, index: usize) {
        assert!(
            index < self.nodes.len(),
            "node index {index} out of range: the cluster has {} nodes",
            self.nodes.len()
        );
        self.nodes[index].kill().await;
        self.alive[index] = false;
    }

    /// Restarts node `index` on its port with its `nodes.conf`, and waits until it has rejoined:
    /// the cluster is healthy, every running node sees every other as connected, and the node
    /// is either a primary serving slots or a replica whose link to its primary is up (a
    /// killed primary that was replaced comes back as a replica of its successor). If the node
    /// is still running it is killed first.
    pub async fn restart(&mut self, index: usize) -> anyhow::Result<()> {
        ensure!(
            index < self.nodes.len(),
            "node index {index} out of range: the cluster has {} nodes",
            self.nodes.len()
        );
        let label = self.label(index);
        let started = Instant::now();
        self.alive[index] = false;
        self.nodes[index]
            .restart()
            .await
            .with_context(|| format!("restarting cluster {label}"))?;
        self.alive[index] = true;
        self.wait_settled(REJOIN_DEADLINE)
            .await
            .with_context(|| format!("restarted {label} did not rejoin the cluster"))?;
        tracing::info!(elapsed = ?started.elapsed(), "Redis Cluster {label} restarted and rejoined");
        Ok(())
    }

    /// Waits (up to `within`) until every running node reports `cluster_state:ok`, all 16384
    /// slots are served by a running primary, and all running nodes agree on which. On timeout
    /// the error says what was wrong last and includes the last `CLUSTER INFO` seen.
    pub async fn wait_healthy(&self, within: Duration) -> anyhow::Result<()> {
        self.wait_until(within, "healthy", |reports| {
            self.check_healthy(reports).map(drop)
        })
        .await
    }

    /// Kills the primary serving `slot` and waits (up to `within` in all) until a replica has
    /// been promoted in its place and the cluster is healthy again; returns the killed node's
    /// index. Fails after `within` if no replica takes over (e.g. the primary had none).
    pub async fn fail_primary_of(&mut self, slot: u16, within: Duration) -> anyhow::Result<usize> {
        let deadline = Instant::now() + within;
        let victim = self.primary_of(slot).await?;
        let victim_label = self.label(victim);
        let started = Instant::now();
        self.kill(victim).await;
        let successor = loop {
            let last = match self.successor(slot, victim).await {
                Ok(successor) => break successor,
                Err(error) => error,
            };
            if Instant::now() >= deadline {
                return Err(last.context(format!(
                    "no replica took over slot {slot} within {within:?} after {victim_label} \
                     was killed"
                )));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        };
        let promoted = started.elapsed();
        self.wait_healthy(deadline.saturating_duration_since(Instant::now()))
            .await
            .with_context(|| {
                format!(
                    "after {victim_label} was killed and {} took over slot {slot}",
                    self.label(successor)
                )
            })?;
        tracing::info!(
            promoted = ?promoted,
            healthy = ?started.elapsed(),
            "Redis Cluster failover: {} replaced {victim_label}",
            self.label(successor)
        );
        Ok(victim)
    }

    /// Channel/key names whose slots are owned by different primaries: `n` names of the form
    /// `{prefix}{i}` (the smallest `i = 0, 1, 2, ...` that qualify) such that, when `n` is at
    /// most the number of primaries, each lives on a different primary than the others. For a
    /// larger `n` the names are spread evenly: each primary gets one before any gets a second.
    pub async fn names_on_distinct_primaries(
        &self,
        prefix: &str,
        n: usize,
    ) -> anyhow::Result<Vec<String>> {
        let (_, owners) = self.owners().await?;
        let primaries: BTreeSet<usize> = owners.iter().flatten().copied().collect();
        ensure!(!primaries.is_empty(), "the cluster serves no slots");
        let (index, mut connection) = self.live_connection().await?;
        let mut names = Vec::with_capacity(n);
        let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
        for i in 0..NAME_CANDIDATES {
            if names.len() == n {
                break;
            }
            let name = format!("{prefix}{i}");
            let slot: u16 = probe(
                format!("CLUSTER KEYSLOT {name:?} on {}", self.label(index)),
                redis::cmd("CLUSTER")
                    .arg("KEYSLOT")
                    .arg(&name)
                    .query_async(&mut connection),
            )
            .await?;
            let Some(owner) = owners.get(usize::from(slot)).copied().flatten() else {
                continue;
            };
            // Round r gives each primary its (r+1)-th name.
            let round = names.len() / primaries.len();
            let count = counts.entry(owner).or_default();
            if *count == round {
                *count += 1;
                names.push(name);
            }
        }
        ensure!(
            names.len() == n,
            "only {} of {n} names `{prefix}N` spread over {} primaries among the first \
             {NAME_CANDIDATES} candidates: {names:?}",
            names.len(),
            primaries.len()
        );
        Ok(names)
    }

    /// "node INDEX (port PORT)", for messages.
    fn label(&self, index: usize) -> String {
        match self.nodes.get(index) {
            Some(node) => format!("node {index} (port {})", node.port()),
            None => format!("node {index} (no such node)"),
        }
    }

    /// Indexes of the running nodes.
    fn live(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.nodes.len()).filter(|&index| self.alive[index])
    }

    /// The index of the node listening on `port`.
    fn index_of_port(&self, port: u16) -> Option<usize> {
        self.nodes.iter().position(|node| node.port() == port)
    }

    /// A connection to the first running node that accepts one.
    async fn live_connection(&self) -> anyhow::Result<(usize, redis::aio::MultiplexedConnection)> {
        let mut failures = Vec::new();
        for index in self.live() {
            match connect(&self.nodes[index].url(), &self.label(index)).await {
                Ok(connection) => return Ok((index, connection)),
                Err(error) => failures.push(format!("{error:#}")),
            }
        }
        if failures.is_empty() {
            bail!("no node of the cluster is running");
        }
        bail!(
            "no running node accepted a connection: {}",
            failures.join("; ")
        )
    }

    /// The primary (node index) of every slot, according to `CLUSTER SLOTS` of the first
    /// running node that answers; returns that node's index too.
    async fn owners(&self) -> anyhow::Result<(usize, Vec<Option<usize>>)> {
        let mut failures = Vec::new();
        for index in self.live() {
            let label = self.label(index);
            let view = async {
                let mut connection = connect(&self.nodes[index].url(), &label).await?;
                let slots: Value = probe(
                    format!("CLUSTER SLOTS on {label}"),
                    redis::cmd("CLUSTER")
                        .arg("SLOTS")
                        .query_async(&mut connection),
                )
                .await?;
                slot_ports(&slots).with_context(|| format!("reading CLUSTER SLOTS of {label}"))
            };
            match view.await {
                Ok(ports) => {
                    let owners = self
                        .port_owners(&ports)
                        .map_err(|problem| anyhow!("{label}: {}", problem.message))?;
                    return Ok((index, owners));
                }
                Err(error) => failures.push(format!("{error:#}")),
            }
        }
        if failures.is_empty() {
            bail!("no node of the cluster is running");
        }
        bail!(
            "no running node answered CLUSTER SLOTS: {}",
            failures.join("; ")
        )
    }

    /// Maps a slot → primary port table to node indexes.
    fn port_owners(&self, ports: &[Option<u16>]) -> Result<Vec<Option<usize>>, Problem> {
        ports
            .iter()
            .enumerate()
            .map(|(slot, port)| match port {
                None => Ok(None),
                Some(port) => self.index_of_port(*port).map(Some).ok_or_else(|| {
                    Problem::new(
                        None,
                        format!("slot {slot} is served by port {port}, not a node of this cluster"),
                    )
                }),
            })
            .collect()
    }

    /// The node other than `victim` that a running node reports as primary of `slot`.
    async fn successor(&self, slot: u16, victim: usize) -> anyhow::Result<usize> {
        let mut views = Vec::new();
        for (index, report) in self.reports().await {
            let report = match report {
                Ok(report) => report,
                Err(error) => {
                    views.push(format!("{error:#}"));
                    continue;
                }
            };
            let owner = report.slots[usize::from(slot)].and_then(|port| self.index_of_port(port));
            match owner {
                Some(owner) if owner != victim && self.alive[owner] => return Ok(owner),
                Some(owner) => {
                    views.push(format!("{} says {}", self.label(index), self.label(owner)))
                }
                None => views.push(format!("{} says no known node", self.label(index))),
            }
        }
        bail!(
            "slot {slot} is not yet served by a new primary: {}",
            views.join("; ")
        )
    }

    /// Probes every running node concurrently.
    async fn reports(&self) -> Vec<(usize, anyhow::Result<NodeReport>)> {
        let probes = self
            .live()
            .map(|index| async move { (index, self.report(index).await) });
        futures::future::join_all(probes).await
    }

    /// `CLUSTER INFO`, `CLUSTER SLOTS`, `CLUSTER NODES` and `INFO replication` of node `index`.
    async fn report(&self, index: usize) -> anyhow::Result<NodeReport> {
        let label = self.label(index);
        let mut connection = connect(&self.nodes[index].url(), &label).await?;
        let (info, slots, nodes, replication): (String, Value, String, String) = probe(
            format!("CLUSTER INFO/SLOTS/NODES and INFO replication on {label}"),
            redis::pipe()
                .cmd("CLUSTER")
                .arg("INFO")
                .cmd("CLUSTER")
                .arg("SLOTS")
                .cmd("CLUSTER")
                .arg("NODES")
                .cmd("INFO")
                .arg("replication")
                .query_async(&mut connection),
        )
        .await?;
        let slots =
            slot_ports(&slots).with_context(|| format!("reading CLUSTER SLOTS of {label}"))?;
        Ok(NodeReport {
            info,
            slots,
            nodes,
            replication,
        })
    }

    /// Polls every running node until `check` accepts their reports, or fails after `within`
    /// with the last problem and the last `CLUSTER INFO` seen.
    async fn wait_until(
        &self,
        within: Duration,
        what: &str,
        check: impl Fn(&[(usize, anyhow::Result<NodeReport>)]) -> Result<(), Problem>,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let reports = self.reports().await;
            let problem = match check(&reports) {
                Ok(()) => return Ok(()),
                Err(problem) => problem,
            };
            if Instant::now() >= deadline {
                // The concerned node's CLUSTER INFO, or else the first one that answered.
                let info = reports
                    .iter()
                    .filter(|(index, _)| problem.node.is_none_or(|node| node == *index))
                    .chain(reports.iter())
                    .find_map(|(index, report)| {
                        report.as_ref().ok().map(|report| (*index, &report.info))
                    });
                let info = match info {
                    Some((index, info)) => format!(
                        "last CLUSTER INFO of {}:\n{}",
                        self.label(index),
                        info.trim_end()
                    ),
                    None => "no running node answered CLUSTER INFO".to_owned(),
                };
                bail!(
                    "the Redis Cluster is not {what} after {within:?}: {}\n{info}",
                    problem.message
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Healthy: every running node answers with `cluster_state:ok` and the same slot map, in
    /// which every slot is served by a running node. Returns that map (slot → node index).
    fn check_healthy(
        &self,
        reports: &[(usize, anyhow::Result<NodeReport>)],
    ) -> Result<Vec<usize>, Problem> {
        let mut agreed: Option<(usize, &[Option<u16>])> = None;
        for (index, report) in reports {
            let index = *index;
            let report = report
                .as_ref()
                .map_err(|error| Problem::new(Some(index), format!("{error:#}")))?;
            let state = info_field(&report.info, "cluster_state");
            if state != Some("ok") {
                return Err(Problem::new(
                    Some(index),
                    format!(
                        "{} reports cluster_state:{}",
                        self.label(index),
                        state.unwrap_or("(missing)")
                    ),
                ));
            }
            match agreed {
                None => agreed = Some((index, &report.slots)),
                Some((first, slots)) => {
                    if let Some(slot) = (0..SLOTS).find(|&slot| slots[slot] != report.slots[slot]) {
                        return Err(Problem::new(
                            Some(index),
                            format!(
                                "{} and {} disagree about slot {slot}: primary port {} vs {}",
                                self.label(first),
                                self.label(index),
                                port_text(slots[slot]),
                                port_text(report.slots[slot])
                            ),
                        ));
                    }
                }
            }
        }
        let Some((first, slots)) = agreed else {
            return Err(Problem::new(None, "no node of the cluster is running"));
        };
        let owners = self.port_owners(slots)?;
        owners
            .into_iter()
            .enumerate()
            .map(|(slot, owner)| match owner {
                Some(owner) if self.alive[owner] => Ok(owner),
                Some(owner) => Err(Problem::new(
                    Some(first),
                    format!(
                        "slot {slot} is served by {}, which is dead",
                        self.label(owner)
                    ),
                )),
                None => Err(Problem::new(
                    Some(first),
                    format!("slot {slot} is served by no primary"),
                )),
            })
            .collect()
    }

    /// Waits (up to `within`) until the cluster is healthy, every running node sees every
    /// other as connected and not failing, and each is a primary serving slots or a replica
    /// whose link to its primary is up.
    async fn wait_settled(&self, within: Duration) -> anyhow::Result<()> {
        self.wait_until(within, "settled", |reports| self.check_settled(reports))
            .await
    }

    fn check_settled(
        &self,
        reports: &[(usize, anyhow::Result<NodeReport>)],
    ) -> Result<(), Problem> {
        let owners = self.check_healthy(reports)?;
        let primaries: BTreeSet<usize> = owners.into_iter().collect();
        let live: BTreeSet<usize> = self.live().collect();
        for (index, report) in reports {
            let index = *index;
            let label = self.label(index);
            let report = report
                .as_ref()
                .map_err(|error| Problem::new(Some(index), format!("{error:#}")))?;
            let not_yet = |message: String| Err(Problem::new(Some(index), message));
            match info_field(&report.replication, "role") {
                Some("master") if primaries.contains(&index) => {}
                Some("master") => {
                    return not_yet(format!(
                        "{label} is a primary serving no slots (not yet a replica again?)"
                    ));
                }
                Some("slave") => {
                    let link = info_field(&report.replication, "master_link_status");
                    if link != Some("up") {
                        return not_yet(format!(
                            "{label} is a replica whose master_link_status is {}",
                            link.unwrap_or("(missing)")
                        ));
                    }
                }
                role => {
                    return not_yet(format!(
                        "{label} reports role {}",
                        role.unwrap_or("(missing)")
                    ));
                }
            }
            let mut seen = BTreeSet::new();
            for line in report.nodes.lines() {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let (Some(address), Some(flags), Some(link)) =
                    (fields.get(1), fields.get(2), fields.get(7))
                else {
                    continue;
                };
                let Some(other) = node_port(address).and_then(|port| self.index_of_port(port))
                else {
                    continue;
                };
                if !live.contains(&other) {
                    continue;
                }
                if flags.contains("fail") || flags.contains("handshake") || *link != "connected" {
                    return not_yet(format!(
                        "{label} sees {} as {flags} ({link})",
                        self.label(other)
                    ));
                }
                seen.insert(other);
            }
            if let Some(missing) = live.difference(&seen).next() {
                return not_yet(format!(
                    "{label} does not know {} yet",
                    self.label(*missing)
                ));
            }
        }
        Ok(())
    }

    /// Runs `redis-cli --cluster create` over all nodes; returns its (uncoloured) output.
    async fn create(&self, replicas_per_master: usize) -> anyhow::Result<String> {
        let binary = redis_cli_binary();
        let mut args: Vec<String> = vec!["--cluster".into(), "create".into()];
        args.extend(
            self.nodes
                .iter()
                .map(|node| format!("127.0.0.1:{}", node.port())),
        );
        args.extend([
            "--cluster-replicas".into(),
            replicas_per_master.to_string(),
            "--cluster-yes".into(),
        ]);
        let command_line = format!("{} {}", binary.to_string_lossy(), args.join(" "));
        let mut command = Command::new(&binary);
        command
            .args(&args)
            .stdin(Stdio::null())
            // Killed if it overruns the deadline (the future is dropped).
            .kill_on_drop(true);
        let output = match tokio::time::timeout(CREATE_DEADLINE, command.output()).await {
            Ok(Ok(output)) => output,
            Ok(Err(error)) if error.kind() == ErrorKind::NotFound => bail!(
                "redis-cli is not installed: `{}` was not found. The cluster tests need it to \
                 create a Redis Cluster; it comes with `apt-get install redis-server` (or set \
                 REDIS_CLI to the path of a redis-cli binary)",
                binary.to_string_lossy()
            ),
            Ok(Err(error)) => {
                return Err(anyhow::Error::new(error).context(format!("running `{command_line}`")));
            }
            Err(_) => bail!("`{command_line}` did not finish within {CREATE_DEADLINE:?}"),
        };
        let text = format!(
            "output of `{command_line}`:\n{}{}",
            strip_ansi(&String::from_utf8_lossy(&output.stdout)),
            strip_ansi(&String::from_utf8_lossy(&output.stderr))
        );
        ensure!(
            output.status.success(),
            "creating the Redis Cluster failed ({}); {text}",
            output.status
        );
        Ok(text)
    }
}

/// Starts one cluster node whose bus listens on `bus_port`, or on a fresh port if that one
/// turns out to be taken.
async fn start_node(mut bus_port: u16) -> anyhow::Result<RedisServer> {
    let mut attempt = 1;
    loop {
        let bus = bus_port.to_string();
        let mut args = NODE_ARGS.to_vec();
        args.extend(["--cluster-port", &bus]);
        match RedisServer::start_with(&args).await {
            Ok(server) => return Ok(server),
            // `RedisServer` already retried other client ports: the bus port is the one taken.
            Err(error)
                if attempt < BUS_PORT_ATTEMPTS
                    && format!("{error:#}").contains("Address already in use") =>
            {
                attempt += 1;
                bus_port = free_ports(1)?[0];
            }
            Err(error) => {
                return Err(
                    error.context(format!("starting a cluster node with bus port {bus_port}"))
                );
            }
        }
    }
}

/// `count` distinct ports that were free a moment ago on 127.0.0.1 (held together while
/// picking, so they differ).
fn free_ports(count: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..count)
        .map(|_| {
            std::net::TcpListener::bind(("127.0.0.1", 0))
                .context("binding 127.0.0.1:0 to find a free cluster bus port")
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|listener| {
            Ok(listener
                .local_addr()
                .context("reading the port of a 127.0.0.1:0 listener")?
                .port())
        })
        .collect()
}

fn redis_cli_binary() -> OsString {
    std::env::var_os("REDIS_CLI").unwrap_or_else(|| OsString::from("redis-cli"))
}

/// Awaits one step of a probe for at most [`PROBE_TIMEOUT`].
async fn probe<T>(
    what: impl Display,
    step: impl Future<Output = redis::RedisResult<T>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(PROBE_TIMEOUT, step).await {
        Ok(result) => result.with_context(|| what.to_string()),
        Err(_) => bail!("{what}: no answer within {PROBE_TIMEOUT:?}"),
    }
}

/// A fresh plain (non-cluster) connection to one node, for probes.
async fn connect(url: &str, label: &str) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(url).with_context(|| format!("parsing {url}"))?;
    probe(
        format!("connecting to {label}"),
        client.get_multiplexed_async_connection(),
    )
    .await
}

/// The primary's port of every slot in a `CLUSTER SLOTS` reply:
/// `[[start, end, [ip, port, id, ...], replicas...], ...]`.
fn slot_ports(reply: &Value) -> anyhow::Result<Vec<Option<u16>>> {
    let Value::Array(ranges) = reply else {
        bail!("not an array: {reply:?}");
    };
    let mut ports = vec![None; SLOTS];
    for range in ranges {
        let parsed = match range {
            Value::Array(fields) => match (fields.first(), fields.get(1), fields.get(2)) {
                (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(primary))) => {
                    match primary.get(1) {
                        Some(Value::Int(port)) => Some((*start, *end, *port)),
                        _ => None,
                    }
                }
                _ => None,
            },
            _ => None,
        };
        let (start, end, port) = parsed.with_context(|| format!("unexpected range {range:?}"))?;
        let port = u16::try_from(port).with_context(|| format!("bad port in {range:?}"))?;
        let start = usize::try_from(start).with_context(|| format!("bad slot in {range:?}"))?;
        let end = usize::try_from(end).with_context(|| format!("bad slot in {range:?}"))?;
        ensure!(start <= end && end < SLOTS, "bad slot range in {range:?}");
        ports[start..=end].fill(Some(port));
    }
    Ok(ports)
}

/// The value of `key` in an `INFO`-style `key:value` reply.
fn info_field<'a>(info: &'a str, key: &str) -> Option<&'a str> {
    info.lines().find_map(|line| {
        line.strip_prefix(key)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(str::trim)
    })
}

/// The client port in a `CLUSTER NODES` address: `ip:port@busport[,hostname]`.
fn node_port(address: &str) -> Option<u16> {
    let address = address.split('@').next()?;
    address.rsplit(':').next()?.parse().ok()
}

fn port_text(port: Option<u16>) -> String {
    port.map_or_else(|| "(none)".to_owned(), |port| port.to_string())
}

/// `text` without ANSI escape sequences (redis-cli colours its `--cluster` output).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte (a letter).
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
