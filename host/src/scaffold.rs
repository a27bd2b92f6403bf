//! `switchyard new`: a plugin project that builds and passes `switchyard test` as it is.
//! Rust only so far; the other languages' examples (`plugins/notify-router-*`) show their
//! builds.
//!
//! Every project holds the WIT contract, a starter plugin (republish `NAME:in` on `NAME:out`,
//! reject empty payloads), a `build.sh` that writes `NAME.wasm`, the manifest granting what
//! the starter needs, and `tests/` with input messages and the expected effects.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

/// The WIT contract every project builds against.
const WIT: &str = include_str!("../../wit/plugin.wit");

/// The wit-bindgen version Rust projects use: the one the Rust SDK is built with here.
const WIT_BINDGEN: &str = "0.61";

/// The languages `switchyard new` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// Rust, with the `switchyard-plugin` SDK (included in the project).
    Rust,
}

impl Lang {
    fn title(self) -> &'static str {
        match self {
            Lang::Rust => "Rust",
        }
    }

    /// The language's own files: (path, text, executable).
    fn files(self) -> Vec<(&'static str, &'static str, bool)> {
        match self {
            Lang::Rust => vec![
                (
                    "Cargo.toml",
                    include_str!("../templates/rust/Cargo.toml"),
                    false,
                ),
                (
                    "src/lib.rs",
                    include_str!("../templates/rust/lib.rs"),
                    false,
                ),
                ("build.sh", include_str!("../templates/rust/build.sh"), true),
                (
                    ".gitignore",
                    include_str!("../templates/rust/gitignore"),
                    false,
                ),
                (
                    "switchyard-plugin/Cargo.toml",
                    include_str!("../templates/rust/sdk-Cargo.toml"),
                    false,
                ),
                (
                    "switchyard-plugin/src/lib.rs",
                    include_str!("../../plugins/sdk/src/lib.rs"),
                    false,
                ),
            ],
        }
    }

    fn build_notes(self) -> &'static str {
        match self {
            Lang::Rust => include_str!("../templates/rust/NOTES.md"),
        }
    }
}

/// Checks that `name` can be a plugin name, a channel prefix and a file name.
fn check_name(name: &str) -> anyhow::Result<()> {
    let valid = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-');
    if !valid {
        bail!(
            "{name:?} is not a usable plugin name: use lowercase letters, digits and dashes, \
             starting with a letter (at most 64 characters)"
        );
    }
    Ok(())
}

/// Fills the placeholders of a template.
fn render(template: &str, name: &str, lang: Lang) -> String {
    let snake = name.replace('-', "_");
    template
        .replace("{{build_notes}}", lang.build_notes().trim_end())
        .replace("{{lang_title}}", lang.title())
        .replace("{{name_snake}}", &snake)
        .replace("{{name}}", name)
        .replace("{{empty_error}}", "invalid: empty payload")
        .replace("{{version}}", env!("CARGO_PKG_VERSION"))
        .replace("{{wit_bindgen}}", WIT_BINDGEN)
}

/// Creates the project `name` for `lang` in `dir/name`, which must not exist yet; returns its
/// path.
pub fn create(name: &str, lang: Lang, dir: &Path) -> anyhow::Result<PathBuf> {
    check_name(name)?;
    let root = dir.join(name);
    if root.exists() {
        bail!("{} already exists", root.display());
    }
    let mut files: Vec<(String, String, bool)> = vec![
        ("wit/plugin.wit".to_owned(), WIT.to_owned(), false),
        (
            format!("{name}.toml"),
            render(
                include_str!("../templates/common/manifest.toml"),
                name,
                lang,
            ),
            false,
        ),
        (
            "tests/messages.jsonl".to_owned(),
            render(
                include_str!("../templates/common/messages.jsonl"),
                name,
                lang,
            ),
            false,
        ),
        (
            "tests/expected.jsonl".to_owned(),
            render(
                include_str!("../templates/common/expected.jsonl"),
                name,
                lang,
            ),
            false,
        ),
        (
            "README.md".to_owned(),
            render(include_str!("../templates/common/README.md"), name, lang),
            false,
        ),
    ];
    for (path, text, executable) in lang.files() {
        let mut text = render(text, name, lang);
        if path == "switchyard-plugin/src/lib.rs" {
            // The SDK finds the WIT relative to its own folder.
            text = text.replace(r#"path: "../../wit""#, r#"path: "../wit""#);
        }
        files.push((path.to_owned(), text, executable));
    }
    for (path, text, executable) in files {
        let path = root.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        if executable {
            make_executable(&path)?;
        }
    }
    Ok(root)
}

#[cfg(unix)]
fn make_executable(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("cannot make {} executable", path.display()))
}

#[cfg(not(unix))]
fn make_executable(_: &Path) -> anyhow::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_work_as_channels_and_files() {
        for good in ["greeter", "order-router", "a1"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Greeter",
            "1st",
            "with space",
            "dots.no",
            "trailing-",
            "x/y",
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_language_gets_a_complete_project_without_placeholders() {
        let dir = tempfile::tempdir().unwrap();
        for lang in [Lang::Rust] {
            let name = format!("starter-{}", lang.title().to_lowercase());
            let root = create(&name, lang, dir.path()).unwrap();
            for file in [
                "wit/plugin.wit",
                "build.sh",
                "README.md",
                "tests/expected.jsonl",
            ] {
                assert!(root.join(file).is_file(), "{lang:?}: {file}");
            }
            assert!(root.join(format!("{name}.toml")).is_file());
            for entry in walk(&root) {
                let text = std::fs::read_to_string(&entry).unwrap();
                assert!(
                    !text.contains("{{"),
                    "{} keeps a placeholder",
                    entry.display()
                );
            }
            assert!(create(&name, lang, dir.path()).is_err(), "overwrote {name}");
        }
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                files.extend(walk(&path));
            } else {
                files.push(path);
            }
        }
        files
    }
}
