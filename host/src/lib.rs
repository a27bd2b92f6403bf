//! Switchyard routes Redis pub/sub messages to WebAssembly component plugins that are loaded,
//! swapped and unloaded live from a folder.
//!
//! # Layout
//!
//! A message passes through the modules in this order:
//!
//! - [`source`]: owns the subscriber connection (Redis, or the [embedded](source::embedded)
//!   broker) and turns every delivery into a [`message::Delivery`]. Never waits on a plugin.
//! - [`router`]: finds the plugins a delivery is for (Redis glob semantics, once per plugin)
//!   and offers it to their queues.
//! - [`worker`]: one thread per plugin with a long-lived Wasm instance; runs `handle` under a
//!   deadline and a memory cap.
//! - [`effects`]: what plugins cause in return (publishing), on the host's own connection.
//!
//! Beside the message path:
//!
//! - [`plugins`]: the folder watcher, the loader (validate, compile, describe) and the
//!   registry that swaps versions atomically and rebuilds the routing table.
//! - [`admin`]: `/healthz`, `/readyz` and `/plugins` over HTTP.
//! - [`app`]: wires the pieces together and runs them until shutdown.
//! - [`config`] and [`cli`]: the configuration file and the command line.
//! - [`demo`]: the example plugins on the embedded broker, no Redis needed.
//! - [`offline`]: `switchyard check` and `switchyard test`, for plugin authors.
//! - [`scaffold`]: `switchyard new`, a plugin project in any supported language.
//! - [`status`]: `switchyard status`, a running host and its Redis at a glance.

#![deny(missing_docs)]

pub mod admin;
pub mod app;
pub mod cli;
pub mod config;
pub mod demo;
pub mod effects;
pub mod examples;
pub mod gateway;
pub mod glob;
pub mod grants;
pub mod message;
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
