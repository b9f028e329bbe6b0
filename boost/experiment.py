"""A grid of arms x seeds of the trainer, with per-arm learning rates tuned on validation only.

    python -m boost.experiment --config configs/experiment_gridnav.yaml [--quick] [--out DIR] [--report-only]
        [--arms A,B] [--seeds 0,3]
    python -m boost.experiment analyse {ranking,shift-by-source,key-pool-weights,add-filtered-out} ...

``analyse`` reads finished runs' records and trains nothing (:mod:`boost.analysis`).

``--arms`` / ``--seeds`` train a part of the grid (e.g. one process per arm and seed, all into one
``--out``; give parallel processes different arms, or let one finish an arm's tuning first); the
report covers every finished run of the whole grid.

``--report-only`` trains nothing: it writes the results over the runs already finished (e.g. while
per-arm or per-seed processes of the same grid are still running into the same folder).

The experiment file (YAML)::

    train_config: configs/cpu_preset.yaml        # the TrainConfig every arm starts from
    env: gridnav-compact                         # data: generated once into OUT/data.jsonl
    sources: real:400,eps0.1:400,random:400      # NAME:COUNT (python -m boost.generate)
    data_seed: 0
    seeds: [0, 1, 2]                             # training seeds (model init, batch order)
    steps: 300                                   # inner steps per run
    episodes: 100                                # test tasks played per run (task success)
    lr_grid: [0.0005, 0.001, 0.002]              # tuned per arm on validation, seed tune_seed
    tune_steps: 150
    tune_seed: 100
    tune_by: success                             # validation task success (ties: loss), or loss
    tune_episodes: 50                            # validation tasks played per candidate (tune_by success)
    arms:                                        # name: [key=value overrides of the TrainConfig]
      uniform: [weighting.method=uniform]          # ("{seed}" in an override: the run's seed)
      boost: [weighting.method=boost]
    quick: {seeds: [0, 1, 2], steps: 100, lr_grid: [0.001], arms: [uniform, boost]}
    reference: boost                             # paired differences: arm − this arm (default: boost)
    tune:                                        # per arm, settings chosen with lr on validation
      boost: {head.init_mass: [0.5, 1.0]}          # (every combination with lr_grid; same tune_steps/seed)

``--quick`` replaces the keys under ``quick`` (``arms`` there lists a subset by name). Every run writes
its own folder ``OUT/<arm>/seed<k>`` (tuning: ``OUT/<arm>/tune-lr<lr>``); a run whose ``final.json``
exists is skipped, so an interrupted grid resumes where it stopped. The learning rate of an arm is
the grid value with the highest task success on ``tune_episodes`` tasks of the environment's
*validation* split (``eval.split=validation``; ties: the lower validation loss), or with
``tune_by: loss`` the lowest validation loss (held-out real trajectories; the held-out NLL has ranked
arms opposite to success, so success is the default). Test tasks are never used to choose anything.
An arm listed under ``tune`` has its settings there chosen the same way, jointly with the learning
rate (give each compared arm a grid of the same size: the same tuning budget).
The report gives each arm's success minus the reference arm's over the seeds both ran, as mean ± std
and a 95% Student-t interval (``--reference`` overrides the file's). Writes ``OUT/results.json``,
``OUT/results.md`` and plots (``success.png``,
``weights_over_steps.png``, ``weight_vs_quality.png``, and ``refilter_kept.png`` for arms that refilter).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from boost import analysis
from boost.analysis import read_pool_rows
from boost.atomic import write_json_atomic, write_text_atomic
from boost.cli import ArgumentParser
from boost.config import load_config
from boost.data.format import write_jsonl
from boost.generators import GeneratorConfig, generate, parse_sources
from boost.stats import mean_std, t_interval95
from boost.train.baselines import relative_source_means
from boost.train.config import TrainConfig
from boost.train.two_stage import build_run, train_run

log = logging.getLogger(__name__)

REQUIRED = ("train_config", "env", "sources", "seeds", "steps", "arms")
DEFAULTS = {
    "data_seed": 0,
    "episodes": 100,
    "lr_grid": [],
    "tune_steps": 150,
    "tune_seed": 100,
    "tune_by": "success",
    "tune_episodes": 50,
    "quick": {},
    "reference": None,
    "tune": {},
}
METRICS = (
    ("success_rate", "success"),
    ("mean_return", "return"),
    ("invalid_per_turn", "invalid/turn"),
    ("test_loss", "held-out loss"),
    ("test_agent_token_accuracy", "agent-token acc"),
    ("spearman_quality", "Spearman(w, quality)"),
    ("n_eff_pool", "n_eff"),
    ("wall_seconds", "wall s"),
)


class ExperimentError(ValueError):
    """A bad experiment file; the message names the file and the key."""


def load_spec(path: str | Path, quick: bool = False) -> dict[str, Any]:
    """The experiment file as a dict, checked, with defaults and (``quick``) the quick overrides applied."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExperimentError(f"{path}: no such experiment file") from None
    if not isinstance(spec, dict):
        raise ExperimentError(f"{path}: the top level must be a mapping")
    unknown = sorted(set(spec) - set(REQUIRED) - set(DEFAULTS))
    if unknown:
        raise ExperimentError(
            f"{path}: unknown key {unknown[0]!r}; known: {', '.join((*REQUIRED, *DEFAULTS))}"
        )
    missing = [k for k in REQUIRED if k not in spec]
    if missing:
        raise ExperimentError(f"{path}: missing key {missing[0]!r}")
    spec = {**DEFAULTS, **spec}
    _check_tune(path, spec)
    if spec["reference"] is not None and spec["reference"] not in (spec["arms"] or {}):
        raise ExperimentError(f"{path}: reference {spec['reference']!r} is not one of the arms")
    if quick:
        q = dict(spec["quick"] or {})
        names = q.pop("arms", None)
        bad = sorted(set(q) - set(REQUIRED) - set(DEFAULTS))
        if bad:
            raise ExperimentError(f"{path}: quick: unknown key {bad[0]!r}")
        spec.update(q)
        if names is not None:
            absent = [n for n in names if n not in spec["arms"]]
            if absent:
                raise ExperimentError(f"{path}: quick.arms names {absent[0]!r}, which is not an arm")
            spec["arms"] = {n: spec["arms"][n] for n in names}
            if spec["reference"] not in names:  # the quick subset leaves it out: the default applies
                spec["reference"] = None
            spec["tune"] = {a: g for a, g in spec["tune"].items() if a in names}
    if not isinstance(spec["arms"], dict) or not spec["arms"]:
        raise ExperimentError(f"{path}: arms must be a mapping name -> list of key=value overrides")
    for name, overrides in spec["arms"].items():
        if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
            raise ExperimentError(f"{path}: arms.{name} must be a list of key=value strings")
    if not spec["seeds"] or not all(isinstance(s, int) for s in spec["seeds"]):
        raise ExperimentError(f"{path}: seeds must be a non-empty list of integers")
    parse_sources(spec["sources"])  # a clear error for a bad source list
    return spec


