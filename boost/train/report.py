"""report.md and training.png of a finished run, from the files the loop wrote under ``out_dir``."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from boost.atomic import write_text_atomic
from boost.plotting import pyplot, save_png


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


def _plot(metrics: list[dict], path: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    steps = [m["step"] for m in metrics]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    axes[0].plot(steps, [_nan(m["loss"]) for m in metrics], label="weighted training loss")
    real = [_nan(m["real_train_loss"]) for m in metrics]
    axes[0].plot(steps, real, ".", label="real training trajectories in the batch")
    outer = _outer_steps(metrics)
    if outer:
        axes[0].plot([m["step"] for m in outer], [m["val_loss"] for m in outer], label="real validation")
        axes[1].plot([m["step"] for m in outer], [m["n_eff"] for m in outer], label="n_eff (synthetic)")
        axes[1].plot([m["step"] for m in outer], [m["mass"] for m in outer], label="synthetic mass")
        sources = sorted({s for m in outer for s in m["weights"]})
        for s in sources:
            pts = [(m["step"], m["weights"][s]["mean"]) for m in outer if s in m["weights"]]
            axes[2].plot([p[0] for p in pts], [p[1] for p in pts], label=s)
    axes[0].set(title="loss", xlabel="step")
    axes[1].set(title="effective sample size and mass", xlabel="step")
    axes[2].set(title="mean weight per source", xlabel="step")
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return save_png(fig, path)


def write_report(out: Path, data_summary: list[str]) -> Path:
    """Write ``out/report.md`` (and ``out/training.png`` when matplotlib is installed)."""
    metrics = read_metrics(out)
    final = json.loads((out / "final.json").read_text(encoding="utf-8"))
    config = (out / "config.yaml").read_text(encoding="utf-8")
    lines = [
        f"# BOOST run: {out.name}",
        "",
        f"Steps: {final['step']}. Held-out real tasks, mean per-trajectory loss: validation "
        f"{_number(final['validation_loss'])}, test {_number(final['test_loss'])}.",
    ]
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
            f"(every {yaml.safe_load(config)['outer_every']} inner steps)"
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
        "```yaml",
        config.rstrip(),
        "```",
    ]
    path = out / "report.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path
