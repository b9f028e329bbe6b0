"""kill -9 one rank of a ``torchrun`` training run, let torchrun restart the ranks, and check that the
run ends where an uninterrupted one does.

    python benchmarks/kill_resume_distributed.py --repeats 10 --ranks 2 --parallel ddp --out runs/kill_resume_dist

Each repeat launches ``torchrun --standalone --nproc-per-node N --max-restarts 3 -m boost.train ...
parallel=ddp|fsdp2 --resume`` (the tiny chat model of the tests, gridnav data, 8 steps, a distributed
checkpoint every step, BOOST reweighting on; ``--resume`` is in the command from the start, so the
first launch starts fresh and every restart continues from the newest complete checkpoint). One rank
(drawn at random) is sent SIGKILL: odd repeats at a uniformly random moment between the first
checkpoint of an uninterrupted run and its end, even repeats while the k-th checkpoint is being
written (k uniform in 1..8: as soon as its temporary folder appears). torchrun then stops the other
ranks and starts them all again. Checked, and counted as problems:

- torchrun exits 0 and restarted at least once when a rank was killed;
- no temporary file or folder is left, ``metrics.jsonl`` is strict JSON with steps 1..8 once each;
- its rows (timings aside) and the final model (``out_dir/model``) equal the uninterrupted run's:
  exactly, or within ``--tolerance`` relative where a reduction over ranks could round differently.

Prints one line per repeat and a summary, and writes ``kill_resume_distributed.json`` under ``--out``.
:func:`kill_restart_and_compare` is what ``tests/test_train_kill_distributed.py`` runs once in CI.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.envs.tiny_chat_lm, benchmarks

from benchmarks.kill_resume import (  # noqa: E402
    STEPS,
    TIMINGS,
    _rows,
    _temporaries,
    command,
    kill_counts,
    make_assets,
    write_results,
)

RESTARTS = 3


def torchrun_command(
    model: Path, data: Path, out: Path, ranks: int, parallel: str, steps: int = STEPS
) -> list[str]:
    """``torchrun --max-restarts`` around ``python -m boost.train ... --resume`` on the tiny model."""
    train = command(model, data, out, f"parallel={parallel}", "eval.episodes=0", "--resume", steps=steps)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
            f"--max-restarts={RESTARTS}", "--monitor-interval=0.1", *train[1:]]  # fmt: skip


def _environment() -> dict:
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH", "")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _workers(agent: int) -> list[int]:
    """The pids of the ranks torchrun's agent (pid ``agent``) runs now."""
    found = subprocess.run(["pgrep", "-P", str(agent)], capture_output=True, text=True).stdout.split()
    return sorted(int(p) for p in found)


def _kill_a_rank(
    proc: subprocess.Popen, ranks: int, out: Path, mode: str, at: float, deadline: float
) -> bool:
    """SIGKILL one rank: at ``at`` seconds after the start (mode ``random``) or as soon as the k-th
    temporary checkpoint folder exists (mode ``checkpoint:k``). False if the run ended first."""
    started, nth, seen = time.monotonic(), int(mode.partition(":")[2] or 0), set()
    while time.monotonic() < deadline and proc.poll() is None:
        if nth:
            seen.update(p.name for p in out.glob("checkpoints/.step-*.tmp"))
            due = len(seen) >= nth
        else:
            due = time.monotonic() - started >= at
        workers = _workers(proc.pid)
        if due and len(workers) == ranks:
            os.kill(random.choice(workers), signal.SIGKILL)
            return True
        time.sleep(0.001 if nth else 0.01)
    return False


def _relative(a: list[float], b: list[float]) -> float:
    import torch

    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _final_model(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "model" / "model.safetensors"))


def compare(rows: list[dict], model: dict, reference: dict, tolerance: float) -> list[str]:
    """Problems of a finished run against the uninterrupted ``reference`` (rows without timings, model)."""
    problems = []
    clean = [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]
    if [r.keys() for r in clean] != [r.keys() for r in reference["rows"]]:
        return ["metrics rows hold other keys than the uninterrupted run's"]
    for mine, theirs in zip(clean, reference["rows"]):
        numbers = [k for k, v in theirs.items() if isinstance(v, float)]
        if {k: v for k, v in mine.items() if k not in numbers} != {
            k: v for k, v in theirs.items() if k not in numbers
        }:
            problems.append(f"step {mine['step']}: non-numeric fields differ")
        if numbers and _relative([mine[k] for k in numbers], [theirs[k] for k in numbers]) > tolerance:
            problems.append(f"step {mine['step']}: metrics differ beyond {tolerance:g}")
    worst = max(
        _relative(model[k].flatten().tolist(), v.flatten().tolist()) for k, v in reference["model"].items()
    )
    if worst > tolerance:
        problems.append(f"final model differs from the uninterrupted run by {worst:.2e} relative")
    return problems