def _check_tune(path: Path, spec: dict[str, Any]) -> None:
    if spec["tune_by"] not in ("success", "loss"):
        raise ExperimentError(f"{path}: tune_by must be 'success' or 'loss', got {spec['tune_by']!r}")
    episodes = spec["tune_episodes"]
    if not isinstance(episodes, int) or isinstance(episodes, bool) or episodes < 1:
        raise ExperimentError(f"{path}: tune_episodes must be an integer >= 1, got {episodes!r}")
    tune = spec["tune"]
    if not isinstance(tune, dict):
        raise ExperimentError(f"{path}: tune must be a mapping arm -> {{setting: [values]}}")
    for arm, grid in tune.items():
        if arm not in (spec["arms"] or {}):
            raise ExperimentError(f"{path}: tune names {arm!r}, which is not an arm")
        if not isinstance(grid, dict) or not grid:
            raise ExperimentError(f"{path}: tune.{arm} must be a mapping setting -> [values]")
        for key, values in grid.items():
            if key == "optim.lr":
                raise ExperimentError(f"{path}: tune.{arm}: the learning rate is tuned by lr_grid, not tune")
            if (
                not isinstance(values, list)
                or not values
                or not all(isinstance(v, (int, float, str)) for v in values)
            ):
                raise ExperimentError(f"{path}: tune.{arm}.{key} must be a non-empty list of values")


