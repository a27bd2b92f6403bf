//! Builds every plugin the integration tests use, once per build, and generates one path
//! constant per plugin (`switchyard_tests::plugins::FORWARD`, ...). A fixture that is built
//! but never used is visible here; one that is used but not built is a compile error.

use switchyard_plugin_build::{Embed, build, write_constants};

const PLUGINS: &[&str] = &[
    "forward",
    "forward-0-4",
    "forward-0-5",
    "notify-router",
    "chat-moderator",
    "cache-invalidator",
    "metrics-rollup",
    "echo",
    "faulty",
    "attack",
    "trap-describe",
    "not-a-plugin",
    "output-probe",
    "sink",
    "messaging-forward",
    "wasmcloud-forward",
    "spin2-forward",
    "spin-forward",
];

fn main() {
    let artifacts = build(PLUGINS);
    write_constants("plugins.rs", &artifacts, Embed::Path);
}
