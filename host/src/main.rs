//! The `switchyard` command: parses the command line and hands over to the library.

use std::process::ExitCode;

use clap::Parser;

/// mimalloc rather than the C library's allocator: every message allocates a few small
/// buffers on the reading thread and frees them on a worker thread, the case mimalloc's
/// per-thread free lists are built for (see BENCHMARKS.md for what it changes).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = switchyard::cli::Cli::parse();
    switchyard::cli::main(cli)
}
