"""Analyses of finished runs' records: ``python -m boost.experiment analyse <command> ...``.

    python -m boost.experiment analyse ranking FILE [FILE ...]            # how a head ranks the pool
    python -m boost.experiment analyse shift-by-source RUN               # shift distance per source
    python -m boost.experiment analyse key-pool-weights RUN [RUN ...]    # add keys to old pool files
    python -m boost.experiment analyse add-filtered-out RUN [RUN ...]    # list a filter's left-out rows
    python -m boost.experiment analyse aggregate GRID [GRID ...]        # IQM and P(improvement) over grids

They read what the trainer wrote (``pool_weights.jsonl``, ``config.yaml``, ``final.json``,
checkpoints) and train nothing. Every ``pool_weights.jsonl`` is read by :func:`read_pool_rows`.
Ground truth (``quality``) is read for analysis only; no method sees it.

- ``ranking``: per file, Spearman(weight, ground-truth quality) over the pool and inside each source
  whose quality varies (what a per-trajectory head can add over per-source weights, which tie inside
  a source); once for the pool (the same in every file, checked), the ceiling of the pool-level
  Spearman for a head that ranks every trajectory by its true quality except that it takes
  ``expert_shifted`` (quality 0: the expert on another task) for the expert (quality 1).
- ``shift-by-source``: under a finished BOOST run's last checkpoint, per source, the mean and the
  10%/90% quantiles of the task-shift distance d_i that ``head.task_shift`` penalises
  (:meth:`ReweightingHead.shift_distance`), the mean weight (score x mass) and the mean loss.
- ``key-pool-weights``: adds ``task_id`` and ``key`` (:func:`boost.train.baselines.trajectory_key`)
  to a ``pool_weights.jsonl`` written before rows carried them, so ``weighting.method=weight_filter``
  can read it. The old rows are in the order the final weights were computed (the synthetic
  trajectories of the run's training batches of epoch 0): the run's data and batches are rebuilt from
  its ``config.yaml`` and every row is checked against its trajectory (source, return and quality)
  before anything is written.
- ``add-filtered-out``: runs of ``real_only``, ``return_filter``, ``weight_filter`` and ``oracle``
  written before filters listed their left-out trajectories: redoes the run's selection from its
  ``config.yaml`` (no model is built), checks the kept set is exactly the file's rows, rewrites them
  with the left-out trajectories at weight 0 and replaces the weight analysis of ``final.json``
  (:func:`boost.train.baselines.pool_analysis`).

- ``aggregate``: over the finished grids named (each an experiment folder with ``results.json``, one
  per environment), for every arm that ran in all of them: the interquartile mean of held-out success
  over all its runs with a 95% stratified-bootstrap interval (seeds redrawn inside each grid), and the
  probability that a run of the grids' common reference arm beats a run of it (per grid, ties 1/2,
  averaged over grids) with its interval, as ``rliable`` reports them.

Files are replaced atomically; nothing is written when a check fails, and a run done already is left
as it is.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from boost.atomic import write_text_atomic
from boost.cli import ArgumentParser
from boost.stats import spearman

SHIFTED = "expert_shifted"


class RunError(Exception):
    """This run cannot be analysed or rewritten as it is; the message names the file and why."""


def read_pool_rows(path: str | Path) -> list[dict]:
    """The rows of a ``pool_weights.jsonl`` (:func:`boost.train.baselines.pool_weight_lines`), in file order."""
    text = Path(path).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# ranking


def within_source(rows: Iterable[dict]) -> dict[str, float | None]:
    """Spearman(weight, quality) inside each source whose quality is not constant (None where the
    weights are constant inside it, as per-source weights are)."""
    by_source: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_source[r["source"]].append(r)
    out = {}
    for source, group in sorted(by_source.items()):
        quality = [r["quality"] for r in group]
        if len(set(quality)) > 1:
            out[source] = spearman([r["weight"] for r in group], quality)
    return out


def _fmt(value: float | None, label: str = "") -> str:
    text = "tied (constant weights)" if value is None else f"{value:+.3f}"
    return f"{label} {text}" if label else text


def ranking(paths: list[Path]) -> list[str]:
    """One line per file and one for the pool: see the module docstring."""
    pool, reference, lines = None, None, []
    for path in paths:
        rows = sorted(read_pool_rows(path), key=lambda r: r["key"])
        signature = [(r["key"], r["source"], r["quality"]) for r in rows]
        if pool is None:
            pool, reference = rows, signature
        elif signature != reference:
            raise RunError(f"{path}: another pool than {paths[0]} (keys, sources or qualities differ)")
        quality = [r["quality"] for r in rows]
        inside = ", ".join(_fmt(v, s) for s, v in within_source(rows).items())
        total = _fmt(spearman([r["weight"] for r in rows], quality))
        lines.append(f"{path}: Spearman(w, quality) {total}; within source: {inside}")
    quality = [r["quality"] for r in pool]
    blind = [1.0 if r["source"] == SHIFTED else r["quality"] for r in pool]
    lines.append(
        f"pool of {len(pool)}: ceiling for a head blind to the task shift ({SHIFTED} taken for the expert, "
        f"everything else ranked by true quality): Spearman {spearman(blind, quality):+.3f}"
    )
    return lines


# shift-by-source


def _trainer(run: Path, out_dir: str | None = None):
    """A Trainer built from a finished run's ``config.yaml`` (into ``out_dir`` when given)."""
    from boost.config import load_config
    from boost.train.config import TrainConfig
    from boost.train.loop import Trainer

    cfg = load_config(TrainConfig, run / "config.yaml")
    return Trainer(cfg if out_dir is None else replace(cfg, out_dir=out_dir), progress=False)


