"""Ahead-of-time compile of every kernel variant for sm_80 and sm_90 (no GPU needed).

Catches what the interpreter forgives: lowering failures, register spills, shared-memory
overflow. Runs ``python -m boost_kernels.aot`` in a subprocess because this test session sets
TRITON_INTERPRET=1, under which kernels are interpreted rather than compiled. Run with ``-s`` to
see registers and shared memory per variant. fp16 compiles like bf16 and is left to the CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

# Shared memory per block: sm_80 (A100) 163 KiB, sm_90 (H100) 227 KiB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def _compile(arch: int, dtype: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "boost_kernels.aot", "--arch", str(arch), "--dtypes", dtype, "--json"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("arch", [80, 90])
def test_every_variant_compiles_without_spills(arch, dtype):
    reports = _compile(arch, dtype)
    for r in reports:
        print(f"sm_{arch} {r['kernel']:<19} {r['variant']:<28} regs={r['registers']:<4} "
              f"local={r['local_bytes']:<5} smem={r['shared_bytes']:<7} mma={r['mma']}")  # fmt: skip
    assert len(reports) == 8
    spilled = [r for r in reports if r["local_bytes"] != 0]
    assert not spilled, f"register spills: {spilled}"
    too_big = [r for r in reports if r["shared_bytes"] > SMEM_LIMIT[arch]]
    assert not too_big, f"shared memory over the limit: {too_big}"
    if dtype == "bf16":
        no_mma = [r for r in reports if r["mma"] == "none"]
        assert not no_mma, f"bf16 kernels must use tensor cores: {no_mma}"
