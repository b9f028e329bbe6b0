"""Add ``task_id`` and ``key`` (boost.train.baselines.trajectory_key) to a ``pool_weights.jsonl`` written
before rows carried them, so that ``weighting.method=weight_filter`` can read it.

    python benchmarks/experiments/key_pool_weights.py RUN_DIR [RUN_DIR ...]

The old rows are in the order the final weights were computed: the synthetic trajectories of the run's
training batches of epoch 0. This rebuilds the run's data and batches from its ``config.yaml`` (same
data file, tokenizer, split and packing seed), walks them in that order and checks every row against
its trajectory (source, return and ground-truth quality must all agree) before writing anything; the
file is replaced atomically. A run whose rows already have keys is left as it is.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from dataclasses import replace
from pathlib import Path

from boost.atomic import write_text_atomic
from boost.config import load_config
from boost.train.baselines import ground_truth_quality, trajectory_key
from boost.train.config import TrainConfig
from boost.train.loop import Trainer


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(float(a), float(b), rel_tol=0, abs_tol=1e-9)


def key_run(run: Path) -> str:
    path = run / "pool_weights.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if all("key" in r for r in rows):
        return f"{path}: has keys already"
    cfg = load_config(TrainConfig, run / "config.yaml")
    with tempfile.TemporaryDirectory() as tmp:  # the tokenizer is rebuilt here, not in the run's folder
        trainer = Trainer(replace(cfg, out_dir=tmp), progress=False)
        order = [i for batch in trainer.data.train.batches(0)
                 for i, real in zip(batch.trajectory_index.tolist(), batch.is_real.tolist()) if not real]  # fmt: skip
        trajectories = [trainer.data.train_trajectories[i] for i in order]
    if len(trajectories) != len(rows):
        raise SystemExit(
            f"{path}: {len(rows)} rows but the rebuilt pool has {len(trajectories)} synthetic trajectories"
        )
    for n, (row, t) in enumerate(zip(rows, trajectories), 1):
        if (
            row["source"] != t.source
            or not _same(row["return"], t.reward)
            or not _same(row["quality"], ground_truth_quality(t.meta))
        ):
            raise SystemExit(
                f"{path}:{n}: row {row} does not match the rebuilt trajectory {t.origin}; nothing written"
            )
        row["task_id"], row["key"] = t.task_id, trajectory_key(t)
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    return f"{path}: {len(rows)} rows keyed, each checked against its trajectory's source, return and quality"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "runs", nargs="+", type=Path, help="run folders holding pool_weights.jsonl and config.yaml"
    )
    for run in parser.parse_args().runs:
        print(key_run(run))


if __name__ == "__main__":
    main()
