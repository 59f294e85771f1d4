#!/usr/bin/env bash
# Prepare an aarch64 Python with numpy + ONNX Runtime that runs on an x86_64 host under
# qemu-user emulation, so the board agent and the edgeprune wheel can be tested on ARM code
# without a board.
#
# What it does (idempotent; a second run only re-checks):
#   1. apt-get update, install qemu-user-static (provides qemu-aarch64-static);
#   2. dpkg --add-architecture arm64 + apt-get update; apt-get download the arm64 packages
#      of Debian's python3.11 and the shared libraries it, numpy and onnxruntime load;
#   3. dpkg -x them into $EDGEPRUNE_AARCH64_ROOT (default /opt/edgeprune-aarch64);
#   4. pip-installs (host pip, --platform/--only-binary) numpy and onnxruntime into the
#      prefix's dist-packages; onnxruntime is pinned to 1.22.0 because later aarch64 wheels
#      (1.31.1) crash under qemu-user;
#   5. writes $EDGEPRUNE_AARCH64_ROOT/bin/python3, an x86 wrapper that runs the arm64
#      python under qemu with QEMU_LD_PREFIX set, and smoke-tests it.
#
# Needs root (apt, dpkg) and network access to Debian and PyPI. Works on Debian bookworm
# (python3.11); on another release set EDGEPRUNE_AARCH64_PYVER to its python3.X.
#
# Environment:
#   EDGEPRUNE_AARCH64_ROOT   prefix to fill          (default /opt/edgeprune-aarch64)
#   EDGEPRUNE_AARCH64_PYVER  Debian python version   (default 3.11)
#   EDGEPRUNE_AARCH64_ORT    onnxruntime version     (default 1.22.0)
#   EDGEPRUNE_HOST_PYTHON    host python with pip    (default python3)
set -euo pipefail

ROOT="${EDGEPRUNE_AARCH64_ROOT:-/opt/edgeprune-aarch64}"
PYVER="${EDGEPRUNE_AARCH64_PYVER:-3.11}"
ORT_VERSION="${EDGEPRUNE_AARCH64_ORT:-1.22.0}"
HOST_PYTHON="${EDGEPRUNE_HOST_PYTHON:-python3}"
QEMU=/usr/bin/qemu-aarch64-static
SITE="$ROOT/usr/lib/python3/dist-packages"
export DEBIAN_FRONTEND=noninteractive

# Shared libraries: the interpreter (libc6, zlib1g, libexpat1, libssl3), the stdlib's C
# modules used by numpy/onnxruntime imports (libffi8: ctypes; libbz2/liblzma: shutil,
# tarfile; libuuid1: uuid), and the C++ runtime of onnxruntime (libstdc++6, libgcc-s1).
PACKAGES=(
    libc6 libgcc-s1 libstdc++6 zlib1g libexpat1 libssl3 libffi8 libbz2-1.0 liblzma5 libuuid1
    "libpython${PYVER}-minimal" "python${PYVER}-minimal" "libpython${PYVER}-stdlib"
)

log() { echo "setup_qemu_aarch64: $*" >&2; }

die() { log "error: $*"; exit 1; }

run_arm_python() {
    QEMU_LD_PREFIX="$ROOT" "$QEMU" "$ROOT/usr/bin/python${PYVER}" "$@"
}

already_done() {
    [ -x "$QEMU" ] && [ -x "$ROOT/bin/python3" ] && [ -x "$ROOT/usr/bin/python${PYVER}" ] || return 1
    local got
    got="$(run_arm_python -c 'import numpy, onnxruntime; print(onnxruntime.__version__)' 2>/dev/null)" || return 1
    [ "$got" = "$ORT_VERSION" ]
}

install_host_tools() {
    [ "$(id -u)" = 0 ] || die "run as root (apt-get and dpkg are needed), e.g. sudo $0"
    apt-get update -q
    apt-get install -y -q --no-install-recommends qemu-user-static ca-certificates
    if ! "$HOST_PYTHON" -m pip --version >/dev/null 2>&1; then
        apt-get install -y -q --no-install-recommends python3-pip
    fi
}

add_arm64_arch() {
    if ! dpkg --print-foreign-architectures | grep -qx arm64; then
        dpkg --add-architecture arm64
    fi
    apt-get update -q
}

unpack_packages() {
    local debs="$ROOT/.debs"
    mkdir -p "$debs" "$ROOT"
    local pkg
    for pkg in "${PACKAGES[@]}"; do
        if ! ls "$debs/${pkg}_"*_arm64.deb >/dev/null 2>&1; then
            (cd "$debs" && apt-get download -q -o APT::Sandbox::User=root "${pkg}:arm64")
        fi
    done
    local deb
    for deb in "$debs"/*.deb; do
        dpkg -x "$deb" "$ROOT"
    done
}

pip_install_runtime() {
    mkdir -p "$SITE"
    "$HOST_PYTHON" -m pip install -q --upgrade --no-compile --root-user-action=ignore \
        --only-binary=:all: --implementation cp --python-version "$PYVER" \
        --platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 \
        --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 \
        --target "$SITE" numpy "onnxruntime==${ORT_VERSION}"
}

write_wrapper() {
    mkdir -p "$ROOT/bin"
    cat > "$ROOT/bin/python3" <<EOF
#!/bin/sh
# arm64 python${PYVER} under qemu-user (written by scripts/setup_qemu_aarch64.sh)
QEMU_LD_PREFIX="$ROOT" exec "$QEMU" "$ROOT/usr/bin/python${PYVER}" "\$@"
EOF
    chmod +x "$ROOT/bin/python3"
}

smoke_test() {
    local out
    out="$("$ROOT/bin/python3" -c 'import platform, numpy, onnxruntime as ort; print(platform.machine(), numpy.__version__, ort.__version__, ",".join(ort.get_available_providers()))')" \
        || die "the arm64 python in $ROOT does not start or cannot import numpy/onnxruntime"
    log "ready: $ROOT/bin/python3 -> $out"
    case "$out" in aarch64*) ;; *) die "expected machine aarch64, got: $out" ;; esac
}

main() {
    if already_done; then
        log "already set up in $ROOT (onnxruntime $ORT_VERSION); nothing to do"
        smoke_test
        return 0
    fi
    install_host_tools
    add_arm64_arch
    unpack_packages
    pip_install_runtime
    write_wrapper
    smoke_test
}

main "$@"
