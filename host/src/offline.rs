//! Tools for plugin authors that need no Redis: `switchyard check` and `switchyard test`.
//!
//! Both run the real host (loader, grants, workers) on the embedded broker with one plugin in
//! a private folder, so what they report is what a running host would do. Outputs are
//! captured, never called: every output name exists, and grants alone decide what the plugin
//! may call.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::app::{Broker, Host};
use crate::component::{Interface, interface};
use crate::config::{Config, GrantsConfig, Policy};
use crate::effects::outputs::{Captured, Outputs, Reply};
use crate::plugins::PluginReport;
use crate::plugins::loader::WORLD;
use crate::source::embedded::{EmbeddedBroker, Published};
use crate::worker::worlds::World;

/// How long one input may keep the plugin busy before `test` gives up on it.
const INPUT_TIMEOUT: Duration = Duration::from_secs(30);

/// A plugin file and what decides its grants.
#[derive(Debug, Clone)]
pub struct Target {
    /// The `.wasm` file.
    pub wasm: PathBuf,
    /// The plugin's name in the host; by default the file name without `.wasm`.
    pub name: Option<String>,
    /// The manifest; by default `NAME.toml` beside the file, if there is one.
    pub manifest: Option<PathBuf>,
    /// The host configuration (policy, grants by plugin name, limits).
    pub config: Config,
}

impl Target {
    fn name(&self) -> anyhow::Result<String> {
        match &self.name {
            Some(name) => Ok(name.clone()),
            None => self
                .wasm
                .file_stem()
                .and_then(|stem| stem.to_str())
                .map(str::to_owned)
                .with_context(|| format!("{} has no usable file name", self.wasm.display())),
        }
    }

    fn manifest(&self) -> Option<PathBuf> {
        self.manifest.clone().or_else(|| {
            let beside = self.wasm.with_extension("toml");
            beside.is_file().then_some(beside)
        })
    }
}

/// A file that is not a plugin this host can run, and why.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {reason}")]
pub struct NotAPlugin {
    /// The file.
    pub file: String,
    /// Why not.
    pub reason: String,
}

/// What `switchyard check` found.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    /// The file.
    pub file: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// The world it targets.
    pub world: &'static str,
    /// The plugin's name in the host.
    pub name: String,
    /// The manifest used, if any.
    pub manifest: Option<PathBuf>,
    /// What `describe` answered.
    pub describe: Value,
    /// The component's imports (interfaces it needs).
    pub imports: Vec<String>,
    /// The component's exports.
    pub exports: Vec<String>,
    /// The policy grants were decided under.
    pub policy: Policy,
    /// What the host would grant.
    pub grants: GrantsConfig,
    /// What `describe` asks for that would not be granted.
    pub not_granted: GrantsConfig,
    /// The names of its settings.
    pub settings: Vec<String>,
}

/// Checks that `target` is a plugin this host can run and reports what it is.
pub async fn check(target: &Target) -> anyhow::Result<CheckReport> {
    let bytes = std::fs::read(&target.wasm)
        .with_context(|| format!("cannot read {}", target.wasm.display()))?;
    let not_a_plugin = |reason: String| NotAPlugin {
        file: target.wasm.display().to_string(),
        reason,
    };
    let (imports, exports) = checked_interface(&bytes).map_err(not_a_plugin)?;
    let sandbox = Sandbox::start(target).await?;
    let report = sandbox.report();
    let result = match (&report.version, report.load_error()) {
        (Some(version), _) => {
            let requested = &version.requested;
            let granted = &version.grants;
            Ok(CheckReport {
                file: target.wasm.clone(),
                size: bytes.len() as u64,
                world: match World::of_exports(&exports) {
                    Ok(world) => world.contract().unwrap_or(world.label()),
                    Err(_) => WORLD,
                },
                name: report.name.to_string(),
                manifest: target.manifest(),
                describe: json!({
                    "name": version.declared_name,
                    "version": version.version,
                    "subscriptions": version.subscriptions,
                    "keys": version.keys,
                    "tracking": version.tracking,
                    "requested": requested,
                }),
                imports,
                exports,
                policy: target.config.plugins.policy,
                grants: granted.clone(),
                not_granted: GrantsConfig {
                    publish: missing(&requested.publish, &granted.publish),
                    invalidate: missing(&requested.invalidate, &granted.invalidate),
                    outputs: missing(&requested.outputs, &granted.outputs),
                },
                settings: version.settings.clone(),
            })
        }
        (None, Some((_, message))) => Err(not_a_plugin(message.to_owned()).into()),
        (None, None) => Err(not_a_plugin("the host did not load it".to_owned()).into()),
    };
    sandbox.stop().await?;
    result
}

