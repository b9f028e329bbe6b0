"""``scratch_bytes``: the memory/speed choice of the 16-bit Triton backward, exact in both settings.

With the float32 copies of the gradients within the budget (or ``scratch_bytes=None``), the
backward makes one pass over the logits (``token_grads_kernel``); below it, two passes through a
ring of float32 slabs (``token_grads_slab_kernel``). Both accumulate in float32 and round each
element once. Checked in the interpreter, fp16 and bf16 (GPU operand rounding emulated), against
float64: which kernel ran (recorded at launch) and the gradients, for the loss and the HVP. The
PyTorch path takes the argument and ignores it.
"""

from __future__ import annotations

import pytest
import torch

import boost_kernels as bk
from boost_kernels import triton_ops
from tests.kernels import reference
from tests.kernels.cases import SHAPES, fresh_seed, make_batch

pytestmark = pytest.mark.skipif(not triton_ops.interpreting(), reason="interpreter runs")
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # as tests/kernels/test_loss.py
ONE_PASS, SLABS = "token_grads_kernel", "token_grads_slab_kernel"


class _Recorder:
    """Stands in for a kernel in triton_ops: records its name at each launch, then launches it."""

    def __init__(self, kernel, name: str, log: list[str]):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        self.log.append(self.name)
        return self.kernel[grid]


@pytest.fixture
def launched(monkeypatch) -> list[str]:
    log: list[str] = []
    for name in (ONE_PASS, SLABS):
        monkeypatch.setattr(triton_ops, name, _Recorder(getattr(triton_ops, name), name, log))
    return log


def _grads(batch, shape, **options):
    h, w, b = (x.detach().clone().requires_grad_() for x in (batch.hidden, batch.weight, batch.bias))
    out = bk.trajectory_cross_entropy(
        h, w, batch.labels, batch.segment_ids, shape.S, traj_weights=batch.traj_weights, bias=b,
        softcap=shape.softcap, normalize=shape.normalize, **options,
    )  # fmt: skip
    out.loss.backward()
    return h.grad, w.grad, b.grad


def _float64_grads(batch, shape):
    h, w, b = (x.double().requires_grad_() for x in (batch.hidden, batch.weight, batch.bias))
    total, _ = reference.trajectory_losses(
        h, w, batch.labels, batch.segment_ids, shape.S, batch.traj_weights.double(), b,
        softcap=shape.softcap, normalize=shape.normalize,
    )  # fmt: skip
    total.backward()
    return h.grad, w.grad, b.grad


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_budget_picks_the_kernel_and_both_are_exact(dtype, launched):
    shape = SHAPES[4]  # T=33, D=24, V=100, bias, softcap: 2 token blocks, 2 vocabulary blocks
    seed = fresh_seed()
    batch = make_batch(shape, dtype, seed)
    fits = (shape.T + shape.V) * shape.D * 4  # float32 d_hidden + d_weight
    want = _float64_grads(batch, shape)
    runs = {}
    for budget, kernel in ((0, SLABS), (fits - 1, SLABS), (fits, ONE_PASS), (None, ONE_PASS)):
        launched.clear()
        runs[budget] = _grads(batch, shape, backend="triton", scratch_bytes=budget)
        assert launched == [kernel], f"scratch_bytes={budget}: launched {launched}"
        for name, got, ref in zip(("hidden", "weight", "bias"), runs[budget], want):
            assert got.dtype == dtype
            err = reference.rel_err(got, ref)
            assert err <= TOL[dtype], f"d_{name} {err:.2e} with scratch_bytes={budget}, seed={seed}"
    # Both kernels add the same float32 tiles in the same order here (the interpreter runs programs
    # one by one) and round once: the same bits, whatever the budget.
    for budget in (0, fits - 1, fits):
        for a, b in zip(runs[budget], runs[None]):
            assert torch.equal(a, b), f"scratch_bytes={budget} vs None differ, seed={seed}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_hvp_takes_the_budget_too(dtype, launched):
    shape = SHAPES[1]  # T=53, D=40, V=161, bias
    seed = fresh_seed()
    batch = make_batch(shape, dtype, seed)
    g = torch.Generator().manual_seed(seed)
    tangent_hidden = (0.1 * torch.randn(batch.hidden.shape, generator=g)).to(dtype)
    args = (batch.hidden, batch.weight, batch.labels, batch.segment_ids, shape.S)
    kw = dict(tangent_weight=batch.weight, tangent_hidden=tangent_hidden, bias=batch.bias)
    ref = bk.trajectory_hvp(
        *(x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in args),
        **{k: v.double() for k, v in kw.items()}, backend="torch",
    )  # fmt: skip
    for budget, kernel in ((0, SLABS), (None, ONE_PASS)):
        launched.clear()
        hvp = bk.trajectory_hvp(*args, **kw, backend="triton", scratch_bytes=budget)
        assert launched == [kernel], f"scratch_bytes={budget}: launched {launched}"
        for name in ("weight", "hidden", "bias"):
            err = reference.rel_err(getattr(hvp, name), getattr(ref, name))
            assert err <= TOL[dtype], f"hvp {name} {err:.2e} with scratch_bytes={budget}, seed={seed}"


