"""The chunked path computes the gradient of the weighted total during the forward (one pass over
the logits instead of two). Every way of consuming it must still give the float64 reference's
gradients: the total alone and double backward (no recompute at all), scaled totals, gradients
into the per-trajectory losses as well or only, a second backward with ``retain_graph``."""

from __future__ import annotations

import pytest
import torch

import boost_kernels as bk
from boost_kernels import chunked
from tests.kernels import reference
from tests.kernels.cases import SHAPES, fresh_seed, make_batch

SHAPE = SHAPES[1]  # odd shapes, an empty trajectory, a bias


def _leaves(batch, dtype=None):
    cast = (lambda x: x.to(dtype)) if dtype is not None else (lambda x: x)
    return [
        cast(x).clone().requires_grad_() for x in (batch.hidden, batch.weight, batch.bias, batch.traj_weights)
    ]


def _ours(batch, h, w, b, tw, softcap=None):
    return bk.trajectory_cross_entropy(
        h,
        w,
        batch.labels,
        batch.segment_ids,
        SHAPE.S,
        traj_weights=tw,
        bias=b,
        softcap=softcap,
        backend="torch",
    )


def _reference(batch, h, w, b, tw, softcap=None):
    return reference.trajectory_losses(
        h, w, batch.labels, batch.segment_ids, SHAPE.S, traj_weights=tw, bias=b, softcap=softcap
    )


def _check(objective, seed, softcap=None):
    """Gradients of objective(total, per_trajectory) on our path vs the float64 reference."""
    batch = make_batch(SHAPE, torch.float32, seed)
    ours = _leaves(batch)
    total, per = _ours(batch, *ours, softcap=softcap)[:2]
    ours_grads = torch.autograd.grad(objective(total, per), ours, allow_unused=True)
    ref = _leaves(batch, torch.float64)
    ref_grads = torch.autograd.grad(
        objective(*_reference(batch, *ref, softcap=softcap)), ref, allow_unused=True
    )
    for name, g, r in zip(("hidden", "weight", "bias", "traj_weights"), ours_grads, ref_grads):
        if r is None:  # traj_weights when only the per-trajectory losses are used: 0 or None
            assert g is None or not g.any(), f"grad {name}: seed={seed}"
            continue
        assert reference.rel_err(g, r) <= 1e-5, f"grad {name}: seed={seed}"


@pytest.mark.parametrize("softcap", [None, 3.0], ids=["plain", "softcap"])
def test_total_alone_never_recomputes_the_logits(monkeypatch, softcap):
    def fail(*args, **kwargs):
        raise AssertionError("the backward recomputed the gradient pass")

    monkeypatch.setattr(chunked, "token_loss_grads", fail)
    _check(lambda total, per: total, fresh_seed(), softcap)


@pytest.mark.parametrize(
    "objective",
    [
        lambda total, per: 3.5 * total,
        lambda total, per: total + (torch.arange(per.numel(), dtype=per.dtype) * per).sum(),
        lambda total, per: (per**2).sum(),
        lambda total, per: -total,
    ],
    ids=["scaled_total", "total_and_per_trajectory", "per_trajectory_only", "negated"],
)
def test_every_consumer_gets_the_reference_gradient(objective):
    _check(objective, fresh_seed())


def test_a_retained_graph_gives_the_same_gradient_twice():
    seed = fresh_seed()
    batch = make_batch(SHAPE, torch.float32, seed)
    leaves = _leaves(batch)
    total = _ours(batch, *leaves).loss
    first = torch.autograd.grad(2.0 * total, leaves, retain_graph=True)  # eager buffers, scaled in place
    second = torch.autograd.grad(2.0 * total, leaves)  # recomputed: the buffers were handed over
    for a, b in zip(first, second):  # the same chunks, the same softmax, the same order: bitwise
        assert torch.equal(a, b), f"seed={seed}"


def test_precompute_grad_false_skips_the_eager_pass(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("gradients computed during the forward")

    monkeypatch.setattr(chunked, "token_losses_with_grads", fail)
    seed = fresh_seed()
    batch = make_batch(SHAPE, torch.float32, seed)
    leaves = _leaves(batch)
    h, w, b, tw = leaves
    out = bk.trajectory_cross_entropy(
        h, w, batch.labels, batch.segment_ids, SHAPE.S, traj_weights=tw, bias=b, backend="torch",
        precompute_grad=False,
    )  # fmt: skip
    ours = torch.autograd.grad((out.per_trajectory**2).sum(), (h, w, b))
    ref_leaves = _leaves(batch, torch.float64)
    _, per = _reference(batch, *ref_leaves)
    ref = torch.autograd.grad((per**2).sum(), ref_leaves[:3])
    for g, r in zip(ours, ref):
        assert reference.rel_err(g, r) <= 1e-5, f"seed={seed}"


def test_no_gradient_work_without_grad_mode(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("gradients computed under no_grad")

    monkeypatch.setattr(chunked, "token_losses_with_grads", fail)
    batch = make_batch(SHAPE, torch.float32, fresh_seed())
    with torch.no_grad():
        _ours(batch, *_leaves(batch))


def test_double_backward_reuses_the_eager_buffers(monkeypatch):
    """create_graph=True attaches the derivative rules to the eager gradient (no recompute); the
    grad of <grad, r> is then the exact HVP."""

    def fail(*args, **kwargs):
        raise AssertionError("the backward recomputed the gradient pass")

    monkeypatch.setattr(chunked, "token_loss_grads", fail)
    seed = fresh_seed()
    batch = make_batch(SHAPE, torch.float64, seed)
    h, w, b, tw = _leaves(batch)
    r = torch.randn(w.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    (gw,) = torch.autograd.grad(_ours(batch, h, w, b, tw).loss, (w,), create_graph=True)
    (hv,) = torch.autograd.grad((gw * r).sum(), (w,))
    hvp = bk.trajectory_hvp(
        h.detach(), w.detach(), batch.labels, batch.segment_ids, SHAPE.S, tangent_weight=r,
        traj_weights=tw.detach(), bias=b.detach(), backend="torch",
    )  # fmt: skip
    assert reference.rel_err(hv, hvp.weight) <= 1e-10, f"seed={seed}"


def test_per_token_and_total_gradients_that_cancel_keep_fp16_precision():
    """One token whose two coefficients nearly cancel (traj weight 0.72, upstream into the
    per-trajectory loss -0.67): the eager gradient of the total plus a separately rounded
    per-token pass gave 3e-3 relative error in fp16; one combined pass gives ~2e-4."""
    batch = make_batch(SHAPES[0], torch.float16, seed=2050618333)  # T=1, S=1
    upstream = torch.tensor([-0.6739632487297058])
    assert abs(float(batch.traj_weights[0]) + float(upstream[0])) < 0.06  # the cancellation
    h, w, b, tw = _leaves(batch)
    out = bk.trajectory_cross_entropy(
        h, w, batch.labels, batch.segment_ids, 1, traj_weights=tw, bias=b, backend="torch"
    )
    (out.loss + (upstream * out.per_trajectory).sum()).backward()
    hd, wd, bd, twd = _leaves(batch, torch.float64)
    total, per = reference.trajectory_losses(
        hd, wd, batch.labels, batch.segment_ids, 1, traj_weights=twd, bias=bd
    )
    (total + (upstream.double() * per).sum()).backward()
    for got, ref in ((h.grad, hd.grad), (w.grad, wd.grad), (b.grad, bd.grad)):
        assert reference.rel_err(got, ref) <= 6e-4