fn missing(requested: &[String], granted: &[String]) -> Vec<String> {
    requested
        .iter()
        .filter(|r| !granted.contains(r))
        .cloned()
        .collect()
}

/// The top-level import and export names of a component, after checking that it exports
/// the handler of a world this host runs (for Switchyard's own, in a version it runs).
fn checked_interface(bytes: &[u8]) -> Result<(Vec<String>, Vec<String>), String> {
    let Interface { imports, exports } = interface(bytes)?;
    World::of_exports(&exports).map_err(|why| format!("not a plugin: {why}"))?;
    Ok((imports, exports))
}

/// One line of a `switchyard test` input file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputLine {
    /// Publish a message on this channel.
    #[serde(default)]
    pub channel: Option<String>,
    /// Its payload, as text.
    #[serde(default)]
    pub payload: Option<String>,
    /// Its payload, as base64 (for bytes that are not UTF-8).
    #[serde(default)]
    pub payload_base64: Option<String>,
    /// Set these keys in the broker's key space (for invalidation).
    #[serde(default)]
    pub set: Vec<String>,
    /// From now on, make output `output` answer this status (and `body`).
    #[serde(default)]
    pub reply: Option<ReplyLine>,
}

/// What a captured output answers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplyLine {
    /// The output.
    pub output: String,
    /// The status it answers (0 for none).
    #[serde(default)]
    pub status: u16,
    /// The body it answers.
    #[serde(default)]
    pub body: String,
}

/// Parses an input file: one JSON object per line; blank lines and lines starting with `#`
/// are skipped. Errors name the line.
pub fn parse_inputs(text: &str, origin: &str) -> anyhow::Result<Vec<(usize, InputLine)>> {
    let mut inputs = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let input: InputLine =
            serde_json::from_str(line).with_context(|| format!("{origin}:{number}"))?;
        let has_message = input.channel.is_some();
        if input.payload.is_some() && input.payload_base64.is_some() {
            bail!("{origin}:{number}: give payload or payload_base64, not both");
        }
        if !has_message && (input.payload.is_some() || input.payload_base64.is_some()) {
            bail!("{origin}:{number}: a payload needs a channel");
        }
        if !has_message && input.set.is_empty() && input.reply.is_none() {
            bail!("{origin}:{number}: nothing to do (expected channel, set or reply)");
        }
        if let Some(encoded) = &input.payload_base64 {
            BASE64
                .decode(encoded)
                .with_context(|| format!("{origin}:{number}: payload_base64"))?;
        }
        inputs.push((number, input));
    }
    Ok(inputs)
}

/// Runs `target` on the embedded broker, feeding `inputs` one message at a time, and returns
/// every effect as JSON values in a stable order: for each message, what the plugin
/// published, then the keys it invalidated, then the outputs it called (each kind in call
/// order), then the outcome of `handle`.
pub async fn test(target: &Target, inputs: &[(usize, InputLine)]) -> anyhow::Result<Vec<Value>> {
    let mut sandbox = Sandbox::start(target).await?;
    let report = sandbox.report();
    if report.version.is_none() {
        let reason = report
            .load_error()
            .map_or("the host did not load it", |(_, message)| message)
            .to_owned();
        sandbox.stop().await?;
        return Err(NotAPlugin {
            file: target.wasm.display().to_string(),
            reason,
        }
        .into());
    }
    let mut effects = Vec::new();
    for (line, input) in inputs {
        for key in &input.set {
            sandbox.broker.set(key.clone(), "set by the input file");
        }
        if let Some(reply) = &input.reply {
            sandbox.outputs.set_capture_reply(
                &reply.output,
                Reply {
                    status: reply.status,
                    body: reply.body.clone().into_bytes(),
                },
            );
        }
        let Some(channel) = &input.channel else {
            continue;
        };
        let payload = match (&input.payload, &input.payload_base64) {
            (_, Some(encoded)) => Bytes::from(BASE64.decode(encoded)?),
            (Some(text), None) => Bytes::from(text.clone().into_bytes()),
            (None, None) => Bytes::new(),
        };
        let before = sandbox.counters();
        sandbox
            .broker
            .publish(Bytes::from(channel.clone().into_bytes()), payload);
        sandbox.wait_idle().await?;
        effects.extend(sandbox.effects_of(*line, before));
    }
    sandbox.stop().await?;
    Ok(effects)
}

