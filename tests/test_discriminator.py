"""``weighting.select_by=discriminator`` (boost/train/discriminator.py): the logistic regression is at
its optimum, each score comes from a classifier that never saw the trajectory, the AUC is the
Mann-Whitney probability, and a run selects the pool's top share by the cross-fitted log-odds."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from benchmarks.kill_resume import make_assets
from boost.train import Trainer
from boost.train.discriminator import cross_fitted_log_odds, fit_logistic, roc_auc
from tests.test_influence import assert_kept_the_top_share
from tests.test_train import _config


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("discriminator"))


def _data(n=120, shift=1.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3 == 0  # a third positive: the classes are weighted equally anyway
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    x[y, 0] += shift
    return x, y


def test_the_fit_is_the_penalised_optimum():
    x, y = _data()
    fitted, b = fit_logistic(x, y, l2=0.5)
    w, b = fitted.clone().requires_grad_(), b.requires_grad_()
    weight = torch.where(y, 0.5 / y.sum(), 0.5 / (~y).sum()).double()
    loss = (weight * F.binary_cross_entropy_with_logits(x @ w + b, y.double(), reduction="none")).sum()
    loss = loss + 0.25 * (w * w).sum()
    grads = torch.autograd.grad(loss, (w, b))
    assert max(float(g.abs().max()) for g in grads) < 1e-7
    # the shifted feature decides
    assert float(fitted[0]) > 0.1 and float(fitted[1:].abs().max()) < float(fitted[0])


def test_each_score_comes_from_a_classifier_that_never_saw_its_row():
    x, y = _data()
    scores = cross_fitted_log_odds(x, y, folds=4, l2=1.0, seed=3)
    assert roc_auc(scores, y) > 0.8  # a real shift is found
    flipped = y.clone()
    flipped[7] = ~flipped[7]  # row 7's own label does not move row 7's score
    assert torch.equal(cross_fitted_log_odds(x, flipped, folds=4, l2=1.0, seed=3)[7], scores[7])
    same_x, _ = _data(shift=0.0)
    assert abs(roc_auc(cross_fitted_log_odds(same_x, y, 4, 1.0, 3), y) - 0.5) < 0.15  # nothing to find


def test_auc_is_the_mann_whitney_probability():
    scores = torch.tensor([0.1, 0.4, 0.4, 0.8, 0.3], dtype=torch.float64)
    positive = torch.tensor([False, True, False, True, False])
    pairs = [(p, n) for p in (0.4, 0.8) for n in (0.1, 0.4, 0.3)]
    expected = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    assert roc_auc(scores, positive) == pytest.approx(expected)


def test_a_run_keeps_the_top_share_by_log_odds(assets, tmp_path):
    run = (
        "weighting.method=influence",
        "weighting.select_by=discriminator",
        "weighting.select_at=2",
        "steps=3",
    )
    trainer = Trainer(_config(assets, tmp_path, *run), progress=False)
    final = trainer.train()
    (record,) = final["refilters"]
    assert record["select_by"] == "discriminator" and 0.0 <= record["discriminator_auc"] <= 1.0
    rows = [json.loads(line) for line in (tmp_path / "influence_scores.jsonl").read_text().splitlines()]
    pool = trainer.data.train.trajectories
    assert len(rows) == sum(t.source != "real" for t in pool)
    kept = {pool[p].index for p in trainer.refiltered.positions if pool[p].source != "real"}
    weights = assert_kept_the_top_share(tmp_path)
    assert len(kept) == sum(w["weight"] == 1.0 for w in weights)
