"""report.md and training.png of a finished run, from the files the loop wrote under ``out_dir``.

The report is titled by what ran (``uniform run``, ``BOOST run (head, cg)``, ...: :func:`run_title`),
warns when a CPU-preset run had too few steps to beat the random policy
(:func:`boost.train.preset.budget_warning`), and its config shows only the settings that applied to
the run (:func:`applied_settings`; ``config.yaml`` beside it keeps them all).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml

from boost.atomic import write_text_atomic
from boost.plotting import integer_ticks, pyplot, save_png
from boost.train.baselines import GATED_FILTERS, LEARNED
from boost.train.preset import PRESET, budget_warning


def _number(x: float | None) -> str:
    return "none (no such split)" if x is None else f"{x:.4f}"


def _median(values) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _nan(x: float | None) -> float:
    return float("nan") if x is None else x


def _outer_steps(metrics: list[dict]) -> list[dict]:
    """The rows of outer steps that were taken (a skipped one logs null numbers)."""
    return [m for m in metrics if "val_loss" in m and not m.get("skipped")]


def read_metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def panels(metrics: list[dict]) -> list[str]:
    """The panels of training.png this run has numbers for: ``loss`` always; ``n_eff_mass`` and
    ``weights`` only when outer steps logged them (a uniform run has neither)."""
    outer = _outer_steps(metrics)
    shown = ["loss"]
    if any(m.get("n_eff") is not None or m.get("mass") is not None for m in outer):
        shown.append("n_eff_mass")
    if any(m.get("weights") for m in outer):
        shown.append("weights")
    return shown


def training_figure(metrics: list[dict]):
    """The figure of training.png: one panel per entry of :func:`panels`, integer step ticks.

    Returns None when matplotlib is not installed.
    """
    plt = pyplot()
    if plt is None:
        return None
    shown = panels(metrics)
    fig, axes = plt.subplots(1, len(shown), figsize=(4.7 * len(shown), 3.6), squeeze=False)
    ax = dict(zip(shown, axes[0]))
    steps = [m["step"] for m in metrics]
    outer = _outer_steps(metrics)
    ax["loss"].plot(steps, [_nan(m["loss"]) for m in metrics], label="weighted training loss")
    real = [_nan(m["real_train_loss"]) for m in metrics]
    ax["loss"].plot(steps, real, ".", label="real training trajectories in the batch")
    if outer:
        ax["loss"].plot([m["step"] for m in outer], [m["val_loss"] for m in outer], label="real validation")
    ax["loss"].set(title="loss", xlabel="step")
    if "n_eff_mass" in ax:
        for key, label in (("n_eff", "n_eff"), ("mass", "synthetic mass")):
            pts = [(m["step"], m[key]) for m in outer if m.get(key) is not None]
            ax["n_eff_mass"].plot([p[0] for p in pts], [p[1] for p in pts], label=label)
        ax["n_eff_mass"].set(title="effective sample size and mass", xlabel="step")
    if "weights" in ax:
        for s in sorted({s for m in outer for s in m.get("weights") or {}}):
            pts = [(m["step"], m["weights"][s]["mean"]) for m in outer if s in (m.get("weights") or {})]
            ax["weights"].plot([p[0] for p in pts], [p[1] for p in pts], label=s)
        ax["weights"].set(title="mean weight per source", xlabel="step")
    for a in axes[0]:
        integer_ticks(a)
        if a.lines:
            a.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _plot(metrics: list[dict], path: Path) -> Path | None:
    fig = training_figure(metrics)
    return None if fig is None else save_png(fig, path)


def run_title(config: dict[str, Any]) -> str:
    """What ran, from a run's config: ``uniform run``, ``return_filter run``, ``BOOST run (head, cg)``
    (a learned weighting: the block the hypergradient is taken over, the solver, and the outer objective
    when it is not the validation NLL; an influence selection: that objective too)."""
    method = config["weighting"]["method"]
    objective = config.get("outer", {}).get("objective", "nll")
    if method == "influence" and objective != "nll":
        return f"influence run (scored by outer objective {objective})"
    if method not in LEARNED:
        return f"{method} run"
    parts = [config["block"], config["solver"]["method"]]
    if objective != "nll":
        parts.append(f"outer objective {objective}")
    if config["weighting"]["refilter_every"]:
        parts.append(f"refiltering every {config['weighting']['refilter_every']} steps")
    return f"{'BOOST' if method == 'boost' else method} run ({', '.join(parts)})"


# weighting.* settings read only by some methods (boost/train/baselines.py, boost/train/refilter.py)
_WEIGHTING_USERS = {
    "return_threshold": ("return_filter",),
    "loss_drop": ("loss_filter",),
    "oracle_threshold": ("oracle",),
    "weights_path": ("weight_filter",),
    "return_gate": GATED_FILTERS,
    "subset_seed": ("random_filter", "influence"),
    "select_at": ("influence",),
    "influence_batches": ("influence",),
    "select_by": ("influence",),
    "warmup_on": ("influence",),
    "influence_norm": ("influence",),
}
# what only a learned weighting (a head and outer steps) reads
_LEARNED_ONLY = ("solver", "head", "outer", "block", "fd_step", "outer_every")
_LEARNED_ONLY_IN = {
    "optim": ("head_lr", "schedule_head"),
    "weighting": ("outer_start", "freeze_mass", "refilter_every", "head_steps"),
}
# the learned-only settings a method without a head reads too (influence solves for v = H⁻¹ g for the
# outer objective's g, rescores)
_ALSO_READ_BY = {"influence": ("solver", "outer", "refilter_every")}


def applied_settings(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (a run's ``config.yaml``) without the settings that did not apply to the run: no
    solver, head or outer-step settings without a learned weighting, no other method's
    ``weighting.*`` settings, no LoRA options with LoRA off, no rollout options without rollouts, no
    preset model sizes for another model, no finite-difference step for ``block=head``."""
    shown = copy.deepcopy(config)
    weighting = shown["weighting"]
    method = weighting["method"]
    learned = method in LEARNED
    if not learned:
        read = _ALSO_READ_BY.get(method, ())
        for key in _LEARNED_ONLY:
            if key not in read:
                shown.pop(key, None)
        for group, keys in _LEARNED_ONLY_IN.items():
            for key in keys:
                if key not in read:
                    shown[group].pop(key, None)
    elif shown.get("block") == "head":
        shown.pop("fd_step", None)
    if method == "influence":  # one selection's rollouts: no schedule; the default NLL reads no option
        if shown.get("outer", {}).get("objective", "nll") == "nll":
            shown.pop("outer", None)
        else:
            shown["outer"].pop("rollout_every", None)
    for key, users in _WEIGHTING_USERS.items():
        if method not in users:
            weighting.pop(key, None)
    uses_top = method in ("weight_filter", "random_filter", "influence") or (
        method == "return_filter" and weighting.get("return_threshold") is None
    )
    if not (uses_top or (learned and weighting.get("refilter_every"))):
        weighting.pop("top_fraction", None)
    if not weighting.get("awr_beta"):
        weighting.pop("awr_max", None)
    if shown["optim"].get("schedule") == "constant":
        shown["optim"].pop("min_lr_ratio", None)
    if not shown["lora"]["enabled"]:
        shown["lora"] = {"enabled": False}
    if not shown["eval"]["episodes"]:
        shown["eval"] = {"episodes": 0}
    if shown["model"]["name"] != PRESET:
        shown["model"] = {
            k: v for k, v in shown["model"].items() if k not in ("hidden_size", "layers", "heads")
        }
    if shown.get("parallel") == "none":
        shown.pop("parallel_debug", None)
    return shown