def test_budget_counts_only_the_gradients_asked_for(launched):
    """Head-only gradients need V·D·4 bytes of float32 scratch, not (T + V)·D·4."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    T, D, V = 40, 16, 96
    hidden = torch.randn(T, D, generator=g).to(torch.bfloat16)
    weight = (torch.randn(V, D, generator=g) / D**0.5).to(torch.bfloat16)
    labels = torch.randint(0, V, (T,), generator=g)
    coef = torch.rand(T, generator=g) / T
    for budget, kernel in ((V * D * 4, ONE_PASS), (V * D * 4 - 1, SLABS)):
        launched.clear()
        triton_ops.token_loss_grads(
            hidden, weight, None, labels, None, coef, need_hidden=False, need_bias=False, scratch_bytes=budget
        )
        assert launched == [kernel], f"scratch_bytes={budget}: launched {launched}"


def test_float32_needs_no_scratch(launched):
    shape = SHAPES[4]
    batch = make_batch(shape, torch.float32, fresh_seed())
    _grads(batch, shape, backend="triton", scratch_bytes=0)
    assert launched == [ONE_PASS]


def test_torch_path_accepts_and_ignores_it():
    shape = SHAPES[1]
    batch = make_batch(shape, torch.bfloat16, fresh_seed())
    first = _grads(batch, shape, backend="torch", scratch_bytes=0)
    for a, b in zip(first, _grads(batch, shape, backend="torch", scratch_bytes=None)):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "bad, error",
    [(-1, ValueError), (1.5, TypeError), ("56MiB", TypeError), (True, TypeError)],
    ids=["negative", "float", "str", "bool"],
)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_budget_is_refused_with_its_name(bad, error, backend):
    shape = SHAPES[1]
    batch = make_batch(shape, torch.bfloat16, fresh_seed())
    with pytest.raises(error, match="scratch_bytes"):
        _grads(batch, shape, backend=backend, scratch_bytes=bad)
    with pytest.raises(error, match="scratch_bytes"):
        triton_ops.token_loss_grads(
            batch.hidden, batch.weight, None, batch.labels, None, torch.ones(shape.T), scratch_bytes=bad
        )


def test_deterministic_mode_takes_any_budget(launched):
    """deterministic=True always runs the owner-ordered slab kernel; with no limit its ring has one
    slot per slab (every row block in flight at once). Same bits whatever the budget."""
    shape = SHAPES[4]
    seed = fresh_seed()
    batch = make_batch(shape, torch.bfloat16, seed)
    want = _float64_grads(batch, shape)
    small = _grads(batch, shape, backend="triton", deterministic=True, scratch_bytes=0)
    unlimited = _grads(batch, shape, backend="triton", deterministic=True, scratch_bytes=None)
    assert launched == [SLABS, SLABS]
    for name, a, b, ref in zip(("hidden", "weight", "bias"), small, unlimited, want):
        assert torch.equal(a, b), f"d_{name}: seed={seed}"
        assert reference.rel_err(b, ref) <= TOL[torch.bfloat16], f"d_{name}: seed={seed}"
