"""torch.compile users get the chunked PyTorch path: it must compile (graph breaks allowed) and
give the eager values and gradients."""

from __future__ import annotations

import torch

import boost_kernels as bk
from tests.kernels import reference
from tests.kernels.cases import SHAPES, fresh_seed, make_batch


def test_torch_compile_matches_eager():
    shape = SHAPES[1]
    seed = fresh_seed()
    batch = make_batch(shape, torch.float32, seed)

    def loss_fn(h, w, b):
        return bk.trajectory_cross_entropy(
            h, w, batch.labels, batch.segment_ids, shape.S, traj_weights=batch.traj_weights, bias=b
        ).loss

    leaves = [x.clone().requires_grad_() for x in (batch.hidden, batch.weight, batch.bias)]
    eager = loss_fn(*leaves)
    eager_grads = torch.autograd.grad(eager, leaves)
    compiled = torch.compile(loss_fn, backend="aot_eager")(*leaves)
    compiled_grads = torch.autograd.grad(compiled, leaves)
    assert reference.rel_err(compiled, eager) <= 1e-6, f"seed={seed}"
    for a, b in zip(compiled_grads, eager_grads):
        assert reference.rel_err(a, b) <= 1e-6, f"seed={seed}"
