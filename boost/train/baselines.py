"""Baselines as configurations of the one trainer: only the per-trajectory weights differ.

``weighting.method`` (the one weighting setting):

- ``boost``: the reweighting head of :mod:`boost.bilevel.reweighting`, trained by implicit hypergradients.
- ``uniform``: weight 1 on every real and synthetic trajectory (behaviour cloning on all data).
- ``real_only``: the synthetic trajectories are left out of the training set.
- ``return_filter``: synthetic trajectories with return >= ``return_threshold`` are kept (or, without a
  threshold, the ``top_fraction`` of them by return); the rest are left out. Weight 1.
- ``loss_filter``: in each batch, the ``loss_drop`` share of synthetic trajectories with the highest
  loss under the current model get weight 0.
- ``per_source``: DoReMi-style, one learned weight per source (:class:`SourceHead`: the head with only
  a source embedding), trained on validation by the same hypergradients as BOOST.
- ``mwn``: Meta-Weight-Net, an MLP on the loss alone (:class:`LossHead`); its arm uses the one-step
  look-ahead, ``solver.method=identity``.
- ``weight_filter``: two-stage BOOST: keeps the ``top_fraction`` of synthetic trajectories by the weight
  a finished learned-weight run gave them (its ``pool_weights.jsonl``, ``weights_path``); weight 1.
  Judge-free, and unlike ``return_filter`` it needs no returns. The file names each trajectory by
  :func:`trajectory_key`, so it applies to the same trajectories in any order or file.
- ``random_filter``: a control, not a method: keeps a uniformly random ``top_fraction`` of the synthetic
  trajectories (``subset_seed``), weight 1. Beside ``weight_filter`` at the same ``top_fraction`` (and
  ``return_gate``) it says whether a learned ranking beats an unranked subset of the same size.
- ``oracle``: ANALYSIS ONLY, not a method: keeps the synthetic trajectories whose ground-truth quality
  (from ``meta``, which no method may read) is >= ``oracle_threshold``.

Composable with each: AWR, ``awr_beta > 0`` multiplies every weight by
``min(exp(awr_beta · (R_i − mean R)), awr_max)`` (returns of the training pool; 1 without a return),
and ``outer_start``: no outer step before that inner step (behaviour-cloning warm-up).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from boost.atomic import write_text_atomic
from boost.bilevel.reweighting import (
    HeadConfig,
    ReweightingHead,
    TrajectoryFeatures,
    effective_sample_size,
    trajectory_features,
)
from boost.data.format import Trajectory
from boost.stats import spearman

METHODS = (
    "boost", "uniform", "real_only", "return_filter", "loss_filter", "per_source", "mwn", "weight_filter",
    "random_filter", "influence", "oracle",
)  # fmt: skip
LEARNED = ("boost", "per_source", "mwn")  # methods with a head and outer steps
# methods that choose their synthetic trajectories before training (select_synthetic), weight 1 each
DATA_FILTERS = ("real_only", "return_filter", "weight_filter", "random_filter", "oracle")
# data filters that rank (after an optional weighting.return_gate) and keep a top_fraction; influence
# trains on every passer until weighting.select_at, then ranks them by influence
GATED_FILTERS = ("return_filter", "weight_filter", "random_filter", "influence")
ANALYSIS_ONLY = ("oracle",)


class SourceHead(ReweightingHead):
    """Per-source weights (DoReMi-style): a learned score per source index, nothing else.

    Everything but the scores (the normaliser μ, the synthetic mass, the task-shift reference) is the
    BOOST head's, so the arms differ only in what the score sees. Needs ``cfg.num_sources > 0``.
    """

    def __init__(self, hidden_dim: int, cfg: HeadConfig):
        if not cfg.num_sources:
            raise ValueError("weighting.method=per_source needs head.num_sources > 0 (the number of sources)")
        super().__init__(hidden_dim, cfg)
        self.mlp = self.source = self.pooled_norm = None  # the score reads the source index alone
        self.log_score = nn.Parameter(torch.zeros(cfg.num_sources))

    def scores(self, f: TrajectoryFeatures) -> torch.Tensor:
        if f.source is None:
            raise ValueError("SourceHead needs the features' source indices")
        return self.log_score[f.source].exp()


class LossHead(ReweightingHead):
    """Meta-Weight-Net: an MLP from the trajectory's loss alone to a positive score (the rest as
    :class:`SourceHead`: the BOOST head's normaliser, mass and regularisers)."""

    def __init__(self, hidden_dim: int, cfg: HeadConfig):
        super().__init__(hidden_dim, cfg)
        self.source = self.pooled_norm = None
        # no bias on the score layer, as the BOOST head (boost/bilevel/reweighting.py says why)
        self.mlp = nn.Sequential(
            nn.Linear(1, cfg.hidden_size), nn.SiLU(), nn.Linear(cfg.hidden_size, 1, bias=False)
        )
        nn.init.zeros_(self.mlp[-1].weight)  # uniform at the start, as the BOOST head

    def scores(self, f: TrajectoryFeatures) -> torch.Tensor:
        return nn.functional.softplus(self.mlp(f.loss[:, None]).squeeze(1)) + 1e-6


