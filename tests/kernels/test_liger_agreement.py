"""Agreement with Liger-Kernel's fused linear cross-entropy on the unweighted case.

Liger's Triton kernels run under the interpreter on CPU in float32. Unweighted mean over all
counted tokens = one trajectory holding every token, normalize="mean".
"""

from __future__ import annotations

import pytest
import torch

import boost_kernels as bk
from tests.kernels import reference
from tests.kernels.cases import fresh_seed

liger = pytest.importorskip("liger_kernel.transformers.fused_linear_cross_entropy")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_unweighted_loss_and_grads_match_liger(backend):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    T, D, V = 24, 32, 96
    hidden = torch.randn(T, D, generator=g)
    weight = torch.randn(V, D, generator=g) / D**0.5
    labels = torch.randint(0, V, (T,), generator=g)
    labels[::5] = -100

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    liger_loss = liger.LigerFusedLinearCrossEntropyLoss()(w1, h1, labels)
    liger_loss.backward()

    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ours = bk.trajectory_cross_entropy(h2, w2, labels, torch.zeros(T, dtype=torch.long), 1, backend=backend)
    ours.loss.backward()
    assert reference.rel_err(ours.loss, liger_loss) <= 1e-5, f"seed={seed}"
    assert reference.rel_err(h2.grad, h1.grad) <= 1e-5, f"seed={seed}"
    assert reference.rel_err(w2.grad, w1.grad) <= 1e-5, f"seed={seed}"
