//! The command line: `switchyard run`, `demo`, `status`, `config check`, and the plugin
//! authors' `check`, `test` and `new`.
//!
//! Exit status: 0 after a stop on SIGINT or SIGTERM (queues drained, or `plugins.drain_ms`
//! passed first: a warning says how many messages were left unhandled) or a passing check or
//! test; 2 when the configuration is unusable (the message names the key and where it was set:
//! an unknown key, a bad value, a plugins folder that does not exist, an admin or gateway
//! address that cannot be listened on); 130 when a second signal cut the drain short; 1 for any
//! other failure (a file that is not a plugin, effects that differ from the expected ones).
//!
//! Once a command is done the process exits without waiting for work still running: after a
//! stop whose deadline passed, or a second signal, worker threads may be inside plugin calls,
//! and waiting for them is exactly what the deadline forbids.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::app::{Broker, Host, ListenError, Stopped};
use crate::config::{Config, ConfigError, Policy, RedisUrl};

/// The exit status after a second SIGINT/SIGTERM cut the drain short (128 + SIGINT).
pub const EXIT_INTERRUPTED: u8 = 130;

/// The exit status when the configuration is unusable.
pub const EXIT_CONFIG: u8 = 2;

/// How long the async runtime may take to wind down once a command returned: enough for
/// tasks that are merely finishing, short enough that a stuck one cannot hold the exit.
const RUNTIME_SHUTDOWN_GRACE: Duration = Duration::from_millis(200);

/// A second stop signal arrived while draining.
#[derive(Debug, thiserror::Error)]
#[error("stopped at once by a second signal; messages still queued were not handled")]
pub struct Interrupted;

/// Routes Redis pub/sub messages to hot-reloaded WebAssembly plugins.
#[derive(Debug, Parser)]
#[command(name = "switchyard", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    /// Log level filter, e.g. `info` or `switchyard=debug`; takes precedence over RUST_LOG,
    /// which applies when this is not given.
    #[arg(long, global = true)]
    pub log_level: Option<String>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Subscribe to Redis and route messages to the plugins in a folder.
    Run(RunArgs),
    /// Run the example plugins on an embedded broker and show what they do (no Redis needed).
    Demo(DemoArgs),
    /// Configuration tools.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Show a running host's plugins, states and rates, and what Redis sees of it.
    Status(StatusArgs),
    /// Check that a .wasm file is a plugin this host runs, and show what it is and would be
    /// granted.
    Check(CheckArgs),
    /// Run a plugin offline on the embedded broker, feeding it messages from a file, and
    /// print every effect (published messages, invalidations, output calls, outcomes).
    Test(TestArgs),
    /// Create a plugin project that builds and passes `switchyard test` as it is.
    New(NewArgs),
    /// Push a plugin (its .wasm, and the NAME.toml beside it) to a registry as an OCI
    /// artifact.
    Push(PushArgs),
    /// Pull a plugin from a registry into a folder (digests checked, files renamed into
    /// place).
    Pull(PullArgs),
    /// Browser gateway tools.
    #[command(subcommand)]
    Gateway(GatewayCommand),
}

/// `switchyard demo` options.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// After the scenarios, keep running with the browser gateway on this address (the
    /// dashboard and chat pages, on the embedded broker).
    #[arg(long)]
    pub gateway: Option<SocketAddr>,
}

/// `switchyard gateway ...`
#[derive(Debug, Subcommand)]
pub enum GatewayCommand {
    /// Print a signed gateway token (gateway.hmac_secret from the configuration).
    Token(TokenArgs),
}

/// `switchyard gateway token` options.
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// Configuration file holding gateway.hmac_secret.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Who holds the token (shown in the host's logs).
    #[arg(long, default_value = "browser")]
    pub sub: String,
    /// Channels (Redis glob patterns) it may read; repeatable.
    #[arg(long)]
    pub read: Vec<String>,
    /// Channels (Redis glob patterns) it may publish to; repeatable.
    #[arg(long)]
    pub write: Vec<String>,
    /// Seconds until it expires.
    #[arg(long, default_value_t = 3600)]
    pub ttl: u64,
}

