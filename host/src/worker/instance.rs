//! One live plugin instance: a `Store` and the component instantiated in it.
//!
//! Used by the worker for every message and by the loader to call `describe` once per new
//! version. Every call runs under the plugin's deadline (epoch interruption) and memory cap
//! (store limits). A failed `handle` is classified here, where the trap is still at hand, into
//! one of the fixed [`FailureReason`]s.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use wasmtime::Store;

use super::Envelope;
use super::bindings::switchyard::plugin::types::{self, Message};
use super::engine::deadline_ticks;
use super::host::render_error;
use super::state::{HostState, MemoryExhausted};
use super::version::LoadedPlugin;
use super::wasi::DeadlineReached;
use super::worlds::wasi_messaging::{self, MessageData};
use super::worlds::wasmcloud::BrokerMessage;
use super::worlds::{Bindings, spin_redis3, switchyard04, switchyard05};
use crate::message::{Heard, Subscription};
use crate::stats::PluginStats;
use crate::stats::outcome::{Failure, FailureReason};

/// A store with a plugin instantiated in it.
pub struct Instance {
    version: Arc<LoadedPlugin>,
    store: Store<HostState>,
    bindings: Bindings,
}

impl Instance {
    /// Instantiates `version` in a fresh store of the engine it was compiled with, counting
    /// into `stats`. A failed
    /// instantiation's reason tells a deadline (a start function that waits or loops) from
    /// a trap.
    pub fn new(version: Arc<LoadedPlugin>, stats: Arc<PluginStats>) -> Result<Self, Failure> {
        let state = HostState::new(version.context.clone(), stats);
        let mut store = Store::new(version.pre.engine(), state);
        store.limiter(HostState::limiter);
        // A new store's deadline is "now": without this, instantiation traps as soon as the
        // epoch has moved once.
        store.set_epoch_deadline(deadline_ticks(version.context.deadline));
        store.data_mut().begin_call();
        let bindings = version.pre.instantiate(&mut store).map_err(|e| Failure {
            reason: trap_reason(&e),
            message: describe_trap(&e, &version),
        })?;
        Ok(Self {
            version,
            store,
            bindings,
        })
    }

    /// Whether this instance runs `version`.
    pub fn runs(&self, version: &Arc<LoadedPlugin>) -> bool {
        Arc::ptr_eq(&self.version, version)
    }

    /// Calls `describe`, within the deadline armed when the instance was built: the plugin's
    /// deadline covers instantiation and `describe` together, so a probe built to describe a
    /// new version (the loader's) takes no longer than that in all.
    /// Components of other hosts' worlds have no `describe`: `None`.
    pub fn describe(&mut self) -> Result<Option<types::PluginInfo>, Failure> {
        let answer = match &self.bindings {
            Bindings::Switchyard(bindings) => bindings
                .switchyard_plugin_handler()
                .call_describe(&mut self.store),
            Bindings::Switchyard05(bindings) => switchyard05::describe(bindings, &mut self.store),
            Bindings::Switchyard04(bindings) => switchyard04::describe(bindings, &mut self.store),
            _ => return Ok(None),
        };
        answer.map(Some).map_err(|trap| Failure {
            reason: trap_reason(&trap),
            message: describe_trap(&trap, &self.version),
        })
    }

    /// Calls the handler with one message, under the span `trace` if it is traced (a plugin
    /// of the current contract reads that span's context in `message.trace`). After a
    /// failure whose reason poisons the instance, the instance must be dropped.
    pub fn handle(
        &mut self,
        envelope: Envelope,
        trace: Option<opentelemetry::Context>,
    ) -> Result<(), Failure> {
        self.arm();
        self.store.data_mut().trace = trace;
        let result = match &self.bindings {
            Bindings::Switchyard(bindings) => {
                let trace = self.store.data().trace.as_ref().and_then(trace_context);
                let message = switchyard_message(envelope, trace);
                bindings
                    .switchyard_plugin_handler()
                    .call_handle(&mut self.store, &message)
                    .map(|answer| answer.map_err(|error| render_error(&error)))
            }
            Bindings::Switchyard05(bindings) => {
                let trace = self.store.data().trace.as_ref().and_then(trace_context);
                switchyard05::handle(
                    bindings,
                    &mut self.store,
                    switchyard_message(envelope, trace),
                )
            }
            Bindings::Switchyard04(bindings) => switchyard04::handle(
                bindings,
                &mut self.store,
                switchyard_message(envelope, None),
            ),
            Bindings::WasiMessaging(bindings) => self
                .store
                .data_mut()
                .push_message(messaging_message(envelope))
                .and_then(|message| {
                    bindings
                        .wasi_messaging_incoming_handler()
                        .call_handle(&mut self.store, message)
                })
                .map(|answer| answer.map_err(|error| wasi_messaging::render_error(&error))),
            Bindings::Wasmcloud(bindings) => {
                let (reply_to, body) = crate::effects::replies::unwrap(envelope.payload);
                self.store.data_mut().reply_to.clone_from(&reply_to);
                let message = BrokerMessage {
                    subject: text(envelope.channel),
                    body: Vec::from(body),
                    reply_to,
                };
                bindings
                    .wasmcloud_messaging_handler()
                    .call_handle_message(&mut self.store, &message)
            }
            Bindings::SpinRedis2(bindings) => bindings
                .fermyon_spin_inbound_redis()
                .call_handle_message(&mut self.store, &Vec::from(envelope.payload))
                .map(|answer| {
                    answer.map_err(|_| {
                        "the handler returned error (this world carries no reason; the \
                         plugin's standard error may say more)"
                            .to_owned()
                    })
                }),
            Bindings::SpinRedis3(bindings) => {
                spin_redis3::call(bindings, &mut self.store, Vec::from(envelope.payload))
            }
        };
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(Failure {
                reason: FailureReason::Error,
                message,
            }),
            Err(trap) => Err(Failure {
                reason: trap_reason(&trap),
                message: format!("trapped: {}", describe_trap(&trap, &self.version)),
            }),
        }
    }

    /// Starts the deadline of one call.
    fn arm(&mut self) {
        self.store
            .set_epoch_deadline(deadline_ticks(self.version.context.deadline));
        self.store.data_mut().begin_call();
    }
}

