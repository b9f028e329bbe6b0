"""Launch-time compile checks of the Triton kernels for sm_80 and sm_90 (no GPU needed).

``python -m boost_kernels.aot`` runs the launchers on meta tensors at the issue's target shapes,
intercepts every kernel launch, compiles it exactly as the JIT would specialise it for the GPU and
reads the cubin (registers, spills, shared memory, SASS). It runs in a subprocess because this test
session sets TRITON_INTERPRET=1, under which kernels are interpreted rather than compiled. Compiled
binaries land in Triton's cache, so reruns are fast; run with ``-s`` to see the report.

Targets (issue 12), at T=16384, D=4096, V=128256 and T=65536, D=8192, V=256000, bf16: zero spills;
on sm_90 every tensor-core instruction inside a loop of the forward, backward, JVP and HVP kernels
is wgmma (HGMMA); no GPU-wide fence inside a loop; launches per call independent of T and V (and
small); at most 64 MiB of extra memory per call, except with ``scratch_bytes=None`` (the user's
choice of memory for speed: one pass over the logits, checked to run the one-pass kernel with the
float32 accumulators as its only large allocation).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

TARGET_SHAPES = [(16384, 4096, 128256), (65536, 8192, 256000)]
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # shared memory per block
MAX_LAUNCHES = 32  # Triton launches + PyTorch device kernels per call
EXTRA_BYTES = 64 * 2**20


def _start(*args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return subprocess.Popen(
        [sys.executable, "-m", "boost_kernels.aot", "--json", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def _collect(proc: subprocess.Popen) -> list[dict]:
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-4000:]
    calls = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    for c in calls:
        print(f"[{c['call']}] {c['shape']} {c['dtype']} sm_{c['arch']}: {c['triton_launches']} launches "
              f"+ {c['torch_kernels']} torch kernels, extra {c['extra_bytes'] / 2**20:.1f} MiB")  # fmt: skip
        for k in c["kernels"]:
            print(f"    {k['kernel']} {k['config']} regs={k['registers']} spill={k['spill_bytes']} "
                  f"smem={k['shared_bytes']} mma_in_loops={k['mma_in_loops']} atomics={k['atomics']} "
                  f"fences_in_loops={k['gpu_fences_in_loops']}")  # fmt: skip
    return calls


@pytest.fixture(scope="module")
def reports() -> tuple[list[dict], list[dict]]:
    """(target calls, variant calls). Four report processes at once (compiling is the slow part)."""
    shapes = [a for s in TARGET_SHAPES for a in ("--shape", *map(str, s))]
    procs = [_start(*shapes, "--dtypes", "bf16", "--arch", arch) for arch in ("80", "90")]
    # bias, softcap and every tangent, 16-bit and float32, at a small shape
    procs.append(_start("--shape", "4096", "2048", "32000", "--dtypes", "bf16", "fp32", "--variants"))
    # 16-bit gradients whose float32 copies fit the scratch: the one-launch kernel, not the slab one
    procs.append(_start("--shape", "1024", "1024", "8192", "--dtypes", "bf16", "--variants"))
    targets, variants = _collect(procs[0]) + _collect(procs[1]), _collect(procs[2])
    one_pass = _collect(procs[3])
    assert len(targets) == 2 * 2 * 6  # shapes x archs x (fwd, bwd, jvp, hvp, unlimited bwd and hvp)
    assert any(k["kernel"] == "token_grads_kernel" for _, k in _kernels(one_pass))
    return targets, variants + one_pass


@pytest.fixture(scope="module")
def target_calls(reports) -> list[dict]:
    return reports[0]


@pytest.fixture(scope="module")
def variant_calls(reports) -> list[dict]:
    return reports[1]


def _kernels(calls):
    for c in calls:
        for k in c["kernels"]:
            yield c, k


def test_zero_spills_and_shared_memory_fits(target_calls, variant_calls):
    for c, k in _kernels(target_calls + variant_calls):
        where = f"{c['call']} {c['dtype']} sm_{c['arch']} {k['kernel']} {k['config']}"
        assert k["spill_bytes"] == 0, f"register spills in {where}"
        assert k["shared_bytes"] <= SMEM_LIMIT[c["arch"]], f"shared memory over the limit in {where}"
        assert k["blocks_per_sm"] >= 1, where


def test_hot_loop_dots_are_wgmma_on_sm90(target_calls):
    for c, k in _kernels(target_calls):
        if c["arch"] != 90:
            continue
        in_loops = {name.split(".")[0] for name, n in k["mma_in_loops"].items() if n}
        assert in_loops == {"HGMMA"}, (
            f"{c['call']} {k['kernel']} {k['config']}: loop dots {k['mma_in_loops']}"
        )


def test_16bit_kernels_use_tensor_cores_on_sm80(target_calls):
    for c, k in _kernels(target_calls):
        if c["arch"] == 80:
            assert any(name.startswith("HMMA") for name in k["mma_in_loops"]), f"{c['call']} {k['kernel']}"


def test_no_gpu_wide_fence_in_hot_loops(target_calls):
    for c, k in _kernels(target_calls):
        assert k["gpu_fences_in_loops"] == 0, f"{c['call']} sm_{c['arch']} {k['kernel']}: {k['atomics']}"


def test_launches_per_call_do_not_grow_with_tokens_or_vocabulary(target_calls):
    by_call: dict[tuple, set[int]] = {}
    for c in target_calls:
        n = c["triton_launches"] + c["torch_kernels"]
        assert n <= MAX_LAUNCHES, (
            f"{c['call']} {c['shape']} sm_{c['arch']}: {n} launches {c['torch_kernel_ops']}"
        )
        by_call.setdefault((c["call"], c["arch"]), set()).add(n)
    assert all(len(v) == 1 for v in by_call.values()), by_call


def test_extra_memory_within_64_mib(target_calls):
    for c in target_calls:
        if "unlimited_scratch" in c["call"]:
            continue
        assert c["extra_bytes"] <= EXTRA_BYTES, (
            f"{c['call']} {c['shape']}: {c['extra_bytes'] / 2**20:.1f} MiB"
        )


FLOAT_ATOMIC = re.compile(r"\.(F16|BF16|F32|F64)(?![0-9])")


def test_deterministic_mode_has_no_floating_point_atomics(variant_calls):
    """Integer atomics (the slab kernel's tickets and slab counters) do not change results; a float
    atomic add would make them depend on the order programs finish in."""
    calls = [c for c in variant_calls if "deterministic" in c["call"]]
    assert len(calls) == 2 * 3 * 2  # (loss_bwd, hvp) x (bf16, fp32, small bf16) x archs
    for c, k in _kernels(calls):
        floats = [a for a in k["atomics"] if FLOAT_ATOMIC.search(a)]
        assert not floats, f"{c['call']} {c['dtype']} sm_{c['arch']} {k['kernel']}: {k['atomics']}"
    # the 16-bit calls do run the slab kernel with its counters (so the check above means something)
    assert any(k["atomics"] for c, k in _kernels(calls) if c["dtype"] == "bf16")


def test_atomic_names_are_classified():
    assert FLOAT_ATOMIC.search("REDG.E.ADD.F32x4.FTZ.RN.STRONG.GPU")
    assert FLOAT_ATOMIC.search("RED.E.ADD.F32.FTZ.RN.STRONG.GPU")
    assert not FLOAT_ATOMIC.search("ATOMG.E.ADD.STRONG.GPU")
    assert not FLOAT_ATOMIC.search("ATOMG.E.EXCH.STRONG.GPU")


def test_unlimited_scratch_is_one_pass_over_the_logits(target_calls):
    """scratch_bytes=None at the target shapes: the one-pass kernel, one launch, and no extra memory
    beyond its float32 accumulators ((T + V)·D·4 for the loss, V·D·4 for the head-only HVP) and
    O(T + V) statistics (its checks of spills, wgmma and fences are the tests above)."""
    calls = [c for c in target_calls if "unlimited_scratch" in c["call"]]
    assert len(calls) == 2 * 2 * 2
    for c in calls:
        T, D, V = c["shape"]
        grads = [lu for lu in c["launches"] if lu["kernel"].startswith("token_grads")]
        assert [lu["kernel"] for lu in grads] == ["token_grads_kernel"], (c["call"], c["launches"])
        accumulators = ((T + V) if c["call"].startswith("loss_bwd") else V) * D * 4
        assert accumulators <= c["extra_bytes"] <= accumulators + 64 * (T + V), (
            f"{c['call']} {c['shape']}: {c['extra_bytes'] / 2**20:.1f} MiB"
        )
