//! Plugins from a registry: components stored as OCI artifacts the way the Wasm OCI
//! convention stores them, pushed and pulled by `switchyard push` and `switchyard pull`, and
//! kept in the plugins folder by the host's registry sources (`plugins.sources`).
//!
//! The folder stays the source of truth: pulling is one more way to fill it. What comes from
//! a registry lands there through a dotfile and a rename, as a deployer's copy would, and is
//! loaded by the ordinary hot-reload path.
//!
//! - [`reference`]: `oci://REGISTRY/REPOSITORY:TAG` and `...@sha256:DIGEST`;
//! - [`artifact`]: the artifact's layout (config, layer, the manifest's annotation);
//! - [`client`]: push, pull with every digest checked, tag resolution, signatures;
//! - [`commands`]: what the `push`, `pull` and `check oci://` commands do;
//! - [`folder`]: a pulled plugin into the plugins folder, by rename;
//! - [`trust`]: which components may load (cosign signatures by trusted keys, pinned
//!   digests).

pub mod artifact;
pub mod client;
pub mod commands;
pub mod folder;
pub mod reference;
pub mod trust;

pub use artifact::Artifact;
pub use client::{Credentials, Pulled, Registry, RegistryError};
pub use folder::install;
pub use reference::PluginRef;
