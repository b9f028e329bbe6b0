"""Bar charts of a gpu_suite run: time and peak memory of every variant, one panel per problem.

    python benchmarks/plot_results.py OUT/gpu_suite.json [--png OUT/gpu_suite.png]

Runs where the report was fetched (the lent GPU need not have matplotlib). Rows that did not run
(skipped, error) are listed under their panel with their status instead of drawn as bars, so a
missing competitor is visible rather than silently absent.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _panels(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    panels: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        panels[(row["problem"], row["op"])].append(row)
    return dict(panels)


def plot(report: dict, png: Path) -> Path:
    """Draw the report's rows into ``png`` (written atomically). Returns the path."""
    panels = _panels(report["rows"])
    if not panels:
        raise ValueError("the report has no benchmark rows to plot")
    fig, axes = plt.subplots(len(panels), 2, figsize=(12, 2.2 + 1.6 * len(panels)), squeeze=False)
    for (problem, op), (ax_time, ax_mem) in zip(panels, axes):
        rows = panels[(problem, op)]
        ran = [r for r in rows if r["status"] == "ok" and r["seconds"] is not None]
        names = [r["name"] for r in ran]
        colors = ["tab:red" if n.startswith("ours") else "tab:gray" for n in names]
        ax_time.barh(names, [r["seconds"] * 1e3 for r in ran], color=colors)
        ax_time.set_xlabel("time (ms)")
        ax_time.set_title(f"{op} · {problem}", fontsize=9)
        ax_mem.barh(names, [(r["peak_bytes"] or 0) / 2**20 for r in ran], color=colors)
        ax_mem.set_xlabel("peak memory above inputs (MiB)")
        missing = [f"{r['name']}: {r['status']}" for r in rows if r not in ran]
        if missing:
            ax_mem.set_title("not run: " + "; ".join(missing), fontsize=7)
        for ax in (ax_time, ax_mem):
            ax.invert_yaxis()
            ax.tick_params(labelsize=8)
    info = report.get("info", {})
    title = f"{info.get('machine', '?')} · {info.get('date', '?')} · commit {info.get('commit', '?')}"
    if report.get("dry_run"):
        title = "DRY RUN (CPU, tiny shapes) · " + title
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=png.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, png)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return png


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("report", type=Path, help="gpu_suite.json written by benchmarks/gpu_suite.py")
    parser.add_argument("--png", type=Path, default=None, help="output image (default: beside the report)")
    args = parser.parse_args(argv)
    if not args.report.is_file():
        parser.error(f"{args.report} does not exist; run benchmarks/gpu_suite.py --out DIR first")
    report = json.loads(args.report.read_text())
    png = plot(report, args.png or args.report.with_suffix(".png"))
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