/// What decides a plugin's name and grants, for `check` and `test`.
#[derive(Debug, Args)]
pub struct PluginArgs {
    /// The plugin component.
    pub file: PathBuf,
    /// Its manifest (default: NAME.toml beside the file, if there is one).
    #[arg(long)]
    pub manifest: Option<PathBuf>,
    /// Its name in the host (default: the file name without .wasm).
    #[arg(long)]
    pub name: Option<String>,
    /// Host configuration to take the policy, grants and limits from.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Grant policy, overriding the configuration's.
    #[arg(long, value_enum)]
    pub policy: Option<PolicyArg>,
}

/// `--policy` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PolicyArg {
    /// Only what the manifest and the configuration grant.
    Deny,
    /// Also what the plugin asks for in `describe`.
    TrustDescribe,
}

/// `switchyard check` options.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The plugin, and what decides its name and grants. The file may be a registry
    /// reference (oci://...), pulled into a temporary folder first.
    #[command(flatten)]
    pub plugin: PluginArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// How to reach the registry, when the plugin is a reference.
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// How the registry commands reach a registry. Registries on this machine are spoken to
/// over plain HTTP; others over HTTPS. Without credentials here, those of the Docker
/// configuration file (`~/.docker/config.json`, or `$DOCKER_CONFIG`) are used.
#[derive(Debug, Args)]
pub struct RegistryArgs {
    /// Registry user name.
    #[arg(long, env = "SWITCHYARD_REGISTRY_USERNAME", requires = "password")]
    pub username: Option<String>,
    /// Registry password or token.
    #[arg(long, env = "SWITCHYARD_REGISTRY_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// Speak plain HTTP to this registry although it is not on this machine.
    #[arg(long)]
    pub insecure: bool,
}

impl RegistryArgs {
    fn access(&self, max_wasm_mib: u64) -> crate::oci::commands::Access {
        crate::oci::commands::Access {
            credentials: match (&self.username, &self.password) {
                (Some(username), Some(password)) => Some(crate::oci::Credentials {
                    username: username.clone(),
                    password: password.clone(),
                }),
                _ => None,
            },
            insecure: self.insecure,
            max_wasm_bytes: max_wasm_mib << 20,
        }
    }
}

/// `switchyard push` options.
#[derive(Debug, Args)]
pub struct PushArgs {
    /// The plugin component.
    pub file: PathBuf,
    /// Where to push it: oci://REGISTRY/REPOSITORY:TAG.
    pub reference: String,
    /// Its manifest (default: NAME.toml beside the file, if there is one).
    #[arg(long)]
    pub manifest: Option<PathBuf>,
    /// How to reach the registry.
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// `switchyard pull` options.
#[derive(Debug, Args)]
pub struct PullArgs {
    /// What to pull: oci://REGISTRY/REPOSITORY:TAG or oci://REGISTRY/REPOSITORY@sha256:DIGEST.
    pub reference: String,
    /// The plugins folder to put it in.
    #[arg(long)]
    pub to: PathBuf,
    /// Its name there (default: the repository's last segment).
    #[arg(long)]
    pub name: Option<String>,
    /// How to reach the registry.
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// `switchyard test` options.
#[derive(Debug, Args)]
pub struct TestArgs {
    /// The plugin, and what decides its name and grants.
    #[command(flatten)]
    pub plugin: PluginArgs,
    /// Input messages, one JSON object per line: {"channel": ..., "payload": ...} (or
    /// "payload_base64"); {"set": \[keys\]}; {"reply": {"output": ..., "status": ...}}.
    #[arg(long, short)]
    pub input: PathBuf,
    /// Print the effects as JSON lines (the format --expect reads).
    #[arg(long)]
    pub json: bool,
    /// Expected effects (JSON lines): exit 1, showing the first difference, unless the
    /// effects are exactly these.
    #[arg(long)]
    pub expect: Option<PathBuf>,
}

/// `switchyard new` options.
#[derive(Debug, Args)]
pub struct NewArgs {
    /// The plugin's name (lowercase letters, digits and dashes); also the folder created.
    pub name: String,
    /// The language.
    #[arg(long, value_enum)]
    pub lang: crate::scaffold::Lang,
    /// Where to create the folder (default: the current folder).
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
}

/// A file that failed `switchyard test --expect`.
#[derive(Debug, thiserror::Error)]
#[error("effects differ from {file}: {difference}")]
pub struct EffectsDiffer {
    file: String,
    difference: String,
}

/// `switchyard status` options.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The host's admin address.
    #[arg(long, default_value = crate::config::DEFAULT_ADMIN_ADDR)]
    pub admin: SocketAddr,
    /// The Redis the host uses (default: from the configuration and the environment).
    #[arg(long)]
    pub redis: Option<String>,
    /// Configuration file to take the Redis URL from.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Seconds between the two samples rates are computed from.
    #[arg(long, default_value_t = 1.0)]
    pub interval: f64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `switchyard config ...`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the configuration (file, environment, flags) and print the effective
    /// settings, secrets masked. Exit status 2 when it is unusable.
    Check(RunArgs),
}

/// `switchyard run` options; flags override the configuration file.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Configuration file (TOML).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Redis URL, e.g. redis://127.0.0.1:6379 (overrides redis.url).
    #[arg(long)]
    pub redis: Option<String>,
    /// Plugins folder (overrides plugins.dir).
    #[arg(long)]
    pub plugins: Option<PathBuf>,
    /// Admin HTTP address (overrides admin.listen).
    #[arg(long)]
    pub admin: Option<SocketAddr>,
    /// Browser gateway address (overrides gateway.listen; the gateway is off without it).
    #[arg(long)]
    pub gateway: Option<SocketAddr>,
}

