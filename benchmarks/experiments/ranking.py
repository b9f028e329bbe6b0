"""How a learned head ranks the synthetic pool, from finished runs' ``pool_weights.jsonl`` files.

    python benchmarks/experiments/ranking.py benchmarks/experiments/gridnav-lowreal/{boost,mwn}/seed*-pool_weights.jsonl

Per file: Spearman(weight, ground-truth quality) over the pool; within each source whose quality
varies (eps0.1, eps0.3, corrupt), Spearman(weight, quality) inside that source alone: what a
per-trajectory head can add over per-source weights, which tie inside a source. Once for the pool
(the data are the same in every file, checked): the ceiling of the pool-level Spearman for a head
that ranks every trajectory by its true quality except that it takes ``expert_shifted`` (quality 0:
the expert on another task) for the expert (quality 1), i.e. a head that cannot tell the task shift.
Ground truth is read for analysis only; no method sees it.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from boost.stats import spearman

SHIFTED = "expert_shifted"


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def within_source(rows: list[dict]) -> dict[str, float | None]:
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


def main(paths: list[str]) -> None:
    if not paths:
        raise SystemExit(__doc__)
    pool = None
    for name in paths:
        rows = sorted(read(Path(name)), key=lambda r: r["key"])
        signature = [(r["key"], r["source"], r["quality"]) for r in rows]
        if pool is None:
            pool = rows
            reference = signature
        elif signature != reference:
            raise SystemExit(f"{name}: another pool than {paths[0]} (keys, sources or qualities differ)")
        quality = [r["quality"] for r in rows]
        inside = ", ".join(_fmt(v, s) for s, v in within_source(rows).items())
        print(f"{name}: Spearman(w, quality) {_fmt(spearman([r['weight'] for r in rows], quality))}; "
              f"within source: {inside}")  # fmt: skip
    quality = [r["quality"] for r in pool]
    blind = [1.0 if r["source"] == SHIFTED else r["quality"] for r in pool]
    print(f"pool of {len(pool)}: ceiling for a head blind to the task shift ({SHIFTED} taken for the "
          f"expert, everything else ranked by true quality): Spearman {spearman(blind, quality):+.3f}")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
