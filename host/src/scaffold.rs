//! `switchyard new`: a plugin project that builds and passes `switchyard test` as it is.
//!
//! Every project holds the WIT contract, a starter plugin (republish `NAME:in` on `NAME:out`,
//! reject empty payloads), a `build.sh` that writes `NAME.wasm`, the manifest granting what
//! the starter needs, and `tests/` with input messages and the expected effects. The build
//! scripts pin the same tool versions as the examples in `plugins/notify-router-*`, and install
//! them once into `${SWITCHYARD_TOOLS:-~/.cache/switchyard/tools}`.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

use crate::plugins::loader::world_version;

/// The WIT contract every project builds against.
const WIT: &str = include_str!("../../wit/plugin.wit");

/// The wit-bindgen version Rust projects use: the one the Rust SDK is built with here.
const WIT_BINDGEN: &str = "0.61";

/// The languages `switchyard new` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// Rust, with the `switchyard-plugin` SDK (included in the project).
    Rust,
    /// Python, built with componentize-py.
    Python,
    /// JavaScript, built with ComponentizeJS.
    Js,
    /// C, with wit-bindgen's C bindings, clang and wasi-libc.
    C,
}

/// A file of a project: path, template, executable.
type File = (&'static str, &'static str, bool);

impl Lang {
    /// Every language, in the order the documentation lists them.
    pub const ALL: [Lang; 4] = [Lang::Rust, Lang::Python, Lang::Js, Lang::C];

    fn title(self) -> &'static str {
        match self {
            Lang::Rust => "Rust",
            Lang::Python => "Python",
            Lang::Js => "JavaScript",
            Lang::C => "C",
        }
    }

    /// The language's own files.
    fn files(self) -> Vec<File> {
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
            Lang::Python => vec![
                (
                    "src/app.py",
                    include_str!("../templates/python/app.py"),
                    false,
                ),
                (
                    "build.sh",
                    include_str!("../templates/python/build.sh"),
                    true,
                ),
                (
                    ".gitignore",
                    include_str!("../templates/python/gitignore"),
                    false,
                ),
            ],
            Lang::Js => vec![
                ("app.js", include_str!("../templates/js/app.js"), false),
                ("build.sh", include_str!("../templates/js/build.sh"), true),
                (
                    ".gitignore",
                    include_str!("../templates/js/gitignore"),
                    false,
                ),
                // The same pins as the JavaScript example, so both share one install.
                (
                    "package.json",
                    include_str!("../../plugins/notify-router-js/package.json"),
                    false,
                ),
                (
                    "package-lock.json",
                    include_str!("../../plugins/notify-router-js/package-lock.json"),
                    false,
                ),
            ],
            Lang::C => vec![
                ("src/app.c", include_str!("../templates/c/app.c"), false),
                ("build.sh", include_str!("../templates/c/build.sh"), true),
                (
                    ".gitignore",
                    include_str!("../templates/c/gitignore"),
                    false,
                ),
            ],
        }
    }

    fn build_notes(self) -> &'static str {
        match self {
            Lang::Rust => include_str!("../templates/rust/NOTES.md"),
            Lang::Python => include_str!("../templates/python/NOTES.md"),
            Lang::Js => include_str!("../templates/js/NOTES.md"),
            Lang::C => include_str!("../templates/c/NOTES.md"),
        }
    }

    /// Manifest lines beyond the grants: the JavaScript engine needs more memory than the
    /// host's default under sustained traffic.
    fn manifest_limits(self) -> &'static str {
        match self {
            Lang::Js => concat!(
                "\n# The JavaScript engine needs more than the host's default of 64 MiB\n",
                "# under sustained traffic.\n[limits]\nmemory_mib = 128\n"
            ),
            Lang::Rust | Lang::Python | Lang::C => "",
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
        .replace("{{wit_version}}", world_version())
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
            ) + lang.manifest_limits(),
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
        for lang in Lang::ALL {
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