def ensure_data(spec: dict[str, Any], out: Path) -> Path:
    """Generate the experiment's data once into ``out/data.jsonl`` (kept for resumes)."""
    path = out / "data.jsonl"
    if not path.exists():
        config = GeneratorConfig(
            env=spec["env"], sources=parse_sources(spec["sources"]), seed=spec["data_seed"]
        )
        write_jsonl(path, generate(config, progress=False))
    return path


def run_folder(out: Path, arm: str, seed: int) -> Path:
    """Where the grid in ``out`` keeps the run of ``arm`` with training seed ``seed``."""
    return out / arm / f"seed{seed}"


def run_file(folder: Path, name: str) -> Path:
    """File ``name`` of the run in ``folder`` (``<out>/<arm>/seed<k>``): ``folder/name`` while the run
    folder is there, else the committed record's ``<out>/<arm>/seed<k>-<name>`` (the layout of
    ``benchmarks/experiments/*``, where only each run's records are kept), so ``--report-only`` works
    on either."""
    inside = folder / name
    if inside.exists():
        return inside
    record = folder.parent / f"{folder.name}-{name}"
    return record if record.exists() else inside


def read_final(folder: Path) -> dict[str, Any] | None:
    """The finished run's ``final.json`` in ``folder`` (or its record, :func:`run_file`), or None while
    it has none."""
    path = run_file(folder, "final.json")
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def run_one(spec: dict[str, Any], overrides: list[str], folder: Path, steps: int, seed: int, lr: float | None,
            data: Path, episodes: int, tuned: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Train one run into ``folder`` (skipped when its ``final.json`` exists); its final metrics.
    ``tuned``: settings chosen on validation (:func:`tune_arm`), applied after the arm's overrides."""
    finished = read_final(folder)
    if finished is not None:
        return finished
    final_path = folder / "final.json"
    overrides = [o.replace("{seed}", str(seed)) for o in overrides]  # e.g. a per-seed weights file
    settings = [f"data.path={data}", f"out_dir={folder}", f"steps={steps}", f"seed={seed}",
                f"eval.episodes={episodes}", "checkpoint_every=0", *overrides,
                *(f"{k}={v}" for k, v in (tuned or {}).items())]  # fmt: skip
    if lr is not None:
        settings.append(f"optim.lr={lr}")
    cfg = load_config(TrainConfig, spec["train_config"], settings)
    started = time.perf_counter()
    _, final = train_run(build_run(cfg, progress=False))  # both phases timed with weighting.head_steps
    final["wall_seconds"] = round(time.perf_counter() - started, 1)
    final["lr"] = cfg.optim.lr
    if tuned:
        final["tuned"] = dict(tuned)
    write_json_atomic(final_path, final)
    return final


def _tuning_candidates(spec, name) -> tuple[list[str], list[tuple]]:
    """(setting names, candidates) of an arm's tuning grid: each candidate is (lr, *setting values)."""
    grid = spec["tune"].get(name, {})
    keys = list(grid)
    return keys, list(itertools.product(spec["lr_grid"] or [None], *(grid[k] for k in keys)))


def _tuning_parts(keys: list[str], candidate: tuple) -> list[str]:
    """A candidate's name parts, for its folder and its score label: its lr, then each setting."""
    return [f"lr{candidate[0]}"] + [f"{k}={v}" for k, v in zip(keys, candidate[1:])]


def _tuning_folder(out: Path, name: str, keys: list[str], candidate: tuple) -> Path:
    return out / name / ("tune-" + "-".join(_tuning_parts(keys, candidate)))


def _tuning_label(keys: list[str], candidate: tuple) -> str:
    """The score label of a candidate (an lr-only grid keeps plain lr labels)."""
    return ",".join(_tuning_parts(keys, candidate)) if keys else str(candidate[0])


def _tuning_score(final: dict[str, Any]) -> dict[str, float | None]:
    """What a tuning run is judged by: its validation task success (None when no task was played) and
    its validation loss."""
    return {"validation_success": final.get("success_rate"), "validation_loss": final["validation_loss"]}


def _better(spec: dict[str, Any]):
    """The sort key of :func:`_tuning_score`s, best first: the highest validation success (ties: the
    lower validation loss) with ``tune_by: success``; the lowest validation loss with ``tune_by: loss``."""
    if spec["tune_by"] == "loss":
        return lambda score: score["validation_loss"]
    return lambda score: (-score["validation_success"], score["validation_loss"])


def tune_arm(spec, name, overrides, out, data) -> tuple[float | None, dict[str, Any], dict[str, dict]]:
    """(learning rate, {setting: value}, score per candidate) of the arm: the combination of ``lr_grid``
    and the arm's ``tune`` grid that is best on validation (``tune_by``: task success on
    ``tune_episodes`` validation tasks, or validation loss) after ``tune_steps`` at ``tune_seed``. A
    single candidate is taken without a run (lr None: no lr_grid)."""
    keys, candidates = _tuning_candidates(spec, name)
    if len(candidates) == 1:
        return candidates[0][0], dict(zip(keys, candidates[0][1:])), {}
    by_success = spec["tune_by"] == "success"
    scores = {}
    for candidate in candidates:
        final = run_one(spec, [*overrides, *(["eval.split=validation"] if by_success else [])],
                        _tuning_folder(out, name, keys, candidate), spec["tune_steps"], spec["tune_seed"],
                        candidate[0], data, episodes=spec["tune_episodes"] if by_success else 0,
                        tuned=dict(zip(keys, candidate[1:])))  # fmt: skip
        scores[_tuning_label(keys, candidate)] = _tuning_score(final)
    better = _better(spec)
    best = min(candidates, key=lambda c: better(scores[_tuning_label(keys, c)]))
    return best[0], dict(zip(keys, best[1:])), scores


def finished_tuning(spec: dict[str, Any], out: Path) -> dict[str, dict[str, dict]]:
    """:func:`_tuning_score` per tuning candidate of each arm, read back from the tuning runs in ``out``
    (the candidates not finished are left out; an arm with one candidate has none)."""
    tuning = {}
    for name in spec["arms"]:
        keys, candidates = _tuning_candidates(spec, name)
        if len(candidates) == 1:
            tuning[name] = {}
            continue
        finals = {_tuning_label(keys, c): read_final(_tuning_folder(out, name, keys, c)) for c in candidates}
        tuning[name] = {label: _tuning_score(f) for label, f in finals.items() if f is not None}
    return tuning


def aggregate(runs: dict[str, dict[int, dict]], reference: str | None, out: Path) -> dict[str, Any]:
    """Mean ± std over seeds per arm and metric; paired differences (arm − reference) over shared seeds:
    ``success_minus_<reference>`` (mean, std) and, from two shared seeds, ``..._ci95`` (Student t)."""
    table: dict[str, Any] = {}
    for arm, by_seed in runs.items():
        row: dict[str, Any] = {"seeds": sorted(by_seed)}
        for key, _ in METRICS:
            values = [r[key] for r in by_seed.values() if isinstance(r.get(key), (int, float))]
            row[key] = list(mean_std(values)) if values else None
        if reference and arm != reference and reference in runs:
            shared = sorted(set(by_seed) & set(runs[reference]))
            diffs = [by_seed[s]["success_rate"] - runs[reference][s]["success_rate"] for s in shared]
            row["success_minus_" + reference] = list(mean_std(diffs)) if diffs else None
            row["success_minus_" + reference + "_ci95"] = (
                list(t_interval95(diffs)) if len(diffs) > 1 else None
            )
            row["paired_seeds"] = shared
        row["mean_weight_per_source"] = _mean_dicts(
            [_source_weights(run_folder(out, arm, seed), r) for seed, r in by_seed.items()]
        )
        table[arm] = row
    return table


def _source_weights(folder: Path, final: dict) -> dict[str, float]:
    """Relative mean weight per source of one run, from its ``pool_weights.jsonl`` when there is one."""
    pool = run_file(folder, "pool_weights.jsonl")
    if not pool.exists():
        return final.get("mean_weight_per_source") or {}
    rows = read_pool_rows(pool)
    return relative_source_means([(r["source"], r["weight"]) for r in rows])


def _mean_dicts(dicts: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for d in dicts for k in d})
    return {k: sum(d[k] for d in dicts if k in d) / sum(k in d for d in dicts) for k in keys}