def shift_by_source(run: Path) -> list[str]:
    """Per source: task-shift distance, weight and loss under the run's last checkpoint."""
    import torch

    from boost.train.baselines import pool_batches

    trainer = _trainer(run)
    if not trainer.resume():
        raise RunError(f"{run}: no checkpoint to load (checkpoints/ is empty)")
    lines = [f"step {trainer.step}, reference scale {float(trainer.head.reference_scale):.3f}"]
    rows = defaultdict(list)
    with torch.no_grad():
        for batch, _, f in pool_batches(trainer, features=True):
            d = trainer.head.shift_distance(f.pooled)
            w = trainer.head.scores(f) * trainer.head.mass
            sources = [trainer.data.train_trajectories[i].source for i in batch.trajectory_index.tolist()]
            for row in zip(sources, d.tolist(), w.tolist(), f.loss.tolist()):
                rows[row[0]].append(row[1:])
    for source, values in sorted(rows.items()):
        t = torch.tensor(values)
        d = t[:, 0]
        lines.append(
            f"{source:15s} n={len(values):4d}  d mean {d.mean():.3f} (10% {d.quantile(0.1):.3f}, "
            f"90% {d.quantile(0.9):.3f})  weight {t[:, 1].mean():.3f}  loss {t[:, 2].mean():.3f}"
        )
    return lines


# key-pool-weights


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(float(a), float(b), rel_tol=0, abs_tol=1e-9)


def key_pool_weights(run: Path) -> str:
    """Add ``task_id`` and ``key`` to the rows of ``run/pool_weights.jsonl`` (module docstring)."""
    from boost.train.baselines import ground_truth_quality, trajectory_key

    path = run / "pool_weights.jsonl"
    rows = read_pool_rows(path)
    if all("key" in r for r in rows):
        return f"{path}: has keys already"
    with tempfile.TemporaryDirectory() as tmp:  # the tokenizer is rebuilt here, not in the run's folder
        trainer = _trainer(run, out_dir=tmp)
        order = [i for batch in trainer.data.train.batches(0)
                 for i, real in zip(batch.trajectory_index.tolist(), batch.is_real.tolist()) if not real]  # fmt: skip
        trajectories = [trainer.data.train_trajectories[i] for i in order]
    if len(trajectories) != len(rows):
        raise RunError(
            f"{path}: {len(rows)} rows but the rebuilt pool has {len(trajectories)} synthetic trajectories"
        )
    for n, (row, t) in enumerate(zip(rows, trajectories), 1):
        if (
            row["source"] != t.source
            or not _same(row["return"], t.reward)
            or not _same(row["quality"], ground_truth_quality(t.meta))
        ):
            raise RunError(
                f"{path}:{n}: row {row} does not match the rebuilt trajectory {t.origin}; nothing written"
            )
        row["task_id"], row["key"] = t.task_id, trajectory_key(t)
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    return f"{path}: {len(rows)} rows keyed, each checked against its trajectory's source, return and quality"


# add-filtered-out


def _num(value) -> float:
    return -1e300 if value is None else round(float(value), 9)


