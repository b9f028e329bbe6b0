"""kill -9 a short training run at a random moment, resume it, and check what survived.

    python benchmarks/kill_resume.py --repeats 20 --out runs/kill_resume

Each repeat starts ``python -m boost.train`` (the tiny chat model of the tests, gridnav data, 8 steps,
a checkpoint every step, BOOST reweighting on) and kills it with SIGKILL: odd repeats at a uniformly
random moment between the first checkpoint of an uninterrupted run and its end, even repeats while
the k-th checkpoint is being written (k uniform in 1..8: as soon as its temporary folder
``checkpoints/.step-*.tmp`` appears). Then it checks, and counts violations of:

- after the kill: the newest ``checkpoints/step-*`` folder, if there is one, loads (safetensors);
- ``python -m boost.train ... --resume`` exits 0; afterwards no temporary file is left,
  ``metrics.jsonl`` parses line by line as strict JSON with steps 1..8 each exactly once, and
  (with ``--reference``, the default here) its rows (timings aside) and the final model equal those
  of an uninterrupted run bit for bit.

Prints one line per repeat and a summary, and writes ``kill_resume.json`` under ``--out``.
:func:`kill_and_resume` is what ``tests/test_train_kill.py`` runs once in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

STEPS = 8
TIMINGS = ("inner_seconds", "outer_seconds")


def make_assets(root: Path) -> tuple[Path, Path]:
    """The tiny chat model and gridnav data (real 24, corrupt 16, eps0.3 16) under ``root``."""
    from boost.generate import main as generate
    from tests.envs.tiny_chat_lm import save_tiny_chat_model

    data = root / "data.jsonl"
    if not data.exists():
        generate(
            [
                "--env",
                "gridnav",
                "--out",
                str(data),
                "--sources",
                "real:24,corrupt:16,eps0.3:16",
                "--no-progress",
            ]
        )
    model = root / "model"
    if not (model / "config.json").exists():
        save_tiny_chat_model(model)
    return model, data


def command(model: Path, data: Path, out: Path, *extra: str, steps: int = STEPS) -> list[str]:
    """``python -m boost.train`` on the tiny model; ``extra``: more settings or options."""
    return [sys.executable, "-m", "boost.train", f"data.path={data}", f"model.name={model}", f"out_dir={out}",
            "data.token_budget=384", "data.max_length=192", f"steps={steps}", "checkpoint_every=1",
            "solver.steps=1", *extra, "--quiet"]  # fmt: skip


def _strict(line: str) -> dict:
    def refuse(name):
        raise ValueError(f"{name} in metrics.jsonl")

    return json.loads(line, parse_constant=refuse)


def _rows(out: Path) -> list[dict]:
    return [_strict(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _temporaries(out: Path) -> list[str]:
    """Temporary files of ``out`` and temporary checkpoint folders of ``out/checkpoints``."""
    found = [*out.glob(".*.tmp*"), *out.glob("checkpoints/.*.tmp")] if out.exists() else []
    return sorted(str(p.relative_to(out)) for p in found)


def _checkpoint(out: Path) -> dict | None:
    """The newest checkpoint folder's state and model tensors (None: no checkpoint)."""
    from boost.train.checkpoint_io import latest_checkpoint, read_checkpoint

    path = latest_checkpoint(out)
    return None if path is None else read_checkpoint(path)


# Loaded by the killed run's interpreter (PYTHONPATH) for mode "save:K": the K-th torch.save writes a
# few bytes of its file and then the process sends itself SIGKILL, mid-write, deterministically.
KILL_HOOK = """
import os, signal
import torch
_save, _calls = torch.save, [0]
def _save_then_die(obj, f, *args, **kwargs):
    _calls[0] += 1
    if _calls[0] == int(os.environ["BOOST_KILL_AT_SAVE"]):
        with open(f, "wb") as half:
            half.write(b"half a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)
    return _save(obj, f, *args, **kwargs)
torch.save = _save_then_die
"""