/// Log output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

impl RunArgs {
    /// The configuration: the file (or defaults), then the flags. Beyond the configuration's
    /// own checks, the plugins folder must exist: a host watching nothing is a mistake, and
    /// `config check` should say so before a rollout does.
    pub fn resolve(&self) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        let mut config = Config::load(self.config.as_deref(), &env)?;
        if let Some(url) = &self.redis {
            config.redis.url = RedisUrl::new(url.clone());
        }
        if let Some(dir) = &self.plugins {
            config.plugins.dir = dir.clone();
        }
        if let Some(addr) = self.admin {
            config.admin.listen = addr;
        }
        if let Some(addr) = self.gateway {
            config.gateway.listen = Some(addr);
        }
        let mut problems = match config.validate("command line") {
            Ok(()) => Vec::new(),
            Err(error) => error.problems,
        };
        if !config.plugins.dir.is_dir() {
            problems.push(format!(
                "{}: plugins.dir {} is not a folder (create it, or pass --plugins DIR)",
                self.plugins_dir_origin(&env),
                config.plugins.dir.display()
            ));
        }
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError { problems })
        }
    }

    /// Where `plugins.dir` came from, for error messages: the flag wins over the environment,
    /// which wins over the file.
    fn plugins_dir_origin(&self, env: &[(String, String)]) -> String {
        const ENV_KEY: &str = "SWITCHYARD_PLUGINS_DIR";
        if self.plugins.is_some() {
            "--plugins".to_owned()
        } else if env.iter().any(|(key, _)| key == ENV_KEY) {
            ENV_KEY.to_owned()
        } else if let Some(file) = &self.config {
            file.display().to_string()
        } else {
            "default".to_owned()
        }
    }
}

