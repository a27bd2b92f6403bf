#!/usr/bin/env bash
# Builds the JavaScript notify-router into a WebAssembly component.
#
# usage: build.sh OUT.wasm
#
# Installs the npm packages pinned in package-lock.json (ComponentizeJS and jco) into
# ${SWITCHYARD_TOOLS:-<repo root>/target/tools}/js-<hash of the lock file>, once: a later run with
# the same lock file skips the install. Then componentizes notify-router.js against <repo root>/wit.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
# One install per lock file: projects made by `switchyard new --lang js` pin the same packages
# (package.json and package-lock.json are copied from here) and share it.
lock="$(sha256sum "$here/package-lock.json" | cut -c1-16)"
tools="${SWITCHYARD_TOOLS:-$root/target/tools}/js-$lock"

fail() {
    echo "notify-router-js build: $*" >&2
    exit 1
}

[[ $# -eq 1 ]] || fail "usage: build.sh OUT.wasm"
out="$(realpath -m "$1")"
[[ -f "$root/wit/plugin.wit" ]] || fail "no WIT contract at $root/wit"

# Node 20.19 or later: the oldest line that every pinned package supports.
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    if ! dpkg -s nodejs npm >/dev/null 2>&1; then
        apt-get install -y -qq nodejs npm >/dev/null 2>&1 ||
            { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq nodejs npm >/dev/null 2>&1; } ||
            fail "node and npm are missing and apt-get could not install them"
    fi
fi
node -e '
    const [major, minor] = process.versions.node.split(".").map(Number);
    process.exit(major > 20 || (major === 20 && minor >= 19) ? 0 : 1);
' || fail "node $(node --version) is too old: 20.19 or later is needed"

# Install, unless done already. The stamp is written last, so an interrupted install is
# redone; the lock keeps two builds running at the same time from installing over each other.
mkdir -p "$tools"
exec 9>"$tools/.lock"
flock 9
if [[ ! -f "$tools/.installed" ]]; then
    rm -rf "$tools/node_modules"
    cp "$here/package.json" "$here/package-lock.json" "$tools/"
    if ! (cd "$tools" && npm ci --no-audit --no-fund --loglevel=error) >"$tools/npm-ci.log" 2>&1; then
        cat "$tools/npm-ci.log" >&2
        fail "npm ci failed (log above, also in $tools/npm-ci.log)"
    fi
    touch "$tools/.installed"
fi
flock -u 9

log="$(mktemp)"
trap 'rm -f "$log"' EXIT

# A syntax error gets a precise message from node; ComponentizeJS only counts them.
if ! node --check "$here/notify-router.js" 2>"$log"; then
    cat "$log" >&2
    fail "notify-router.js does not parse"
fi

# ComponentizeJS is run directly: `jco componentize` would use the older copy that jco 1.35.0
# depends on itself (0.22.0, whose bindings leak memory on every call). Every WASI feature of
# the engine is disabled: the plugin needs none, and the component then imports nothing but
# the contract's host interface.
bin="$tools/node_modules/@bytecodealliance"
mkdir -p "$(dirname "$out")"
# Written beside OUT and renamed into place at the end, so that a host watching OUT's folder
# never loads a half-written or unchecked file.
part="$out.part"
trap 'rm -f "$log" "$part"' EXIT
# Run from this folder: the component records the source's path relative to the working
# directory (for stack traces), which then does not depend on where build.sh is run from.
if ! (cd "$here" && node "$bin/componentize-js/src/cli.js" notify-router.js \
    --wit "$root/wit" --world-name plugin \
    --disable stdio random clocks http fetch-event \
    -o "$part") >"$log" 2>&1 || [[ ! -s "$part" ]]; then
    cat "$log" >&2
    fail "componentize-js failed"
fi

# Check what the component imports: the host interface (and its types), nothing else.
if ! node "$bin/jco/dist/jco.js" wit "$part" >"$log" 2>&1; then
    cat "$log" >&2
    fail "jco could not read the component's WIT"
fi
if unexpected="$(grep -E '^\s*import ' "$log" | grep -v ' switchyard:plugin/')"; then
    fail "the component imports more than the host interface: $unexpected"
fi
mv -f "$part" "$out"
