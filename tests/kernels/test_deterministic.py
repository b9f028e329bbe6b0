"""deterministic=True: gradients without atomics (one program owns each row block and adds its tiles
in a fixed order), so they are bitwise the same run to run. The interpreter runs programs one after
another, so here two runs agree either way; what these tests check is that the owner-ordered
kernels compute the right thing (float32 and bf16, slabs, bias, softcap, HVP) and that the public
ops take the option. That no atomic is left in the compiled binaries is checked on the SASS by
tests/kernels/test_aot_compile.py."""

from __future__ import annotations

import pytest
import torch

import boost_kernels as bk
from boost_kernels import triton_ops
from tests.kernels import reference
from tests.kernels.cases import SHAPES, fresh_seed, make_batch

pytestmark = pytest.mark.skipif(not triton_ops.interpreting(), reason="interpreter runs")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("slabs", [False, True], ids=["one_slab", "slabs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_deterministic_gradients_match_float64_and_repeat_bitwise(dtype, slabs):
    shape = SHAPES[4]  # softcap, bias
    seed = fresh_seed()
    batch = make_batch(shape, dtype, seed)
    args = (batch.labels, batch.segment_ids, shape.S)
    kw = dict(traj_weights=batch.traj_weights, bias=batch.bias, softcap=shape.softcap, backend="triton")
    if slabs:  # scratch for one slot of one block of rows: several slabs per pass
        kw["scratch_bytes"] = 1

    def grads():
        h, w, b = (x.detach().requires_grad_() for x in (batch.hidden, batch.weight, batch.bias))
        out = bk.trajectory_cross_entropy(h, w, *args, **(kw | dict(bias=b)), deterministic=True)
        out.loss.backward()
        return h.grad, w.grad, b.grad

    first, second = grads(), grads()
    for a, b in zip(first, second):
        assert torch.equal(a, b), f"seed={seed}"
    h, w, b = (x.double().requires_grad_() for x in (batch.hidden, batch.weight, batch.bias))
    total, _ = reference.trajectory_losses(
        h, w, *args, batch.traj_weights.double(), b, softcap=shape.softcap, normalize=shape.normalize
    )
    total.backward()
    for name, got, ref in zip(("hidden", "weight", "bias"), first, (h.grad, w.grad, b.grad)):
        assert reference.rel_err(got, ref) <= TOL[dtype], f"{name}: seed={seed}"


def test_deterministic_hvp_matches_the_atomic_one():
    shape = SHAPES[1]
    seed = fresh_seed()
    batch = make_batch(shape, torch.float32, seed)
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch.weight.shape, generator=g)
    dh = torch.randn(batch.hidden.shape, generator=g)
    args = (batch.hidden, batch.weight, batch.labels, batch.segment_ids, shape.S)
    kw = dict(tangent_weight=u, tangent_hidden=dh, bias=batch.bias, traj_weights=batch.traj_weights)
    atomic = bk.trajectory_hvp(*args, **kw, backend="triton")
    ordered = bk.trajectory_hvp(*args, **kw, backend="triton", deterministic=True)
    for name in ("weight", "hidden", "bias"):
        assert reference.rel_err(getattr(ordered, name), getattr(atomic, name)) <= 1e-6, (
            f"{name}: seed={seed}"
        )