/// Runs the command and returns the process exit status.
pub fn main(cli: Cli) -> ExitCode {
    // The demo's output is the story it prints; the host's own logs would bury it.
    let default_level = match cli.command {
        Command::Run(_) => "info",
        Command::Demo(_)
        | Command::Config(_)
        | Command::Status(_)
        | Command::New(_)
        | Command::Push(_)
        | Command::Pull(_)
        | Command::Gateway(_) => "warn",
        // A failing message is an effect these report; the log would only repeat it.
        Command::Check(_) | Command::Test(_) => "error",
    };
    init_logging(cli.log_format, cli.log_level.as_deref(), default_level);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("switchyard: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Whether `run` left work behind: a stop whose deadline passed, or a second signal.
    let mut abandoned = false;
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => {
                let stopped = run(args).await;
                abandoned = match &stopped {
                    Ok(stopped) => *stopped != Stopped::Drained,
                    Err(error) => error.is::<Interrupted>(),
                };
                stopped.map(|_| ())
            }
            Command::Demo(args) => crate::demo::run(&mut std::io::stdout(), args.gateway).await,
            Command::Status(args) => status(args).await,
            Command::Check(args) => check(args).await,
            Command::Push(args) => push(args).await,
            Command::Pull(args) => pull(args).await,
            Command::Test(args) => test(args).await,
            Command::New(args) => {
                let folder = crate::scaffold::create(&args.name, args.lang, &args.dir)?;
                println!(
                    "created {}; see its README.md to build and test it",
                    folder.display()
                );
                Ok(())
            }
            Command::Gateway(GatewayCommand::Token(args)) => {
                println!("{}", gateway_token(&args)?);
                Ok(())
            }
            Command::Config(ConfigCommand::Check(args)) => {
                let config = args.resolve()?;
                print!("{}", effective_settings(&config));
                Ok(())
            }
        }
    });
    let code = match result {
        Ok(()) => 0,
        Err(error) => {
            eprintln!("switchyard: {error:#}");
            if error.downcast_ref::<ConfigError>().is_some()
                || error.downcast_ref::<ListenError>().is_some()
            {
                EXIT_CONFIG
            } else if error.downcast_ref::<Interrupted>().is_some() {
                EXIT_INTERRUPTED
            } else {
                1
            }
        }
    };
    if abandoned {
        // Worker threads may be inside plugin calls that wait on the runtime. Ending the
        // process here, with the runtime still up, is what makes the exit prompt: shutting
        // the runtime down first would wait for its blocking tasks (the join of those very
        // workers), or pull it from under them mid-call. The log is written unbuffered, and
        // `exit` flushes stdout.
        std::process::exit(i32::from(code));
    }
    // Nothing should be left running; if something is, it does not get to hold the exit.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_GRACE);
    ExitCode::from(code)
}

/// `switchyard gateway token`: a token signed with the configuration's secret.
pub fn gateway_token(args: &TokenArgs) -> anyhow::Result<String> {
    let env: Vec<(String, String)> = std::env::vars().collect();
    let config = Config::load(args.config.as_deref(), &env)?;
    let secret =
        config.gateway.hmac_secret.as_deref().ok_or_else(|| {
            anyhow::anyhow!("gateway.hmac_secret is not set: nothing to sign with")
        })?;
    let secret = crate::config::expand_env(secret)
        .map_err(|e| anyhow::anyhow!("gateway.hmac_secret: {e}"))?;
    Ok(crate::gateway::auth::sign(
        secret.as_bytes(),
        &crate::gateway::auth::Claims {
            sub: args.sub.clone(),
            exp: crate::gateway::auth::now_secs() + args.ttl,
            read: args.read.clone(),
            write: args.write.clone(),
        },
    ))
}

/// `switchyard run`: starts the host and runs it until SIGINT or SIGTERM, then drains it
/// until `plugins.drain_ms` has passed ([`Stopped::DeadlinePassed`]: the caller must not wait
/// for what is left), or until a second signal ([`Interrupted`]).
pub async fn run(args: RunArgs) -> anyhow::Result<Stopped> {
    let config = args.resolve()?;
    // Listening before starting: a signal that arrives while plugins compile is kept, and
    // the stop begins as soon as the host is up.
    let mut signals = StopSignals::listen();
    tracing::info!(
        redis = %config.redis.url,
        plugins = %config.plugins.dir.display(),
        admin = %config.admin.listen,
        "starting"
    );
    let start = Host::start(&config, Broker::Redis(config.redis.clone()), true, None);
    tokio::pin!(start);
    let mut signalled = false;
    let host = loop {
        tokio::select! {
            host = &mut start => break host?,
            () = signals.next() => {
                if signalled {
                    return Err(Interrupted.into());
                }
                signalled = true;
                tracing::info!("stop requested while starting: stopping once started (a second signal stops at once)");
            }
        }
    };
    if !signalled {
        signals.next().await;
    }
    let drain = Duration::from_millis(config.plugins.drain_ms);
    tracing::info!(
        ?drain,
        "stopping: draining plugin queues (a second signal stops at once)"
    );
    let backlog = host.backlog();
    tokio::select! {
        stopped = host.stop_by(tokio::time::Instant::now() + drain) => {
            // Past the deadline `stop_by` has said how much was left; the stop is still the
            // one the operator asked for, so it is not an error.
            if stopped == Stopped::Drained {
                tracing::info!("stopped: every queue drained");
            }
            Ok(stopped)
        }
        () = signals.next() => {
            let unhandled = backlog.unhandled();
            tracing::warn!(unhandled, "second stop signal: exiting at once with {unhandled} queued messages unhandled");
            Err(Interrupted.into())
        }
    }
}

