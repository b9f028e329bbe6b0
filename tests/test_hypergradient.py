"""Head-block implicit hypergradients against explicit float64 linear algebra and a re-solved inner
problem: the solvers, the per-trajectory scores, and dL_out/dw by the implicit function theorem."""

from __future__ import annotations

import pytest
import torch

import boost_kernels as bk
from boost.bilevel.hypergradient import (
    HeadBatch,
    SolverConfig,
    head_hvp,
    head_hypergradient,
    inverse_hvp,
    trajectory_gradient_norms,
)
from tests.kernels import reference
from tests.kernels.cases import fresh_seed

V, D, T, S = 7, 5, 40, 4  # 35 head parameters: the Hessian is small enough to build
DAMPING = 0.05


def _batch(gen: torch.Generator, T=T, S=S) -> HeadBatch:
    hidden = torch.randn(T, D, dtype=torch.float64, generator=gen)
    labels = torch.randint(0, V, (T,), generator=gen)
    segments = torch.randint(-1, S, (T,), generator=gen)
    return HeadBatch(hidden, labels, segments, S)


def _loss(batch: HeadBatch, weight, traj_weights=None):
    total, _ = reference.trajectory_losses(
        batch.hidden, weight, batch.labels, batch.segment_ids, batch.num_segments, traj_weights=traj_weights
    )
    return total


def _per_trajectory(batch: HeadBatch, weight):
    return reference.trajectory_losses(
        batch.hidden, weight, batch.labels, batch.segment_ids, batch.num_segments
    )[1]


def _hessian(batch, weight, traj_weights):
    n = weight.numel()
    h = torch.func.hessian(lambda w: _loss(batch, w.view(V, D), traj_weights))(weight.reshape(-1))
    return h.reshape(n, n)


def _validation(seed: int) -> HeadBatch:
    return _batch(torch.Generator().manual_seed(seed + 7), T=24, S=3)


@pytest.fixture
def problem():
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    train, val = _batch(gen), _validation(seed)
    weight = 0.3 * torch.randn(V, D, dtype=torch.float64, generator=gen)
    traj_weights = torch.rand(S, dtype=torch.float64, generator=gen) + 0.5
    g = torch.func.grad(lambda w: _loss(val, w))(weight)
    return seed, train, weight, traj_weights, g