/// Feeds every message at once and returns how long the plugin took to finish them all,
/// from the first publish to an empty queue. For benchmarks: the effects are not kept, and
/// the queue must hold all the messages (`plugins.queue_bytes`) or some are shed.
pub async fn time_messages(
    target: &Target,
    messages: &[(Bytes, Bytes)],
) -> anyhow::Result<Duration> {
    let sandbox = Sandbox::start(target).await?;
    if let Some((_, message)) = sandbox.report().load_error() {
        let reason = message.to_owned();
        sandbox.stop().await?;
        bail!("{}: {reason}", target.wasm.display());
    }
    let started = Instant::now();
    for (channel, payload) in messages {
        sandbox.broker.publish(channel.clone(), payload.clone());
    }
    sandbox.wait_idle().await?;
    let elapsed = started.elapsed();
    let shed = sandbox.counters().shed;
    sandbox.stop().await?;
    if shed > 0 {
        bail!("{shed} messages were shed: raise plugins.queue_bytes");
    }
    Ok(elapsed)
}

/// Compares `actual` effects with `expected` ones; `Err` describes the first difference.
/// Payloads that are JSON text compare as JSON values: key order and spacing do not matter,
/// since no JSON reader sees them.
pub fn compare(actual: &[Value], expected: &[Value]) -> Result<(), String> {
    for (index, (got, want)) in actual.iter().zip(expected).enumerate() {
        if comparable(got) != comparable(want) {
            return Err(format!(
                "effect {} differs:\n  expected {want}\n  got      {got}",
                index + 1
            ));
        }
    }
    match actual.len().cmp(&expected.len()) {
        std::cmp::Ordering::Equal => Ok(()),
        std::cmp::Ordering::Less => Err(format!(
            "{} expected effects missing, starting with {}",
            expected.len() - actual.len(),
            expected[actual.len()]
        )),
        std::cmp::Ordering::Greater => Err(format!(
            "{} unexpected effects, starting with {}",
            actual.len() - expected.len(),
            actual[expected.len()]
        )),
    }
}

/// `effect` with every payload that is JSON text replaced by its value.
fn comparable(effect: &Value) -> Value {
    let mut effect = effect.clone();
    for kind in ["publish", "output"] {
        if let Some(Value::String(text)) = effect.pointer(&format!("/{kind}/payload"))
            && let Ok(value) = serde_json::from_str::<Value>(text)
        {
            effect[kind]["payload"] = json!({ "json": value });
        }
    }
    effect
}

/// A payload as JSON: `{"payload": text}` when it is UTF-8, `{"payload_base64": ...}`
/// otherwise.
fn payload_fields(object: &mut serde_json::Map<String, Value>, payload: &[u8]) {
    match std::str::from_utf8(payload) {
        Ok(text) => object.insert("payload".to_owned(), json!(text)),
        Err(_) => object.insert("payload_base64".to_owned(), json!(BASE64.encode(payload))),
    };
}

/// One plugin on the embedded broker, everything it does captured.
struct Sandbox {
    host: Option<Host>,
    name: String,
    broker: Arc<EmbeddedBroker>,
    outputs: Arc<Outputs>,
    published: mpsc::UnboundedReceiver<Published>,
    unlinked: mpsc::UnboundedReceiver<Vec<String>>,
    calls: mpsc::UnboundedReceiver<Captured>,
    /// Holds the plugin's private folder until the sandbox is gone.
    _folder: tempfile::TempDir,
}

/// A plugin's outcome counters.
#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    handled: u64,
    failed: u64,
    shed: u64,
}

impl Sandbox {
    async fn start(target: &Target) -> anyhow::Result<Self> {
        let name = target.name()?;
        let folder = tempfile::Builder::new()
            .prefix("switchyard-offline-")
            .tempdir()
            .context("cannot create a folder for the plugin")?;
        let wasm = folder.path().join(format!("{name}.wasm"));
        std::fs::copy(&target.wasm, &wasm)
            .with_context(|| format!("cannot read {}", target.wasm.display()))?;
        if let Some(manifest) = target.manifest() {
            std::fs::copy(&manifest, folder.path().join(format!("{name}.toml")))
                .with_context(|| format!("cannot read {}", manifest.display()))?;
        }
        let mut config = target.config.clone();
        config.plugins.dir = folder.path().to_owned();
        let broker = EmbeddedBroker::new();
        let published = broker.tap();
        let unlinked = broker.tap_unlinks();
        let (outputs, calls) = Outputs::capture_any();
        let outputs = Arc::new(outputs);
        let host = Host::start(
            &config,
            Broker::Embedded(broker.clone()),
            false,
            Some(outputs.clone()),
        )
        .await?;
        Ok(Self {
            host: Some(host),
            name,
            broker,
            outputs,
            published,
            unlinked,
            calls,
            _folder: folder,
        })
    }

