//! The example plugins of `plugins/`, compiled by the build script and embedded in the binary
//! (one constant of component bytes each, and [`ALL`] by name), so that `switchyard demo`
//! runs from the binary alone.

include!(concat!(env!("OUT_DIR"), "/examples.rs"));
