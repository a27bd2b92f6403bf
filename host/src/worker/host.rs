//! The `switchyard:plugin/host` interface: what a plugin may ask of the host.
//!
//! Each call checks the plugin's grants first. Everything a plugin should expect to go wrong
//! (a missing grant, Redis away, a deadline, the loop guard, a payload too large, a full
//! outgoing queue) comes back as a WIT `error` value and is counted; nothing here traps.
//!
//! Names the plugin supplies (channels, keys, outputs) appear in refusals and logs bounded
//! and escaped ([`text`]), and so do its `log` lines, its name and its version.

use std::sync::Arc;
use std::time::Instant;

use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;
use tracing::Level as TraceLevel;

use super::bindings::switchyard::plugin::host::Host;
use super::bindings::switchyard::plugin::types::{self, Error, Level, OutputReply};
use super::state::HostState;

use crate::PluginName;
use crate::effects::loop_guard::{Feedback, LOOP_RATE_PER_SEC};
use crate::effects::{EffectError, Effects};
use crate::stats::PluginStats;
use crate::text::{self, quoted};

/// Longest `log` line kept; the rest is cut, so a plugin cannot flood the host's log with one
/// call.
pub const MAX_LOG_LINE: usize = 4096;
/// `log` lines a plugin may write per second, sustained; the rest are dropped and counted.
pub const LOG_LINES_PER_SEC: f64 = 100.0;
/// `log` lines a plugin may write in a burst.
pub const LOG_BURST: f64 = 200.0;

impl types::Host for HostState {}

impl HostState {
    /// Counts and returns a denial.
    fn deny(&self, why: String) -> Error {
        self.stats.record_denied(&self.plugin.name, &why);
        Error::Denied(why)
    }

    /// What `publish` and `send` check first: the channel is not the host's, the plugin has
    /// a grant for it, and the loop guard lets it through.
    fn check_publish(&self, channel: &str) -> Result<(), Error> {
        let plugin = &self.plugin;
        if self.reply_to.as_deref() == Some(channel) {
            // The answer to the request in hand, on the host's reply channel that named it.
            return Ok(());
        }
        if crate::message::is_reserved(channel.as_bytes()) {
            return Err(self.deny(format!(
                "channel {} is reserved for the host",
                quoted(channel)
            )));
        }
        if !plugin.grants.may_publish(channel.as_bytes()) {
            return Err(self.deny(format!(
                "plugin {} has no publish grant for channel {} (publish grants: {})",
                self.name(),
                quoted(channel),
                list(&plugin.grants.config().publish)
            )));
        }
        self.check_loop(channel.as_bytes(), || {
            format!("channel {}", quoted(channel))
        })
    }

    /// The loop guard: a publish on `channel` that comes back to this plugin (directly or
    /// through others) takes a token, and is refused when none is left. `what` names the
    /// publish in the refusal.
    fn check_loop(&self, channel: &[u8], what: impl FnOnce() -> String) -> Result<(), Error> {
        let plugin = &self.plugin;
        let Some(feedback) =
            plugin
                .loop_guard
                .feedback(&plugin.name, plugin.effects.flows(), channel)
        else {
            return Ok(());
        };
        if plugin.loop_guard.admit() {
            return Ok(());
        }
        let what = what();
        self.stats.record_loop_limited(&plugin.name, &what);
        let how = match feedback {
            Feedback::Itself => format!("feeds plugin {}'s own subscriptions", self.name()),
            Feedback::Through(via) => format!(
                "reaches plugin {}, whose publishes lead back to plugin {}",
                text::escaped(via.as_str()),
                self.name()
            ),
        };
        Err(Error::Denied(format!(
            "loop guard: {what} {how}, and it is over {LOOP_RATE_PER_SEC} such publishes a second"
        )))
    }

    /// What the plugin is told when a `publish` or `send` did not happen; refusals by the
    /// host's own limits are counted.
    pub(in crate::worker) fn refused(&self, error: EffectError) -> Error {
        match &error {
            EffectError::PayloadTooLarge { .. } => {
                self.stats
                    .record_payload_too_large(&self.plugin.name, &error.to_string());
            }
            EffectError::OutgoingFull { .. } => {
                self.stats
                    .record_outgoing_full(&self.plugin.name, &error.to_string());
            }
            _ => {}
        }
        unavailable(error)
    }

    /// The plugin's name as logs and refusals show it.
    fn name(&self) -> std::borrow::Cow<'_, str> {
        text::escaped(self.plugin.name.as_str())
    }
}