    fn host(&self) -> &Host {
        self.host
            .as_ref()
            .expect("the sandbox's host runs until stop")
    }

    fn report(&self) -> PluginReport {
        let reports = self.host().registry().report();
        reports
            .into_iter()
            .find(|report| report.name.as_str() == self.name)
            .expect("the registry reports every plugin in its folder")
    }

    fn counters(&self) -> Counters {
        self.report()
            .stats
            .map(|stats| Counters {
                handled: stats.handled,
                failed: stats.failed,
                shed: stats.shed,
            })
            .unwrap_or_default()
    }

    async fn wait_idle(&self) -> anyhow::Result<()> {
        let started = Instant::now();
        while !self.host().registry().idle() {
            if started.elapsed() > INPUT_TIMEOUT {
                bail!("the plugin was still busy after {INPUT_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }

    /// What happened since `before`, for the input on `line`.
    fn effects_of(&mut self, line: usize, before: Counters) -> Vec<Value> {
        let mut effects = Vec::new();
        while let Ok(message) = self.published.try_recv() {
            // The input itself comes by the tap too; only the plugin's own messages count.
            if message.from.is_none() {
                continue;
            }
            let mut publish = serde_json::Map::new();
            publish.insert(
                "channel".to_owned(),
                json!(String::from_utf8_lossy(&message.channel)),
            );
            payload_fields(&mut publish, &message.payload);
            effects.push(json!({ "input": line, "publish": publish }));
        }
        while let Ok(keys) = self.unlinked.try_recv() {
            effects.push(json!({ "input": line, "invalidate": keys }));
        }
        while let Ok(call) = self.calls.try_recv() {
            let mut output = serde_json::Map::new();
            output.insert("name".to_owned(), json!(call.output));
            payload_fields(&mut output, &call.payload);
            effects.push(json!({ "input": line, "output": output }));
        }
        let after = self.counters();
        let report = self.report();
        let outcome = if after.failed > before.failed {
            let error = report
                .stats
                .and_then(|stats| stats.last_error)
                .unwrap_or_default();
            json!({ "input": line, "result": "failed", "error": error })
        } else if after.shed > before.shed {
            json!({ "input": line, "result": "shed" })
        } else if after.handled > before.handled {
            json!({ "input": line, "result": "ok" })
        } else {
            json!({ "input": line, "result": "not delivered" })
        };
        effects.push(outcome);
        effects
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        match self.host.take() {
            Some(host) => host.stop(Duration::from_secs(5)).await,
            None => Ok(()),
        }
    }
}

/// `check`'s report as text.
pub fn render_check(report: &CheckReport) -> String {
    use std::fmt::Write as _;
    let list = |items: &[String]| {
        if items.is_empty() {
            "none".to_owned()
        } else {
            items.join(", ")
        }
    };
    let grants = |g: &GrantsConfig| {
        format!(
            "publish [{}], invalidate [{}], outputs [{}]",
            g.publish.join(", "),
            g.invalidate.join(", "),
            g.outputs.join(", ")
        )
    };
    let text = |value: &Value| value.as_str().unwrap_or_default().to_owned();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}: a Switchyard plugin for {} ({} KiB)",
        report.file.display(),
        report.world,
        report.size.div_ceil(1024)
    );
    let _ = writeln!(out, "  plugin name:   {}", report.name);
    if World::of_exports(&report.exports).is_ok_and(World::describes_itself) {
        let _ = writeln!(
            out,
            "  describe:      {} {}",
            text(&report.describe["name"]),
            text(&report.describe["version"])
        );
    } else {
        let _ = writeln!(
            out,
            "  describe:      none in this world; subscriptions come from the manifest"
        );
    }
    let tracked = report.describe["tracking"].as_array().into_iter().flatten();
    let subscriptions: Vec<String> = ["subscriptions", "keys"]
        .into_iter()
        .filter_map(|field| report.describe[field].as_array())
        .flat_map(|items| items.iter().map(text))
        .chain(tracked.map(|prefix| format!("tracking {}", text(prefix))))
        .collect();
    let _ = writeln!(out, "  subscriptions: {}", list(&subscriptions));
    let requested: GrantsConfig =
        serde_json::from_value(report.describe["requested"].clone()).unwrap_or_default();
    let _ = writeln!(out, "  requests:      {}", grants(&requested));
    for (label, names) in [("imports", &report.imports), ("exports", &report.exports)] {
        let _ = writeln!(out, "  {label}:");
        for name in names.iter() {
            let _ = writeln!(out, "    {name}");
        }
    }
    let _ = writeln!(out, "  settings:      {}", list(&report.settings));
    let source = match &report.manifest {
        Some(path) => format!("manifest {}", path.display()),
        None => "no manifest".to_owned(),
    };
    let policy = match report.policy {
        Policy::Deny => "deny",
        Policy::TrustDescribe => "trust-describe",
    };
    let _ = writeln!(
        out,
        "  granted ({source}, policy {policy}): {}",
        grants(&report.grants)
    );
    let not_granted = &report.not_granted;
    if !(not_granted.publish.is_empty()
        && not_granted.invalidate.is_empty()
        && not_granted.outputs.is_empty())
    {
        let _ = writeln!(out, "  requested but NOT granted: {}", grants(not_granted));
    }
    out
}

/// One effect as a line of text.
pub fn render_effect(effect: &Value) -> String {
    let line = &effect["input"];
    let payload = |object: &Value| match (&object["payload"], &object["payload_base64"]) {
        (Value::String(text), _) => text.clone(),
        (_, Value::String(encoded)) => format!("(base64) {encoded}"),
        _ => String::new(),
    };
    if let Some(publish) = effect.get("publish") {
        let channel = publish["channel"].as_str().unwrap_or_default();
        format!("line {line}: publish {channel} {}", payload(publish))
    } else if let Some(keys) = effect.get("invalidate") {
        format!("line {line}: invalidate {keys}")
    } else if let Some(output) = effect.get("output") {
        let name = output["name"].as_str().unwrap_or_default();
        format!("line {line}: output {name} {}", payload(output))
    } else {
        match (effect["result"].as_str(), effect["error"].as_str()) {
            (Some("failed"), Some(error)) => format!("line {line}: FAILED {error}"),
            (Some(result), _) => format!("line {line}: {result}"),
            _ => effect.to_string(),
        }
    }
}

/// Reads an effects file (one JSON value per line, blank lines skipped).
pub fn parse_effects(text: &str, origin: &str) -> anyhow::Result<Vec<Value>> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(index, line)| {
            serde_json::from_str(line).with_context(|| format!("{origin}:{}", index + 1))
        })
        .collect()
}

