#!/usr/bin/env bash
# Fetch the competitors that the lent GPU machine lacks (it has torch, triton and pytest-benchmark
# but no registry access) as wheels into .whl/ (git-ignored), for the device tool's `carry`.
# Versions match what `pip install -e ".[dev]"` resolves here, so CPU and GPU rows compare the same code.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "liger-kernel==${LIGER_VERSION:-0.8.5}" "cut-cross-entropy==${CCE_VERSION:-25.1.1}"
ls -l .whl
