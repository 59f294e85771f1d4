#!/usr/bin/env bash
# Create .venv and install edgeprune with every host-side extra and the test tools.
# torch is installed FIRST and pinned: an unpinned torch pulls several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e '.[all,test]'
echo "edgeprune installed in .venv ($(.venv/bin/edgeprune --version))"