/// The effective configuration as TOML-like text, with passwords and header values masked.
pub fn effective_settings(config: &Config) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let p = &config.plugins;
    let _ = writeln!(out, "[redis]\nurl = {:?}", config.redis.url.masked());
    for (key, path) in [
        ("ca_file", &config.redis.ca_file),
        ("cert_file", &config.redis.cert_file),
        ("key_file", &config.redis.key_file),
    ] {
        if let Some(path) = path {
            let _ = writeln!(out, "{key} = {:?}", path.display().to_string());
        }
    }
    if let Some(seeds) = config.redis.cluster_seeds() {
        let masked: Vec<String> = seeds
            .into_iter()
            .map(|seed| RedisUrl::new(seed).masked())
            .collect();
        let _ = writeln!(
            out,
            "cluster = true
# seed nodes: {}",
            masked.join(", ")
        );
    }
    if config.redis.set_keyspace_events {
        out.push_str("set_keyspace_events = true\n");
    }
    if !config.redis.sharded_channels.is_empty() {
        let _ = writeln!(
            out,
            "sharded_channels = {:?}",
            config.redis.sharded_channels
        );
    }
    out.push('\n');
    let _ = writeln!(
        out,
        "[plugins]\ndir = {:?}\npolicy = {:?}\nqueue_bytes = {}\nqueue_bytes_total = {}{}\n\
         {}when_full = {:?}\ndeadline_ms = {}\ndescribe_deadline_ms = {}\nmemory_mib = {}\n\
         settle_ms = {}\nbreaker_failures = {}\n\
         breaker_window = {}\nbreaker_backoff_ms = {}\nmax_payload_bytes = {}\n\
         max_wasm_mib = {}\ndrain_ms = {}",
        p.dir.display(),
        p.policy,
        p.queue_bytes,
        config.queue_bytes_total(),
        if p.queue_bytes_total.is_none() {
            "  # derived: a quarter of the cgroup's memory limit, else 1 GiB"
        } else {
            ""
        },
        p.queue_capacity
            .map_or_else(String::new, |count| format!("queue_capacity = {count}\n")),
        p.when_full,
        p.deadline_ms,
        p.describe_deadline_ms,
        p.memory_mib,
        p.settle_ms,
        p.breaker_failures,
        p.breaker_window,
        p.breaker_backoff_ms,
        p.max_payload_bytes,
        p.max_wasm_mib,
        p.drain_ms
    );
    if let Some(dir) = &p.compile_cache {
        let _ = writeln!(out, "compile_cache = {:?}", dir.display().to_string());
    }
    out.push('\n');
    let _ = writeln!(out, "[admin]\nlisten = \"{}\"\n", config.admin.listen);
    let gw = &config.gateway;
    match gw.listen {
        None => {
            let _ = writeln!(out, "[gateway]\n# off (no listen address)\n");
        }
        Some(listen) => {
            let _ = writeln!(
                out,
                "[gateway]\nlisten = \"{listen}\"\nallowed_origins = {:?}\npublic_origins = {:?}\n\
                 hmac_secret = {}\nclient_buffer = {}\nclient_buffer_bytes = {}\n\
                 buffer_bytes_total = {}\nmax_payload_bytes = {}\nslow_clients = {:?}\n\
                 max_message_bytes = {}\nmax_messages_per_sec = {}\nmax_connections = {}\n\
                 max_pending_connections = {}\nrequest_timeout_ms = {}\n\
                 max_subscriptions_per_connection = {}\nmax_subscriptions = {}\npages = {}",
                gw.allowed_origins,
                gw.public_origins,
                if gw.hmac_secret.is_some() {
                    "\"***\""
                } else {
                    "\"\" # signed tokens off"
                },
                gw.client_buffer,
                gw.client_buffer_bytes,
                gw.buffer_bytes_total,
                gw.max_payload_bytes,
                gw.slow_clients,
                gw.max_message_bytes,
                gw.max_messages_per_sec,
                gw.max_connections,
                gw.max_pending_connections,
                gw.request_timeout_ms,
                gw.max_subscriptions_per_connection,
                gw.max_subscriptions,
                gw.pages,
            );
            for (name, token) in &gw.tokens {
                let _ = writeln!(
                    out,
                    "[gateway.tokens.{name}]\ntoken = \"***\"\nread = {:?}\nwrite = {:?}",
                    token.read, token.write
                );
            }
            out.push('\n');
        }
    }
    let st = &config.streams;
    let _ = writeln!(
        out,
        "[streams]\nconsumer = {:?}\nbatch = {}\nblock_ms = {}\nmax_deliveries = {}\n\
         retry_backoff_ms = {}\nclaim_idle_ms = {}\nstart = {:?}\n",
        st.consumer
            .clone()
            .unwrap_or_else(crate::config::default_consumer),
        st.batch,
        st.block_ms,
        st.max_deliveries,
        st.retry_backoff_ms,
        st.claim_idle_ms,
        match st.start {
            crate::config::StartFrom::New => "new",
            crate::config::StartFrom::All => "all",
        }
    );
    let _ = writeln!(
        out,
        "[invalidation]\nbroadcast = {:?}\n",
        config.invalidation.broadcast
    );
    let _ = writeln!(
        out,
        "[effects]\noutgoing_bytes = {}\n",
        config.effects.outgoing_bytes
    );
    for (name, output) in &config.outputs {
        let _ = writeln!(out, "[outputs.{name}]");
        let _ = match output {
            crate::config::OutputConfig::Http {
                url,
                method,
                headers,
                timeout_ms,
                retries,
                backoff_ms,
                max_reply_bytes,
            } => writeln!(
                out,
                "kind = \"http\"\nurl = {:?}\nmethod = {method:?}\nheaders = {:?}\n\
                 timeout_ms = {timeout_ms}\nretries = {retries}\nbackoff_ms = {backoff_ms}\n\
                 max_reply_bytes = {max_reply_bytes}\n",
                RedisUrl::new(url.clone()).masked(),
                headers
                    .keys()
                    .map(|h| format!("{h} = ***"))
                    .collect::<Vec<_>>()
            ),
            crate::config::OutputConfig::File { path } => {
                writeln!(out, "kind = \"file\"\npath = {path:?}\n")
            }
            crate::config::OutputConfig::Stdout {} => writeln!(out, "kind = \"stdout\"\n"),
            crate::config::OutputConfig::Redis { url, channel } => writeln!(
                out,
                "kind = \"redis\"\nurl = {:?}\nchannel = {channel:?}\n",
                RedisUrl::new(url.clone()).masked()
            ),
        };
    }
    for (plugin, grants) in &config.grants {
        let _ = writeln!(
            out,
            "[grants.{plugin}]\npublish = {:?}\ninvalidate = {:?}\noutputs = {:?}\n",
            grants.publish, grants.invalidate, grants.outputs
        );
    }
    out
}

