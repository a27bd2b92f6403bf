//! Writes the WASI preview1 reactor adapter to the file named by the one argument.

use std::process::ExitCode;

use wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(path), None) = (args.next(), args.next()) else {
        eprintln!("usage: notify-router-c-adapter OUT.wasm");
        return ExitCode::FAILURE;
    };
    match std::fs::write(&path, WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("cannot write {}: {error}", path.to_string_lossy());
            ExitCode::FAILURE
        }
    }
}
