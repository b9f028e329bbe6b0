"""JVP and HVP of the per-trajectory loss w.r.t. the LM head, ours vs torch.func on materialised
logits (jvp; hvp by forward-over-reverse) and vs double backward, in one run (issue 3).

    python -m pytest benchmarks/bench_jvp_hvp.py --benchmark-only -p no:cacheprovider

The same run times our fused forward and forward+backward on the same S=64 weighted problem
(``ours_weighted``), which the targets are relative to. Our ops are also timed through autograd
(``torch.func.jvp``, forward-over-reverse and double backward through ``trajectory_cross_entropy``).
On the CPU: T=1024, D=576, V=49152, float32 (T=2048 would take over 10 minutes on 2 cores); with a
CUDA device: T=8192, D=4096, V=128256, bfloat16.
"""

from __future__ import annotations

import pytest

from benchmarks._bench import CUDA, DEVICE, env_int, recording, shrink
from benchmarks._common import Problem
from benchmarks._report import second_order_targets
from benchmarks._variants import HVP_NAMES, JVP_NAMES, loss_variant, second_order_variant

if CUDA:
    PROBLEM = Problem(8192, 4096, 128256, "bfloat16", DEVICE)
    ROUNDS = env_int("BOOST_BENCH_ROUNDS", 5)
else:
    PROBLEM = shrink(Problem(1024, 576, 49152, "float32", DEVICE))
    ROUNDS = env_int("BOOST_BENCH_ROUNDS", 2)

COMMAND = "python -m pytest benchmarks/bench_jvp_hvp.py --benchmark-only -p no:cacheprovider"
REFERENCED = {"torch_func"}


def _first(names: tuple[str, ...], first: str) -> list[str]:
    """Reference variant first, so the others can be checked against its result."""
    return [first] + [n for n in names if n != first]


CASES = (
    [("ours_weighted", "fwd"), ("ours_weighted", "fwd_bwd")]
    + [(name, "jvp") for name in _first(JVP_NAMES, "torch_func")]
    + [(name, "hvp") for name in _first(HVP_NAMES, "torch_func")]
)


@pytest.fixture(scope="module")
def recorder(request):
    with recording(request, "JVP / HVP", COMMAND, PROBLEM, second_order_targets, "bench_jvp_hvp") as rec:
        yield rec


@pytest.mark.parametrize("name,op", CASES, ids=[f"{op}-{name}" for name, op in CASES])
def test_jvp_hvp(benchmark, recorder, name, op):
    benchmark.group = f"{PROBLEM.label} {op}"
    v = loss_variant(name, op) if op in ("fwd", "fwd_bwd") else second_order_variant(name, op)
    recorder.run(benchmark, v, PROBLEM, ROUNDS, REFERENCED)
