"""Fused linear cross-entropy, forward and forward+backward: ours vs naive PyTorch, torch.compile,
Liger-Kernel and Cut Cross-Entropy, with peak memory (issue 2).

    python -m pytest benchmarks/bench_loss.py --benchmark-only -p no:cacheprovider

On the CPU: T=2048, D=576, V=49152 (SmolLM2-135M's head), float32. With a CUDA device: T in
4096..32768, D=4096, V=128256 (Llama-3's head), bfloat16. Liger and CCE's Triton implementation
need CUDA and are skipped on the CPU with the reason. The table (with the targets of the issue) is
printed at the end and written to ``.benchmarks/bench_loss.md``.
"""

from __future__ import annotations

import pytest

from benchmarks._bench import CUDA, DEVICE, env_int, recording, shrink
from benchmarks._common import Problem
from benchmarks._report import loss_targets_cpu, loss_targets_gpu
from benchmarks._variants import LOSS_NAMES, loss_variant

if CUDA:
    PROBLEMS = [Problem(T, 4096, 128256, "bfloat16", DEVICE) for T in (4096, 8192, 16384, 32768)]
    ROUNDS = env_int("BOOST_BENCH_ROUNDS", 5)
    TARGETS = loss_targets_gpu
else:
    PROBLEMS = [shrink(Problem(2048, 576, 49152, "float32", DEVICE))]
    ROUNDS = env_int("BOOST_BENCH_ROUNDS", 2)
    TARGETS = loss_targets_cpu

COMMAND = "python -m pytest benchmarks/bench_loss.py --benchmark-only -p no:cacheprovider"


@pytest.fixture(scope="module")
def recorder(request):
    with recording(request, "Fused loss", COMMAND, PROBLEMS[0], TARGETS, "bench_loss") as rec:
        yield rec


@pytest.fixture(scope="module", params=PROBLEMS, ids=[p.label.replace(" ", "_") for p in PROBLEMS])
def problem(request):
    return request.param


@pytest.mark.parametrize("op", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_loss(benchmark, recorder, problem, op, name):
    benchmark.group = f"{problem.label} {op}"
    recorder.run(benchmark, loss_variant(name, op), problem, ROUNDS, referenced={"naive"})
