//! Driving the real `redis-benchmark`: its command line for a burst of PUBLISHes, a run to
//! completion with the rate it reports, and a clear error when it is not installed. Section 11
//! bursts with it, and section 8 floods a slow plugin with it.

use std::process::Stdio;

use anyhow::{Context as _, bail};

/// Connections `redis-benchmark` publishes on.
const CLIENTS: u32 = 1;
/// PUBLISH commands `redis-benchmark` sends per pipeline.
const PIPELINE: u32 = 100;
/// `redis-benchmark -r`: each `__rand_int__` becomes a number below this. Its generator
/// (`random()`) gives 31 bits, so two placeholders make 62.
const KEYSPACE: u64 = 2_147_483_647;
/// What `redis-benchmark` replaces with 12 random digits.
pub(super) const PLACEHOLDER: &str = "__rand_int__";

/// Fails with a clear message when `redis-benchmark` is not installed.
pub(super) fn check_redis_benchmark() -> anyhow::Result<String> {
    let output = std::process::Command::new("redis-benchmark")
        .arg("--version")
        .output()
        .context(
            "this section needs redis-benchmark on the PATH (it ships with redis-server, in \
             Debian's redis-tools package)",
        )?;
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// The port of a `redis://127.0.0.1:PORT` URL.
fn port(url: &str) -> anyhow::Result<&str> {
    url.rsplit(':')
        .next()
        .filter(|p| p.chars().all(|c| c.is_ascii_digit()))
        .with_context(|| format!("no port in {url}"))
}

/// The `redis-benchmark` arguments of a burst of `messages` PUBLISHes of `payload` on
/// `channel`; with `-r` if the payload holds placeholders.
pub(super) fn benchmark_args(
    url: &str,
    messages: u64,
    channel: &str,
    payload: &str,
) -> Vec<String> {
    let mut args: Vec<String> = vec!["-h".into(), "127.0.0.1".into(), "-p".into()];
    args.push(port(url).unwrap_or("6379").to_owned());
    for (flag, value) in [
        ("-c", CLIENTS.to_string()),
        ("-P", PIPELINE.to_string()),
        ("-n", messages.to_string()),
    ] {
        args.push(flag.into());
        args.push(value);
    }
    if payload.contains(PLACEHOLDER) {
        args.extend(["-r".to_owned(), KEYSPACE.to_string()]);
    }
    args.extend(["--csv", "PUBLISH", channel, payload].map(str::to_owned));
    args
}

/// The command line of a burst, for the tables; `tagged` if the payload opens with the two
/// placeholders.
pub(super) fn command_line(messages: u64, channel: &str, payload: usize, tagged: bool) -> String {
    let random = if tagged {
        format!(" -r {KEYSPACE}")
    } else {
        String::new()
    };
    format!(
        "redis-benchmark -c {CLIENTS} -P {PIPELINE} -n {messages}{random} PUBLISH {channel} \
         <{payload} B>"
    )
}

/// Runs `redis-benchmark` to completion; returns the rate it reports (requests per second).
pub(super) async fn run_benchmark(args: &[String]) -> anyhow::Result<f64> {
    let output = tokio::process::Command::new("redis-benchmark")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .context("cannot run redis-benchmark")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "redis-benchmark exited with {}: {}{}",
            output.status,
            stdout.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    // --csv: a header line, then "COMMAND","rps",...
    stdout
        .lines()
        .last()
        .and_then(|line| line.rsplit("\",\"").nth(6))
        .and_then(|rps| rps.trim_matches('"').parse().ok())
        .with_context(|| format!("no rate in redis-benchmark's output: {stdout}"))
}
