"""The reweighting head: features, normalisation, n_eff, the outer objective, and the method end to
end: a head trained by hypergradients on some batches must downweight corrupted synthetic
trajectories of batches it has never seen."""

from __future__ import annotations

import math

import pytest
import torch

from boost.bilevel.reweighting import (
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
    head = ReweightingHead(5, HeadConfig(init_mass=0.7, real_weight=1.0, normalizer="batch"))
    with torch.no_grad():
        head.mlp[-1].weight.normal_()  # leave the uniform initialisation
    f = _features()
    w = head(f).detach()
    assert torch.equal(w[~f.synthetic], torch.ones(2))
    assert bool((w[f.synthetic] > 0).all())
    assert math.isclose(float(w[f.synthetic].mean()), 0.7, rel_tol=1e-6)
    assert float(w[f.synthetic].std()) > 0


def test_the_running_normaliser_uses_past_batches_only():
    """w = m · s_i / μ with μ from earlier batches: a trajectory's weight does not depend on its
    batch-mates, and μ follows the scores (mean synthetic weight -> m on a stationary stream)."""
    head = ReweightingHead(5, HeadConfig(init_mass=0.7, normalizer="running", normalizer_momentum=0.5))
    with torch.no_grad():
        head.mlp[-1].weight.normal_()
    f = _features()
    mu_before = float(head.score_mean)
    scores = head.scores(f).detach()
    w = head(f).detach()
    assert torch.allclose(w[f.synthetic], 0.7 * scores[f.synthetic] / mu_before)
    assert math.isclose(
        float(head.score_mean), 0.5 * mu_before + 0.5 * float(scores[f.synthetic].mean()), rel_tol=1e-6
    )
    # one trajectory alone gets the same weight as in its batch (given the same μ)
    head.eval()
    alone = head(TrajectoryFeatures(*(t[1:2] for t in f[:4])))
    in_batch = head(f)
    assert torch.allclose(alone, in_batch[1:2])
    head.train()
    for _ in range(40):
        head(f)
    assert math.isclose(float(head(f, update=False)[f.synthetic].mean().detach()), 0.7, rel_tol=1e-4)


def test_the_pool_normaliser_holds_the_mass_exactly_over_past_batches():
    """w = m · s_i / μ(φ), μ the mean score of earlier batches' synthetic trajectories: a trajectory's
    weight does not depend on its batch-mates, and the pool's mean weight is m whatever the head."""
    head = ReweightingHead(5, HeadConfig(init_mass=0.7, pool_size=6))
    with torch.no_grad():
        head.mlp[-1].weight.normal_()
    gen = torch.Generator().manual_seed(3)
    first = _features(gen=gen)
    w_first = head(first).detach()  # the first batch: the pool is empty, its own mean
    assert math.isclose(float(w_first[first.synthetic].mean()), 0.7, rel_tol=1e-6)
    assert int(head.pool_count) == 4
    second = _features(gen=gen)
    head.eval()
    alone = head(TrajectoryFeatures(*(t[1:2] for t in second[:4])))
    assert torch.allclose(alone, head(second)[1:2])
    head.train()
    head(second)
    head(_features(gen=gen))  # 12 pushed into a pool of 6: the FIFO keeps the last 6
    assert int(head.pool_count) == 6
    pool = head._pool()
    assert math.isclose(float(head(pool, update=False).detach().mean()), 0.7, rel_tol=1e-5)
    state = head.state_dict()  # the pool travels with a checkpoint
    restored = ReweightingHead(5, HeadConfig(init_mass=0.7, pool_size=6))
    restored.load_state_dict(state)
    assert torch.equal(restored(second, update=False), head(second, update=False))


@pytest.mark.parametrize("normalizer", ["pool", "running"])
def test_the_normaliser_gives_a_score_gradient_in_single_source_batches(normalizer):
    """A two-source toy: every batch holds one synthetic source only and the features differ only by
    source. With the per-batch mean the weights are m whatever the head does, so the scores get no
    gradient; with the running mean they do, and training separates the sources."""
    D, n = 4, 6
    hyper_by_source = {0: -1.0, 1: +1.0}  # dL_out/dw: source 0 helps (weight up), source 1 hurts

    def batch(source):
        return TrajectoryFeatures(
            torch.ones(n, D), torch.ones(n), torch.ones(n), torch.ones(n, dtype=torch.bool),
            torch.full((n,), source),
        )  # fmt: skip

    def score_grads(normalizer):
        torch.manual_seed(0)
        head = ReweightingHead(
            D, HeadConfig(num_sources=2, normalizer=normalizer, concentration=0, task_shift=0)
        )
        with torch.no_grad():
            head.mlp[-1].weight.normal_()
        head(batch(0))  # an earlier batch, of the other source
        f = batch(1)
        obj = outer_objective(head, head(f), torch.full((n,), hyper_by_source[1]), f.synthetic)
        params = [p for name, p in head.named_parameters() if name != "log_mass"]
        return [g for g in torch.autograd.grad(obj.loss, params, allow_unused=True) if g is not None]

    assert max(float(g.abs().max()) for g in score_grads("batch")) <= 1e-5  # zero up to rounding
    assert max(float(g.abs().max()) for g in score_grads(normalizer)) > 1e-3

    def train(normalizer):
        torch.manual_seed(0)
        head = ReweightingHead(
            D, HeadConfig(num_sources=2, normalizer=normalizer, concentration=0, task_shift=0)
        )
        head.log_mass.requires_grad_(False)
        opt = torch.optim.Adam([p for p in head.parameters() if p.requires_grad], lr=0.05)
        for step in range(60):
            source = step % 2
            f = batch(source)
            obj = outer_objective(head, head(f), torch.full((n,), hyper_by_source[source]), f.synthetic)
            opt.zero_grad()
            obj.loss.backward()
            opt.step()
        head.eval()
        with torch.no_grad():
            return float(head(batch(0))[0]), float(head(batch(1))[0])

    good, bad = train(normalizer)
    assert good > 3 * bad, (good, bad)
    good, bad = train("batch")
    assert good == pytest.approx(1.0, abs=1e-5) and bad == pytest.approx(1.0, abs=1e-5)  # nothing learned


def test_effective_sample_size():
    assert float(effective_sample_size(torch.ones(7))) == pytest.approx(7.0)
    assert float(effective_sample_size(torch.tensor([0.0, 3.0, 0.0]))) == pytest.approx(1.0)
    assert float(effective_sample_size(torch.tensor([1.0, 3.0]))) == pytest.approx(16 / 10)


def test_outer_objective_gradient_is_the_hypergradient_through_the_weights():
    head = ReweightingHead(5, HeadConfig(concentration=0, task_shift=0))
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


def test_n_eff_counts_real_trajectories_so_synthetic_mass_raises_it():
    head = ReweightingHead(5, HeadConfig(init_mass=0.1, task_shift=0))
    f = _features()  # 2 real, 4 synthetic
    small = outer_objective(head, head(f), torch.zeros(6), f.synthetic).n_eff
    with torch.no_grad():
        head.log_mass.fill_(0.0)
    unit = outer_objective(head, head(f), torch.zeros(6), f.synthetic).n_eff
    assert float(small.detach()) < float(unit.detach()) == pytest.approx(6.0)


def test_the_shift_distance_is_relative_to_the_validation_spread():
    head = ReweightingHead(2, HeadConfig())
    with pytest.raises(ValueError, match="update_reference"):
        head.shift_distance(torch.zeros(1, 2))
    head.update_reference(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]))
    d = head.shift_distance(torch.tensor([[0.0, 0.0], [3.0, 4.0]]))
    assert torch.allclose(d, torch.tensor([0.0, 5.0]))