def run_reference(model: Path, data: Path, out: Path, ranks: int, parallel: str) -> tuple[dict, float, float]:
    """The uninterrupted run: (its rows and model, seconds to its first checkpoint, seconds in all)."""
    shutil.rmtree(out, ignore_errors=True)
    started = time.monotonic()
    with open(f"{out}.log", "wb") as log:
        proc = subprocess.Popen(torchrun_command(model, data, out, ranks, parallel), env=_environment(),
                                stdout=log, stderr=log)  # fmt: skip
        while not list(out.glob("checkpoints/step-*")) and proc.poll() is None:
            time.sleep(0.01)
        first = time.monotonic() - started
        if proc.wait() != 0:
            raise SystemExit(f"the uninterrupted run failed; see {out}.log")
    reference = {"rows": [{k: v for k, v in r.items() if k not in TIMINGS} for r in _rows(out)],
                 "model": _final_model(out)}  # fmt: skip
    return reference, first, time.monotonic() - started


def kill_restart_and_compare(model: Path, data: Path, out: Path, ranks: int, parallel: str, mode: str,
                             seconds: tuple[float, float], reference: dict, tolerance: float) -> dict:  # fmt: skip
    """One repeat: launch, SIGKILL one rank, let torchrun restart the ranks, check. ``mode``:
    ``random`` (a moment uniform in ``seconds``) or ``checkpoint:k``. Returns what happened and
    ``"problems"``, empty when everything held."""
    shutil.rmtree(out, ignore_errors=True)
    started = time.monotonic()
    with open(f"{out}.log", "wb") as log:
        proc = subprocess.Popen(torchrun_command(model, data, out, ranks, parallel), env=_environment(),
                                stdout=log, stderr=log)  # fmt: skip
        killed = _kill_a_rank(
            proc, ranks, out, mode, random.uniform(*seconds), started + 10 * seconds[1] + 60
        )
        code = proc.wait()
    text = Path(f"{out}.log").read_text(errors="replace")
    restarts = text.count("failed (exitcode:")  # torchrun's agent logs each failed attempt it restarts from
    result = {"mode": mode, "killed": killed, "after_s": round(time.monotonic() - started, 2),
              "restarts": restarts, "exit_code": code}  # fmt: skip
    problems = []
    if code != 0:
        problems.append(f"torchrun exited {code}; see {out}.log")
    if killed and not restarts:
        problems.append("a rank was killed but torchrun did not restart the ranks")
    if _temporaries(out):
        problems.append(f"temporary files left: {_temporaries(out)}")
    if not problems:
        try:
            rows = _rows(out)
        except ValueError as err:
            return {**result, "problems": [f"metrics.jsonl is not strict JSON: {err}"]}
        if [r["step"] for r in rows] != list(range(1, STEPS + 1)):
            problems.append(f"steps: {[r['step'] for r in rows]}")
        else:
            problems += compare(rows, _final_model(out), reference, tolerance)
    return {**result, "problems": problems}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--parallel", choices=("ddp", "fsdp2"), default="ddp")
    parser.add_argument("--tolerance", type=float, default=0.0, help="relative; 0: bit for bit")
    parser.add_argument("--out", default="runs/kill_resume_distributed")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    random.seed(args.seed)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    model, data = make_assets(root)
    reference, first, seconds = run_reference(model, data, root / "reference", args.ranks, args.parallel)
    print(f"uninterrupted run ({args.ranks} ranks, {args.parallel}): {seconds:.1f} s, first checkpoint "
          f"after {first:.1f} s")  # fmt: skip
    results = []
    for i in range(args.repeats):
        mode = f"checkpoint:{random.randint(1, STEPS)}" if i % 2 == 0 else "random"
        result = kill_restart_and_compare(model, data, root / f"run{i}", args.ranks, args.parallel, mode,
                                          (first, seconds), reference, args.tolerance)  # fmt: skip
        results.append(result)
        print(f"{i:3d} {mode:<13} killed={result['killed']!s:<5} at {result['after_s']:6.2f}s "
              f"restarts {result['restarts']} -> problems: {result['problems'] or 'none'}")  # fmt: skip
    summary = {**kill_counts(results), "ranks": args.ranks, "parallel": args.parallel, "tolerance": args.tolerance,
               "uninterrupted_run_s": round(seconds, 2), "first_checkpoint_s": round(first, 2)}  # fmt: skip
    return write_results(root / "kill_resume_distributed.json", summary, results)


if __name__ == "__main__":
    raise SystemExit(main())
