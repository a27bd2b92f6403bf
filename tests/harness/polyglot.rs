//! Plugins written in other languages than Rust, built with their own `build.sh`.
//!
//! Each build installs its pinned tools once into `target/tools` (shared by the language
//! plugins and by projects made with `switchyard new`) and is skipped when its output is newer
//! than every source file. Builds run one at a time: two installs of the same tools must not
//! race.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::SystemTime;

use anyhow::{Context as _, bail};

/// Serializes builds within the test process.
static BUILDS: Mutex<()> = Mutex::new(());

/// Folders that hold no sources: installed packages and build output.
const NOT_SOURCES: &[&str] = &["node_modules", "target", "__pycache__", ".venv"];

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits one level below the workspace root")
        .to_owned()
}

/// The shared target folder (honours `CARGO_TARGET_DIR`).
pub fn target_dir() -> PathBuf {
    let root = workspace_root();
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), |dir| root.join(dir))
}

/// The compile cache test hosts share.
pub fn compile_cache_dir() -> PathBuf {
    target_dir().join("compile-cache")
}

/// Where the pinned tools of every language live.
pub fn tools_dir() -> PathBuf {
    target_dir().join("tools")
}

/// The languages the notify-router fixture is written in, as (label, plugin folder or `None`
/// for the Rust build of the workspace).
pub const NOTIFY_ROUTER_BUILDS: &[(&str, Option<&str>)] = &[
    ("rust", None),
    ("python", Some("notify-router-py")),
    ("javascript", Some("notify-router-js")),
    ("c", Some("notify-router-c")),
];

/// Builds `plugins/<folder>` with its `build.sh` into `target/plugins/polyglot/<folder>.wasm`,
/// unless that is already newer than the folder's sources and the WIT; returns the path.
pub fn build_plugin(folder: &str) -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    let sources = root.join("plugins").join(folder);
    let out = target_dir()
        .join("plugins")
        .join("polyglot")
        .join(format!("{folder}.wasm"));
    let _one_at_a_time = BUILDS.lock().unwrap_or_else(|e| e.into_inner());
    let newest = newest_source(&sources)?.max(newest_source(&root.join("wit"))?);
    if modified(&out).is_some_and(|built| built > newest) {
        return Ok(out);
    }
    run_build(&sources.join("build.sh"), &[out.as_os_str()], &[])?;
    Ok(out)
}

/// Runs `script` with `args` and extra environment `env`, the tools folder shared; the error
/// carries the script's output.
pub fn run_build(
    script: &Path,
    args: &[&std::ffi::OsStr],
    env: &[(&str, &std::ffi::OsStr)],
) -> anyhow::Result<()> {
    let mut command = Command::new("bash");
    command
        .arg(script)
        .args(args)
        .env("SWITCHYARD_TOOLS", tools_dir())
        .current_dir(script.parent().unwrap_or(Path::new(".")));
    for (key, value) in env {
        command.env(key, value);
    }
    // Flags of the test build are for the host, not for a nested wasm build.
    for var in ["CARGO_ENCODED_RUSTFLAGS", "RUSTFLAGS", "RUSTC_WRAPPER"] {
        command.env_remove(var);
    }
    let output = command
        .output()
        .with_context(|| format!("cannot run {}", script.display()))?;
    if !output.status.success() {
        bail!(
            "{} failed ({}):\n{}{}",
            script.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Holds the build lock while a caller runs builds of its own (projects from `switchyard new`).
pub fn exclusive_build() -> std::sync::MutexGuard<'static, ()> {
    BUILDS.lock().unwrap_or_else(|e| e.into_inner())
}

fn modified(path: &Path) -> Option<SystemTime> {
    path.metadata().and_then(|m| m.modified()).ok()
}

/// The newest modification time of the files under `dir`, skipping [`NOT_SOURCES`].
fn newest_source(dir: &Path) -> anyhow::Result<SystemTime> {
    let mut newest = SystemTime::UNIX_EPOCH;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            if !NOT_SOURCES.contains(&entry.file_name().to_string_lossy().as_ref()) {
                newest = newest.max(newest_source(&path)?);
            }
        } else if let Some(time) = modified(&path) {
            newest = newest.max(time);
        }
    }
    Ok(newest)
}
