//! Builds the example plugins and embeds them, so `switchyard demo` runs from the binary alone.

use switchyard_plugin_build::{Embed, build, write_constants};

/// The plugins `switchyard demo` shows.
const EXAMPLES: &[&str] = &[
    "forward",
    "notify-router",
    "chat-moderator",
    "cache-invalidator",
    "metrics-rollup",
];

fn main() {
    let artifacts = build(EXAMPLES);
    write_constants("examples.rs", &artifacts, Embed::Bytes);
}