def _fmt(pair, digits: int = 3) -> str:
    if pair is None:
        return "–"
    m, s = pair
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _paired_cell(row: dict[str, Any], reference: str) -> str:
    diff, ci = row.get("success_minus_" + reference), row.get("success_minus_" + reference + "_ci95")
    if diff is None:
        return "–"
    seeds = len(row.get("paired_seeds", ()))
    return (
        _fmt(diff)
        + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")
        + f" ({seeds} seed{'' if seeds == 1 else 's'})"
    )


def _tuning_lines(spec, tuning: dict[str, dict[str, dict]]) -> list[str]:
    """The report's tuning section: each tuned arm's candidates with their validation scores."""
    tuning = {arm: scores for arm, scores in (tuning or {}).items() if scores}
    if not tuning:
        return []
    judged = (f"task success on {spec['tune_episodes']} validation tasks (ties: validation loss)"
              if spec["tune_by"] == "success" else "validation loss")  # fmt: skip
    lines = ["", f"Tuning ({spec['tune_steps']} steps, seed {spec['tune_seed']}), chosen by {judged}; "
             "test tasks never choose:", ""]  # fmt: skip
    for arm, scores in tuning.items():
        cells = []
        for label, score in scores.items():
            success = score.get("validation_success")
            cells.append(
                f"{label}: {'–' if success is None else f'{success:.2f}'} / {score['validation_loss']:.3f}"
            )
        lines.append(f"- {arm} (validation success / loss): " + "; ".join(cells))
    return lines