impl Host for HostState {
    fn publish(&mut self, channel: String, payload: Vec<u8>) -> Result<u32, Error> {
        self.out_on_channel("publish", channel, payload, Effects::publish)
    }

    fn send(&mut self, channel: String, payload: Vec<u8>) -> Result<(), Error> {
        self.out_on_channel("send", channel, payload, Effects::send)
    }

    fn invalidate(&mut self, keys: Vec<String>) -> Result<u32, Error> {
        let span = self.effect_span(
            "invalidate",
            keys.first().map_or("", String::as_str),
            SpanKind::Internal,
            keys.len(),
        );
        let result = self.invalidate_keys(keys);
        end_effect(span, &result);
        result
    }

    fn call_output(&mut self, name: String, payload: Vec<u8>) -> Result<OutputReply, Error> {
        let span = self.effect_span("call", &name, SpanKind::Client, payload.len());
        let result = self.call_named_output(name, payload, span.as_ref());
        if let (Some(span), Ok(reply)) = (&span, &result) {
            crate::trace::annotate(
                span,
                vec![KeyValue::new(
                    "http.response.status_code",
                    i64::from(reply.status),
                )],
            );
        }
        end_effect(span, &result);
        result
    }

    fn config(&mut self, key: String) -> Option<String> {
        self.plugin.settings.get(&key).map(str::to_owned)
    }

    fn log(&mut self, level: Level, text: String) {
        if !self.plugin.log_limit.admit() {
            self.stats.record_log_dropped(&self.plugin.name);
            return;
        }
        // Cut, then escaped: a line holds no newline or escape sequence of the plugin's.
        let text = text::escaped(text::truncate(&text, MAX_LOG_LINE));
        let plugin = self.name();
        let version = text::loggable(&self.plugin.version, text::MAX_QUOTED_NAME);
        // A traced message's lines carry its trace and span, to find them from the trace.
        let (trace_id, span_id) = match &self.trace {
            Some(cx) => {
                use opentelemetry::trace::TraceContextExt as _;
                let context = cx.span().span_context().clone();
                (
                    Some(context.trace_id().to_string()),
                    Some(context.span_id().to_string()),
                )
            }
            None => (None, None),
        };
        macro_rules! emit {
            ($level:expr) => {
                tracing::event!(
                    target: "switchyard::plugin",
                    $level,
                    %plugin,
                    %version,
                    trace_id = trace_id.as_deref(),
                    span_id = span_id.as_deref(),
                    "{text}"
                )
            };
        }
        match level {
            Level::Trace => emit!(TraceLevel::TRACE),
            Level::Debug => emit!(TraceLevel::DEBUG),
            Level::Info => emit!(TraceLevel::INFO),
            Level::Warn => emit!(TraceLevel::WARN),
            Level::Error => emit!(TraceLevel::ERROR),
        }
    }
}

/// What the plugin is told when an effect did not happen. The text tells the two ways a
/// Redis effect fails apart: at once, because Redis is not connected or refused the command
/// ("Redis unavailable: ..."), or by running out of the plugin's deadline while waiting
/// ("no answer within the plugin's deadline ..."), so that a plugin (and its operator) can see
/// that an outage failed fast rather than used up the call. A payload over the limit is
/// `invalid` (sending it again fails again); a full outgoing queue names its setting.
fn unavailable(error: EffectError) -> Error {
    match error {
        EffectError::PayloadTooLarge { .. } => Error::Invalid(error.to_string()),
        EffectError::OutgoingFull { .. } => Error::Unavailable(error.to_string()),
        // Texts that already name Redis (the fast path while a write has failed) are kept.
        EffectError::Unavailable(why) if why.contains("Redis") => Error::Unavailable(why),
        EffectError::Unavailable(why) => Error::Unavailable(format!("Redis unavailable: {why}")),
        other => Error::Unavailable(other.to_string()),
    }
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join(", ")
    }
}

impl HostState {
    /// Starts the span of an effect (`operation` on `target`) of the message being handled,
    /// when it is traced.
    fn effect_span(
        &self,
        operation: &str,
        target: &str,
        kind: SpanKind,
        size: usize,
    ) -> Option<opentelemetry::Context> {
        let parent = self.trace.as_ref()?;
        self.plugin
            .effects
            .tracing()
            .child(parent, kind.clone(), || {
                let mut attributes = vec![
                    KeyValue::new("switchyard.plugin", self.plugin.name.as_str().to_owned()),
                    KeyValue::new("switchyard.effect", operation.to_owned()),
                ];
                match kind {
                    SpanKind::Producer => attributes.extend([
                        KeyValue::new("messaging.system", "redis"),
                        KeyValue::new("messaging.operation.type", "send"),
                        KeyValue::new("messaging.destination.name", target.to_owned()),
                        KeyValue::new("messaging.message.body.size", size as i64),
                    ]),
                    SpanKind::Client => {
                        attributes.push(KeyValue::new("switchyard.output", target.to_owned()))
                    }
                    _ => attributes.push(KeyValue::new("switchyard.keys", size as i64)),
                }
                (format!("{operation} {target}"), attributes)
            })
    }