/// Where `switchyard test` writes.
pub fn write_effects(effects: &[Value], to: &Path) -> anyhow::Result<()> {
    let mut text = String::new();
    for effect in effects {
        text.push_str(&effect.to_string());
        text.push('\n');
    }
    std::fs::write(to, text).with_context(|| format!("cannot write {}", to.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_payloads_compare_as_values_and_other_text_exactly() {
        let effect =
            |payload: &str| json!({"input": 1, "publish": {"channel": "c", "payload": payload}});
        assert!(
            compare(
                &[effect(r#"{"a":1,"b":"x"}"#)],
                &[effect(r#"{ "b": "x", "a": 1 }"#)]
            )
            .is_ok()
        );
        assert!(compare(&[effect(r#"{"a":1}"#)], &[effect(r#"{"a":2}"#)]).is_err());
        assert!(compare(&[effect("not json")], &[effect("not  json")]).is_err());
        let missing = compare(&[], &[effect("x")]).unwrap_err();
        assert!(
            missing.starts_with("1 expected effects missing"),
            "{missing}"
        );
    }

    #[test]
    fn input_lines_are_checked_and_named() {
        let ok = "# a comment\n\n{\"channel\":\"a\",\"payload\":\"x\"}\n{\"set\":[\"k\"]}\n";
        let inputs = parse_inputs(ok, "in.jsonl").unwrap();
        assert_eq!(
            inputs.iter().map(|(line, _)| *line).collect::<Vec<_>>(),
            [3, 4]
        );
        for (bad, why) in [
            ("{\"chanel\":\"a\"}", "in.jsonl:1"),
            ("{\"payload\":\"x\"}", "a payload needs a channel"),
            ("{}", "nothing to do"),
            (
                "{\"channel\":\"a\",\"payload\":\"x\",\"payload_base64\":\"eA==\"}",
                "not both",
            ),
            (
                "{\"channel\":\"a\",\"payload_base64\":\"%%\"}",
                "payload_base64",
            ),
        ] {
            let error = format!("{:#}", parse_inputs(bad, "in.jsonl").unwrap_err());
            assert!(error.contains(why), "{bad}: {error}");
        }
    }
}
