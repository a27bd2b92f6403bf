#!/usr/bin/env bash
# Builds the C notify-router into a WebAssembly component.
#
# usage: build.sh OUT.wasm
#
# Needs, and installs when missing:
#   - Debian 12 packages clang-14, lld-14, wasi-libc and libclang-rt-14-dev-wasm32 (apt-get,
#     as root);
#   - wit-bindgen-cli and wasm-tools, exact versions from crates.io (cargo install), and the
#     WASI preview1 reactor adapter from the crates.io package that ships it, into
#     ${SWITCHYARD_TOOLS:-<repo root>/target/tools}/notify-router-c. A later run finds them
#     there and installs nothing.
# Then generates the C bindings for <repo root>/wit, compiles, links a core module and turns
# it into a component.
set -euo pipefail

# Pinned tools. wasm-tools 1.254.2 is built on wasmparser 0.254.2, the release the host's
# Wasmtime 48.0.8 validates components with; wit-bindgen-cli 0.60.0 is the release built on
# the same wit-component line (0.254) as that wasm-tools. The adapter's version is the host's
# Wasmtime release.
WASM_TOOLS_VERSION=1.254.2
WIT_BINDGEN_VERSION=0.60.0
ADAPTER_VERSION=48.0.8
APT_PACKAGES=(clang-14 lld-14 wasi-libc libclang-rt-14-dev-wasm32)

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
tools="${SWITCHYARD_TOOLS:-$root/target/tools}"

fail() {
    echo "notify-router-c build: $*" >&2
    exit 1
}

[[ $# -eq 1 ]] || fail "usage: build.sh OUT.wasm"
out="$1"
[[ -f "$root/wit/plugin.wit" ]] || fail "no WIT contract at $root/wit"

# ---- Debian packages: the compiler, the linker, the C library and compiler runtime for WASI.
missing=()
for package in "${APT_PACKAGES[@]}"; do
    # Not `dpkg -s` alone: it also succeeds for a removed package whose config files remain.
    [[ "$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null)" == "install ok installed" ]] ||
        missing+=("$package")
done
if ((${#missing[@]} > 0)); then
    [[ $EUID -eq 0 ]] || fail "missing Debian packages (install them as root): ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 ||
        { apt-get update -qq >/dev/null 2>&1 &&
            apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1; } ||
        fail "apt-get could not install: ${missing[*]}"
fi
command -v cargo >/dev/null || fail "cargo is needed to install wasm-tools and wit-bindgen"

# ---- Tools from crates.io, shared with projects made by `switchyard new --lang c` (same
# folder names, same pins). Each goes into a folder named after its version, so a change of pin
# installs afresh; the lock keeps two builds at once from installing over each other.
mkdir -p "$tools"
exec 9>"$tools/.c-tools.lock"
flock 9

wasm_tools="$tools/wasm-tools-$WASM_TOOLS_VERSION/bin/wasm-tools"
wit_bindgen="$tools/wit-bindgen-cli-$WIT_BINDGEN_VERSION/bin/wit-bindgen"
adapter="$tools/wasi-adapter-$ADAPTER_VERSION/wasi_snapshot_preview1.reactor.wasm"

# cargo install CRATE VERSION BINARY [cargo install options...]: builds in a scratch target
# folder of its own (removed afterwards) and installs into $tools/CRATE-VERSION. It runs in
# this folder, so the repository's rust-toolchain.toml chooses the Rust toolchain.
install_crate() {
    local crate="$1" version="$2" binary="$3"
    shift 3
    [[ -x "$binary" ]] && return 0
    local log="$tools/install-$crate.log"
    # Unoptimised: the tools run for milliseconds here, and build in a third of the time.
    if ! (cd "$here" && CARGO_TARGET_DIR="$tools/.cargo-target" CARGO_PROFILE_RELEASE_OPT_LEVEL=0 \
        CARGO_PROFILE_RELEASE_DEBUG=false cargo install --locked --quiet \
        --root "$tools/$crate-$version" --version "=$version" "$@" "$crate") >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        fail "cargo install $crate $version failed (log: $log)"
    fi
    rm -rf "$tools/.cargo-target"
}
# Only the features this build uses: `component new`, and the C generator.
install_crate wasm-tools "$WASM_TOOLS_VERSION" "$wasm_tools" --no-default-features --features component
install_crate wit-bindgen-cli "$WIT_BINDGEN_VERSION" "$wit_bindgen" --no-default-features --features c

# The adapter is a file inside a crates.io package: cargo fetches the package (checking it
# against the index's checksum) for a throwaway project that depends on it, and `cargo
# metadata` says where it was unpacked.
if [[ ! -s "$adapter" ]]; then
    probe="$(mktemp -d)"
    mkdir "$probe/src"
    touch "$probe/src/lib.rs"
    printf '[package]\nname = "adapter-fetch"\nversion = "0.0.0"\nedition = "2021"\n[dependencies]\nwasi-preview1-component-adapter-provider = "=%s"\n[workspace]\n' \
        "$ADAPTER_VERSION" >"$probe/Cargo.toml"
    package="$( (cd "$probe" && cargo metadata --quiet --format-version 1) 2>"$probe/log" |
        grep -o "\"manifest_path\":\"[^\"]*/wasi-preview1-component-adapter-provider-$ADAPTER_VERSION/Cargo.toml\"" |
        sed 's/^"manifest_path":"\(.*\)\/Cargo.toml"$/\1/')" || true
    [[ -s "$package/artefacts/wasi_snapshot_preview1.reactor.wasm" ]] ||
        { cat "$probe/log" >&2; fail "could not fetch the WASI adapter $ADAPTER_VERSION"; }
    rm -rf "$probe"
    mkdir -p "$(dirname "$adapter")"
    cp "$package/artefacts/wasi_snapshot_preview1.reactor.wasm" "$adapter.partial"
    mv "$adapter.partial" "$adapter"
fi
flock -u 9

# ---- Build.
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

run() { # runs a command quietly; on failure shows what it said
    if ! "$@" >"$work/log" 2>&1; then
        cat "$work/log" >&2
        fail "failed: $*"
    fi
}

# The bindings are generated fresh on every build, never kept in the repository.
run "$wit_bindgen" c --world plugin --out-dir "$work/gen" "$root/wit"

cflags=(--target=wasm32-wasi -std=c11 -O2 -Wall -Wextra -Werror -I"$work/gen")
objects=()
for source in "$here"/src/*.c "$work/gen/plugin.c"; do
    object="$work/$(basename "$source" .c).o"
    run clang-14 "${cflags[@]}" -c "$source" -o "$object"
    objects+=("$object")
done

# A reactor: no main; the host calls the exports. plugin_component_type.o carries the WIT
# world in a custom section for `component new`. Debian's wasi-libc carries DWARF, dropped
# here.
run clang-14 --target=wasm32-wasi -mexec-model=reactor -Wl,--strip-debug \
    "${objects[@]}" "$work/gen/plugin_component_type.o" -o "$work/core.wasm"

# The module imports nothing from WASI today, so the adapter is left out of the component;
# it is passed so that a future use of a WASI call from wasi-libc still builds.
mkdir -p "$(dirname "$out")"
run "$wasm_tools" component new "$work/core.wasm" \
    --adapt "wasi_snapshot_preview1=$adapter" -o "$out"
