#!/usr/bin/env bash
# Builds {{name}}.wasm from the Python modules in src/ (entry module `app`) with
# componentize-py, which it installs once, at the pinned version, into a venv under
# ${SWITCHYARD_TOOLS:-~/.cache/switchyard/tools}.
set -euo pipefail
cd "$(dirname "$0")"

COMPONENTIZE_PY_VERSION=0.25.1
tools="${SWITCHYARD_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/switchyard/tools}"
venv="$tools/componentize-py-$COMPONENTIZE_PY_VERSION"

fail() {
    echo "build.sh: $*" >&2
    exit 1
}

installed() {
    [[ "$("$venv/bin/componentize-py" --version 2>/dev/null)" == "componentize-py $COMPONENTIZE_PY_VERSION" ]]
}

if ! installed; then
    python3 -c 'import venv, ensurepip' 2>/dev/null ||
        fail "python3 with venv and pip is needed (Debian: apt-get install python3-venv)"
    mkdir -p "$tools"
    exec 9>"$venv.lock" # two builds at once install only once
    flock 9
    if ! installed; then
        echo "installing componentize-py $COMPONENTIZE_PY_VERSION into $venv"
        rm -rf "$venv"
        python3 -m venv "$venv"
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
            "componentize-py==$COMPONENTIZE_PY_VERSION" ||
            { rm -rf "$venv"; fail "could not install componentize-py"; }
    fi
    flock -u 9
fi

# componentize-py bundles every file in the module folder and writes __pycache__ there: give
# it a scratch copy of src/. VIRTUAL_ENV would add that venv's packages to the bundle.
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp -r src "$work/app"
env -u VIRTUAL_ENV "$venv/bin/componentize-py" --quiet --wit-path wit --world plugin \
    componentize --python-path "$work/app" --output "$work/{{name}}.wasm" app ||
    fail "componentize-py failed"
mv "$work/{{name}}.wasm" {{name}}.wasm
echo "built {{name}}.wasm"