def test_head_hvp_is_the_explicit_hessian(problem):
    seed, train, weight, tw, _ = problem
    u = torch.randn(V, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    expected = (_hessian(train, weight, tw) @ u.reshape(-1)).view(V, D)
    assert reference.rel_err(head_hvp(train, weight, tw, None, u), expected) <= 1e-10, f"seed={seed}"


def test_cg_with_enough_steps_solves_the_damped_system(problem):
    seed, train, weight, tw, g = problem
    n = weight.numel()
    exact = torch.linalg.solve(
        _hessian(train, weight, tw) + DAMPING * torch.eye(n, dtype=torch.float64), g.reshape(-1)
    )
    out = head_hypergradient(train, weight, tw, g, SolverConfig("cg", steps=3 * n, damping=DAMPING))
    assert reference.rel_err(out.v, exact.view(V, D)) <= 1e-8, f"seed={seed}"
    assert out.residual <= 1e-8, f"seed={seed}"


def test_neumann_is_the_truncated_series_and_converges(problem):
    seed, train, weight, tw, g = problem
    n = weight.numel()
    a = _hessian(train, weight, tw) + DAMPING * torch.eye(n, dtype=torch.float64)
    alpha = 1.0 / float(torch.linalg.eigvalsh(a).max())
    m = torch.eye(n, dtype=torch.float64) - alpha * a
    series = alpha * sum(torch.linalg.matrix_power(m, k) for k in range(4)) @ g.reshape(-1)

    def hvp(u):
        return head_hvp(train, weight, tw, None, u)

    three = inverse_hvp(hvp, g, SolverConfig("neumann", steps=3, alpha=alpha, damping=DAMPING))
    assert reference.rel_err(three, series.view(V, D)) <= 1e-10, f"seed={seed}"
    many = head_hypergradient(
        train, weight, tw, g, SolverConfig("neumann", steps=4000, alpha=alpha, damping=DAMPING)
    )
    assert many.residual <= 1e-6, f"seed={seed}"


def test_identity_is_the_one_step_look_ahead(problem):
    """v = α g gives d/dw of L_out after one inner SGD step of size α, to first order in α."""
    seed, train, weight, tw, g = problem
    alpha = 1e-4
    out = head_hypergradient(train, weight, tw, g, SolverConfig("identity", alpha=alpha))
    assert torch.equal(out.v, alpha * g)
    w = tw.clone().requires_grad_()
    grad_in = torch.func.grad(lambda W: _loss(train, W, w))(weight)
    # the linear term in α of L_out(W − α ∇_W L_in) is −α <g, ∇_W L_in>: exact agreement
    (linear,) = torch.autograd.grad(-alpha * (g * grad_in).sum(), w, retain_graph=True)
    assert reference.rel_err(out.traj_weights, linear) <= 1e-10, f"seed={seed}"
    # the look-ahead itself, through the step: agreement up to O(α)
    (look_ahead,) = torch.autograd.grad(_loss(_validation(seed), weight - alpha * grad_in), w)
    assert reference.rel_err(out.traj_weights, look_ahead) <= 1e-2, f"seed={seed}"


def test_scores_are_per_trajectory_gradient_dot_v(problem):
    seed, train, weight, tw, g = problem
    out = head_hypergradient(train, weight, tw, g, SolverConfig("cg", steps=10, damping=DAMPING))
    jac = torch.func.jacrev(lambda w: _per_trajectory(train, w))(weight)  # [S, V, D]
    expected = (jac * out.v).sum(dim=(1, 2))
    assert reference.rel_err(out.scores, expected) <= 1e-10, f"seed={seed}"
    assert reference.rel_err(out.traj_weights, -expected / S) <= 1e-10, f"seed={seed}"


@pytest.mark.parametrize("normalize", ["mean", "sum"])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_trajectory_gradient_norms_are_the_per_trajectory_gradient_norms(normalize, softcap):
    """|∇_W L_i|_F (the denominator of a cosine-normalised score) against autograd's per-trajectory
    Jacobian, with a bias, ignored labels, an empty trajectory and vocabulary chunks of 3 rows."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    batch = _batch(gen, S=S + 1)
    batch.segment_ids[batch.segment_ids == S] = -1  # trajectory S is empty
    batch.labels[::7] = -100
    bias = torch.randn(V, dtype=torch.float64, generator=gen)
    batch = HeadBatch(batch.hidden, batch.labels, batch.segment_ids, S + 1, bias=bias, normalize=normalize,
                      softcap=softcap)  # fmt: skip
    weight = 0.5 * torch.randn(V, D, dtype=torch.float64, generator=gen)

    def per_trajectory(w):
        return reference.trajectory_losses(batch.hidden, w, batch.labels, batch.segment_ids, S + 1, bias=bias,
                                           normalize=normalize, softcap=softcap)[1]  # fmt: skip

    expected = torch.func.jacrev(per_trajectory)(weight).flatten(1).norm(dim=1)
    norms = trajectory_gradient_norms(batch, weight, vocab_chunk=3)
    assert norms.dtype == torch.float64 and norms[S] == 0 and expected[S] == 0
    assert reference.rel_err(norms, expected) <= 1e-10, f"seed={seed}"


def test_matches_the_derivative_of_the_re_solved_inner_problem():
    """The implicit function theorem end to end: solve min_W L_in(W, w) + λ/2 |W|² to convergence
    (Newton), move one w_i, solve again, and compare dL_out/dw_i with the hypergradient."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    train, val = _batch(gen), _batch(gen, T=24, S=3)
    tw = torch.rand(S, dtype=torch.float64, generator=gen) + 0.5
    n = V * D

    def inner_solution(weights):
        w = torch.zeros(n, dtype=torch.float64)
        for _ in range(30):
            objective = lambda x: _loss(train, x.view(V, D), weights) + 0.5 * DAMPING * (x * x).sum()  # noqa: E731
            grad = torch.func.grad(objective)(w)
            if grad.norm() < 1e-13:
                break
            w = w - torch.linalg.solve(torch.func.hessian(objective)(w), grad)
        return w.view(V, D)

    w_star = inner_solution(tw)
    g = torch.func.grad(lambda W: _loss(val, W))(w_star)
    out = head_hypergradient(train, w_star, tw, g, SolverConfig("cg", steps=3 * n, damping=DAMPING))
    eps = 1e-5
    for i in range(S):
        step = torch.zeros(S, dtype=torch.float64)
        step[i] = eps
        plus = _loss(val, inner_solution(tw + step))
        minus = _loss(val, inner_solution(tw - step))
        finite_difference = (plus - minus) / (2 * eps)
        assert abs(float(out.traj_weights[i] - finite_difference)) <= 1e-6 * max(
            1.0, abs(float(finite_difference))
        ), f"trajectory {i}: seed={seed}"


@pytest.mark.parametrize("method", ["cg", "neumann"])
def test_a_warm_start_lowers_the_residual_on_a_sequence_of_nearby_problems(method):
    """The trainer's situation: the head moves a little between outer steps (here: inner SGD steps
    on the same batch), and each solve gets the same few Hessian-vector products. Started from the
    previous v, the residual ends lower than from 0, at every step after the first."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    train, val = _batch(gen), _validation(seed)
    weight = 0.3 * torch.randn(V, D, dtype=torch.float64, generator=gen)
    tw = torch.rand(S, dtype=torch.float64, generator=gen) + 0.5
    hess = _hessian(train, weight, tw) + DAMPING * torch.eye(V * D, dtype=torch.float64)
    alpha = 1.0 / float(torch.linalg.eigvalsh(hess).max())
    cfg = SolverConfig(method, steps=3, damping=DAMPING, alpha=alpha if method == "neumann" else None)
    previous, cold, warm = None, [], []
    for _ in range(8):
        g = torch.func.grad(lambda w: _loss(val, w))(weight)
        c = head_hypergradient(train, weight, tw, g, cfg)
        h = head_hypergradient(train, weight, tw, g, cfg, init=previous)
        assert not c.warm_started and h.warm_started == (previous is not None)
        cold.append(c.residual)
        warm.append(h.residual)
        previous = h.v
        weight = weight - 0.05 * torch.func.grad(lambda w: _loss(train, w, tw))(weight)
    assert warm[0] == cold[0]
    assert all(w < c for w, c in zip(warm[1:], cold[1:])), f"warm {warm} cold {cold}: seed={seed}"


def test_a_useless_warm_start_is_dropped(problem):
    """A guess worse than 0 costs one product and is dropped: the solve goes on from 0."""
    seed, train, weight, tw, g = problem
    cfg = SolverConfig("cg", steps=6, damping=DAMPING)
    bad = head_hypergradient(train, weight, tw, g, cfg, init=-100 * g)
    fewer = head_hypergradient(train, weight, tw, g, SolverConfig("cg", steps=5, damping=DAMPING))
    assert not bad.warm_started
    assert torch.allclose(bad.v, fewer.v, rtol=1e-12, atol=0), f"seed={seed}"


def test_cg_refuses_an_indefinite_system():
    g = torch.ones(3, 2, dtype=torch.float64)
    with pytest.raises(FloatingPointError, match="not positive definite"):
        inverse_hvp(lambda u: -u, g, SolverConfig("cg", steps=3))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="lbfgs"), "method must be one of"),
        (dict(steps=-1), "steps must be >= 0"),
        (dict(alpha=0.0), "alpha must be > 0"),
        (dict(method="neumann"), "alpha .* is required for 'neumann'"),
        (dict(damping=float("nan")), "damping must be >= 0"),
    ],
)
def test_bad_solver_config_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SolverConfig(**kwargs)


def test_bad_shapes_name_the_argument(problem):
    _, train, weight, tw, g = problem
    with pytest.raises(ValueError, match="val_grad must be shaped like weight"):
        head_hypergradient(train, weight, tw, g[:-1], SolverConfig())
    with pytest.raises(ValueError, match="traj_weights must have shape"):
        head_hypergradient(train, weight, tw[:-1], g, SolverConfig())


def test_reweighting_by_hypergradient_downweights_corrupted_synthetic_trajectories():
    """The method end to end on the head block: a few real trajectories from a teacher head, many
    synthetic ones of which half have random labels. Alternating inner SGD on the weighted loss
    with outer steps on w along -dL_out/dw (CG hypergradient, validation = the real trajectories)
    must leave the corrupted trajectories with clearly less weight than the clean ones (measured
    over 15 fresh seeds: clean / corrupted mean weight 12 to 244; ascending instead: below 1)."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    dim, vocab, per_traj = 8, 12, 10
    teacher = 2.0 * torch.randn(vocab, dim, generator=gen)

    def trajectories(n, corrupted):
        hidden = torch.randn(n * per_traj, dim, generator=gen)
        labels = torch.distributions.Categorical(logits=hidden @ teacher.T).sample()
        if corrupted:
            labels = torch.randint(0, vocab, labels.shape, generator=gen)
        return hidden, labels

    real_h, real_y = trajectories(4, corrupted=False)
    clean_h, clean_y = trajectories(12, corrupted=False)
    bad_h, bad_y = trajectories(12, corrupted=True)
    S = 24
    train = HeadBatch(
        torch.cat([clean_h, bad_h]),
        torch.cat([clean_y, bad_y]),
        torch.arange(S).repeat_interleave(per_traj),
        S,
    )
    val = HeadBatch(real_h, real_y, torch.arange(4).repeat_interleave(per_traj), 4)
    weight = torch.zeros(vocab, dim)
    log_w = torch.zeros(S)
    cfg = SolverConfig("cg", steps=10, damping=1e-2)
    for _ in range(30):
        w = torch.softmax(log_w, 0) * S  # mean 1
        for _ in range(5):  # inner SGD on the weighted training loss (+ the damping as weight decay)
            W = weight.clone().requires_grad_()
            loss = _loss32(train, W, w) + 0.5 * cfg.damping * (W * W).sum()
            (grad,) = torch.autograd.grad(loss, W)
            weight = weight - 0.5 * grad
        W = weight.clone().requires_grad_()
        (val_grad,) = torch.autograd.grad(_loss32(val, W), W)
        hyper = head_hypergradient(train, weight, w, val_grad, cfg).traj_weights
        lw = log_w.clone().requires_grad_()
        (d_log_w,) = torch.autograd.grad((torch.softmax(lw, 0) * S * hyper).sum(), lw)
        log_w = log_w - 20.0 * d_log_w
    w = torch.softmax(log_w, 0) * S
    clean, bad = w[:12].mean(), w[12:].mean()
    assert clean > 3.0 * bad, f"clean {clean:.3f} vs corrupted {bad:.3f}: seed={seed}"


def _loss32(batch: HeadBatch, weight, traj_weights=None):
    """The weighted loss through our fused op (float32), as the inner step would use it."""
    return bk.trajectory_cross_entropy(
        batch.hidden, weight, batch.labels, batch.segment_ids, batch.num_segments, traj_weights=traj_weights
    ).loss


def test_the_triton_kernels_give_the_same_hypergradient():
    """The same solve on the Triton path (interpreted on the CPU) and the PyTorch path, float32."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, D, generator=gen)
    labels = torch.randint(0, V, (T,), generator=gen)
    segments = torch.randint(-1, S, (T,), generator=gen)
    weight = 0.3 * torch.randn(V, D, generator=gen)
    tw = torch.rand(S, generator=gen) + 0.5
    g = torch.randn(V, D, generator=gen)
    cfg = SolverConfig("cg", steps=4, damping=DAMPING)
    outs = [
        head_hypergradient(HeadBatch(hidden, labels, segments, S, backend=backend), weight, tw, g, cfg)
        for backend in ("torch", "triton")
    ]
    assert reference.rel_err(outs[1].v, outs[0].v) <= 1e-5, f"seed={seed}"
    assert reference.rel_err(outs[1].traj_weights, outs[0].traj_weights) <= 1e-5, f"seed={seed}"
