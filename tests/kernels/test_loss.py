"""trajectory_cross_entropy against the float64 reference, on the PyTorch path and the Triton
kernels (under TRITON_INTERPRET=1 without a GPU): values and all four gradients."""

from __future__ import annotations

import pytest
import torch

import boost_kernels as bk
from tests.kernels import reference
from tests.kernels.cases import SHAPES, fresh_seed, make_batch

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
BACKENDS = ["torch", "triton"]


def _run_ours(batch, shape, backend, upstream, **options):
    h = batch.hidden.clone().requires_grad_()
    w = batch.weight.clone().requires_grad_()
    b = batch.bias.clone().requires_grad_() if batch.bias is not None else None
    tw = batch.traj_weights.clone().requires_grad_()
    out = bk.trajectory_cross_entropy(
        h, w, batch.labels, batch.segment_ids, shape.S, traj_weights=tw, bias=b,
        normalize=shape.normalize, normalizer=shape.normalizer, softcap=shape.softcap, backend=backend,
        **options,
    )  # fmt: skip
    (out.loss + (upstream * out.per_trajectory).sum()).backward()
    return out, (h.grad, w.grad, b.grad if b is not None else None, tw.grad)


def _run_reference(batch, shape, upstream):
    h = batch.hidden.double().requires_grad_()
    w = batch.weight.double().requires_grad_()
    b = batch.bias.double().requires_grad_() if batch.bias is not None else None
    tw = batch.traj_weights.double().requires_grad_()
    total, per = reference.trajectory_losses(
        h, w, batch.labels, batch.segment_ids, shape.S, traj_weights=tw, bias=b,
        normalize=shape.normalize, normalizer=shape.normalizer, softcap=shape.softcap,
    )  # fmt: skip
    (total + (upstream.double() * per).sum()).backward()
    return total, per, (h.grad, w.grad, b.grad if b is not None else None, tw.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[s.name for s in SHAPES])
def test_matches_float64_reference(shape, dtype, backend):
    seed = fresh_seed()
    batch = make_batch(shape, dtype, seed)
    upstream = torch.randn(shape.S, generator=torch.Generator().manual_seed(seed))
    out, grads = _run_ours(batch, shape, backend, upstream)
    total, per, ref_grads = _run_reference(batch, shape, upstream)
    tol = TOL[dtype]
    assert reference.rel_err(out.per_trajectory, per) <= tol, f"seed={seed}"
    assert reference.rel_err(out.loss, total) <= tol, f"seed={seed}"
    for name, g, r in zip(("hidden", "weight", "bias", "traj_weights"), grads, ref_grads):
        if r is None:
            assert g is None
            continue
        assert g.dtype == (batch.traj_weights.dtype if name == "traj_weights" else dtype)
        assert reference.rel_err(g, r) <= tol, f"grad {name}: seed={seed}"
    for i in (e for e in shape.empty):
        assert out.per_trajectory[i] == 0 and out.num_tokens[i] == 0
    assert torch.isfinite(out.per_trajectory).all()


def test_bf16_torch_path():
    shape = SHAPES[1]
    seed = fresh_seed()
    batch = make_batch(shape, torch.bfloat16, seed)
    upstream = torch.zeros(shape.S)
    out, grads = _run_ours(batch, shape, "torch", upstream)
    total, per, ref_grads = _run_reference(batch, shape, upstream)
    assert reference.rel_err(out.per_trajectory, per) <= 1e-5, f"seed={seed}"  # float32 math on bf16 inputs
    assert reference.rel_err(grads[0], ref_grads[0]) <= TOL[torch.bfloat16], f"seed={seed}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    shape = SHAPES[1]
    seed = fresh_seed()
    batch = make_batch(shape, torch.float32, seed)
    # Transposed storage for hidden and weight, strided labels/segments/bias.
    hidden = batch.hidden.T.contiguous().T
    weight = batch.weight.T.contiguous().T
    labels = torch.stack([batch.labels, batch.labels], 1)[:, 0]
    segments = torch.stack([batch.segment_ids, batch.segment_ids], 1)[:, 1]
    bias = torch.stack([batch.bias, batch.bias], 1)[:, 0]
    assert not hidden.is_contiguous() and not labels.is_contiguous() and not bias.is_contiguous()
    out = bk.trajectory_cross_entropy(hidden, weight, labels, segments, shape.S, bias=bias, backend=backend)
    total, per = reference.trajectory_losses(
        batch.hidden, batch.weight, batch.labels, batch.segment_ids, shape.S, bias=batch.bias
    )
    assert reference.rel_err(out.per_trajectory, per) <= 1e-5, f"seed={seed}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_tokens_ignored_gives_zero_not_nan(backend):
    T, D, V, S = 8, 16, 40, 2
    hidden = torch.randn(T, D, requires_grad=True)
    weight = torch.randn(V, D, requires_grad=True)
    labels = torch.full((T,), -100)
    segments = torch.zeros(T, dtype=torch.long)
    out = bk.trajectory_cross_entropy(hidden, weight, labels, segments, S, backend=backend)
    out.loss.backward()
    assert out.loss.item() == 0.0 and (out.per_trajectory == 0).all()
    assert (hidden.grad == 0).all() and (weight.grad == 0).all()


def test_mean_normalisation_counts_tokens_per_trajectory():
    # Two trajectories with identical tokens but different lengths: equal mean losses.
    D, V = 8, 30
    hidden1 = torch.randn(1, D)
    weight = torch.randn(V, D)
    hidden = hidden1.repeat(5, 1)
    labels = torch.full((5,), 3)
    segments = torch.tensor([0, 0, 1, 1, 1])
    out = bk.trajectory_cross_entropy(hidden, weight, labels, segments, 2)
    assert torch.allclose(out.per_trajectory[0], out.per_trajectory[1])
    assert out.num_tokens.tolist() == [2, 3]


def test_16bit_gradients_in_token_and_vocabulary_slabs():
    """16-bit inputs accumulate in bounded float32 scratch; force several slabs (T=53 in 32-token
    slabs, V=161 in 64-row slabs under the interpreter) with scratch for one slot of one block."""
    shape = SHAPES[1]
    seed = fresh_seed()
    batch = make_batch(shape, torch.float16, seed)
    upstream = torch.randn(shape.S, generator=torch.Generator().manual_seed(seed))
    out, grads = _run_ours(batch, shape, "triton", upstream, scratch_bytes=1)
    total, per, ref_grads = _run_reference(batch, shape, upstream)
    assert reference.rel_err(out.per_trajectory, per) <= TOL[torch.float16], f"seed={seed}"
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert reference.rel_err(g, r) <= TOL[torch.float16], f"grad {name}: seed={seed}"
    tangent_hidden = batch.hidden.flip(0)
    hvp = bk.trajectory_hvp(
        batch.hidden, batch.weight, batch.labels, batch.segment_ids, shape.S, tangent_weight=batch.weight,
        tangent_hidden=tangent_hidden, bias=batch.bias, backend="triton", scratch_bytes=1,
    )  # fmt: skip
    ref_hvp = bk.trajectory_hvp(
        batch.hidden.double(), batch.weight.double(), batch.labels, batch.segment_ids, shape.S,
        tangent_weight=batch.weight.double(), tangent_hidden=tangent_hidden.double(),
        bias=batch.bias.double(), backend="torch",
    )  # fmt: skip
    for name in ("weight", "hidden", "bias"):
        got, ref = getattr(hvp, name), getattr(ref_hvp, name)
        assert reference.rel_err(got, ref) <= TOL[torch.float16], f"hvp {name}: seed={seed}"
