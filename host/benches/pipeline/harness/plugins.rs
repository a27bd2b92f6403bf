//! Plugin files for the processes under test: `forward` copies and their manifests, installed
//! and replaced the way deployers should (a dotfile, then a rename). Byte-different copies
//! that behave the same come from the test harness (`switchyard_tests::rebuilt`).

use std::path::Path;
use std::time::Instant;

use super::STREAM_KEY;

/// Writes `dir/NAME.wasm` (through a dotfile and a rename, as deployers should) and its
/// manifest `dir/NAME.toml`.
pub fn install_plugin(dir: &Path, name: &str, wasm: &[u8], manifest: &str) -> anyhow::Result<()> {
    std::fs::write(dir.join(format!("{name}.toml")), manifest)?;
    replace_wasm(dir, name, wasm)?;
    Ok(())
}

/// Atomically replaces `dir/NAME.wasm`; returns the moment of the rename.
pub fn replace_wasm(dir: &Path, name: &str, wasm: &[u8]) -> anyhow::Result<Instant> {
    let staging = dir.join(format!(".{name}.wasm.tmp"));
    std::fs::write(&staging, wasm)?;
    std::fs::File::open(&staging)?.sync_all()?;
    let at = Instant::now();
    std::fs::rename(&staging, dir.join(format!("{name}.wasm")))?;
    Ok(at)
}

/// The manifest of a forward copy: its publish grant, and subscriptions if given.
pub fn forward_manifest(patterns: Option<&[String]>) -> String {
    let mut manifest = String::from("[grants]\npublish = [\"fwded:*\"]\n");
    if let Some(patterns) = patterns {
        manifest.push_str("\n[subscriptions]\npatterns = [\n");
        for pattern in patterns {
            manifest.push_str(&format!("  {pattern:?},\n"));
        }
        manifest.push_str("]\n");
    }
    manifest
}

/// The manifest of a forward copy that reads [`STREAM_KEY`] through `group` instead of its
/// own subscriptions, with the grant its republishing needs.
pub fn stream_manifest(group: &str) -> String {
    format!(
        "{}\n[subscriptions]\nstreams = [{STREAM_KEY:?}]\n\n[stream]\ngroup = {group:?}\n",
        forward_manifest(None)
    )
}
