//! What a plugin version may do and read: its grants, checked on every host call, and the
//! settings its `config` import returns. The ground floor: the loader makes them, the
//! workers' host calls check them, and neither needs the other's module for it.

use std::collections::BTreeMap;

use crate::config::GrantsConfig;
use crate::glob::Glob;

/// What a plugin version may do, checked on every host call.
#[derive(Debug, Clone, Default)]
pub struct Grants {
    config: GrantsConfig,
    publish: Vec<Glob>,
    invalidate: Vec<Glob>,
}

impl Grants {
    /// Grants exactly what `config` lists.
    pub fn new(config: GrantsConfig) -> Self {
        let globs =
            |patterns: &[String]| patterns.iter().map(|p| Glob::new(p.as_bytes())).collect();
        Self {
            publish: globs(&config.publish),
            invalidate: globs(&config.invalidate),
            config,
        }
    }

    /// The grants as configured.
    pub fn config(&self) -> &GrantsConfig {
        &self.config
    }

    /// Whether publishing on `channel` is granted.
    pub fn may_publish(&self, channel: &[u8]) -> bool {
        self.publish.iter().any(|glob| glob.matches(channel))
    }

    /// Whether invalidating `key` is granted.
    pub fn may_invalidate(&self, key: &[u8]) -> bool {
        self.invalidate.iter().any(|glob| glob.matches(key))
    }

    /// Whether calling output `name` is granted.
    pub fn may_call(&self, name: &str) -> bool {
        self.config.outputs.iter().any(|output| output == name)
    }
}

/// A plugin's settings as its `config` import returns them: text, whatever the TOML type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings(BTreeMap<String, String>);

impl Settings {
    /// Settings with these values.
    pub fn new(values: BTreeMap<String, String>) -> Self {
        Self(values)
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// Every key, in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }
}