    /// `publish` or `send` (`operation`, done by `effect`) of `payload` on `channel`, under
    /// the grants and the loop guard, in a span when the message is traced.
    pub(in crate::worker) fn out_on_channel<T>(
        &mut self,
        operation: &str,
        channel: String,
        payload: Vec<u8>,
        effect: impl FnOnce(
            &Effects,
            &PluginName,
            &Arc<PluginStats>,
            Vec<u8>,
            Vec<u8>,
            Instant,
        ) -> Result<T, EffectError>,
    ) -> Result<T, Error> {
        let span = self.effect_span(operation, &channel, SpanKind::Producer, payload.len());
        let payload = match &span {
            Some(cx) => self.plugin.effects.tracing().stamp(cx, payload),
            None => payload,
        };
        let result = self.check_publish(&channel).and_then(|()| {
            let plugin = &self.plugin;
            effect(
                &plugin.effects,
                &plugin.name,
                &self.stats,
                channel.into_bytes(),
                payload,
                self.call_deadline,
            )
            .map_err(|error| self.refused(error))
        });
        end_effect(span, &result);
        result
    }

    /// `invalidate`, under the grants and the loop guard.
    fn invalidate_keys(&mut self, keys: Vec<String>) -> Result<u32, Error> {
        let plugin = &self.plugin;
        if let Some(key) = keys
            .iter()
            .find(|key| !plugin.grants.may_invalidate(key.as_bytes()))
        {
            return Err(self.deny(format!(
                "plugin {} has no invalidate grant for key {} (invalidate grants: {}); nothing was deleted",
                self.name(),
                quoted(key),
                list(&plugin.grants.config().invalidate)
            )));
        }
        if keys.is_empty() {
            return Ok(0);
        }
        // The notice the call announces may come back to this plugin, or to one that
        // invalidates in turn: the loop guard treats it as the publish it is.
        if let Some(broadcast) = plugin.effects.broadcast() {
            self.check_loop(broadcast, || {
                format!(
                    "the invalidation notice on {}",
                    quoted(&String::from_utf8_lossy(broadcast))
                )
            })
            .map_err(|refused| match refused {
                Error::Denied(why) => Error::Denied(format!("{why}; nothing was deleted")),
                other => other,
            })?;
        }
        plugin
            .effects
            .invalidate(&plugin.name, &keys, self.remaining())
            .map_err(unavailable)
    }

    /// `call-output`, under the grants, in the call's span `trace` when traced.
    fn call_named_output(
        &mut self,
        name: String,
        payload: Vec<u8>,
        trace: Option<&opentelemetry::Context>,
    ) -> Result<OutputReply, Error> {
        let plugin = &self.plugin;
        if !plugin.grants.may_call(&name) {
            return Err(self.deny(format!(
                "plugin {} has no grant for output {} (output grants: {})",
                self.name(),
                quoted(&name),
                list(&plugin.grants.config().outputs)
            )));
        }
        plugin
            .effects
            .call_output(&plugin.name, &name, &payload, self.remaining(), trace)
            .map(|reply| OutputReply {
                status: reply.status,
                body: reply.body,
            })
            .map_err(unavailable)
    }
}

/// Ends an effect's span with its result: a refusal or failure is its error status.
fn end_effect<T>(span: Option<opentelemetry::Context>, result: &Result<T, Error>) {
    if let Some(span) = span {
        match result {
            Ok(_) => crate::trace::end(&span, Ok(())),
            Err(error) => crate::trace::end(&span, Err(&render_error(error))),
        }
    }
}

/// How an `error::invalid` returned by `handle` begins once rendered: the input is bad, and
/// retrying it will fail again.
pub const INVALID_PREFIX: &str = "invalid: ";

/// The plugin's error value as a log line.
pub fn render_error(error: &types::Error) -> String {
    match error {
        types::Error::Denied(why) => format!("denied: {why}"),
        types::Error::Invalid(why) => format!("{INVALID_PREFIX}{why}"),
        types::Error::Unavailable(why) => format!("unavailable: {why}"),
        types::Error::Failed(why) => format!("failed: {why}"),
    }
}
