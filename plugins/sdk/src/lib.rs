//! Write Switchyard plugins in Rust.
//!
//! A plugin is a type that implements [`Plugin`], exported with [`export!`], in a `cdylib` crate
//! built for `wasm32-wasip2`:
//!
//! ```no_run
//! use switchyard_plugin::{Error, Message, Plugin, PluginInfo};
//!
//! #[derive(Default)]
//! struct Forward;
//!
//! impl Plugin for Forward {
//!     fn describe(&self) -> PluginInfo {
//!         PluginInfo::new("forward", env!("CARGO_PKG_VERSION"))
//!             .pattern("fwd:*")
//!             .publishes("fwded:*")
//!     }
//!
//!     fn handle(&mut self, message: Message) -> Result<(), Error> {
//!         let rest = message.channel.strip_prefix("fwd:").unwrap_or(&message.channel);
//!         switchyard_plugin::publish(&format!("fwded:{rest}"), &message.payload)?;
//!         Ok(())
//!     }
//! }
//!
//! switchyard_plugin::export!(Forward);
//! ```
//!
//! The host creates the value with [`Default`] when it instantiates the plugin, keeps it across
//! messages (so a plugin may keep running totals in `self`), and starts over with a fresh value
//! if the instance has to be rebuilt after a trap.
//!
//! # Key changes
//!
//! A plugin that asks for keys ([`PluginInfo::keys`], or `[subscriptions] keys = ["user:*"]`
//! in its manifest) hears of writes to those keys (Redis keyspace notifications): each
//! [`Message`] has the key as its `channel` (`user:42`) and the event as its `payload`
//! (`set`, `hset`, `del`, `expired`, ...), and its `subscription` is [`Subscription::Keys`].
//! One that tracks a prefix ([`PluginInfo::tracking`]) gets client-side caching
//! invalidations: the key and `invalidate`, or an empty channel and `flush`, under
//! [`Subscription::Tracking`].
//!
//! The raw WIT bindings are in [`bindings`]; plugins should not need them.

#![deny(missing_docs)]

/// Bindings generated from `wit/plugin.wit`. Use the re-exports at the crate root instead.
#[allow(missing_docs)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "plugin",
        path: "../../wit",
        pub_export_macro: true,
        export_macro_name: "__export_plugin_world",
        default_bindings_module: "::switchyard_plugin::bindings",
    });
}

use bindings::switchyard::plugin::host;
pub use bindings::switchyard::plugin::types::{
    Capabilities, Error, KeySubscription, Level, Message, OutputReply, PluginInfo, Subscription,
    TraceContext,
};

/// A Switchyard plugin.
///
/// One value lives per plugin instance; the host calls [`Plugin::describe`] once after loading
/// and [`Plugin::handle`] for every matching message, one at a time, in delivery order.
pub trait Plugin: Default + 'static {
    /// Names the plugin and lists its subscriptions and the capabilities it asks for.
    fn describe(&self) -> PluginInfo;

    /// Handles one message. Returning an error counts the message as failed; it does not
    /// discard the plugin's state.
    fn handle(&mut self, message: Message) -> Result<(), Error>;
}

/// Exports a [`Plugin`] type as the component's `handler`.
///
/// Use it once per crate, at the top level: `switchyard_plugin::export!(MyPlugin);`.
#[macro_export]
macro_rules! export {
    ($plugin:ty) => {
        const _: () = {
            struct SwitchyardExports;

            ::std::thread_local! {
                static INSTANCE: ::std::cell::RefCell<Option<$plugin>> =
                    const { ::std::cell::RefCell::new(None) };
            }

            fn with_plugin<R>(f: impl FnOnce(&mut $plugin) -> R) -> R {
                INSTANCE.with(|cell| {
                    let mut slot = cell.borrow_mut();
                    f(slot.get_or_insert_with(<$plugin as ::core::default::Default>::default))
                })
            }

            impl $crate::bindings::exports::switchyard::plugin::handler::Guest for SwitchyardExports {
                fn describe() -> $crate::PluginInfo {
                    with_plugin(|plugin| $crate::Plugin::describe(plugin))
                }

                fn handle(message: $crate::Message) -> ::core::result::Result<(), $crate::Error> {
                    with_plugin(|plugin| $crate::Plugin::handle(plugin, message))
                }
            }

            $crate::bindings::__export_plugin_world!(SwitchyardExports with_types_in $crate::bindings);
        };
    };
}

/// Publishes `payload` on `channel` and returns how many subscribers received it.
///
/// Fails with [`Error::Denied`] unless the operator granted a publish pattern matching
/// `channel`, and with [`Error::Unavailable`] when Redis cannot be reached.
pub fn publish(channel: &str, payload: &[u8]) -> Result<u32, Error> {
    host::publish(channel, payload)
}

/// Publishes `payload` on `channel` without waiting for Redis, in order with this plugin's
/// other `send`s and `publish`es. `Ok` means queued; a write that fails later is counted by
/// the host (`send_failed`). Prefer it to [`publish`] when the receiver count does not
/// matter: `publish` waits one round trip to Redis per call.
pub fn send(channel: &str, payload: &[u8]) -> Result<(), Error> {
    host::send(channel, payload)
}

/// Deletes `keys` from Redis and returns how many existed; the host also broadcasts an
/// invalidation notice if it is configured to.
///
/// Fails with [`Error::Denied`] (and deletes nothing) unless every key matches an invalidate
/// grant.
pub fn invalidate(keys: &[String]) -> Result<u32, Error> {
    host::invalidate(keys)
}