def make_head(method: str, hidden_dim: int, cfg: HeadConfig) -> nn.Module:
    """The head of ``method`` (the BOOST head also for methods without outer steps: it is never used)."""
    if method == "per_source":
        return SourceHead(hidden_dim, cfg)
    if method == "mwn":
        return LossHead(hidden_dim, cfg)
    return ReweightingHead(hidden_dim, cfg)


# ---- ground truth (analysis only) -------------------------------------------------------------------


def ground_truth_quality(meta: dict[str, Any]) -> float | None:
    """1 − share of non-expert actions on the target task (0 for task-shifted or random play).

    From the generator's ``meta``; None where it does not say (e.g. ``lm_rollout``).
    """
    if meta.get("shift"):
        return 0.0
    generator, turns = meta.get("generator"), meta.get("turns") or 0
    if generator == "random":
        return 0.0
    if generator in ("expert", "eps_expert", "corrupt", "sticky") and turns:
        bad = meta.get("n_random_actions", 0) + meta.get("n_corrupted", 0)
        return 1.0 - bad / turns
    if generator == "expert":
        return 1.0
    return None


# ---- data-level selection -----------------------------------------------------------------------------


def top_share_threshold(values: list[float], fraction: float) -> float:
    """The value of rank ceil(fraction·n) from the top: keeping ``>= it`` keeps that share (ties kept)."""
    ordered = sorted(values, reverse=True)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)] if ordered else 0.0


def return_gate_value(cfg, real: list[Trajectory] | None) -> float | None:
    """The return a synthetic trajectory needs to pass ``cfg.return_gate`` (None: no gate).

    ``"real_min"``: the lowest return among ``real`` (the real training trajectories). Raises
    ValueError when that cannot be read (no real trajectories, or one without a return).
    """
    gate = cfg.return_gate
    if gate is None:
        return None
    if gate != "real_min":
        return float(gate)
    returns = [t.reward for t in real or []]
    if not returns or any(r is None for r in returns):
        missing = sum(r is None for r in returns)
        raise ValueError(
            "weighting.return_gate=real_min needs the return of every real training trajectory; "
            + (
                f"{missing} of {len(returns)} have none"
                if returns
                else "there are no real training trajectories"
            )
            + " (give a number instead, e.g. weighting.return_gate=1.0)"
        )
    return min(returns)


def synthetic_returns(synthetic: list[Trajectory], setting: str, alternative: str) -> list[float]:
    """The return of each trajectory of ``synthetic``, for the setting ``setting`` that reads them.

    Raises:
        ValueError: some have no return; the message names ``setting`` and the fix (``alternative``).
    """
    returns = [t.reward for t in synthetic]
    missing = sum(r is None for r in returns)
    if missing:
        raise ValueError(
            f"{setting}: {missing} synthetic trajectories have no return; filter them out of the data or "
            f"{alternative}"
        )
    return returns


