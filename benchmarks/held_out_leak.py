"""How many generated synthetic trajectories play a held-out real task, per environment.

    python benchmarks/held_out_leak.py --real 32 --per-source 64 --out runs/held_out_leak

For each environment, generates the README's default sources (real, expert_shifted, eps0.1, eps0.3,
eps0.6, random, corrupt; smaller counts) into one file, applies the trainer's data selection
(:func:`boost.train.selection.select_trajectories`, default ``DataConfig``) and counts the synthetic
trajectories whose task is a validation or test task, by task id and by content key. Before issue 13
all of them were trained on; now every one is excluded and counted. Prints a markdown table and
writes ``held_out_leak.json`` under ``--out``; exits 1 if any reaches training.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

SOURCES = ("expert_shifted", "eps0.1", "eps0.3", "eps0.6", "random", "corrupt")
ENVS = (
    "gridnav",
    "guess",
    "textworld",
    "textarena:GuessTheNumber-v0",
    "textarena:TowerOfHanoi-v0",
    "textarena:Mastermind-v0",
    "textarena:Minesweeper-v0-small",
    "textarena:FrozenLake-v0",
)


def measure(env: str, real: int, per_source: int, out: Path, games_dir: str | None) -> dict:
    from boost.data import write_jsonl
    from boost.data.split import environment_task_keys
    from boost.generators import GeneratorConfig, generate
    from boost.train.config import DataConfig
    from boost.train.selection import select_trajectories

    started = time.perf_counter()
    sources = {"real": real, **dict.fromkeys(SOURCES, per_source)}
    trajectories = generate(GeneratorConfig(env, sources, games_dir=games_dir), progress=False)
    path = out / f"{env.replace(':', '_')}.jsonl"
    write_jsonl(path, trajectories)
    chosen = select_trajectories(DataConfig(path=str(path)))
    held_ids = {t.task_id for t in chosen.validation + chosen.test}
    synthetic = [t for t in trajectories if not t.is_real]
    keys = environment_task_keys({t.task_id for t in trajectories})
    held_keys = {keys[t] for t in held_ids}
    by_id = sum(t.task_id in held_ids for t in synthetic)
    by_key = sum(t.task_id not in held_ids and keys[t.task_id] in held_keys for t in synthetic)
    trained = [t for t in chosen.train if not t.is_real]
    reaching = sum(t.task_id in held_ids or keys[t.task_id] in held_keys for t in trained)
    return {
        "env": env,
        "real_tasks": [len({t.task_id for t in part}) for part in (
            [t for t in chosen.train if t.is_real], chosen.validation, chosen.test)],
        "synthetic": len(synthetic),
        "held_out_by_id": by_id,
        "held_out_by_content": by_key,
        "excluded": len(chosen.excluded),
        "held_out_reaching_training": reaching,
        "summary_line": next(line for line in chosen.summary if "excluded" in line),
        "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", type=int, default=32)
    parser.add_argument("--per-source", type=int, default=64)
    parser.add_argument("--envs", default=",".join(ENVS))
    parser.add_argument("--games-dir", help="where TextWorld games are generated and cached")
    parser.add_argument("--out", default="runs/held_out_leak")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    print("| environment | real tasks train/val/test | synthetic | of a held-out task: by id | by content only | "
          "excluded (summary) | reaching training | seconds |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    for env in args.envs.split(","):
        row = measure(env, args.real, args.per_source, out, args.games_dir)
        rows.append(row)
        print(f"| {env} | {'/'.join(map(str, row['real_tasks']))} | {row['synthetic']} | {row['held_out_by_id']} | "
              f"{row['held_out_by_content']} | {row['excluded']} | {row['held_out_reaching_training']} | "
              f"{row['seconds']} |", flush=True)  # fmt: skip
    (out / "held_out_leak.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 1 if any(r["held_out_reaching_training"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