def write_markdown(
    spec, table, lrs, runs, reference, path: Path, missing: list[str] = (), tuned=None, tuning=None
) -> None:
    tuned = {a: t for a, t in (tuned or {}).items() if t}
    lines = [f"# Experiment: {spec['env']}, sources {spec['sources']}", "",
             f"{len(spec['seeds'])} seeds ({spec['seeds']}), {spec['steps']} steps, {spec['episodes']} test tasks "
             "per run; mean ± std over seeds. Success: greedy rollouts on the environment's test split.", ""]  # fmt: skip
    if missing:
        lines += [f"**Not run ({len(missing)}; the means are over the finished seeds only):** "
                  + ", ".join(missing) + ".", ""]  # fmt: skip
    header = ["arm", "lr", *(["tuned"] if tuned else []), *(label for _, label in METRICS)]
    if reference:
        header.append(f"success − {reference} (paired, 95% t interval)")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm, row in table.items():
        cells = [arm, str(lrs.get(arm))] + ([", ".join(f"{k}={v}" for k, v in tuned.get(arm, {}).items()) or "–"]
                                             if tuned else [])  # fmt: skip
        cells += [_fmt(row[k], 1 if k == "wall_seconds" else 3) for k, _ in METRICS]
        if reference:
            cells.append(_paired_cell(row, reference) if arm != reference else "–")
        lines.append("| " + " | ".join(cells) + " |")
    lines += _tuning_lines(spec, tuning)
    lines += ["", "Per-seed success (95% Wilson interval):", ""]
    for arm, by_seed in runs.items():
        cells = [f"seed {s}: {r['success_rate']:.2f} [{r['success_ci95'][0]:.2f}, {r['success_ci95'][1]:.2f}]"
                 for s, r in sorted(by_seed.items()) if "success_ci95" in r]  # fmt: skip
        lines.append(f"- {arm}: " + "; ".join(cells))
    lines += ["", "Mean final weight per synthetic source over the whole pool, relative to the pool's mean "
              "weight (mean over seeds):", ""]  # fmt: skip
    for arm, row in table.items():
        if row["mean_weight_per_source"]:
            lines.append(
                f"- {arm}: " + ", ".join(f"{k} {v:.3f}" for k, v in row["mean_weight_per_source"].items())
            )
    write_text_atomic(path, "\n".join(lines) + "\n")


