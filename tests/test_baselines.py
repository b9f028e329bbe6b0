"""Pieces of the baselines and statistics, on hand-made inputs (no model)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from boost.bilevel.reweighting import HeadConfig, TrajectoryFeatures
from boost.data.format import Trajectory
from boost.stats import mean_std, spearman, t_critical95, t_interval95, wilson_interval
from boost.train.baselines import (
    LossHead,
    SourceHead,
    awr_factors,
    fixed_weights,
    ground_truth_quality,
    read_pool_weights,
    select_synthetic,
    trajectory_key,
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


def test_weight_filter_keeps_the_top_share_of_a_pool_weights_file_by_trajectory_key(tmp_path):
    pool = [_traj(f"s{i}", None) for i in range(4)]  # no returns: return_filter could not run here
    rows = [
        {"source": t.source, "weight": w, "key": trajectory_key(t)}
        for t, w in zip(pool, (0.1, 3.0, 0.5, 2.0))
    ]
    path = tmp_path / "pool_weights.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))  # any order
    cfg = WeightingConfig(method="weight_filter", weights_path=str(path), top_fraction=0.5)
    kept, note = select_synthetic(pool, cfg)
    assert [t.source for t in kept] == ["s1", "s3"] and "kept 2 of 4" in note
    assert read_pool_weights(path, pool) == [0.1, 3.0, 0.5, 2.0]


def test_return_gate_leaves_out_what_is_below_the_worst_demonstration_before_ranking(tmp_path):
    """weight_filter with return_gate=real_min: the gate (lowest real return) first, then the top share
    of what passed by weight, so a high-weight failure is never kept and the share is of the passers."""
    real = [_traj("real", r) for r in (0.8, 1.0)]
    pool = [_traj(f"s{i}", r) for i, r in enumerate((0.0, 0.9, 0.8, 1.0, 0.5))]
    weights = (9.0, 1.0, 2.0, 3.0, 8.0)  # the two failures carry the highest weights
    path = tmp_path / "pool_weights.jsonl"
    path.write_text(
        "".join(json.dumps({"weight": w, "key": trajectory_key(t)}) + "\n" for t, w in zip(pool, weights))
    )
    cfg = WeightingConfig(
        method="weight_filter", weights_path=str(path), top_fraction=0.5, return_gate="real_min"
    )
    kept, note = select_synthetic(pool, cfg, real=real)
    # passed: s1 (0.9, w 1), s2 (0.8, w 2), s3 (1.0, w 3); top half of 3 = ceil(1.5) = 2 by weight
    assert [t.source for t in kept] == ["s2", "s3"]
    assert "kept 2 of 5" in note and "return gate 0.8 (real_min) passed 3 of 5" in note
    # return_filter with a numeric gate ranks by return among the passers
    kept, _ = select_synthetic(
        pool, WeightingConfig(method="return_filter", return_gate=0.85, top_fraction=0.5)
    )
    assert [t.source for t in kept] == ["s3"]
    with pytest.raises(ValueError, match="needs the return of every real"):
        select_synthetic(pool, cfg, real=[_traj("real", None)])
    with pytest.raises(ValueError, match="no synthetic trajectory has a return >= 2"):
        select_synthetic(pool, WeightingConfig(method="return_filter", return_gate=2.0))
    with pytest.raises(
        ValueError,
        match="goes with weighting.method=return_filter, weight_filter, random_filter or influence",
    ):
        WeightingConfig(method="boost", return_gate=1.0)
    # influence trains on every passer until select_at (boost/train/influence.py): the gate note says so
    kept, note = select_synthetic(
        pool, WeightingConfig(method="influence", return_gate="real_min"), real=real
    )
    assert [t.source for t in kept] == ["s1", "s2", "s3"]
    assert (
        note == "weighting influence: 3 synthetic trajectories kept; return gate 0.8 (real_min) passed 3 of 5"
    )
    with pytest.raises(ValueError, match="a number or 'real_min'"):
        WeightingConfig(method="return_filter", return_gate="median")


def test_random_filter_keeps_a_seeded_subset_of_fixed_size_among_what_passes_the_gate():
    """random_filter: round(top_fraction * n) of the (gated) pool, the same subset for the same
    subset_seed and another for another seed; nothing below the gate is ever kept."""
    real = [_traj("real", 1.0)]
    pool = [_traj(f"s{i}", 1.0 if i % 2 else 0.0) for i in range(40)]  # 20 pass the gate

    def kept_sources(seed, gate="real_min", fraction=0.5):
        cfg = WeightingConfig(
            method="random_filter", subset_seed=seed, top_fraction=fraction, return_gate=gate
        )
        kept, note = select_synthetic(pool, cfg, real=real)
        return [t.source for t in kept], note

    first, note = kept_sources(0)
    assert len(first) == 10 and all(int(s[1:]) % 2 for s in first)
    assert "kept 10 of 40" in note and "passed 20 of 40" in note
    assert kept_sources(0)[0] == first and kept_sources(1)[0] != first
    assert len(kept_sources(0, gate=None, fraction=0.25)[0]) == 10  # no gate: a quarter of all 40
    assert len(kept_sources(0, gate=None, fraction=1.0)[0]) == 40


def test_weight_filter_refuses_a_file_of_other_data_or_without_keys(tmp_path):
    pool = [_traj("a", None), _traj("b", None)]
    path = tmp_path / "w.jsonl"
    path.write_text(json.dumps({"source": "a", "weight": 1.0, "key": trajectory_key(pool[0])}) + "\n")
    with pytest.raises(ValueError, match="no weight for 1 of the 2"):
        read_pool_weights(path, pool)
    path.write_text(json.dumps({"source": "a", "weight": 1.0}) + "\n")
    with pytest.raises(ValueError, match=r"w.jsonl:1: no 'key'"):
        read_pool_weights(path, pool)
    with pytest.raises(ValueError, match="does not exist"):
        read_pool_weights(tmp_path / "absent.jsonl", pool)
    with pytest.raises(ValueError, match="weights_path"):
        WeightingConfig(method="weight_filter")
    with pytest.raises(ValueError, match="only with it"):
        WeightingConfig(method="uniform", weights_path=str(path))


def test_trajectory_key_names_content_not_object():
    a, b = _traj("eps0.1", 1.0), _traj("eps0.1", 0.0)
    assert trajectory_key(a) == trajectory_key(b)  # same source and messages
    assert trajectory_key(a) != trajectory_key(_traj("eps0.3", 1.0))


def test_t_interval_uses_student_t_critical_values():
    assert t_critical95(1) == 12.7062 and t_critical95(30) == 2.0423
    assert t_critical95(31) == pytest.approx(2.0395, abs=1e-4) and t_critical95(10**6) == pytest.approx(
        1.96, abs=1e-3
    )
    lo, hi = t_interval95([1.0, 2.0, 3.0])
    assert (lo + hi) / 2 == pytest.approx(2.0) and hi - lo == pytest.approx(2 * 4.3027 / math.sqrt(3))
    with pytest.raises(ValueError, match="at least 2 values"):
        t_interval95([1.0])


def test_t_critical_values_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in [*range(1, 31), 31, 45, 100, 1000]:
        assert t_critical95(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-4)
