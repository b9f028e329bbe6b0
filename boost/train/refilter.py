"""Applying a learned head's weights by selection (``weighting.refilter_every > 0``).

Multiplying the losses by the head's weights leaves the batch's slots of low-weight trajectories
nearly unused: on gridnav a uniform run with half of each batch's synthetic trajectories at weight 0
fell from 0.46 to 0.08 held-out success (benchmarks/RESULTS.md, "A half-batch diagnostic"). The
two-stage arm (``weight_filter``) avoids that by training a second model on the head's top share.
Refiltering does it within one run: every ``refilter_every`` inner steps the head scores the whole
synthetic pool (:func:`boost.train.baselines.pool_weights`, the current model and head), and the
training batches are planned from then on over the real trajectories plus the ``top_fraction`` of
synthetic ones by weight, each trained with weight 1. The head keeps learning from outer steps on
those batches (its hypergradients do not depend on how its weights are applied), and the next
refilter can bring back what it dropped.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

from boost.data import TrajectoryPacker
from boost.train.baselines import top_share_threshold


@dataclass(frozen=True)
class Refiltered:
    """The training set chosen after inner step ``step``: ``positions`` into the pool packer's list."""

    step: int
    positions: list[int]
    kept: dict[str, list[int]]  # source -> [kept, in the pool] (synthetic sources; real: all kept)

    def note(self) -> str:
        detail = ", ".join(f"{s} {k}/{n}" for s, (k, n) in sorted(self.kept.items()))
        kept = sum(k for k, _ in self.kept.values())
        total = sum(n for _, n in self.kept.values())
        return f"refilter after step {self.step}: training on {kept} of {total} synthetic trajectories ({detail})"


def is_refilter_step(step: int, every: int, outer_start: int, steps: int) -> bool:
    """Whether the training set is chosen again after inner step ``step``: every ``every`` steps, once
    the head has had outer steps (past ``outer_start``), and not after the last step."""
    return every > 0 and step % every == 0 and step > outer_start and step < steps


def choose(pool: TrajectoryPacker, weights: dict[int, float], top_fraction: float, step: int) -> Refiltered:
    """Every real trajectory of ``pool`` and the ``top_fraction`` of its synthetic ones by ``weights``
    (trajectory ``index`` -> weight, ties at the threshold kept, as ``weight_filter``).

    Raises:
        ValueError: a synthetic trajectory of the pool has no weight (the scoring missed it).
    """
    synthetic = [p for p, t in enumerate(pool.trajectories) if t.source != "real"]
    missing = [pool.trajectories[p].index for p in synthetic if pool.trajectories[p].index not in weights]
    if missing:
        raise ValueError(
            f"refilter: {len(missing)} synthetic trajectories were not scored (first index {missing[0]})"
        )
    threshold = top_share_threshold([weights[pool.trajectories[p].index] for p in synthetic], top_fraction)
    chosen = {p for p in synthetic if weights[pool.trajectories[p].index] >= threshold}
    positions = [p for p, t in enumerate(pool.trajectories) if t.source == "real" or p in chosen]
    kept: dict[str, list[int]] = {}
    totals = Counter(pool.trajectories[p].source for p in synthetic)
    counts = Counter(pool.trajectories[p].source for p in chosen)
    for source, n in totals.items():
        kept[source] = [counts.get(source, 0), n]
    return Refiltered(step, positions, kept)


def packer_for(pool: TrajectoryPacker, positions: list[int], step: int) -> TrajectoryPacker:
    """A packer over ``pool``'s trajectories at ``positions``, with the pool's packing and a seed of its
    own per refilter step (a resumed run rebuilds the very same batches from the step and positions)."""
    if not positions:
        raise ValueError("refilter: no trajectory left to train on")
    seed = pool.config.seed * 1_000_003 + step
    return TrajectoryPacker(
        [pool.trajectories[p] for p in positions], replace(pool.config, seed=seed),
        name=f"train (refiltered after step {step})",
    )  # fmt: skip