impl PluginArgs {
    fn target(&self) -> anyhow::Result<crate::offline::Target> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        let mut config = Config::load(self.config.as_deref(), &env)?;
        match self.policy {
            Some(PolicyArg::Deny) => config.plugins.policy = Policy::Deny,
            Some(PolicyArg::TrustDescribe) => config.plugins.policy = Policy::TrustDescribe,
            None => {}
        }
        Ok(crate::offline::Target {
            wasm: self.file.clone(),
            name: self.name.clone(),
            manifest: self.manifest.clone(),
            config,
        })
    }
}

/// `switchyard check`.
async fn check(args: CheckArgs) -> anyhow::Result<()> {
    let mut target = args.plugin.target()?;
    // A reference is pulled into a folder of its own, and checked there as a file.
    let _pulled_into = match target
        .wasm
        .to_str()
        .filter(|f| f.starts_with(crate::oci::reference::SCHEME))
    {
        Some(reference) => {
            let reference: crate::oci::PluginRef = reference.parse()?;
            let dir = tempfile::tempdir()?;
            let access = args.registry.access(target.config.plugins.max_wasm_mib);
            let pulled = crate::oci::commands::pull(
                &reference,
                dir.path(),
                args.plugin.name.as_deref(),
                &access,
            )
            .await?;
            target.wasm = pulled.wasm;
            if target.manifest.is_none() {
                target.manifest = pulled.manifest;
            }
            Some(dir)
        }
        None => None,
    };
    let report = crate::offline::check(&target).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", crate::offline::render_check(&report));
    }
    Ok(())
}