def select_synthetic(
    synthetic: list[Trajectory], cfg, real: list[Trajectory] | None = None
) -> tuple[list[Trajectory], str]:
    """The synthetic trajectories ``cfg.method`` trains on, and a line saying what was left out.

    ``real``: the real training trajectories (read only by ``cfg.return_gate="real_min"``). With a
    return gate, the trajectories below it are left out first and the ranking (``top_fraction`` by
    return or by weight) runs over the ones that pass.
    """
    method = cfg.method
    gate = return_gate_value(cfg, real) if method in GATED_FILTERS else None
    gate_note = ""
    if gate is not None:
        synthetic_returns(synthetic, "weighting.return_gate", "drop the gate")
        passed = [t for t in synthetic if t.reward >= gate]
        gate_note = f"; return gate {gate:g} ({cfg.return_gate}) passed {len(passed)} of {len(synthetic)}"
        if not passed:
            raise ValueError(
                f"weighting.return_gate={cfg.return_gate}: no synthetic trajectory has a return >= {gate:g}; "
                "lower the gate or drop it"
            )
        full, synthetic = synthetic, passed
    if method == "real_only":
        kept = []
    elif method == "return_filter":
        returns = synthetic_returns(synthetic, "weighting.method=return_filter", "use another method")
        if cfg.return_threshold is not None:
            threshold = cfg.return_threshold
        else:
            threshold = top_share_threshold(returns, cfg.top_fraction)
        kept = [t for t in synthetic if t.reward >= threshold]
    elif method == "weight_filter":
        weights = read_pool_weights(cfg.weights_path, full if gate is not None else synthetic)
        if gate is not None:
            weights = [w for t, w in zip(full, weights) if t.reward >= gate]
        threshold = top_share_threshold(weights, cfg.top_fraction)
        kept = [t for t, w in zip(synthetic, weights) if w >= threshold]
    elif method == "random_filter":
        # a fixed number, not a threshold: ties cannot change the size of the control
        count = max(1, round(cfg.top_fraction * len(synthetic)))
        chosen = set(random.Random(cfg.subset_seed).sample(range(len(synthetic)), count))
        kept = [t for i, t in enumerate(synthetic) if i in chosen]
    elif method == "oracle":
        quality = [ground_truth_quality(t.meta) for t in synthetic]
        if any(q is None for q in quality):
            raise ValueError("weighting.method=oracle needs generator ground truth in every synthetic 'meta'")
        kept = [t for t, q in zip(synthetic, quality) if q >= cfg.oracle_threshold]
    else:  # not one of DATA_FILTERS (influence: every passer of the gate, ranked later in the run)
        return synthetic, f"weighting {method}: {len(synthetic)} synthetic trajectories kept{gate_note}"
    note = " (ANALYSIS ONLY: reads ground truth)" if method in ANALYSIS_ONLY else ""
    if gate is not None:
        synthetic = full
    by_source = defaultdict(lambda: [0, 0])
    for t in synthetic:
        by_source[t.source][1] += 1
    for t in kept:
        by_source[t.source][0] += 1
    detail = ", ".join(f"{s} {k}/{n}" for s, (k, n) in sorted(by_source.items()))
    return (
        kept,
        f"weighting {method}{note}: kept {len(kept)} of {len(synthetic)} synthetic trajectories ({detail})"
        f"{gate_note}",
    )


def left_out(pool: list[Trajectory], kept: list[Trajectory]) -> list[Trajectory]:
    """The trajectories of ``pool`` that are not in ``kept`` (by identity; ``pool`` order)."""
    kept_ids = {id(t) for t in kept}
    return [t for t in pool if id(t) not in kept_ids]


