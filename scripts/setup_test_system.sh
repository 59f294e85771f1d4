#!/usr/bin/env bash
# System pieces the remote-device and ARM tests need (run as root on Debian; CI runs it):
# - openssh-server: tests start their own sshd on 127.0.0.1 with a config of their own;
# - qemu-user-static + an arm64 Python with onnxruntime 1.22.0: the board agent and the
#   wheel are tested on real aarch64 ONNX Runtime under emulation.
# Without them those tests skip with a reason; everything else runs.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
if ! command -v /usr/sbin/sshd >/dev/null 2>&1 || ! command -v qemu-aarch64-static >/dev/null 2>&1; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends openssh-server openssh-client qemu-user-static >/dev/null
fi
bash scripts/setup_qemu_aarch64.sh