/// `switchyard push`.
async fn push(args: PushArgs) -> anyhow::Result<()> {
    let reference: crate::oci::PluginRef = args.reference.parse()?;
    let access = args.registry.access(crate::config::MAX_WASM_MIB);
    let (digest, with_manifest) =
        crate::oci::commands::push(&args.file, args.manifest.as_deref(), &reference, &access)
            .await?;
    println!(
        "pushed {} {}as {reference}\npinned: {}",
        args.file.display(),
        if with_manifest {
            "with its manifest "
        } else {
            ""
        },
        reference.at(&digest)
    );
    Ok(())
}

/// `switchyard pull`.
async fn pull(args: PullArgs) -> anyhow::Result<()> {
    let reference: crate::oci::PluginRef = args.reference.parse()?;
    let access = args.registry.access(crate::config::MAX_WASM_MIB);
    let pulled =
        crate::oci::commands::pull(&reference, &args.to, args.name.as_deref(), &access).await?;
    println!(
        "pulled {reference} ({}) into {}{}",
        pulled.digest,
        pulled.wasm.display(),
        pulled
            .manifest
            .map(|m| format!(" and {}", m.display()))
            .unwrap_or_default()
    );
    Ok(())
}

/// `switchyard test`.
async fn test(args: TestArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let target = args.plugin.target()?;
    let origin = args.input.display().to_string();
    let text =
        std::fs::read_to_string(&args.input).with_context(|| format!("cannot read {origin}"))?;
    let inputs = crate::offline::parse_inputs(&text, &origin)?;
    let effects = crate::offline::test(&target, &inputs).await?;
    for effect in &effects {
        if args.json {
            println!("{effect}");
        } else {
            println!("{}", crate::offline::render_effect(effect));
        }
    }
    if let Some(expected) = &args.expect {
        let origin = expected.display().to_string();
        let text =
            std::fs::read_to_string(expected).with_context(|| format!("cannot read {origin}"))?;
        let expected = crate::offline::parse_effects(&text, &origin)?;
        crate::offline::compare(&effects, &expected).map_err(|difference| EffectsDiffer {
            file: origin,
            difference,
        })?;
        eprintln!("switchyard: all {} effects as expected", effects.len());
    }
    Ok(())
}

/// `switchyard status`.
async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let env: Vec<(String, String)> = std::env::vars().collect();
    let mut redis = Config::load(args.config.as_deref(), &env)?.redis;
    if let Some(url) = &args.redis {
        redis.url = RedisUrl::new(url.clone());
    }
    let interval = Duration::from_secs_f64(args.interval.clamp(0.0, 60.0));
    let status = crate::status::gather(args.admin, &redis, interval).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", crate::status::render(&status));
    }
    Ok(())
}

/// SIGINT and SIGTERM, listened to for the whole run: a listener created only after the first
/// signal would miss a second one sent right after it.
struct StopSignals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
}

impl StopSignals {
    fn listen() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let listen = |kind: SignalKind, name: &str| match signal(kind) {
                Ok(signal) => Some(signal),
                Err(e) => {
                    tracing::warn!(
                        "cannot listen for {name} ({e}); it will not stop the host gracefully"
                    );
                    None
                }
            };
            Self {
                term: listen(SignalKind::terminate(), "SIGTERM"),
                int: listen(SignalKind::interrupt(), "SIGINT"),
            }
        }
        #[cfg(not(unix))]
        {
            Self {}
        }
    }

    /// Resolves on the next SIGINT or SIGTERM.
    async fn next(&mut self) {
        #[cfg(unix)]
        {
            async fn recv(signal: &mut Option<tokio::signal::unix::Signal>) {
                match signal {
                    Some(signal) => {
                        if signal.recv().await.is_none() {
                            std::future::pending::<()>().await;
                        }
                    }
                    None => std::future::pending().await,
                }
            }
            tokio::select! {
                () = recv(&mut self.term) => {}
                () = recv(&mut self.int) => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn init_logging(format: LogFormat, level: Option<&str>, default_level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(level) => EnvFilter::new(level),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)),
    };
    // Colours only for a person at a terminal: escape codes in a collected log are noise.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    let _ = match format {
        // Every field and message is escaped: plugins choose much of what is logged (their
        // lines, error texts, names), and a newline or escape sequence of theirs must not
        // forge a line or reach the terminal. JSON escapes by itself.
        LogFormat::Human => builder
            .fmt_fields(crate::text::escaping_fields())
            .try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
