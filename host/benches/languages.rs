//! What each language's build of notify-router costs: component size, load time (compile,
//! instantiate, describe) and time per message, on the embedded broker, side by side with the
//! Rust build in the same run.
//!
//! Dead letters are left out: a plugin publishing into its own subscription thousands of
//! times a second meets the loop guard.
//!
//! `cargo bench -p switchyard --bench languages` after `cargo test` has built the components
//! (`target/plugins/polyglot/`). Prints a table; figures are medians of 3 rounds.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use switchyard::config::Config;
use switchyard::offline::{self, Target};

const MESSAGES: usize = 20_000;
const ROUNDS: usize = 3;

fn main() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let builds = [
        (
            "rust",
            target.join("plugins/wasm32-wasip2/release/notify_router.wasm"),
        ),
        (
            "python",
            target.join("plugins/polyglot/notify-router-py.wasm"),
        ),
        (
            "javascript",
            target.join("plugins/polyglot/notify-router-js.wasm"),
        ),
        ("c", target.join("plugins/polyglot/notify-router-c.wasm")),
    ];
    let manifest = root.join("plugins/notify-router/notify-router.toml");
    let valid =
        r#"{"to":"ana@example.com","subject":"Welcome","body":"Hi Ana, thanks for joining."}"#;
    let messages: Vec<(Bytes, Bytes)> = (0..MESSAGES)
        .map(|_| {
            (
                Bytes::from_static(b"notifications:email"),
                Bytes::from_static(valid.as_bytes()),
            )
        })
        .collect();
    // The default queue budget (64 MiB) holds every message at once.
    let config = Config::default();

    let runtime = tokio::runtime::Runtime::new()?;
    println!("notify-router, {MESSAGES} valid email notifications, median of {ROUNDS} rounds\n");
    println!(
        "{:<11} {:>10} {:>10} {:>13} {:>8}",
        "language", "size KiB", "load ms", "µs/message", "vs rust"
    );
    let mut rust_per_message = None;
    for (lang, wasm) in builds {
        if !wasm.is_file() {
            println!("{lang:<11} (not built: run `cargo test` first)");
            continue;
        }
        let size = std::fs::metadata(&wasm)?.len();
        let target = Target {
            wasm,
            name: Some("notify-router".to_owned()),
            manifest: Some(manifest.clone()),
            config: config.clone(),
        };
        let mut loads = Vec::new();
        let mut per_message = Vec::new();
        for _ in 0..ROUNDS {
            let started = Instant::now();
            runtime.block_on(offline::check(&target))?;
            loads.push(started.elapsed());
            let run = runtime.block_on(offline::time_messages(&target, &messages))?;
            per_message.push(run / MESSAGES as u32);
        }
        let load = median(&mut loads);
        let each = median(&mut per_message);
        let ratio = match rust_per_message {
            None => {
                rust_per_message = Some(each);
                1.0
            }
            Some(rust) => each.as_secs_f64() / Duration::as_secs_f64(&rust),
        };
        println!(
            "{lang:<11} {:>10} {:>10.0} {:>13.1} {:>7.1}x",
            size.div_ceil(1024),
            load.as_secs_f64() * 1e3,
            each.as_secs_f64() * 1e6,
            ratio
        );
    }
    println!(
        "\nµs/message: all messages queued at once, then handled one by one (JSON check, one \
         output call, captured); the host's per-message overhead is in every row."
    );
    Ok(())
}

fn median(values: &mut [Duration]) -> Duration {
    values.sort();
    values[values.len() / 2]
}
