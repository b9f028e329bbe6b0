"""One head-block implicit hypergradient (an outer step's solve): ours vs the same algorithm with
torch.func on materialised logits, next to one inner step (our fused forward+backward).

    python -m pytest benchmarks/bench_hypergradient.py --benchmark-only -p no:cacheprovider

The outer step is ``boost.bilevel.hypergradient.head_hypergradient`` with 5 conjugate-gradient steps
(5 fused HVPs) and one fused JVP for the per-trajectory scores; the baseline runs the same CG with
HVPs by ``torch.func`` forward-over-reverse and the scores by ``torch.func.jvp`` on materialised
logits, as a generic implicit-differentiation library would. The validation gradient g is the
problem's tangent direction. No issue sets a target here; the report gives the outer / inner cost.
On the CPU: T=1024, D=576, V=49152, float32; with a CUDA device: T=8192, D=4096, V=128256, bfloat16.
"""

from __future__ import annotations

import pytest

from benchmarks._bench import CUDA, DEVICE, env_int, recording, shrink
from benchmarks._common import Problem
from benchmarks._report import Target
from benchmarks._variants import loss_variant, second_order_variant

if CUDA:
    PROBLEM = Problem(8192, 4096, 128256, "bfloat16", DEVICE)
    ROUNDS = env_int("BOOST_BENCH_ROUNDS", 3)
else:
    PROBLEM = shrink(Problem(1024, 576, 49152, "float32", DEVICE))
    ROUNDS = env_int("BOOST_BENCH_ROUNDS", 1)

COMMAND = "python -m pytest benchmarks/bench_hypergradient.py --benchmark-only -p no:cacheprovider"
CASES = [("ours_weighted", "fwd_bwd"), ("torch_func", "outer"), ("ours", "outer")]


def no_targets(problem: str) -> list[Target]:
    return []


@pytest.fixture(scope="module")
def recorder(request):
    with recording(request, "Hypergradient", COMMAND, PROBLEM, no_targets, "bench_hypergradient") as rec:
        yield rec


@pytest.mark.parametrize("name,op", CASES, ids=[f"{op}-{name}" for name, op in CASES])
def test_hypergradient(benchmark, recorder, name, op):
    benchmark.group = f"{PROBLEM.label} {op}"
    v = loss_variant(name, op) if op == "fwd_bwd" else second_order_variant(name, op)
    recorder.run(benchmark, v, PROBLEM, ROUNDS, {"torch_func"})
