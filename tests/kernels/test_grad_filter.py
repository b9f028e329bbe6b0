"""The optional gradient filter (Cut Cross-Entropy's filtered mode): the gradient kernels skip the
(token block, vocabulary block) tiles in which every |p - e_y| is below a threshold.

Checked in the interpreter, float32: the filtered gradient equals the float64 gradient with exactly
those tiles left out (so the kernel skips the right tiles and nothing else), it stays within the
bound documented in ``triton_ops.token_loss_grads``, and the filter is off unless asked for.
"""

from __future__ import annotations

import pytest
import torch

import boost_kernels as bk
from boost_kernels import triton_ops
from tests.kernels import reference
from tests.kernels.cases import fresh_seed

pytestmark = pytest.mark.skipif(not triton_ops.interpreting(), reason="interpreter runs")
T, D, V, LIVE = 70, 16, 640, 128  # labels and most probability mass in the first LIVE entries


def _batch(seed: int):
    """Logits whose vocabulary beyond LIVE sits 9 to 12 nats below (probabilities ~1e-5, below bf16's
    filter threshold 2^-12 = 2.4e-4), except one vocabulary block at 4 nats below (kept)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, D, generator=g)
    weight = torch.randn(V, D, generator=g) / D**0.5
    bias = torch.zeros(V)
    bias[LIVE:] = -9.0 - 3.0 * torch.rand(V - LIVE, generator=g)
    bias[LIVE + 64 : LIVE + 128] = -4.0  # one vocabulary block that is never skipped
    labels = torch.randint(0, LIVE, (T,), generator=g)
    coef = torch.rand(T, generator=g) / T
    return hidden, weight, bias, labels, coef


def _tile_max(x: torch.Tensor, bt: int, bv: int) -> torch.Tensor:
    """[T, V] -> [cdiv(T, bt), cdiv(V, bv)] maxima of |x| over each tile."""
    rows, cols = -(-x.shape[0] // bt), -(-x.shape[1] // bv)
    padded = x.new_zeros(rows * bt, cols * bv)
    padded[: x.shape[0], : x.shape[1]] = x.abs()
    return padded.view(rows, bt, cols, bv).amax(dim=(1, 3))


def _float64(hidden, weight, bias, labels, coef, keep):
    """float64 (d_hidden, d_weight, d_bias) of Σ_t coef_t·loss_t with p - e_y zeroed where not keep."""
    h, w, b = hidden.double(), weight.double(), bias.double()
    p = torch.softmax(h @ w.T + b, dim=1)
    g = (p - torch.nn.functional.one_hot(labels, V).double()) * keep * coef.double()[:, None]
    return g @ w, g.T @ h, g.sum(0)


@pytest.mark.parametrize("slabs", [False, True], ids=["one_launch", "slab_kernel"])
def test_filtered_gradient_skips_exactly_the_small_tiles_within_the_bound(slabs):
    if slabs:  # the two-pass slab kernel (float32: no scratch) takes the filter too
        kw = dict(deterministic=True)
    else:
        kw = {}
    seed = fresh_seed()
    hidden, weight, bias, labels, coef = _batch(seed)
    cfg = triton_ops.INTERPRETER_CONFIG
    h, w, b = hidden.double(), weight.double(), bias.double()
    g = torch.softmax(h @ w.T + b, dim=1) - torch.nn.functional.one_hot(labels, V).double()
    tile_max = _tile_max(g, cfg.block_t, cfg.block_v)
    # A threshold in the widest gap between the tiles' maxima below 2^-8 (so float32 vs float64
    # probabilities cannot put a tile on the other side of it).
    levels = torch.sort(tile_max.flatten()).values
    levels = levels[levels < 2**-8]
    gap = int(torch.argmax(levels[1:] / levels[:-1]))
    eps = float((levels[gap] * levels[gap + 1]).sqrt())
    assert levels[gap + 1] / levels[gap] > 1.5, f"no clear threshold, seed={seed}"
    skipped = tile_max < eps
    assert 0 < int(skipped.sum()) < skipped.numel(), f"nothing or everything skipped, seed={seed}"
    keep = (~skipped).repeat_interleave(cfg.block_t, 0).repeat_interleave(cfg.block_v, 1)[:T, :V]

    exact = triton_ops.token_loss_grads(hidden, weight, bias, labels, None, coef, **kw)
    filtered = triton_ops.token_loss_grads(hidden, weight, bias, labels, None, coef, grad_filter=eps, **kw)
    want = _float64(hidden, weight, bias, labels, coef, keep)
    full = _float64(hidden, weight, bias, labels, coef, torch.ones_like(keep))
    # The bound of token_loss_grads' docstring, with the float32 rounding of both runs on top.
    a = coef.double().abs()
    bound = (
        eps * a[:, None] * w.abs().sum(0)[None, :],
        eps * (a[:, None] * h.abs()).sum(0)[None, :].expand(V, D),
        eps * a.sum().expand(V),
    )
    for name, f, e, ref, r_full, bnd in zip(("hidden", "weight", "bias"), filtered, exact, want, full, bound):
        assert reference.rel_err(f, ref) <= 1e-5, f"d_{name} is not the tile-filtered gradient, seed={seed}"
        assert reference.rel_err(e, r_full) <= 1e-5, f"exact d_{name}, seed={seed}"
        diff = (f.double() - e.double()).abs()
        assert (diff <= bnd + 1e-6 * r_full.abs().max()).all(), f"d_{name} beyond the bound, seed={seed}"
    assert not torch.equal(filtered[1], exact[1]), f"the filter changed nothing, seed={seed}"


def test_filter_is_off_by_default_and_named_thresholds():
    seed = fresh_seed()
    hidden, weight, bias, labels, coef = _batch(seed)
    default = triton_ops.token_loss_grads(hidden, weight, bias, labels, None, coef)
    off = triton_ops.token_loss_grads(hidden, weight, bias, labels, None, coef, grad_filter=False)
    on = triton_ops.token_loss_grads(hidden, weight, bias, labels, None, coef, grad_filter=1e-3)
    for d, o in zip(default, off):
        assert torch.equal(d, o), f"seed={seed}"
    assert not torch.equal(default[1], on[1]), f"seed={seed}"
    assert triton_ops.grad_filter_eps(True, torch.bfloat16) == 2.0**-12
    assert triton_ops.grad_filter_eps(False, torch.bfloat16) == 0.0
    with pytest.raises(ValueError, match="grad_filter"):
        triton_ops.grad_filter_eps(-1.0, torch.float32)


def test_public_op_takes_the_filter_and_keeps_the_loss_exact():
    seed = fresh_seed()
    hidden, weight, bias, labels, _ = _batch(seed)
    segments = torch.arange(T) % 3

    def run(**kw):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = bk.trajectory_cross_entropy(h, w, labels, segments, 3, bias=bias, backend="triton", **kw)
        out.loss.backward()
        return out.loss, h.grad, w.grad

    exact, default, filtered = run(grad_filter=False), run(), run(grad_filter=1e-3)
    for e, d in zip(exact, default):
        assert torch.equal(e, d), f"seed={seed}"
    assert torch.equal(exact[0], filtered[0]), f"the loss must not change, seed={seed}"
    assert not torch.equal(exact[2], filtered[2]), f"seed={seed}"
    assert reference.rel_err(filtered[2], exact[2]) < 1e-2, f"seed={seed}"
