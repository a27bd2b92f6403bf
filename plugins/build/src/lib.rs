//! Build-script helper: compiles plugin crates of this workspace into `wasm32-wasip2`
//! components and tells the calling crate where they are.
//!
//! The host embeds the example plugins for `switchyard demo`; the integration tests use the
//! examples and the fixtures. Both call [`build`] from their `build.rs`. The nested cargo runs
//! with its own target directory (`target/plugins`), because the outer cargo holds the lock on
//! the main one for as long as it builds; both callers share that directory, so each plugin is
//! compiled once per build however many crates ask for it.
//!
//! [`write_constants`] then generates one constant per plugin, so a plugin nobody builds is a
//! compile error rather than a missing file at test time.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The target plugins are built for.
pub const TARGET: &str = "wasm32-wasip2";

/// A compiled plugin component.
#[derive(Debug, Clone)]
pub struct Artifact {
    /// The cargo package name, e.g. `trap-describe`.
    pub package: String,
    /// Absolute path of the `.wasm` component.
    pub path: PathBuf,
}

impl Artifact {
    /// The package name as a Rust constant name: `trap-describe` becomes `TRAP_DESCRIBE`.
    pub fn const_name(&self) -> String {
        self.package.to_uppercase().replace('-', "_")
    }
}

/// The workspace root: this crate lives in `plugins/build`.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("plugins/build sits two levels below the workspace root")
        .to_path_buf()
}

/// The target directory of the nested plugin build.
pub fn plugin_target_dir() -> PathBuf {
    let root = workspace_root();
    let main = std::env::var_os("CARGO_TARGET_DIR")
        .map(|dir| root.join(dir))
        .unwrap_or_else(|| root.join("target"));
    main.join("plugins")
}

/// Makes sure the standard library for [`TARGET`] is installed, before anything is compiled.
///
/// `rust-toolchain.toml` names the target, but rustup installs a toolchain's targets only when
/// it installs the toolchain: a machine that had the toolchain before lacks it, and the nested
/// build would fail minutes later with "can't find crate for `core`". Where rustup is there it
/// adds the target (for the toolchain this build runs, which rustup passes down in
/// `RUSTUP_TOOLCHAIN`); elsewhere the build stops now, naming the command to run.
fn ensure_target() {
    if target_installed() {
        return;
    }
    let added = Command::new("rustup")
        .args(["target", "add", TARGET])
        .output()
        .is_ok_and(|output| output.status.success());
    if added && target_installed() {
        println!("cargo:warning=installed the {TARGET} target with `rustup target add {TARGET}`");
        return;
    }
    panic!(
        "the {TARGET} target is not installed for this toolchain, and rustup could not add it: \
         run `rustup target add {TARGET}`"
    );
}

/// Whether the toolchain running this build has the standard library for [`TARGET`].
fn target_installed() -> bool {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    Command::new(rustc)
        .args(["--print", "target-libdir", "--target", TARGET])
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()))
        .is_some_and(|libdir| {
            std::fs::read_dir(libdir).is_ok_and(|entries| {
                entries.flatten().any(|entry| {
                    let name = entry.file_name();
                    let name = name.to_string_lossy();
                    name.starts_with("libcore-") && name.ends_with(".rlib")
                })
            })
        })
}

/// Builds `packages` in release mode for [`TARGET`] and returns their components, in order.
///
/// Panics with cargo's output when the build fails: it runs in a build script, where a panic
/// is how an error reaches the user.
pub fn build(packages: &[&str]) -> Vec<Artifact> {
    ensure_target();
    let root = workspace_root();
    for watched in ["wit", "plugins", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    let target_dir = plugin_target_dir();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(&root)
        .args(["build", "--release", "--target", TARGET, "--target-dir"])
        .arg(&target_dir);
    for package in packages {
        command.args(["-p", package]);
    }
    // The outer build's flags and wrappers are for the host target (and for clippy when it is
    // the one running): none of them belongs in a wasm build.
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
    ] {
        command.env_remove(var);
    }
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run cargo to build plugins: {e}"));
    if !output.status.success() {
        panic!(
            "building plugins {packages:?} for {TARGET} failed (is the target installed? \
             `rustup target add {TARGET}`):\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let out = target_dir.join(TARGET).join("release");
    packages
        .iter()
        .map(|package| {
            // A cdylib's file takes the library name (dashes become underscores); a binary's
            // keeps the package name.
            let candidates = [
                out.join(format!("{}.wasm", package.replace('-', "_"))),
                out.join(format!("{package}.wasm")),
            ];
            let path = candidates
                .into_iter()
                .find(|path| path.exists())
                .unwrap_or_else(|| panic!("cargo built {package} but left no .wasm in {out:?}"));
            Artifact {
                package: (*package).to_owned(),
                path,
            }
        })
        .collect()
}

/// How [`write_constants`] presents each plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Embed {
    /// `pub const NAME: &str = "/path/to/name.wasm";`
    Path,
    /// `pub const NAME: &[u8] = include_bytes!("/path/to/name.wasm");`
    Bytes,
}

/// Writes `$OUT_DIR/{file}` with one constant per artifact, plus `ALL`, a list of
/// `(package, constant)` pairs.
pub fn write_constants(file: &str, artifacts: &[Artifact], embed: Embed) {
    let out_dir = std::env::var_os("OUT_DIR").expect("write_constants runs in a build script");
    let (ty, wrap): (&str, fn(&str) -> String) = match embed {
        Embed::Path => ("&str", |path| format!("{path:?}")),
        Embed::Bytes => ("&[u8]", |path| format!("include_bytes!({path:?})")),
    };
    let mut code = String::new();
    for artifact in artifacts {
        let path = artifact.path.to_str().expect("target paths are UTF-8");
        let _ = writeln!(
            code,
            "/// The `{}` plugin component.\npub const {}: {ty} = {};",
            artifact.package,
            artifact.const_name(),
            wrap(path)
        );
    }
    let _ = writeln!(
        code,
        "/// Every plugin built for this crate: (package name, component).\npub const ALL: &[(&str, {ty})] = &[{}];",
        artifacts
            .iter()
            .map(|a| format!("({:?}, {})", a.package, a.const_name()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    std::fs::write(Path::new(&out_dir).join(file), code)
        .unwrap_or_else(|e| panic!("cannot write {file}: {e}"));
}
