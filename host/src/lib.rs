//! Switchyard routes Redis pub/sub messages to WebAssembly component plugins that are loaded,
//! swapped and unloaded live from a folder.
//!
//! # Layout
//!
//! The modules stand in floors, and every import points down: a module uses the ones below
//! it, never one above, and no two import each other. A message passes through the stages
//! from the top down:
//!
//! - [`source`]: owns the subscriber connection (Redis, a cluster, stream readers, or the
//!   [embedded](source::embedded) broker) and turns every delivery into a
//!   [`message::Delivery`]. Never waits on a plugin.
//! - [`router`]: finds the plugins a delivery is for (Redis glob semantics, once per plugin)
//!   and offers it to their queues.
//! - [`worker`]: the queues, and one thread per plugin with a long-lived Wasm instance; runs
//!   `handle` under a deadline and a memory cap, and answers the plugin's host calls.
//! - [`effects`]: what plugins cause in return (publishes, invalidations, output calls), on
//!   the host's own connections.
//!
//! Above the stages, using them:
//!
//! - [`plugins`]: the folder watcher, the loader (validate, compile, describe) and the
//!   registry that swaps versions atomically, starts their workers and rebuilds the routing
//!   table.
//! - [`gateway`]: the browser gateway (WebSocket and SSE, its pages), a reader of its own.
//! - [`admin`]: `/healthz`, `/readyz`, `/plugins` and `/metrics` over HTTP.
//! - [`app`]: wires the pieces together and runs them until shutdown.
//! - [`demo`], [`offline`] (`switchyard check` and `switchyard test`), [`scaffold`]
//!   (`switchyard new`), [`status`] (`switchyard status`) and [`cli`], the command line, on
//!   top.
//!
//! The ground floor, the words every stage shares, imports none of the above:
//!
//! - [`message`]: subscriptions, how a delivery arrived, the delivery itself, the host's
//!   reserved channels.
//! - [`keyspace`]: key subscriptions, the keyspace events Redis publishes and the
//!   `notify-keyspace-events` flags they need.
//! - [`stream_entry`]: a stream entry on its way to a plugin and the ticket that reports back.
//! - [`stats`]: each plugin's counters, written by every stage, read by `/plugins`.
//! - [`grants`]: what a plugin version may do and read.
//! - [`config`]: the configuration file by section, and the settings the stages read.
//! - [`oci`]: plugins as OCI artifacts: references, the artifact's layout, the registry
//!   client, which components may load (signatures, pinned digests).
//! - [`component`]: what a component file imports and exports, read without compiling it.
//! - [`trace`]: OpenTelemetry spans of handled messages and their effects, and trace context
//!   in and out; [`crypto`]: the TLS primitives its exporter and the registry client share.
//! - [`glob`], [`rate`], [`text`]: Redis's glob matcher, a token bucket, bounding and
//!   escaping text a plugin controls.
//! - [`examples`]: the example plugins, compiled and embedded.
//! - [`PluginName`] and [`ContentHash`], below.
//!
//! Where a call must go back up at run time, it goes through an interface the lower module
//! owns: effects publish to the embedded broker (a source) through
//! [`effects::InProcessBroker`], which the broker implements.

#![deny(missing_docs)]

pub mod admin;
pub mod app;
pub mod cli;
pub mod component;
pub mod config;
pub mod crypto;
pub mod demo;
pub mod effects;
pub mod examples;
pub mod gateway;
pub mod glob;
pub mod grants;
pub mod keyspace;
pub mod message;
pub mod oci;
pub mod offline;
pub mod plugins;
pub mod rate;
pub mod router;
pub mod scaffold;
pub mod source;
pub mod stats;
pub mod status;
pub mod stream_entry;
pub mod text;
pub mod trace;
pub mod worker;

use std::fmt;
use std::str::FromStr;

/// A plugin's identity: the name of its file without `.wasm`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct PluginName(String);

impl PluginName {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for PluginName {
    type Err = String;

    /// A file stem is a plugin name unless it is empty, hidden (`.name`, which is how
    /// half-written files are kept out of the way), or contains a path separator.
    fn from_str(name: &str) -> Result<Self, String> {
        if name.is_empty() || name.starts_with('.') || name.contains(['/', '\\']) {
            Err(format!("{name:?} is not a plugin name"))
        } else {
            Ok(Self(name.to_owned()))
        }
    }
}

impl fmt::Display for PluginName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The BLAKE3 hash of a file's content: a plugin version's identity.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ContentHash([u8; 32]);

impl ContentHash {
    /// Hashes `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }

    /// The whole 32-byte hash.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for ContentHash {
    /// The first 16 hex digits: enough to tell versions apart in logs and reports.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in &self.0[..8] {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentHash({self})")
    }
}

impl serde::Serialize for ContentHash {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_and_empty_names_are_not_plugins() {
        assert!("forward".parse::<PluginName>().is_ok());
        assert!(".forward".parse::<PluginName>().is_err());
        assert!("".parse::<PluginName>().is_err());
        assert!("a/b".parse::<PluginName>().is_err());
    }

    #[test]
    fn hashes_display_as_short_hex() {
        let hash = ContentHash::of(b"abc");
        assert_eq!(hash.to_string().len(), 16);
        assert_eq!(hash, ContentHash::of(b"abc"));
        assert_ne!(hash, ContentHash::of(b"abd"));
    }
}
