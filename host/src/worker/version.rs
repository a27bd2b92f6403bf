//! A plugin version as the loader made it and the workers run it: the component, checked
//! and linked, with its context (identity, grants, settings, limits) and its `describe`
//! answer. Versions are shared (`Arc`) and swapped whole, never changed in place.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;

use super::state::PluginContext;
use super::worlds::HandlerPre;
use crate::ContentHash;
use crate::config::{GrantsConfig, StreamSettings};
use crate::keyspace::KeySubscription;
use crate::message::Subscription;

/// What a plugin says about itself, checked.
#[derive(Debug, Clone, Default)]
pub struct Description {
    /// Its display name.
    pub name: String,
    /// Its own version string.
    pub version: String,
    /// What it listens to, in its order (after any override by its manifest).
    pub subscriptions: Vec<Subscription>,
    /// The keys whose changes it hears of (from its manifest), after its subscriptions in
    /// order of preference.
    pub keys: Vec<KeySubscription>,
    /// The key prefixes whose client-side caching invalidations it hears of (from its
    /// manifest; see [`crate::router`]).
    pub tracking: Vec<Bytes>,
    /// The capabilities it asks for.
    pub requested: GrantsConfig,
}

/// One checked, compiled version of a plugin, ready to instantiate.
pub struct LoadedPlugin {
    /// Identity, grants, settings and limits, shared with every store of this version.
    pub context: Arc<PluginContext>,
    /// The component, linked and type-checked against its world.
    pub pre: HandlerPre,
    /// Its `describe` answer.
    pub description: Description,
    /// How its streams are read.
    pub stream: Arc<StreamSettings>,
    /// How many workers handle its messages at once (`limits.concurrency`; 1 keeps them in
    /// order).
    pub concurrency: usize,
    /// Its queue's byte budget, if its manifest sets one (`limits.queue_bytes`).
    pub queue_bytes: Option<u64>,
    /// The file it came from.
    pub path: PathBuf,
    /// The file's size in bytes.
    pub size: usize,
    /// Hash of the manifest text (of the empty text when there is none).
    pub manifest_hash: ContentHash,
    /// When it was loaded.
    pub loaded_at: SystemTime,
}

impl std::ops::Deref for LoadedPlugin {
    type Target = PluginContext;

    fn deref(&self) -> &PluginContext {
        &self.context
    }
}
