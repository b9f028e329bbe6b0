"""List the trajectories a data-level filter left out (weight 0) in a finished run's ``pool_weights.jsonl``
and recompute its weight analysis in ``final.json``, as runs made after this change write them.

    python benchmarks/experiments/add_filtered_out.py RUN_DIR [RUN_DIR ...]

Runs of ``real_only``, ``return_filter``, ``weight_filter`` and ``oracle`` written before then listed the
kept trajectories only, so their mean weight per source was 1 for every kept source and their Spearman
correlations were undefined. The filter is a function of the data and the config alone: this redoes
the run's selection from its ``config.yaml`` (no model is built), checks that the kept set is exactly
the rows already in the file (by :func:`boost.train.baselines.trajectory_key`; for rows written before
keys, by their (source, return, quality) multiset), rewrites them with the left-out
trajectories with weight 0 and replaces the Spearman, mean-weight, n_eff and pool-size keys of
``final.json`` with :func:`boost.train.baselines.pool_analysis` of the whole pool. Both files are
replaced atomically; nothing is written when a check fails. A run done already is left as it is.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from boost.atomic import write_text_atomic
from boost.config import load_config
from boost.train.baselines import (
    DATA_FILTERS,
    ground_truth_quality,
    left_out,
    pool_analysis,
    pool_weight_lines,
    select_synthetic,
    trajectory_key,
)
from boost.train.config import TrainConfig
from boost.train.selection import select_trajectories


class RunError(Exception):
    """This run cannot be completed as it is; the message names the file and why."""


def _num(value) -> float:
    return -1e300 if value is None else round(float(value), 9)


def _described(t) -> tuple[str, float, float]:
    return t.source, _num(t.reward), _num(ground_truth_quality(t.meta))


def add_filtered_out(run: Path) -> str:
    pool_path, final_path = run / "pool_weights.jsonl", run / "final.json"
    final = json.loads(final_path.read_text(encoding="utf-8"))
    if "n_filtered_out" in final:
        return f"{run}: lists its filtered-out trajectories already"
    cfg = load_config(TrainConfig, run / "config.yaml")
    method = cfg.weighting.method if cfg.reweight else "uniform"
    if method not in DATA_FILTERS:
        return f"{run}: weighting.method={method} filters nothing before training; left as it is"
    rows = [json.loads(line) for line in pool_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if any(r["weight"] != 1.0 for r in rows):
        raise RunError(f"{pool_path}: a filter run's rows should all have weight 1; nothing written")
    selection = select_trajectories(cfg.data)
    pool = [t for t in selection.train if not t.is_real]
    kept, _ = select_synthetic(pool, cfg.weighting)
    if all("key" in r for r in rows):  # the same trajectories
        same = sorted(trajectory_key(t) for t in kept) == sorted(r["key"] for r in rows)
    else:  # rows written before keys: the same (source, return, quality) multiset
        same = sorted(map(_described, kept)) == sorted(
            (r["source"], _num(r["return"]), _num(r["quality"])) for r in rows
        )
    if not same:
        raise RunError(
            f"{run}: the redone selection keeps {len(kept)} trajectories, the file lists {len(rows)} "
            "other ones (other data, config or a tokeniser drop); nothing written"
        )
    dropped = left_out(pool, kept)
    weighted = [(1.0, t) for t in kept] + [(0.0, t) for t in dropped]
    final.update(pool_analysis(weighted, filtered_out=len(dropped)))
    write_text_atomic(pool_path, pool_weight_lines(weighted))
    write_text_atomic(final_path, json.dumps(final, indent=2) + "\n")
    return f"{run}: {len(rows)} kept, {len(dropped)} filtered out listed with weight 0; final.json updated"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished run folders (config.yaml, final.json)")
    failed = 0
    for run in parser.parse_args().runs:
        try:
            print(add_filtered_out(run))
        except RunError as err:
            failed += 1
            print(f"ERROR {err}")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
