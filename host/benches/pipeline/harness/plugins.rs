//! Plugin files for the processes under test: `forward` copies and their manifests, installed
//! and replaced the way deployers should (a dotfile, then a rename), and byte-different copies
//! that behave the same.

use std::path::Path;
use std::time::Instant;

use super::STREAM_KEY;

/// `bytes` with a custom section appended: a byte-different component (new content hash)
/// that behaves the same.
pub fn with_custom_section(bytes: &[u8], name: &str, payload: &[u8]) -> Vec<u8> {
    fn leb128(mut value: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (value & 0x7f) as u8;
            value >>= 7;
            if value == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let mut contents = Vec::new();
    leb128(name.len(), &mut contents);
    contents.extend_from_slice(name.as_bytes());
    contents.extend_from_slice(payload);
    let mut out = bytes.to_vec();
    out.push(0x00);
    leb128(contents.len(), &mut out);
    out.extend_from_slice(&contents);
    out
}

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
