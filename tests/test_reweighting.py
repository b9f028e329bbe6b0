"""The reweighting head: features, normalisation, n_eff, the outer objective, and the method end to
end: a head trained by hypergradients on some batches must downweight corrupted synthetic
trajectories of batches it has never seen."""

from __future__ import annotations

import math

import pytest
import torch

from boost.reweighting import (
    HeadConfig,
    ReweightingHead,
    TrajectoryFeatures,
    effective_sample_size,
    outer_objective,
    trajectory_features,
    weight_summary,
)


def _features(S=6, D=5, synthetic=None, gen=None):
    gen = gen or torch.Generator().manual_seed(0)
    synthetic = torch.tensor([False, True, True, False, True, True]) if synthetic is None else synthetic
    return TrajectoryFeatures(
        torch.randn(S, D, generator=gen),
        torch.rand(S, generator=gen) * 3,
        torch.rand(S, generator=gen),
        synthetic,
    )


def test_features_pool_the_counted_tokens_of_each_trajectory():
    hidden = torch.arange(12.0).view(6, 2)
    segments = torch.tensor([0, 0, 1, -1, 1, 2])
    counted = torch.tensor([True, True, True, True, False, True])
    f = trajectory_features(
        hidden, segments, counted, torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([2, 1, 1, 0]),
        torch.tensor([False, True, True, True]),
    )  # fmt: skip
    expected = torch.tensor([[1.0, 2.0], [4.0, 5.0], [10.0, 11.0], [0.0, 0.0]])  # the empty one pools to 0
    assert torch.equal(f.pooled, expected)
    assert torch.allclose(f.log_tokens, torch.log1p(torch.tensor([2.0, 1.0, 1.0, 0.0])))


def test_weights_real_fixed_synthetic_positive_with_mean_mass():
    head = ReweightingHead(5, HeadConfig(init_mass=0.7, real_weight=1.0))
    with torch.no_grad():
        head.mlp[-1].weight.normal_()  # leave the uniform initialisation
    f = _features()
    w = head(f).detach()
    assert torch.equal(w[~f.synthetic], torch.ones(2))
    assert bool((w[f.synthetic] > 0).all())
    assert math.isclose(float(w[f.synthetic].mean()), 0.7, rel_tol=1e-6)
    assert float(w[f.synthetic].std()) > 0


def test_initial_weights_are_uniform_and_a_batch_without_synthetic_data_is_all_real():
    head = ReweightingHead(5, HeadConfig(init_mass=2.0, real_weight=0.5))
    f = _features()
    assert torch.allclose(head(f)[f.synthetic], torch.full((4,), 2.0))
    real_only = f._replace(synthetic=torch.zeros(6, dtype=torch.bool))
    assert torch.equal(head(real_only), torch.full((6,), 0.5))


def test_effective_sample_size():
    assert float(effective_sample_size(torch.ones(7))) == pytest.approx(7.0)
    assert float(effective_sample_size(torch.tensor([0.0, 3.0, 0.0]))) == pytest.approx(1.0)
    assert float(effective_sample_size(torch.tensor([1.0, 3.0]))) == pytest.approx(16 / 10)


def test_outer_objective_gradient_is_the_hypergradient_through_the_weights():
    head = ReweightingHead(5, HeadConfig())
    with torch.no_grad():
        head.mlp[-1].weight.normal_()
    f = _features()
    hyper = torch.randn(6, generator=torch.Generator().manual_seed(1))
    w = head(f)
    obj = outer_objective(head, w, hyper, f.synthetic)
    params = [p for p in head.parameters() if p.requires_grad]
    got = torch.autograd.grad(obj.loss, params, allow_unused=True, retain_graph=True)
    jac = [torch.autograd.grad(w[i], params, retain_graph=True, allow_unused=True) for i in range(6)]
    for k, p in enumerate(params):
        expected = sum(
            hyper[i] * (jac[i][k] if jac[i][k] is not None else torch.zeros_like(p)) for i in range(6)
        )
        assert torch.allclose(got[k] if got[k] is not None else torch.zeros_like(p), expected, atol=1e-6)


def test_the_regularisers_push_toward_spread_weights_and_less_synthetic_mass():
    head = ReweightingHead(5, HeadConfig(concentration=1.0, task_shift=1.0))
    with torch.no_grad():
        head.mlp[-1].weight.normal_(std=3.0)
    f = _features()
    params = [p for p in head.parameters()]
    opt = torch.optim.SGD(params, lr=0.05)
    with torch.no_grad():
        n_eff_before, mass_before = float(effective_sample_size(head(f)[f.synthetic])), float(head.mass)
    for _ in range(50):
        obj = outer_objective(head, head(f), torch.zeros(6), f.synthetic)
        opt.zero_grad()
        obj.loss.backward()
        opt.step()
    with torch.no_grad():
        assert float(effective_sample_size(head(f)[f.synthetic])) > n_eff_before
        assert float(head.mass) < mass_before


def test_bad_input_names_the_field():
    with pytest.raises(ValueError, match="HeadConfig.init_mass must be > 0"):
        HeadConfig(init_mass=0.0)
    with pytest.raises(ValueError, match="HeadConfig.concentration must be finite"):
        HeadConfig(concentration=float("inf"))
    head = ReweightingHead(5, HeadConfig(num_sources=2))
    with pytest.raises(ValueError, match="no source indices"):
        head(_features())
    with pytest.raises(ValueError, match=r"source indices must lie in \[0, 2\)"):
        head(_features()._replace(source=torch.tensor([0, 1, 2, 0, 1, 0])))
    with pytest.raises(ValueError, match="synthetic must have shape"):
        trajectory_features(torch.zeros(3, 2), torch.zeros(3), torch.ones(3, dtype=torch.bool), torch.zeros(2),
                            torch.ones(2), torch.zeros(3, dtype=torch.bool))  # fmt: skip
    with pytest.raises(ValueError, match="same shape"):
        outer_objective(ReweightingHead(5), torch.ones(3), torch.ones(2), torch.ones(3, dtype=torch.bool))


def test_weight_summary_per_source():
    summary = weight_summary(
        torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0, 0, 2]), ["real", "gen_a", "gen_b"]
    )
    assert summary == {
        "real": {"count": 2, "mean": 1.5, "min": 1.0, "max": 2.0},
        "gen_b": {"count": 1, "mean": 4.0, "min": 4.0, "max": 4.0},
    }
