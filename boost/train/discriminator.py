"""A real-vs-synthetic discriminator as a judge-free selection baseline (``weighting.select_by=discriminator``).

Discriminator-weighted and importance-weighted behaviour cloning score each synthetic trajectory by
how much it looks like the expert data: a classifier trained to tell the (few) real trajectories from
the synthetic pool gives P(real | x), and the ratio P(real | x) / P(synthetic | x) estimates the
density ratio of the expert distribution to the pool's. Here, at the selection step of the influence
schedule (:mod:`boost.train.influence`: ``select_at``, ``refilter_every``, ``top_fraction``), the
features are each trajectory's mean last hidden state over its counted (agent) tokens under the
current model, with its mean token NLL and log token count; the classifier is an L2-regularised
logistic regression on standardised features, the two classes weighted equally. Each synthetic
trajectory's score is the log-odds of a model fitted *without* it (K-fold cross-fitting), so a
trajectory is not judged by a classifier that memorised it; the cross-fitted ROC AUC is logged (near
0.5: the classifier cannot tell real from synthetic, and its ranking is near random).

It reads no return and no ground truth (the gate, when set, is applied before it as for every arm).
"""

from __future__ import annotations

import math

import torch

from boost.train.baselines import pool_batches


def pool_features(trainer) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(x [N, D + 2] float64, is_real [N] bool, trajectory index per row) over the training pool (real
    trajectories and every synthetic one past the gate): pooled hidden state, mean NLL, log tokens."""
    rows, real, index = [], [], []
    for batch, _, f in pool_batches(trainer, features=True):
        rows.append(torch.cat([f.pooled, f.loss[:, None], f.log_tokens[:, None]], 1).double().cpu())
        real.append(batch.is_real.cpu())
        index += batch.trajectory_index.tolist()
    return torch.cat(rows), torch.cat(real), index


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, l2: float, steps: int = 200
) -> tuple[torch.Tensor, torch.Tensor]:
    """(w [F], b []) of the logistic regression of ``y`` (bool [N]) on ``x`` [N, F] float64, both
    classes weighted equally, penalty ``l2`` · |w|² / 2, by L-BFGS (the loss is strictly convex)."""
    pos = y.double()
    weight = torch.where(y, 0.5 / pos.sum().clamp_min(1), 0.5 / (1 - pos).sum().clamp_min(1))
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, tolerance_grad=1e-10, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")  # fmt: skip

    def closure():
        opt.zero_grad()
        logits = x @ w + b
        loss = (
            weight * torch.nn.functional.binary_cross_entropy_with_logits(logits, pos, reduction="none")
        ).sum()
        loss = loss + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def roc_auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """The probability that a random positive scores above a random negative (ties count half)."""
    pos, neg = scores[positive], scores[~positive]
    if not len(pos) or not len(neg):
        return math.nan
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def cross_fitted_log_odds(
    x: torch.Tensor, real: torch.Tensor, folds: int, l2: float, seed: int
) -> torch.Tensor:
    """[N] log-odds of P(real | x) for every row, each from a classifier fitted on the other folds
    (features standardised on those folds)."""
    n = x.shape[0]
    fold = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) % folds
    out = torch.empty(n, dtype=torch.float64)
    for k in range(folds):
        train, held = fold != k, fold == k
        mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-6)
        w, b = fit_logistic((x[train] - mean) / std, real[train], l2)
        out[held] = ((x[held] - mean) / std) @ w + b
    return out


def discriminator_scores(trainer, folds: int = 5, l2: float = 1.0) -> tuple[dict[int, float], dict]:
    """(synthetic trajectory index -> cross-fitted log-odds of real, a record with the ROC AUC).

    Raises:
        ValueError: fewer than ``folds`` real or synthetic trajectories in the pool.
    """
    x, real, index = pool_features(trainer)
    if int(real.sum()) < folds or int((~real).sum()) < folds:
        raise ValueError(
            f"weighting.select_by=discriminator needs at least {folds} real and {folds} synthetic training "
            f"trajectories, got {int(real.sum())} and {int((~real).sum())}"
        )
    log_odds = cross_fitted_log_odds(x, real, folds, l2, trainer.cfg.weighting.subset_seed)
    scores = {i: float(s) for i, s, r in zip(index, log_odds.tolist(), real.tolist()) if not r}
    return scores, {"select_by": "discriminator", "discriminator_auc": roc_auc(log_odds, real)}
