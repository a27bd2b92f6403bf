#!/usr/bin/env bash
# Builds {{name}}.wasm from the C sources in src/: bindings from `wit-bindgen c`, a reactor
# module from clang with wasi-libc, and the component from `wasm-tools component new` with the
# WASI preview1 adapter. The tools are pinned below and installed once from crates.io into
# ${SWITCHYARD_TOOLS:-~/.cache/switchyard/tools}.
set -euo pipefail
cd "$(dirname "$0")"

# wasm-tools 1.254 writes components with the wasmparser release the host validates with;
# wit-bindgen-cli 0.60 is built on the same wit-component line; the adapter is the host's
# Wasmtime release.
WASM_TOOLS_VERSION=1.254.2
WIT_BINDGEN_VERSION=0.60.0
ADAPTER_VERSION=48.0.8
CC="${CC:-clang-14}"
tools="${SWITCHYARD_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/switchyard/tools}"

fail() {
    echo "build.sh: $*" >&2
    exit 1
}

command -v "$CC" >/dev/null ||
    fail "$CC is missing (Debian: apt-get install clang-14 lld-14 wasi-libc libclang-rt-14-dev-wasm32)"
command -v cargo >/dev/null || fail "cargo is needed to install wit-bindgen and wasm-tools"

mkdir -p "$tools"
exec 9>"$tools/.c-tools.lock" # two builds at once install only once
flock 9
# install CRATE VERSION BINARY [cargo install options]: into $tools/CRATE-VERSION.
install() {
    local crate="$1" version="$2" binary="$3"
    shift 3
    [[ -x "$tools/$crate-$version/bin/$binary" ]] && return
    echo "installing $crate $version into $tools (once; it takes a minute or two)"
    # Unoptimised: the tools run for milliseconds, and build in a third of the time.
    CARGO_TARGET_DIR="$tools/.cargo-target" CARGO_PROFILE_RELEASE_OPT_LEVEL=0 \
        CARGO_PROFILE_RELEASE_DEBUG=false cargo install --locked --quiet \
        --root "$tools/$crate-$version" --version "=$version" "$@" "$crate" ||
        fail "cargo install $crate failed"
    rm -rf "$tools/.cargo-target"
}
install wasm-tools "$WASM_TOOLS_VERSION" wasm-tools --no-default-features --features component
install wit-bindgen-cli "$WIT_BINDGEN_VERSION" wit-bindgen --no-default-features --features c
wasm_tools="$tools/wasm-tools-$WASM_TOOLS_VERSION/bin/wasm-tools"
wit_bindgen="$tools/wit-bindgen-cli-$WIT_BINDGEN_VERSION/bin/wit-bindgen"

# The adapter ships inside a crates.io package: let cargo fetch and verify it, then copy it.
adapter="$tools/wasi-adapter-$ADAPTER_VERSION/wasi_snapshot_preview1.reactor.wasm"
if [[ ! -s "$adapter" ]]; then
    probe="$(mktemp -d)"
    mkdir "$probe/src"
    touch "$probe/src/lib.rs"
    printf '[package]\nname = "adapter-fetch"\nversion = "0.0.0"\nedition = "2021"\n[dependencies]\nwasi-preview1-component-adapter-provider = "=%s"\n[workspace]\n' \
        "$ADAPTER_VERSION" >"$probe/Cargo.toml"
    crate="$( (cd "$probe" && cargo metadata --quiet --format-version 1) |
        grep -o "\"manifest_path\":\"[^\"]*/wasi-preview1-component-adapter-provider-$ADAPTER_VERSION/Cargo.toml\"" |
        sed 's/^"manifest_path":"\(.*\)\/Cargo.toml"$/\1/')" || true
    rm -rf "$probe"
    [[ -s "$crate/artefacts/wasi_snapshot_preview1.reactor.wasm" ]] ||
        fail "could not fetch wasi-preview1-component-adapter-provider $ADAPTER_VERSION"
    mkdir -p "$(dirname "$adapter")"
    cp "$crate/artefacts/wasi_snapshot_preview1.reactor.wasm" "$adapter.partial"
    mv "$adapter.partial" "$adapter"
fi
flock -u 9

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# The bindings are generated on every build from wit/, never edited by hand.
"$wit_bindgen" c --world plugin --out-dir "$work/gen" wit >/dev/null
objects=()
for source in src/*.c "$work/gen/plugin.c"; do
    object="$work/$(basename "$source" .c).o"
    "$CC" --target=wasm32-wasi -std=c11 -O2 -Wall -Wextra -I"$work/gen" -c "$source" -o "$object"
    objects+=("$object")
done
# A reactor: no main, the host calls the exports. plugin_component_type.o carries the world
# for `component new`; Debian's wasi-libc carries debug info, stripped here.
"$CC" --target=wasm32-wasi -mexec-model=reactor -Wl,--strip-debug \
    "${objects[@]}" "$work/gen/plugin_component_type.o" -o "$work/core.wasm"
"$wasm_tools" component new "$work/core.wasm" \
    --adapt "wasi_snapshot_preview1=$adapter" -o "$work/{{name}}.wasm"
mv "$work/{{name}}.wasm" {{name}}.wasm
echo "built {{name}}.wasm"
