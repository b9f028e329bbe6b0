"""Throughput of the trainer on 1 and on N CPU ranks (gloo), BOOST on, the CPU preset.

    python -m benchmarks.parallel_throughput --ranks 1 2 --steps 20 --out runs/parallel-bench

Generates a small gridnav-compact file (real:200, eps0.1:200, corrupt:200) unless ``--data`` is given,
then runs ``torchrun --standalone --nproc-per-node N -m boost.train --config configs/cpu_preset.yaml``
with ``weighting.method=boost parallel=ddp`` (and ``fsdp2`` with ``--kinds``) for each N, and prints
one Markdown row per run: the median seconds per step (inner + outer, measured by rank 0; the ranks
wait for each other in the collectives) after ``--warmup`` steps, global tokens per second and tokens
per second per rank. The global batch (``data.token_budget``) is the preset's in every run: N ranks
split the same batches (strong scaling).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")


def measure(kind: str, ranks: int, data: Path, out: Path, steps: int, warmup: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
           "-m", "boost.train", "--quiet", "--overwrite", "--config", "configs/cpu_preset.yaml",
           f"data.path={data}", f"out_dir={out}", f"steps={steps}", "weighting.method=boost",
           "eval.episodes=0", "checkpoint_every=0", "log_every=1", f"parallel={kind}"]  # fmt: skip
    _run(cmd)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][warmup:]
    seconds = [r["inner_seconds"] + r.get("outer_seconds", 0.0) for r in rows]
    tokens = [r["tokens"] for r in rows]
    step = statistics.median(seconds)
    rate = sum(tokens) / sum(seconds)
    return {"kind": kind, "ranks": ranks, "steps": len(rows), "seconds_per_step": step,
            "tokens_per_step": statistics.mean(tokens), "tokens_per_second": rate,
            "tokens_per_second_per_rank": rate / ranks}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--kinds", nargs="+", default=["ddp"], choices=["ddp", "fsdp2"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/parallel-bench"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.data
    if data is None:
        data = args.out / "data.jsonl"
        _run([sys.executable, "-m", "boost.generate", "--env", "gridnav-compact", "--out", str(data),
              "--sources", "real:200,eps0.1:200,corrupt:200"])  # fmt: skip
    print(
        "| parallel | ranks | steps timed | s / step (median) | tokens / step | tokens / s | tokens / s / rank |"
    )
    print("|---|---|---|---|---|---|---|")
    for kind in args.kinds:
        for ranks in args.ranks:
            r = measure(
                kind, ranks, data.resolve(), (args.out / f"{kind}-{ranks}").resolve(), args.steps, args.warmup
            )
            print(f"| {kind} | {ranks} | {r['steps']} | {r['seconds_per_step']:.3f} | {r['tokens_per_step']:.0f} | "
                  f"{r['tokens_per_second']:.0f} | {r['tokens_per_second_per_rank']:.0f} |", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
