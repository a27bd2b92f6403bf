#!/usr/bin/env bash
# Builds {{name}}.wasm (a component for wasm32-wasip2) next to this script.
set -euo pipefail
cd "$(dirname "$0")"
rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2 ||
    { echo "the wasm32-wasip2 target is missing: rustup target add wasm32-wasip2" >&2; exit 1; }
cargo build --quiet --release --target wasm32-wasip2
cp "${CARGO_TARGET_DIR:-target}/wasm32-wasip2/release/{{name_snake}}.wasm" {{name}}.wasm
echo "built {{name}}.wasm"