def write_plots(table, runs, out: Path) -> list[Path]:
    from boost.plotting import pyplot, save_png

    plt = pyplot()
    if plt is None:
        return []
    written = []
    fig, ax = plt.subplots(figsize=(1.2 * len(table) + 2, 3.5))
    for x, by_seed in enumerate(runs.values()):
        for s, r in sorted(by_seed.items()):
            lo, hi = r["success_ci95"]
            ax.errorbar(x + 0.1 * (s % 5), r["success_rate"], yerr=[[r["success_rate"] - lo], [hi - r["success_rate"]]],
                        fmt="o", color=f"C{x}", capsize=2)  # fmt: skip
    ax.set_xticks(range(len(runs)), list(runs), rotation=30)
    ax.set(ylabel="test success (95% CI per seed)", title="task success per arm")
    fig.tight_layout()
    written.append(save_png(fig, out / "success.png"))
    # mean weight per source over steps, from the metrics of each learned arm's first seed
    learned = [
        (arm, min(by_seed))
        for arm, by_seed in runs.items()
        if run_file(run_folder(out, arm, min(by_seed)), "metrics.jsonl").exists()
    ]
    series = {}
    for arm, seed in learned:
        lines = run_file(run_folder(out, arm, seed), "metrics.jsonl").read_text().splitlines()
        outer = [json.loads(x) for x in lines if '"weights"' in x]
        if outer:
            series[arm] = outer
    if series:
        fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.5), squeeze=False)
        for ax, (arm, outer) in zip(axes[0], series.items()):
            for src in sorted({k for m in outer for k in m["weights"]}):
                pts = [(m["step"], m["weights"][src]["mean"]) for m in outer if src in m["weights"]]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=src)
            ax.set(title=f"{arm}: mean weight per source", xlabel="step")
            ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(save_png(fig, out / "weights_over_steps.png"))
    pools = {
        arm: run_file(run_folder(out, arm, min(by_seed)), "pool_weights.jsonl")
        for arm, by_seed in runs.items()
    }
    pools = {a: p for a, p in pools.items() if p.exists() and a in series}
    if pools:
        fig, axes = plt.subplots(1, len(pools), figsize=(5 * len(pools), 3.5), squeeze=False)
        for ax, (arm, p) in zip(axes[0], pools.items()):
            rows = read_pool_rows(p)
            for k, src in enumerate(sorted({r["source"] for r in rows})):
                pts = [r for r in rows if r["source"] == src and r["quality"] is not None]
                ax.scatter(
                    [r["quality"] for r in pts], [r["weight"] for r in pts], s=6, color=f"C{k}", label=src
                )
            ax.set(title=f"{arm}: final weight vs ground-truth quality", xlabel="quality (1 − non-expert share)",
                   ylabel="weight")  # fmt: skip
            ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(save_png(fig, out / "weight_vs_quality.png"))
    kept = plot_refilters(runs, out)
    return written + ([kept] if kept else [])