/// Sends `payload` to the operator's output `name` (a webhook, a file, stdout, another Redis)
/// and returns its reply.
///
/// Fails with [`Error::Denied`] unless the output is granted, and with
/// [`Error::Unavailable`] when it cannot be reached before the plugin's deadline.
pub fn call_output(name: &str, payload: &[u8]) -> Result<OutputReply, Error> {
    host::call_output(name, payload)
}

/// Returns this plugin's setting `key` from its manifest, if the operator set one.
pub fn config(key: &str) -> Option<String> {
    host::config(key)
}

/// Writes `text` to the host's log at `level`, tagged with the plugin's name and version.
pub fn log(level: Level, text: &str) {
    host::log(level, text)
}

impl PluginInfo {
    /// Starts a description with no subscriptions and no capabilities.
    pub fn new(name: impl Into<String>, version: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            version: version.into(),
            subscriptions: Vec::new(),
            capabilities: Capabilities {
                publish: Vec::new(),
                invalidate: Vec::new(),
                outputs: Vec::new(),
            },
        }
    }

    /// Subscribes to one exact channel.
    pub fn channel(mut self, channel: impl Into<String>) -> Self {
        self.subscriptions
            .push(Subscription::Channel(channel.into()));
        self
    }

    /// Subscribes to every channel matching a Redis glob pattern.
    pub fn pattern(mut self, pattern: impl Into<String>) -> Self {
        self.subscriptions
            .push(Subscription::Pattern(pattern.into()));
        self
    }

    /// Subscribes to one sharded channel (`SSUBSCRIBE`); on a Redis Cluster it is served
    /// by the shard owning its slot.
    pub fn sharded(mut self, channel: impl Into<String>) -> Self {
        self.subscriptions
            .push(Subscription::Sharded(channel.into()));
        self
    }

    /// Reads a Redis stream through a consumer group: every entry is handled at least once
    /// by one of the hosts sharing the group. Use [`Message::entry_id`] as the idempotency
    /// key.
    pub fn stream(mut self, key: impl Into<String>) -> Self {
        self.subscriptions.push(Subscription::Stream(key.into()));
        self
    }

    /// Hears of the changes of keys matching a Redis glob pattern, in the host's database:
    /// each message's channel is the key and its payload the event (`set`, `del`,
    /// `expired`, ...). `events` lists the events wanted; empty for every event. Redis must
    /// publish keyspace notifications for them (`notify-keyspace-events`).
    pub fn keys(mut self, keys: impl Into<String>, events: &[&str]) -> Self {
        self.subscriptions.push(Subscription::Keys(KeySubscription {
            keys: keys.into(),
            events: events.iter().map(|event| (*event).to_owned()).collect(),
            database: None,
        }));
        self
    }

    /// Hears of the client-side caching invalidations of keys starting with `prefix`: a
    /// message per invalidated key (the key as the channel, `invalidate` as the payload), and
    /// a `flush` (empty channel) whenever every tracked key may have changed.
    pub fn tracking(mut self, prefix: impl Into<String>) -> Self {
        self.subscriptions
            .push(Subscription::Tracking(prefix.into()));
        self
    }

    /// Asks for permission to publish on channels matching a Redis glob pattern.
    pub fn publishes(mut self, pattern: impl Into<String>) -> Self {
        self.capabilities.publish.push(pattern.into());
        self
    }

    /// Asks for permission to invalidate keys matching a Redis glob pattern.
    pub fn invalidates(mut self, pattern: impl Into<String>) -> Self {
        self.capabilities.invalidate.push(pattern.into());
        self
    }

    /// Asks for permission to call the operator's output `name`.
    pub fn calls(mut self, output: impl Into<String>) -> Self {
        self.capabilities.outputs.push(output.into());
        self
    }
}

impl Subscription {
    /// The channel name, pattern or stream key, the key pattern or the tracked prefix, as
    /// subscribed.
    pub fn name(&self) -> &str {
        match self {
            Subscription::Channel(name)
            | Subscription::Pattern(name)
            | Subscription::Sharded(name)
            | Subscription::Stream(name)
            | Subscription::Tracking(name) => name,
            Subscription::Keys(keys) => &keys.keys,
        }
    }

    /// `channel`, `pattern`, `sharded`, `stream`, `keys` or `tracking`.
    pub fn kind(&self) -> &'static str {
        match self {
            Subscription::Channel(_) => "channel",
            Subscription::Pattern(_) => "pattern",
            Subscription::Sharded(_) => "sharded",
            Subscription::Stream(_) => "stream",
            Subscription::Keys(_) => "keys",
            Subscription::Tracking(_) => "tracking",
        }
    }
}

impl Message {
    /// The part of the channel after `prefix`, if the channel starts with it.
    pub fn channel_suffix(&self, prefix: &str) -> Option<&str> {
        self.channel.strip_prefix(prefix)
    }

    /// The value of the stream entry's field `name` (the first, if repeated); `None` for
    /// pub/sub messages and for entries without it.
    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(field, _)| field == name)
            .map(|(_, value)| value.as_slice())
    }

    /// The W3C `traceparent` of this call's span (`00-<trace id>-<span id>-<flags>`), when
    /// the host traces: put it in what the plugin publishes or sends to its own services, and
    /// their work joins this message's trace as a child of this call. `None` when tracing is
    /// off. [`Message::trace`] also holds the `tracestate`.
    pub fn traceparent(&self) -> Option<&str> {
        self.trace
            .as_ref()
            .map(|context| context.traceparent.as_str())
    }

    /// The payload as UTF-8 text, or `Error::Invalid` if it is not.
    pub fn text(&self) -> Result<&str, Error> {
        std::str::from_utf8(&self.payload)
            .map_err(|e| Error::Invalid(format!("payload is not UTF-8: {e}")))
    }
}
