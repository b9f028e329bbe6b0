"""Step time and peak memory on the CPU preset: full fine-tuning vs LoRA, uniform vs BOOST, one run.

    python -m pytest benchmarks/bench_cpu_preset.py -s -p no:cacheprovider --benchmark-columns=mean,stddev,min,max,rounds

The CPU preset (``configs/cpu_preset.yaml``: 4-layer width-128 Llama, word-level tokenizer, 8 rows x
768 tokens of source-mixed gridnav-compact trajectories, 1 torch thread). One round is one step on
one fixed batch: *uniform* is an inner step with weight 1; *BOOST* is the inner step with the
reweighting head plus the outer step after it (head block, CG with 5 steps: a trunk forward on a
validation batch and fused head passes). *LoRA* is peft's r=16 on every linear layer with the LM
head trained too (``lora.train_head=true``: what ``block=head`` needs; the uniform LoRA case keeps it
so that only the weighting differs). 15 rounds after 3 warm-up rounds.

Each case runs in its own child process (``benchmarks/_trainer_child.py`` says why: peak resident
memory is a per-process high-water mark). pytest-benchmark times the parent's request-and-reply
round trip (a pipe: well under a millisecond against a step of about a second); the table also
gives the child's process CPU time per step (one thread: the computation's own time, whatever else
the shared box runs). Memory columns, from the child's ``/proc/self/status``:

- *RSS built*: resident set once the trainer is built (model, optimiser, head, data, libraries);
- *peak stepping*: the high-water mark over the warm-up and timed steps (reset after the build);
- *step adds*: peak stepping minus RSS built (activations, gradients, optimiser moments, CG vectors);
- *libraries*: resident set after importing torch / transformers / boost, before any of it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics

import pytest

from benchmarks._common import run_info
from benchmarks._trainer_child import serve
from boost.generate import main as generate

LORA = ("lora.enabled=true", "lora.train_head=true", "lora.r=16")
CASES = {  # name: (overrides, outer step after the inner step)
    "full, uniform": (("weighting.method=uniform",), False),
    "full, BOOST": (("weighting.method=boost",), True),
    "LoRA r=16 + head, uniform": (("weighting.method=uniform", *LORA), False),
    "LoRA r=16 + head, BOOST": (("weighting.method=boost", *LORA), True),
}
ROUNDS, WARMUP = int(os.environ.get("BOOST_BENCH_ROUNDS", 15)), 3
ROWS: dict[str, dict] = {}
MIB = 2**20


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("cpu_preset") / "gridnav.jsonl"
    sources = "real:200,eps0.1:100,eps0.3:100,random:100,corrupt:100,expert_shifted:100"
    argv = ["--env", "gridnav-compact", "--out", str(path), "--sources", sources, "--no-progress"]
    assert generate(argv) == 0
    return path


@pytest.fixture(scope="module", autouse=True)
def _table():
    yield
    if ROWS:
        print("\n" + markdown(ROWS))


def markdown(rows: dict[str, dict]) -> str:
    info = run_info("cpu")
    head = (
        f"{info['machine']}; {info['date']}; commit {info['commit']}; torch {info['torch']}; "
        f"load average at the end {info['load_average']}"
    )
    lines = [head, "", "| case | trained parameters | wall s/step (mean, min) | CPU s/step (median) | "
             "RSS built | peak stepping | step adds | libraries |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['trained_parameters']:,} of {r['parameters']:,} | {r['wall_mean']:.3f}, "
            f"{r['wall_min']:.3f} | {r['cpu_median']:.3f} | {r['rss_built'] / MIB:.0f} MiB | "
            f"{r['peak_stepping'] / MIB:.0f} MiB | {(r['peak_stepping'] - r['rss_built']) / MIB:.0f} MiB | "
            f"{r['rss_imports'] / MIB:.0f} MiB |"
        )
    return "\n".join(lines)


@pytest.mark.parametrize("name", list(CASES))
def test_step(benchmark, data, tmp_path, name):
    overrides, outer = CASES[name]
    overrides = [f"data.path={data}", f"out_dir={tmp_path}", "eval.episodes=0", *overrides]
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=serve, args=(child, overrides, outer), daemon=True)
    proc.start()
    cpu_times = []
    try:
        ready = parent.recv()

        def step():
            parent.send("step")
            cpu_times.append(parent.recv()[0])

        benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)
        parent.send("report")
        memory = parent.recv()
    finally:
        if proc.is_alive():
            parent.send("stop")
        proc.join(timeout=60)
    timed = cpu_times[WARMUP:]
    stats = benchmark.stats.stats
    row = {**ready, **memory, "wall_mean": stats.mean, "wall_min": stats.min,
           "cpu_median": statistics.median(timed)}  # fmt: skip
    benchmark.extra_info.update(row)
    ROWS[name] = row
    assert ready["threads"] == 1 and len(cpu_times) == ROUNDS + WARMUP
