"""Pieces of the baselines and statistics, on hand-made inputs (no model)."""

from __future__ import annotations

import math

import pytest
import torch

from boost.bilevel.reweighting import HeadConfig, TrajectoryFeatures
from boost.data.format import Trajectory
from boost.stats import mean_std, spearman, wilson_interval
from boost.train.baselines import (
    LossHead,
    SourceHead,
    awr_factors,
    fixed_weights,
    ground_truth_quality,
    select_synthetic,
)
from boost.train.config import WeightingConfig


def test_wilson_interval_matches_known_values():
    lo, hi = wilson_interval(15, 100)  # by hand: centre 0.16295, half-width 0.06989
    assert lo == pytest.approx(0.09306, abs=1e-4) and hi == pytest.approx(0.23284, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    with pytest.raises(ValueError, match="0 <= successes <= n"):
        wilson_interval(3, 2)


def test_spearman_uses_ranks_and_mean_ranks_for_ties():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2, 2], [1, 2, 3, 4]) == pytest.approx(0.894427, abs=1e-6)  # scipy's value
    assert spearman([1, 1], [1, 2]) is None
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))


def _traj(source, reward, **meta):
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    return Trajectory(messages=messages, source=source, reward=reward, task_id="t/1", meta=meta)


def test_ground_truth_quality_from_generator_meta():
    assert ground_truth_quality(
        {"generator": "eps_expert", "turns": 10, "n_random_actions": 3}
    ) == pytest.approx(0.7)
    assert ground_truth_quality({"generator": "corrupt", "turns": 4, "n_corrupted": 1}) == pytest.approx(0.75)
    assert ground_truth_quality({"generator": "expert", "turns": 5, "shift": "gridnav-large"}) == 0.0
    assert ground_truth_quality({"generator": "random", "turns": 5}) == 0.0
    assert ground_truth_quality({"generator": "lm_rollout"}) is None


def test_return_filter_keeps_the_top_share_and_says_what_it_dropped():
    pool = [_traj("a", r) for r in (0.0, 0.2, 0.9, 1.0)]
    kept, note = select_synthetic(pool, WeightingConfig(method="return_filter", top_fraction=0.5))
    assert [t.reward for t in kept] == [0.9, 1.0] and "kept 2 of 4" in note
    kept, _ = select_synthetic(pool, WeightingConfig(method="return_filter", return_threshold=0.1))
    assert len(kept) == 3
    with pytest.raises(ValueError, match="have no return"):
        select_synthetic([_traj("a", None)], WeightingConfig(method="return_filter"))


def test_loss_filter_zeroes_the_highest_loss_synthetic_only():
    losses = torch.tensor([5.0, 4.0, 1.0, 3.0, 2.0, 9.0])
    synthetic = torch.tensor([True, True, True, True, True, False])
    w = fixed_weights("loss_filter", losses, synthetic, loss_drop=0.4)
    assert w.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert fixed_weights("uniform", losses, synthetic, 0.4).tolist() == [1.0] * 6


def test_awr_factors_are_clipped_and_one_without_a_return():
    f = awr_factors(torch.tensor([0.0, 1.0, float("nan"), 10.0]), beta=1.0, baseline=0.5, clip=5.0)
    assert f.tolist() == pytest.approx([math.exp(-0.5), math.exp(0.5), 1.0, 5.0])


def test_per_source_and_loss_heads_give_positive_weights_with_mean_mass():
    f = TrajectoryFeatures(
        pooled=torch.zeros(4, 8), loss=torch.tensor([0.5, 1.0, 2.0, 0.1]), log_tokens=torch.zeros(4),
        synthetic=torch.tensor([True, True, True, False]), source=torch.tensor([1, 2, 2, 0]),
    )  # fmt: skip
    for head in (
        SourceHead(8, HeadConfig(num_sources=3, init_mass=2.0)),
        LossHead(8, HeadConfig(init_mass=2.0)),
    ):
        w = head(f)
        assert w[3] == 1.0 and w[:3].mean().item() == pytest.approx(2.0)
        w[:3].sum().backward()  # differentiable in the head's parameters
    with pytest.raises(ValueError, match="head.num_sources > 0"):
        SourceHead(8, HeadConfig())


def test_awr_is_neutral_for_truncated_trajectories():
    """A truncated trajectory's reward is the whole episode's: AWR must not weight its kept part by it."""
    rewards = torch.tensor([1.0, 1.0, 0.0])
    f = awr_factors(rewards, beta=1.0, baseline=0.5, clip=5.0, truncated=torch.tensor([False, True, True]))
    assert torch.allclose(f, torch.tensor([math.exp(0.5), 1.0, 1.0]))