def _kill_hook_env(env: dict, hook_dir: Path, nth: int) -> dict:
    hook_dir.mkdir(parents=True, exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(KILL_HOOK)
    path = os.pathsep.join(filter(None, [str(hook_dir), env.get("PYTHONPATH", "")]))
    return {**env, "PYTHONPATH": path, "BOOST_KILL_AT_SAVE": str(nth)}


def _kill_while_checkpointing(proc: subprocess.Popen, out: Path, deadline: float, nth: int) -> bool:
    """SIGKILL ``proc`` as soon as the ``nth`` temporary checkpoint file exists; False if it never did."""
    seen: set[str] = set()
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists():
            seen.update(p.name.split(".")[1] for p in out.glob("checkpoints/.step-*.tmp"))
            if len(seen) >= nth:
                proc.send_signal(signal.SIGKILL)
                return True
        time.sleep(0.001)
    return False


def kill_and_resume(
    model: Path,
    data: Path,
    out: Path,
    mode: str,
    seconds: tuple[float, float],
    reference: dict | None,
    steps: int = STEPS,
    settings: tuple[str, ...] = (),
) -> dict:
    """One repeat: start, SIGKILL, resume, check.

    ``mode``: ``"checkpoint"`` kills during the write of a checkpoint (the first, or with
    ``mode="checkpoint:K"`` the K-th), seen from outside by polling for its temporary file;
    ``"save:K"`` makes the K-th ``torch.save`` kill its own process mid-write (deterministic);
    ``"random"`` at a moment drawn uniformly from ``seconds``, a ``(low, high)`` pair of seconds
    after the start. ``steps`` and ``settings`` (more ``key=value``)
    shape the run; the killed run's log goes to
    ``<out>.killed.log``. Returns what happened and ``"problems"``, empty when everything held.
    """
    import torch

    problems: list[str] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out.parent.mkdir(parents=True, exist_ok=True)
    killed_env = env
    if mode.startswith("save:"):
        killed_env = _kill_hook_env(env, out.parent / f"{out.name}.hook", int(mode.partition(":")[2]))
    with open(out.parent / f"{out.name}.killed.log", "wb") as log:
        proc = subprocess.Popen(
            command(model, data, out, *settings, steps=steps), env=killed_env, stdout=log, stderr=log
        )
    started = time.monotonic()
    if mode.startswith("checkpoint"):
        nth = int(mode.partition(":")[2] or 1)
        killed = _kill_while_checkpointing(proc, out, started + 4 * seconds[1], nth)
    elif mode.startswith("save:"):
        killed = proc.wait() == -signal.SIGKILL
    else:
        try:
            proc.wait(timeout=random.uniform(*seconds))
            killed = False
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            killed = True
    proc.wait()
    result: dict = {"mode": mode, "killed": killed, "after_s": round(time.monotonic() - started, 3)}
    result["temporaries_left"] = _temporaries(out)
    result["rows_before_resume"] = (
        len((out / "metrics.jsonl").read_text().splitlines()) if (out / "metrics.jsonl").exists() else 0
    )
    result["checkpoint_step"] = None
    try:
        kept = _checkpoint(out)
        result["checkpoint_step"] = None if kept is None else kept["step"]
    except Exception as err:  # noqa: BLE001 (any failure to load is the finding)
        problems.append(f"checkpoint does not load after the kill: {type(err).__name__}: {err}")
    resumed = subprocess.run(
        command(model, data, out, *settings, "--resume", steps=steps), env=env, capture_output=True, text=True
    )
    if resumed.returncode != 0:
        problems.append(f"--resume exited {resumed.returncode}: {resumed.stderr.strip().splitlines()[-1:]}")
        return {**result, "problems": problems}
    if _temporaries(out):
        problems.append(f"temporary files left after the resume: {_temporaries(out)}")
    try:
        rows = _rows(out)
    except ValueError as err:
        problems.append(f"metrics.jsonl is not strict JSON after the resume: {err}")
        return {**result, "problems": problems}
    if [r["step"] for r in rows] != list(range(1, steps + 1)):
        problems.append(f"steps after the resume: {[r['step'] for r in rows]}")
    final = _checkpoint(out)
    if final is None or final["step"] != steps:
        problems.append(f"final checkpoint at step {final and final['step']}")
    if reference is not None:
        if [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows] != reference["rows"]:
            problems.append("metrics rows differ from the uninterrupted run")
        if not all(torch.equal(final["model"][k], v) for k, v in reference["model"].items()):
            problems.append("final model differs from the uninterrupted run")
    return {**result, "problems": problems}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="runs/kill_resume")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import shutil

    random.seed(args.seed)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    model, data = make_assets(root)
    ref_out = root / "reference"
    shutil.rmtree(ref_out, ignore_errors=True)
    started = time.monotonic()
    proc = subprocess.Popen(
        command(model, data, ref_out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    while not list(ref_out.glob("checkpoints/step-*")) and proc.poll() is None:
        time.sleep(0.005)
    first_checkpoint = time.monotonic() - started
    if proc.wait() != 0:
        raise SystemExit(f"the uninterrupted run failed: {command(model, data, ref_out)}")
    seconds = time.monotonic() - started
    reference = {
        "rows": [{k: v for k, v in r.items() if k not in TIMINGS} for r in _rows(ref_out)],
        "model": _checkpoint(ref_out)["model"],
    }
    print(f"uninterrupted run: {seconds:.1f} s wall, first checkpoint after {first_checkpoint:.1f} s")
    results = []
    for i in range(args.repeats):
        out = root / f"run{i}"
        shutil.rmtree(out, ignore_errors=True)
        mode = f"checkpoint:{random.randint(1, STEPS)}" if i % 2 == 0 else "random"
        result = kill_and_resume(model, data, out, mode, (first_checkpoint, seconds), reference)
        results.append(result)
        print(f"{i:3d} {result['mode']:<10} killed={result['killed']!s:<5} at {result['after_s']:6.2f}s "
              f"checkpoint step {result['checkpoint_step']} temporaries {len(result['temporaries_left'])} "
              f"rows {result['rows_before_resume']} -> problems: {result['problems'] or 'none'}")  # fmt: skip
    summary = {
        **kill_counts(results),
        "temporaries_left_by_the_kill": sum(bool(r["temporaries_left"]) for r in results),
        "rows_past_the_checkpoint_at_the_kill": sum(
            r["rows_before_resume"] > (r["checkpoint_step"] or 0) for r in results
        ),
        "uninterrupted_run_s": round(seconds, 2),
        "first_checkpoint_s": round(first_checkpoint, 2),
    }
    return write_results(root / "kill_resume.json", summary, results)


def kill_counts(results: list[dict]) -> dict[str, int]:
    """Repeats, kills (all, and while a checkpoint was being written) and repeats with problems."""
    return {
        "repeats": len(results),
        "killed": sum(r["killed"] for r in results),
        "killed_while_checkpointing": sum(
            r["killed"] and r["mode"].startswith("checkpoint") for r in results
        ),
        "with_problems": sum(bool(r["problems"]) for r in results),
    }


def write_results(path: Path, summary: dict, results: list[dict]) -> int:
    """Print ``summary``, write it and every repeat's result to ``path``; the exit code (1: problems)."""
    print(json.dumps(summary))
    path.write_text(json.dumps({"summary": summary, "repeats": results}, indent=2) + "\n")
    return 1 if summary["with_problems"] else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.envs.tiny_chat_lm
    raise SystemExit(main())
