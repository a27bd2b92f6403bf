#!/usr/bin/env bash
# Installs what the browser tests need: the system's Chromium and Node (Debian packages, with
# apt-get when they are missing and it can) and playwright-core (npm, pinned in
# package-lock.json).
#
# usage: install.sh
#
# Installs into ${SWITCHYARD_TOOLS:-<repo root>/target/tools}/browser-<hash of the lock file>,
# once: a later run with the same lock file skips the install. Prints that folder on the last
# line of its output; pages.mjs loads playwright-core from there (BROWSER_TOOLS).
#
# The browser is the system's Chromium (/usr/bin/chromium, or SWITCHYARD_CHROMIUM), never one
# that playwright downloads.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
lock="$(sha256sum "$here/package-lock.json" | cut -c1-16)"
tools="${SWITCHYARD_TOOLS:-$root/target/tools}/browser-$lock"

fail() {
    echo "browser tests install: $*" >&2
    exit 1
}

# Installs Debian packages, or fails naming them.
apt_install() {
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1 ||
        { apt-get update -qq >/dev/null 2>&1 &&
            apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1; } ||
        fail "$* missing and apt-get could not install them (Debian: apt-get install $*)"
}

if [[ -z "${SWITCHYARD_CHROMIUM:-}" && ! -x /usr/bin/chromium ]]; then
    echo "installing chromium (Debian package)" >&2
    apt_install chromium
fi
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "installing nodejs and npm (Debian packages)" >&2
    apt_install nodejs npm
fi
node -e '
    const [major] = process.versions.node.split(".").map(Number);
    process.exit(major >= 20 ? 0 : 1);
' || fail "node $(node --version) is too old: 20 or later is needed"

# Install, unless done already. The stamp is written last, so an interrupted install is
# redone; the lock keeps two test runs at the same time from installing over each other.
mkdir -p "$tools"
exec 9>"$tools/.lock"
flock 9
if [[ ! -f "$tools/.installed" ]]; then
    rm -rf "$tools/node_modules"
    cp "$here/package.json" "$here/package-lock.json" "$tools/"
    # playwright-core downloads no browser on install; the variable makes sure of it.
    if ! (cd "$tools" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 \
        npm ci --no-audit --no-fund --loglevel=error) >"$tools/npm-ci.log" 2>&1; then
        cat "$tools/npm-ci.log" >&2
        fail "npm ci failed (log above, also in $tools/npm-ci.log)"
    fi
    touch "$tools/.installed"
fi
flock -u 9

[[ -f "$tools/node_modules/playwright-core/package.json" ]] ||
    fail "$tools/node_modules has no playwright-core; delete $tools and run again"
echo "$tools"