def success_line(final: dict, random_policy: dict | None = None) -> str:
    """One line: held-out task success with its 95% Wilson interval (and the random policy's)."""
    if "success_rate" not in final:
        return "held-out task success: not measured (eval.episodes=0)"
    lo, hi = final["success_ci95"]
    line = (
        f"held-out task success: {final['success_rate']:.2f} [{lo:.2f}, {hi:.2f}] (95% Wilson) on "
        f"{final['episodes']} {final.get('eval_split', 'test')} tasks of {final['env']}"
    )
    if random_policy is not None:
        rlo, rhi = random_policy["success_ci95"]
        line += f"; the random policy on the same tasks: {random_policy['success_rate']:.2f} [{rlo:.2f}, {rhi:.2f}]"
    return line


def write_report(out: Path, data_summary: list[str], random_policy: dict | None = None) -> Path:
    """Write ``out/report.md`` (and ``out/training.png`` when matplotlib is installed).

    ``random_policy``: the random policy's task success on the same test tasks
    (:func:`boost.train.evaluation.random_policy_success`), shown next to the model's.
    """
    metrics = read_metrics(out)
    final = json.loads((out / "final.json").read_text(encoding="utf-8"))
    config = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    warning = budget_warning(config["model"]["name"], config["steps"])
    lines = [
        f"# {run_title(config)}: {out.name}",
        "",
        *([f"**Warning:** {warning}.", ""] if warning else []),
        f"Steps: {final['step']}. Held-out real tasks, mean per-trajectory loss: validation "
        f"{_number(final['validation_loss'])}, test {_number(final['test_loss'])}.",
        "",
        success_line(final, random_policy).replace("held-out task success", "Held-out task success", 1) + ".",
    ]
    if "success_rate" in final:
        lines[-1] += (
            f" Mean return {final['mean_return']:.3f}, {final['mean_turns']:.1f} turns per episode, "
            f"{final['invalid_per_turn']:.3f} invalid actions per turn (greedy decoding)."
        )
    outer = _outer_steps(metrics)
    skipped = [m["step"] for m in metrics if m.get("skipped")]
    if skipped:
        lines += [
            "",
            f"Skipped {len(skipped)} steps with a non-finite number (steps {', '.join(map(str, skipped))}).",
        ]
    if outer:
        last = outer[-1]
        residual = last["solver_residual"]
        residual = "not computed" if residual is None else f"{residual:.3g}"
        lines += ["", f"Last outer step (step {last['step']}): n_eff {last['n_eff']:.2f}, synthetic mass "
                  f"{last['mass']:.3f}, solver residual {residual}.", "",
                  "| source | trajectories in the batch | mean weight | min | max |", "|---|---|---|---|---|"]  # fmt: skip
        lines += [
            f"| {s} | {v['count']} | {v['mean']:.3f} | {v['min']:.3f} | {v['max']:.3f} |"
            for s, v in sorted(last["weights"].items())
        ]
    timing = f"Median time per step: inner {_median(m['inner_seconds'] for m in metrics):.2f} s"
    if outer:
        timing += (
            f", outer {_median(m['outer_seconds'] for m in outer):.2f} s "
            f"(every {config['outer_every']} inner steps)"
        )
    lines += ["", timing + "."]
    plot = _plot(metrics, out / "training.png")
    lines += ["", f"![training curves]({plot.name})" if plot else "(install matplotlib for training.png)"]
    lines += [
        "",
        "## Data",
        "",
        "```",
        *data_summary,
        "```",
        "",
        "## Config",
        "",
        "The settings that applied to this run (`config.yaml` holds every setting).",
        "",
        "```yaml",
        yaml.safe_dump(applied_settings(config), sort_keys=False).rstrip(),
        "```",
    ]
    path = out / "report.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path