def plot_refilters(runs: dict[str, dict[int, dict]], out: Path) -> Path | None:
    """``refilter_kept.png``: for each arm that refilters (``final.json["refilters"]``), the share of
    each synthetic source kept at each refilter step, one line per source and seed; None if no arm does."""
    from boost.plotting import pyplot, save_png

    arms = {
        arm: by_seed for arm, by_seed in runs.items() if any(r.get("refilters") for r in by_seed.values())
    }
    plt = pyplot()
    if not arms or plt is None:
        return None
    fig, axes = plt.subplots(1, len(arms), figsize=(5 * len(arms), 3.5), squeeze=False)
    for ax, (arm, by_seed) in zip(axes[0], arms.items()):
        sources = sorted({s for r in by_seed.values() for f in r.get("refilters", []) for s in f["kept"]})
        for k, src in enumerate(sources):
            for n, (_, r) in enumerate(sorted(by_seed.items())):
                pts = [(f["step"], f["kept"][src][0] / f["kept"][src][1]) for f in r.get("refilters", [])
                       if f["kept"].get(src)]  # fmt: skip
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, color=f"C{k}",
                        linestyle=("-", "--", ":", "-.")[n % 4], label=src if n == 0 else None)  # fmt: skip
        ax.set(title=f"{arm}: share kept per source (line style: seed)", xlabel="refilter after step",
               ylabel="kept / in the pool", ylim=(-0.02, 1.02))  # fmt: skip
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_png(fig, out / "refilter_kept.png")


def finished_runs(spec: dict[str, Any], out: Path) -> tuple[dict, dict, list[str]]:
    """(learning rate per arm, {arm: {seed: final.json}}, "arm seed k" of each run without a
    ``final.json``) of the grid as it stands in ``out``: nothing is trained."""
    lrs, runs, missing = {}, {}, []
    for name in spec["arms"]:
        runs[name] = {}
        for seed in spec["seeds"]:
            final = read_final(run_folder(out, name, seed))
            if final is not None:
                runs[name][seed] = final
                lrs[name] = final.get("lr")
            else:
                missing.append(f"{name} seed {seed}")
    return lrs, {a: by for a, by in runs.items() if by}, missing


def run_experiment(
    spec: dict[str, Any],
    out: Path,
    report_only: bool = False,
    arms: list[str] | None = None,
    seeds: list[int] | None = None,
) -> dict[str, Any]:
    """Train every run of the grid that has no ``final.json`` yet (``report_only``: none), then write
    ``results.json``, ``results.md`` and the plots over the finished runs.

    ``arms`` / ``seeds``: train only these arms / seeds of the grid (e.g. one process per arm and seed
    into the same ``out``); the report still covers the whole grid and lists what has not run."""
    out.mkdir(parents=True, exist_ok=True)
    if report_only:
        return _report_finished(spec, out)
    write_text_atomic(out / "experiment.yaml", yaml.safe_dump(spec))
    data = ensure_data(spec, out)
    chosen_arms = {n: o for n, o in spec["arms"].items() if arms is None or n in arms}
    chosen_seeds = [s for s in spec["seeds"] if seeds is None or s in seeds]
    lrs, tuning, runs = {}, {}, {}
    total = len(chosen_arms) * len(chosen_seeds)
    done = 0
    for name, overrides in chosen_arms.items():
        lrs[name], tuned, tuning[name] = tune_arm(spec, name, overrides, out, data)
        runs[name] = {}
        for seed in chosen_seeds:
            runs[name][seed] = run_one(spec, overrides, run_folder(out, name, seed), spec["steps"], seed, lrs[name],
                                       data, spec["episodes"], tuned)  # fmt: skip
            done += 1
            r = runs[name][seed]
            log.info("[%d/%d] %s seed %d: success %.3f, test loss %.4f, %.0f s", done, total, name, seed,
                     r.get("success_rate", math.nan), r.get("test_loss") or math.nan, r.get("wall_seconds", 0))  # fmt: skip
    if arms is not None or seeds is not None:  # a part of the grid: report over every finished run
        return _report_finished(spec, out)
    return write_results(spec, out, lrs, tuning, runs, [])


