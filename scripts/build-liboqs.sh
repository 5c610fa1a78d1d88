#!/usr/bin/env bash
# Build the liboqs shared library (ML-KEM and ML-DSA only) into a prefix, for pqproxy's
# liboqs backend, which loads it through liboqs-python and OQS_INSTALL_PATH.
#
#   scripts/build-liboqs.sh [PREFIX]          PREFIX defaults to .venv/liboqs
#
#   LIBOQS_SRC     the source: a .tar.gz, an unpacked source directory, or an https:// URL of
#                  a release tarball. Default: the snapshot in ../shared/vendor/ (see its
#                  README); outside that network use the pinned release:
#                  LIBOQS_SRC=https://github.com/open-quantum-safe/liboqs/archive/refs/tags/0.16.0.tar.gz
#   LIBOQS_SHA256  optional: the expected SHA-256 of a tarball or download
#
# Idempotent: a stamp in PREFIX records the source and the build options; when both match
# and the library is there, nothing is rebuilt. The install is staged and moved into place
# at the end, so a failed build never leaves a half-installed PREFIX behind.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEFAULT_SRC="$ROOT/../shared/vendor/liboqs-0.16.0-19-g8979276.tar.gz"
PINNED_URL="https://github.com/open-quantum-safe/liboqs/archive/refs/tags/0.16.0.tar.gz"
SRC="${LIBOQS_SRC:-$DEFAULT_SRC}"
PREFIX="${1:-$ROOT/.venv/liboqs}"
STAMP="$PREFIX/.pqproxy-build-stamp"
APT_HINT="on Debian/Ubuntu: sudo apt-get install cmake ninja-build gcc libc6-dev"

# Only what pqproxy uses: a minimal build takes ~40 s instead of many minutes. OpenSSL is
# off so that liboqs uses its own SHA-3 and the system RNG (getrandom), with no dependency
# on whichever libcrypto the host has.
CMAKE_OPTIONS=(
    -DCMAKE_BUILD_TYPE=Release
    -DBUILD_SHARED_LIBS=ON
    -DOQS_BUILD_ONLY_LIB=ON
    -DOQS_USE_OPENSSL=OFF
    "-DOQS_MINIMAL_BUILD=KEM_ml_kem_512;KEM_ml_kem_768;KEM_ml_kem_1024;SIG_ml_dsa_44;SIG_ml_dsa_65;SIG_ml_dsa_87"
)

say() { printf 'build-liboqs: %s\n' "$*"; }
die() {
    printf 'build-liboqs: ERROR: %s\n' "$*" >&2
    exit 1
}

case "$PREFIX" in
    /*) ;;
    *) PREFIX="$PWD/$PREFIX"; STAMP="$PREFIX/.pqproxy-build-stamp" ;;
esac

installed_library() {
    local dir
    for dir in lib lib64; do
        [ -e "$PREFIX/$dir/liboqs.so" ] && { echo "$PREFIX/$dir/liboqs.so"; return 0; }
    done
    return 1
}

# --- what would be built ------------------------------------------------------------------

source_id() {
    # A tarball is identified by its content, a directory by its path, a URL by itself plus
    # the expected hash if one was given: the stamp then notices a changed LIBOQS_SRC.
    if [[ "$SRC" == http://* || "$SRC" == https://* ]]; then
        echo "url $SRC ${LIBOQS_SHA256:-}"
    elif [ -f "$SRC" ]; then
        echo "tarball sha256:$(sha256sum "$SRC" | cut -d' ' -f1)"
    elif [ -d "$SRC" ]; then
        echo "directory $(cd "$SRC" && pwd)"
    else
        die "LIBOQS_SRC=$SRC is neither a file, a directory nor an http(s) URL.
  In this repository's CI it is ../shared/vendor/liboqs-*.tar.gz (see ../shared/vendor/README.md);
  elsewhere use the pinned release: make liboqs LIBOQS_SRC=$PINNED_URL"
    fi
}

WANTED="$(source_id)
options ${CMAKE_OPTIONS[*]}"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANTED" ] && lib="$(installed_library)"; then
    say "up to date: $lib (rm -r $PREFIX to rebuild)"
    exit 0
fi

# --- tools --------------------------------------------------------------------------------

command -v cmake >/dev/null 2>&1 || die "cmake not found; $APT_HINT"
if command -v ninja >/dev/null 2>&1; then
    GENERATOR=(-G Ninja)
elif command -v make >/dev/null 2>&1; then
    # Works, only slower; the vendor README builds the same way without ninja.
    say "ninja not found, building with make instead (faster: $APT_HINT)"
    GENERATOR=(-G "Unix Makefiles")
else
    die "neither ninja nor make found; $APT_HINT"
fi
command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 \
    || die "no C compiler (cc/gcc) found; $APT_HINT"

# Never delete a prefix this script did not build (PREFIX=/usr/local would be a disaster).
if [ -d "$PREFIX" ] && [ ! -f "$STAMP" ] && [ -n "$(ls -A "$PREFIX")" ]; then
    die "$PREFIX exists, is not empty and was not built by this script: choose another PREFIX"
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/pqproxy-liboqs.XXXXXX")"
STAGE="$PREFIX.staging.$$"
cleanup() { rm -rf "$WORK" "$STAGE"; }
trap cleanup EXIT

# --- source -------------------------------------------------------------------------------

check_sha256() {
    [ -n "${LIBOQS_SHA256:-}" ] || return 0
    local got
    got="$(sha256sum "$1" | cut -d' ' -f1)"
    [ "$got" = "$LIBOQS_SHA256" ] || die "$1: SHA-256 is $got, LIBOQS_SHA256 says $LIBOQS_SHA256"
}

unpack() {
    check_sha256 "$1"
    mkdir -p "$WORK/src"
    tar -xzf "$1" -C "$WORK/src" || die "cannot unpack $1"
    # The tarball holds one top directory (liboqs-0.16.0/); find it by its CMakeLists.txt.
    local top
    top="$(find "$WORK/src" -mindepth 2 -maxdepth 2 -name CMakeLists.txt -printf '%h\n' | head -n1)"
    [ -n "$top" ] || die "$1 does not contain a liboqs source tree (no */CMakeLists.txt)"
    echo "$top"
}