def trajectory_key(t: Trajectory) -> str:
    """A stable name of a trajectory's content: the first 16 hex digits of the SHA-1 of its source and
    messages (identical trajectories share it, and would get the same weight)."""
    text = json.dumps({"source": t.source, "messages": t.messages}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def read_pool_weights(path: str | Path | None, synthetic: list[Trajectory]) -> list[float]:
    """The weight of each of ``synthetic`` in a ``pool_weights.jsonl`` (:func:`weight_analysis`), by
    :func:`trajectory_key`. Raises ValueError when the file is missing, has rows without a key (written
    before keys existed) or does not name every trajectory (it was written for other data)."""
    if path is None:
        raise ValueError(
            "weighting.method=weight_filter needs weighting.weights_path=<run>/pool_weights.jsonl "
            "(written by a finished boost, per_source or mwn run on the same data)"
        )
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weighting.weights_path: {path} does not exist")
    by_key: dict[str, list[float]] = defaultdict(list)
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "key" not in row:
            raise ValueError(
                f"{path}:{lineno}: no 'key' (a pool_weights.jsonl written before trajectory keys); rewrite it "
                "with python -m boost.experiment analyse key-pool-weights RUN or rerun the weighting run"
            )
        by_key[row["key"]].append(float(row["weight"]))
    keys = [trajectory_key(t) for t in synthetic]
    missing = [k for k in keys if k not in by_key]
    if missing:
        raise ValueError(
            f"{path} has no weight for {len(missing)} of the {len(keys)} synthetic trajectories (first key "
            f"{missing[0]}): it was written for other data; use the pool_weights.jsonl of a run on this data"
        )
    return [math.fsum(by_key[k]) / len(by_key[k]) for k in keys]


# ---- per-batch weights of the methods without a head --------------------------------------------------


def fixed_weights(
    method: str, per_trajectory: torch.Tensor, synthetic: torch.Tensor, loss_drop: float
) -> torch.Tensor:
    """[S] float32 weights of ``uniform``-like methods: 1, or 0 for the highest-loss synthetic (loss_filter)."""
    w = torch.ones_like(per_trajectory, dtype=torch.float32)
    if method == "loss_filter" and bool(synthetic.any()):
        idx = torch.nonzero(synthetic).squeeze(1)
        n_drop = int(math.floor(loss_drop * len(idx)))
        if n_drop:
            worst = idx[per_trajectory[idx].argsort(descending=True)[:n_drop]]
            w[worst] = 0.0
    return w


def mean_return(trajectories: list[Trajectory]) -> float:
    """Mean return over the trajectories that have one (the AWR baseline); 0 when none has."""
    returns = [t.reward for t in trajectories if t.reward is not None]
    return math.fsum(returns) / len(returns) if returns else 0.0


def awr_factors(
    rewards: torch.Tensor, beta: float, baseline: float, clip: float, truncated: torch.Tensor | None = None
) -> torch.Tensor:
    """[S] ``min(exp(beta (R − baseline)), clip)``; 1 where the return is unknown (NaN) or does not
    describe the tokens trained on (``truncated`` [S] bool: the episode's later turns were cut, and
    its reward is the whole episode's)."""
    known = ~torch.isnan(rewards)
    if truncated is not None:
        known &= ~truncated.to(known.device)
    factor = torch.exp(beta * (torch.nan_to_num(rewards) - baseline)).clamp(max=clip)
    return torch.where(known, factor, torch.ones_like(factor))


# ---- analysis of the final weights over the whole synthetic pool --------------------------------------


def pool_batches(trainer, features: bool) -> Iterator[tuple[Any, Any, Any]]:
    """(batch, losses, head features or None) for every batch of the training pool (epoch-0 order),
    under the current model in eval mode (restored after), without gradients. ``features``: also build
    the head's :func:`trajectory_features` as the trainer does (source and returns as its config says).
    A parallel run yields this rank's share of each batch (every rank the same number of batches).
    """
    cfg = trainer.cfg
    was_training = trainer.model.training
    trainer.model.eval()
    try:
        with torch.no_grad():
            for batch in trainer.parallel.batches(trainer.data.train, 0):
                batch = batch.to(trainer.device)
                hidden = trainer.hidden_states(batch)
                losses = trainer.losses(hidden, batch)
                f = None
                if features:
                    f = trajectory_features(
                        hidden, batch.segment_ids, batch.segment_ids >= 0, losses.per_trajectory,
                        losses.num_tokens, ~batch.is_real,
                        source=trainer._source_index(batch) if cfg.head.num_sources else None,
                        returns=torch.nan_to_num(batch.rewards) if cfg.head.use_returns else None,
                    )  # fmt: skip
                yield batch, losses, f
    finally:
        trainer.model.train(was_training)


@torch.no_grad()
def pool_weights(trainer) -> dict[int, float]:
    """Trajectory index (into the training packer's list) -> weight under the final model and head.

    Learned heads: the unnormalised score times the mass (so weights compare across batches); other
    methods: the weight the method gives (1 or 0). A parallel run scores each rank's share of every
    batch and gathers the global batch (the same dict, in the same order, on every rank).
    """
    method = trainer.method
    out: dict[int, float] = {}
    if method == "influence" and trainer.refiltered is not None:  # 1 on the latest selection, 0 elsewhere
        chosen = set(trainer.refiltered.positions)
        pool = trainer.data.train.trajectories
        return {t.index: float(p in chosen) for p, t in enumerate(pool) if t.source != "real"}
    if method not in LEARNED and method != "loss_filter":  # weight 1 on every kept trajectory: no forward
        return {t.index: 1.0 for t in trainer.data.train.trajectories if t.source != "real"}
    for batch, losses, f in pool_batches(trainer, features=method in LEARNED):
        local = [
            batch.trajectory_index.to(losses.per_trajectory.device),
            ~batch.is_real,
            losses.per_trajectory,
        ]
        if f is not None:
            local.append(trainer.head.scores(f) * trainer.head.mass)  # per trajectory: scored where it is
        index, synthetic, per, *learned = trainer.parallel.gather(batch, *local)
        if learned:
            w = learned[0]
        else:  # loss_filter's threshold is over the global batch
            w = fixed_weights(method, per, synthetic, trainer.cfg.weighting.loss_drop)
        for i, value, syn in zip(index.tolist(), w.tolist(), synthetic.tolist()):
            if syn:
                out[i] = value
    return out


def with_awr_factors(trainer, weights: dict[int, float]) -> dict[int, float]:
    """``weights`` (trajectory index -> weight, :func:`pool_weights`) times each trajectory's AWR
    factor (:func:`awr_factors` with the run's ``awr_beta``, ``awr_max`` and baseline), as the loss
    applies it. The refilter chooses on :func:`pool_weights` alone."""
    cfg = trainer.cfg.weighting
    by_index = {t.index: t for t in trainer.data.train.trajectories}
    indices = list(weights)
    items = [by_index[i] for i in indices]
    rewards = torch.tensor([math.nan if t.reward is None else t.reward for t in items], dtype=torch.float64)
    truncated = torch.tensor([t.truncated for t in items], dtype=torch.bool)
    factors = awr_factors(rewards, cfg.awr_beta, trainer.awr_baseline, cfg.awr_max, truncated=truncated)
    return {i: weights[i] * f for i, f in zip(indices, factors.tolist())}


def relative_source_means(rows: list[tuple[str, float]]) -> dict[str, float]:
    """Mean weight per source divided by the mean over all rows (comparable across runs and heads:
    a learned head's scores have an arbitrary scale). ``rows``: (source, weight) per trajectory."""
    if not rows:
        return {}
    overall = math.fsum(w for _, w in rows) / len(rows)
    by_source: dict[str, list[float]] = defaultdict(list)
    for source, w in rows:
        by_source[source].append(w)
    return {s: math.fsum(v) / len(v) / overall for s, v in sorted(by_source.items())} if overall else {}


def weight_analysis(trainer) -> dict[str, Any]:
    """Spearman(weight, ground-truth quality) and (weight, return), mean weight per source (relative
    to the pool's mean weight), n_eff: :func:`pool_analysis` of the run's final weights.

    Over every synthetic trajectory of the training pool; ground truth from ``meta`` (analysis only).
    The trajectories a data-level filter left out (``trainer.data.filtered_out``) count with weight
    0, so a filter's mean weight per source is the share it kept, relative to the overall share.
    With ``awr_beta > 0`` each weight carries its AWR factor (:func:`with_awr_factors`).
    Also writes ``out_dir/pool_weights.jsonl`` (:func:`pool_weight_lines`;
    ``weighting.method=weight_filter`` reads it).
    """
    weights = pool_weights(trainer)
    if trainer.cfg.weighting.awr_beta:  # the weight the loss applied: the method's times the AWR factor
        weights = with_awr_factors(trainer, weights)
    trajectories = trainer.data.train_trajectories
    rows = [(w, trajectories[i]) for i, w in weights.items()]
    rows += [(0.0, t) for t in trainer.data.filtered_out]
    if trainer.parallel.is_main:  # parallel: every rank holds the same rows, rank 0 writes them
        write_text_atomic(Path(trainer.out) / "pool_weights.jsonl", pool_weight_lines(rows))
    return pool_analysis(rows, filtered_out=len(trainer.data.filtered_out))


def pool_weight_lines(rows: list[tuple[float, Trajectory]]) -> str:
    """``pool_weights.jsonl``: source, weight, quality, return, task id and :func:`trajectory_key` of
    each (weight, trajectory), one JSON object per line."""
    return "".join(
        json.dumps(
            {
                "source": t.source,
                "weight": w,
                "quality": ground_truth_quality(t.meta),
                "return": t.reward,
                "task_id": t.task_id,
                "key": trajectory_key(t),
            }
        )
        + "\n"
        for w, t in rows
    )


def pool_analysis(rows: list[tuple[float, Trajectory]], filtered_out: int) -> dict[str, Any]:
    """The final.json keys of :func:`weight_analysis` for (weight, synthetic trajectory) pairs, of
    which ``filtered_out`` are a data-level filter's left-out trajectories (listed with weight 0)."""
    quality = [(w, ground_truth_quality(t.meta)) for w, t in rows]
    quality = [(w, q) for w, q in quality if q is not None]
    returns = [(w, t.reward) for w, t in rows if t.reward is not None]
    all_w = torch.tensor([w for w, _ in rows], dtype=torch.float64)
    return {
        "spearman_quality": spearman([w for w, _ in quality], [q for _, q in quality]) if quality else None,
        "spearman_return": spearman([w for w, _ in returns], [r for _, r in returns]) if returns else None,
        "mean_weight_per_source": relative_source_means([(t.source, w) for w, t in rows]),
        "n_eff_pool": float(effective_sample_size(all_w)) if len(rows) else None,
        "n_synthetic_pool": len(rows),
        "n_filtered_out": filtered_out,
    }