def _report_finished(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    lrs, runs, missing = finished_runs(spec, out)
    if not runs:
        raise ExperimentError(f"{out}: no finished run of this grid (no <arm>/seed<k>/final.json)")
    return write_results(spec, out, lrs, finished_tuning(spec, out), runs, missing)


def write_results(spec, out: Path, lrs, tuning, runs, missing: list[str]) -> dict[str, Any]:
    """``results.json``, ``results.md`` and the plots of ``runs``; ``missing`` runs are listed as not run."""
    reference = spec.get("reference") or ("boost" if "boost" in runs else None)
    if reference not in runs:
        reference = None
    table = aggregate(runs, reference, out)
    tuned = {a: next((r["tuned"] for r in by.values() if r.get("tuned")), {}) for a, by in runs.items()}
    results = {"spec": spec, "lr": lrs, "tuned": tuned, "tuning": tuning, "table": table,
               "runs": {a: {str(s): r for s, r in by.items()} for a, by in runs.items()}, "not_run": missing}  # fmt: skip
    write_json_atomic(out / "results.json", results)
    write_markdown(spec, table, lrs, runs, reference, out / "results.md", missing, tuned, tuning)
    write_plots(table, runs, out)
    return results


def _subset(parser, flag: str, text: str | None, known: list, convert, noun: str, config: str) -> list | None:
    """The comma-separated values of ``flag`` (each ``convert``ed: ``str`` or ``int``), every one in
    ``known``; None when the flag is not given. A bad, empty or unknown value is a parser error that
    names it and lists ``known``."""
    if text is None:
        return None
    try:
        values = [convert(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        parser.error(f"{flag} {text!r}: give comma-separated integers, e.g. {flag} 0,3")
    absent = [v for v in values if v not in known] if values else ["(none given)"]
    if absent:
        parser.error(
            f"{flag} {text!r}: {absent[0]!r} is not {noun} of {config} ({', '.join(map(str, known))})"
        )
    return values


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["analyse"], ["analyze"]):  # analyses of finished runs' records (boost/analysis.py)
        return analysis.main(argv[1:])
    parser = ArgumentParser(
        prog="python -m boost.experiment",
        description="Arms x seeds of the trainer.",
        epilog="python -m boost.experiment analyse --help: analyses of finished runs' records (train nothing)",
    )
    parser.add_argument("--config", required=True, help="the experiment YAML file (see the module docstring)")
    parser.add_argument("--quick", action="store_true", help="the file's quick grid")
    parser.add_argument("--out", help="output folder (default: runs/experiment-<env>[-quick])")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: write the results over the runs already finished in --out")  # fmt: skip
    parser.add_argument("--reference", help="the arm the paired differences are taken against (default: the "
                        "file's reference, else boost)")  # fmt: skip
    parser.add_argument("--arms", help="comma-separated: train only these arms of the grid (the report covers "
                        "every finished run)")  # fmt: skip
    parser.add_argument("--seeds", help="comma-separated integers: train only these seeds of the grid")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        spec = load_spec(args.config, quick=args.quick)
    except (ExperimentError, ValueError) as exc:
        parser.error(str(exc))
    if args.reference is not None:
        if args.reference not in spec["arms"]:
            parser.error(
                f"--reference {args.reference!r} is not an arm of {args.config} ({', '.join(spec['arms'])})"
            )
        spec["reference"] = args.reference
    if args.report_only and (args.arms is not None or args.seeds is not None):
        parser.error("--report-only trains nothing and reports the whole grid; --arms and --seeds choose what "
                     "to train: give one or the other")  # fmt: skip
    arms = _subset(parser, "--arms", args.arms, list(spec["arms"]), str, "an arm", args.config)
    seeds = _subset(parser, "--seeds", args.seeds, spec["seeds"], int, "a seed", args.config)
    out = Path(args.out or f"runs/experiment-{spec['env']}{'-quick' if args.quick else ''}")
    try:
        run_experiment(spec, out, report_only=args.report_only, arms=arms, seeds=seeds)
    except ExperimentError as exc:
        parser.error(str(exc))
    print(f"results: {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