/// A message as `switchyard:plugin` gives it to `handle`, with the trace context `trace`.
fn switchyard_message(envelope: Envelope, trace: Option<types::TraceContext>) -> Message {
    Message {
        channel: text(envelope.channel),
        subscription: {
            let name = String::from_utf8_lossy(envelope.subscription.name()).into_owned();
            match &envelope.subscription {
                Heard::Subscribed(Subscription::Channel(_)) => types::Subscription::Channel(name),
                Heard::Subscribed(Subscription::Pattern(_)) => types::Subscription::Pattern(name),
                Heard::Subscribed(Subscription::Sharded(_)) => types::Subscription::Sharded(name),
                Heard::Subscribed(Subscription::Stream(_)) => types::Subscription::Stream(name),
                Heard::Keys(keys) => types::Subscription::Keys(types::KeySubscription {
                    keys: name,
                    events: keys.events.names().unwrap_or_default(),
                    database: Some(keys.database),
                }),
                Heard::Tracking(_) => types::Subscription::Tracking(name),
            }
        },
        // Without a copy when this plugin holds the only reference to Redis's buffer (the
        // router hands the last plugin the buffer itself); copied when another shares it.
        payload: Vec::from(envelope.payload),
        received_at: envelope
            .received_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        entry_id: envelope.entry.as_ref().map(|e| e.id.clone()),
        fields: envelope
            .entry
            .map(|e| {
                e.fields
                    .into_iter()
                    .map(|(name, value)| (name, Vec::from(value)))
                    .collect()
            })
            .unwrap_or_default(),
        trace,
    }
}

/// The trace context a plugin sees for the call traced by the span of `cx`: its
/// `traceparent` and `tracestate`, sampled or not; `None` when the span's context is not
/// valid (which a span the host opened always is).
fn trace_context(cx: &opentelemetry::Context) -> Option<types::TraceContext> {
    let mut context = types::TraceContext {
        traceparent: String::new(),
        tracestate: String::new(),
    };
    for (name, value) in crate::trace::carrier_of(cx) {
        match name.as_str() {
            "traceparent" => context.traceparent = value,
            "tracestate" => context.tracestate = value,
            _ => {}
        }
    }
    (!context.traceparent.is_empty()).then_some(context)
}

/// A message as the WASI messaging draft gives it to `handle`: the channel as its topic, the
/// payload as its data, and what else Switchyard knows as metadata (see
/// [`wasi_messaging`]).
fn messaging_message(envelope: Envelope) -> MessageData {
    let mut metadata = Vec::new();
    if let Some(pattern) = envelope.subscription.wire_pattern() {
        metadata.push((
            wasi_messaging::PATTERN_KEY.to_owned(),
            String::from_utf8_lossy(&pattern).into_owned(),
        ));
    }
    if let Some(entry) = envelope.entry {
        metadata.push((wasi_messaging::ENTRY_ID_KEY.to_owned(), entry.id.clone()));
        for (name, value) in entry.fields {
            if let Ok(value) = String::from_utf8(Vec::from(value)) {
                metadata.push((format!("{}{name}", wasi_messaging::FIELD_PREFIX), value));
            }
        }
    }
    MessageData {
        topic: Some(text(envelope.channel)),
        content_type: None,
        data: Vec::from(envelope.payload),
        metadata: (!metadata.is_empty()).then_some(metadata),
    }
}

/// A channel name as the plugin's text: the buffer itself when it is UTF-8 and held by this
/// plugin alone (the usual case), a lossy copy when it is not UTF-8.
fn text(bytes: bytes::Bytes) -> String {
    String::from_utf8(Vec::from(bytes))
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Which kind of trap `error` is: the epoch interrupt, and a WASI wait cut short by the
/// deadline ([`DeadlineReached`]), are the deadline; the store's limiter raises
/// [`MemoryExhausted`] for the memory cap; anything else is a plain trap.
fn trap_reason(error: &wasmtime::Error) -> FailureReason {
    if matches!(
        error.downcast_ref::<wasmtime::Trap>(),
        Some(wasmtime::Trap::Interrupt)
    ) || error.downcast_ref::<DeadlineReached>().is_some()
    {
        FailureReason::Deadline
    } else if error.downcast_ref::<MemoryExhausted>().is_some() {
        FailureReason::Memory
    } else {
        FailureReason::Trap
    }
}

/// A trap, explained: the deadline and the memory cap are named as such.
fn describe_trap(error: &wasmtime::Error, version: &LoadedPlugin) -> String {
    match trap_reason(error) {
        FailureReason::Deadline => match error.downcast_ref::<DeadlineReached>() {
            Some(waiting) => format!(
                "deadline of {:?} exceeded while waiting in {} (a sleep, or a wait on a clock or \
                 a stream)",
                version.context.deadline, waiting.import
            ),
            None => format!("deadline of {:?} exceeded", version.context.deadline),
        },
        FailureReason::Memory => format!(
            "memory cap of {} MiB reached: {error:#}",
            version.context.memory_limit >> 20
        ),
        _ => format!("{error:#}"),
    }
}