def add_filtered_out(run: Path) -> str:
    """List a data-level filter's left-out trajectories with weight 0 and redo ``final.json``'s analysis."""
    from boost.config import from_dict, parse_yaml
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

    pool_path, final_path = run / "pool_weights.jsonl", run / "final.json"
    final = json.loads(final_path.read_text(encoding="utf-8"))
    if "n_filtered_out" in final:
        return f"{run}: lists its filtered-out trajectories already"
    path = run / "config.yaml"
    raw = parse_yaml(path.read_text(encoding="utf-8")) or {}
    # runs written before weighting.method was the one weighting setting carry `reweight`
    if raw.pop("reweight", True) is False:
        raw.setdefault("weighting", {})["method"] = "uniform"
    cfg = from_dict(TrainConfig, raw, str(path))
    method = cfg.weighting.method
    if method not in DATA_FILTERS:
        return f"{run}: weighting.method={method} filters nothing before training; left as it is"
    rows = read_pool_rows(pool_path)
    if any(r["weight"] != 1.0 for r in rows):
        raise RunError(f"{pool_path}: a filter run's rows should all have weight 1; nothing written")
    train = select_trajectories(cfg.data).train
    pool = [t for t in train if not t.is_real]
    kept, _ = select_synthetic(pool, cfg.weighting, real=[t for t in train if t.is_real])
    if all("key" in r for r in rows):  # the same trajectories
        same = sorted(trajectory_key(t) for t in kept) == sorted(r["key"] for r in rows)
    else:  # rows written before keys: the same (source, return, quality) multiset
        described = [(t.source, _num(t.reward), _num(ground_truth_quality(t.meta))) for t in kept]
        same = sorted(described) == sorted((r["source"], _num(r["return"]), _num(r["quality"])) for r in rows)
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


# the command line


def aggregate(grids: list[Path]) -> list[str]:
    """Interquartile mean and probability of improvement over several grids (one per environment)."""
    from boost.stats import interquartile_mean, probability_of_improvement, stratified_bootstrap_ci95

    results = []
    for grid in grids:
        path = Path(grid) / "results.json"
        if not path.is_file():
            raise RunError(f"{path} does not exist (run python -m boost.experiment --report-only on {grid})")
        results.append(json.loads(path.read_text(encoding="utf-8")))
    references = {r["spec"].get("reference") for r in results}
    if len(references) != 1 or None in references:
        raise RunError(f"the grids name different or no reference arms ({sorted(map(str, references))}); "
                       "give grids with the same `reference:`")  # fmt: skip
    (reference,) = references
    arms = [a for a in results[0]["runs"] if all(a in r["runs"] for r in results)]
    if reference not in arms:
        raise RunError(f"the reference arm {reference} has not run in every grid")

    def scores(arm: str) -> list[list[float]]:
        return [[run["success_rate"] for run in r["runs"][arm].values()] for r in results]

    def pooled_iqm(strata):
        return interquartile_mean([v for runs in strata for v in runs])

    names = ", ".join(str(g) for g in grids)
    lines = [f"Held-out success over {len(grids)} grids ({names}); reference {reference}; 95% stratified "
             "bootstrap intervals (2000 redraws, seed 0)", "",
             f"| arm | runs per grid | IQM of success | P({reference} > arm) |", "|---|---|---|---|"]  # fmt: skip
    ref = scores(reference)
    for arm in arms:
        s = scores(arm)
        value = pooled_iqm(s)
        lo, hi = stratified_bootstrap_ci95([s], pooled_iqm)
        cell = "–"
        if arm != reference:
            p = probability_of_improvement(ref, s)
            plo, phi = stratified_bootstrap_ci95([ref, s], probability_of_improvement)
            cell = f"{p:.2f} [{plo:.2f}, {phi:.2f}]"
        lines.append(
            f"| {arm} | {'/'.join(str(len(x)) for x in s)} | {value:.3f} [{lo:.3f}, {hi:.3f}] | {cell} |"
        )
    return lines


COMMANDS = {  # name: (function, one result per argument?, argument help)
    "ranking": (ranking, False, "pool_weights.jsonl files of runs on one pool"),
    "shift-by-source": (shift_by_source, True, "finished BOOST run folders with a checkpoint"),
    "key-pool-weights": (key_pool_weights, True, "run folders holding pool_weights.jsonl and config.yaml"),
    "add-filtered-out": (add_filtered_out, True, "finished run folders (config.yaml, final.json)"),
    "aggregate": (aggregate, False, "experiment folders with results.json, one per environment"),
}


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m boost.experiment analyse",
        description="Analyses of finished runs' records (train nothing).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (function, _, help_) in COMMANDS.items():
        sub = commands.add_parser(name, help=function.__doc__.split("\n")[0], description=function.__doc__)
        sub.add_argument("paths", nargs="+", type=Path, help=help_)
    args = parser.parse_args(argv)
    function, per_path, _ = COMMANDS[args.command]
    failed = 0
    for paths in [[p] for p in args.paths] if per_path else [args.paths]:
        try:
            result = function(paths[0] if per_path else paths)
        except RunError as err:
            failed += 1
            print(f"ERROR {err}")
            continue
        print(result if isinstance(result, str) else "\n".join(result))
    return 1 if failed else 0
