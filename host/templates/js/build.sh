#!/usr/bin/env bash
# Builds {{name}}.wasm from app.js with ComponentizeJS. The npm packages pinned in
# package-lock.json are installed once into ${SWITCHYARD_TOOLS:-~/.cache/switchyard/tools}.
set -euo pipefail
cd "$(dirname "$0")"

fail() {
    echo "build.sh: $*" >&2
    exit 1
}

command -v node >/dev/null && command -v npm >/dev/null || fail "node and npm are needed"
node -e '
    const [major, minor] = process.versions.node.split(".").map(Number);
    process.exit(major > 20 || (major === 20 && minor >= 19) ? 0 : 1);
' || fail "node $(node --version) is too old: 20.19 or later is needed"

# One install per lock file, shared by every project with the same pins. The stamp is written
# last, so an interrupted install is redone.
lock="$(sha256sum package-lock.json | cut -c1-16)"
tools="${SWITCHYARD_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/switchyard/tools}/js-$lock"
mkdir -p "$tools"
exec 9>"$tools/.lock" # two builds at once install only once
flock 9
if [[ ! -f "$tools/.installed" ]]; then
    echo "installing ComponentizeJS into $tools"
    cp package.json package-lock.json "$tools/"
    (cd "$tools" && npm ci --no-audit --no-fund --loglevel=error) || fail "npm ci failed"
    touch "$tools/.installed"
fi
flock -u 9

node --check app.js || fail "app.js does not parse"
# Every WASI feature of the engine is off: the plugin then imports only the host interface.
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
node "$tools/node_modules/@bytecodealliance/componentize-js/src/cli.js" app.js \
    --wit wit --world-name plugin --disable stdio random clocks http fetch-event \
    -o "$work/{{name}}.wasm" || fail "componentize-js failed"
mv "$work/{{name}}.wasm" {{name}}.wasm
echo "built {{name}}.wasm"