if [[ "$SRC" == http://* || "$SRC" == https://* ]]; then
    say "downloading $SRC"
    if command -v curl >/dev/null 2>&1; then
        curl -fsSL --retry 3 -o "$WORK/liboqs.tar.gz" "$SRC" || die "download failed: $SRC"
    elif command -v wget >/dev/null 2>&1; then
        wget -q -O "$WORK/liboqs.tar.gz" "$SRC" || die "download failed: $SRC"
    else
        die "neither curl nor wget is installed to download $SRC"
    fi
    say "downloaded, sha256 $(sha256sum "$WORK/liboqs.tar.gz" | cut -d' ' -f1)"
    SOURCE_DIR="$(unpack "$WORK/liboqs.tar.gz")"
elif [ -f "$SRC" ]; then
    SOURCE_DIR="$(unpack "$SRC")"
else
    [ -f "$SRC/CMakeLists.txt" ] || die "$SRC has no CMakeLists.txt: not a liboqs source tree"
    SOURCE_DIR="$(cd "$SRC" && pwd)"
fi

# --- build --------------------------------------------------------------------------------

say "building $(basename "$SOURCE_DIR") from $SRC into $PREFIX"
start=$SECONDS
cmake -S "$SOURCE_DIR" -B "$WORK/build" "${GENERATOR[@]}" \
    -DCMAKE_INSTALL_PREFIX="$PREFIX" "${CMAKE_OPTIONS[@]}" >"$WORK/configure.log" 2>&1 \
    || { tail -n 30 "$WORK/configure.log" >&2; die "cmake configure failed (log above)"; }
cmake --build "$WORK/build" --parallel "$(nproc 2>/dev/null || echo 2)" >"$WORK/build.log" 2>&1 \
    || { tail -n 30 "$WORK/build.log" >&2; die "build failed (log above)"; }
# DESTDIR staging keeps the configured prefix (baked into the pkg-config and cmake files)
# while the files land beside it; the move below makes the new build appear all at once.
DESTDIR="$STAGE" cmake --install "$WORK/build" >"$WORK/install.log" 2>&1 \
    || { tail -n 30 "$WORK/install.log" >&2; die "install failed (log above)"; }

rm -rf "$PREFIX"
mkdir -p "$(dirname "$PREFIX")"
mv "$STAGE$PREFIX" "$PREFIX"
lib="$(installed_library)" || die "the build installed no liboqs.so under $PREFIX"
printf '%s\n' "$WANTED" >"$STAMP"
say "built $lib in $((SECONDS - start)) s"
if [ "$PREFIX" = "$ROOT/.venv/liboqs" ]; then
    say "pqproxy's liboqs backend finds it there by itself"
else
    say "point pqproxy at it with: export OQS_INSTALL_PATH=$PREFIX"
fi