@pytest.mark.parametrize(
    "term, offset", [("concentration", False), ("task_shift", False), ("task_shift", True)]
)
def test_each_regulariser_pushes_its_way(term, offset):
    """λ_conc alone spreads the weights (n_eff up); λ_shift alone lowers the synthetic mass, and when the
    validation signal offsets the average trajectory's shift cost (``offset``), moves the synthetic
    weight toward the trajectories close to the real validation ones."""
    # offset: the mass frozen and the batch normaliser, so the weights only move between trajectories
    normalizer = "batch" if offset else "running"
    head = ReweightingHead(
        5, HeadConfig(**{"concentration": 0.0, "task_shift": 0.0, "normalizer": normalizer, term: 1.0})
    )
    with torch.no_grad():
        head.mlp[-1].weight.normal_(std=3.0)
    head.log_mass.requires_grad_(not offset)
    f = _features()
    head.update_reference(f.pooled[~f.synthetic])
    far = head.shift_distance(f.pooled)[f.synthetic]
    hyper = torch.zeros(6)
    if offset:
        hyper[f.synthetic] = -float(far.mean()) / 6
    opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=0.05)
    head.eval()  # μ fixed: the test watches the head's parameters only

    @torch.no_grad()
    def stats():
        w = head(f)
        syn = w[f.synthetic]
        return float(effective_sample_size(w)), float(head.mass), float((syn / syn.sum() * far).sum())

    n_eff_before, mass_before, shift_before = stats()
    for _ in range(50):
        obj = outer_objective(head, head(f), hyper, f.synthetic, pooled=f.pooled)
        opt.zero_grad()
        obj.loss.backward()
        opt.step()
    n_eff, mass, shift = stats()
    if term == "concentration":
        assert n_eff > n_eff_before
    elif offset:
        assert shift < shift_before
    else:
        assert mass < mass_before
        with pytest.raises(ValueError, match="pass pooled"):
            outer_objective(head, head(f), torch.zeros(6), f.synthetic)


def test_bad_input_names_the_field():
    with pytest.raises(ValueError, match="HeadConfig.init_mass must be > 0"):
        HeadConfig(init_mass=0.0)
    with pytest.raises(ValueError, match="HeadConfig.concentration must be finite"):
        HeadConfig(concentration=float("inf"))
    with pytest.raises(ValueError, match="HeadConfig.normalizer must be"):
        HeadConfig(normalizer="global")
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


def test_the_monotone_loss_input_orders_weights_by_loss_whatever_the_mlp():
    head = ReweightingHead(5, HeadConfig(monotone_loss=True, normalizer="batch", task_shift=0.0))
    f = _features()
    start = head(f).detach()
    assert torch.allclose(start[f.synthetic], start[f.synthetic][0])  # c starts at 0: uniform weights
    with torch.no_grad():
        head.loss_slope.fill_(-5.0)  # the MLP's output stays constant (zero last layer)
    w = head(f).detach()[f.synthetic]
    order = torch.argsort(f.loss[f.synthetic])
    assert bool((w[order][1:] < w[order][:-1]).all())  # strictly decreasing in the loss
    # the slope is learned: an outer objective that prefers low-loss trajectories moves it down
    hyper = f.loss * f.synthetic  # dL_out/dw_i grows with the loss
    head.loss_slope.data.zero_()
    outer_objective(head, head(f), hyper, f.synthetic).surrogate.backward()
    assert float(head.loss_slope.grad) > 0  # gradient descent lowers c: high-loss weights shrink
    assert "loss_slope" not in dict(ReweightingHead(5, HeadConfig()).named_parameters())
