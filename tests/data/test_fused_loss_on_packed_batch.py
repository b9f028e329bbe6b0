"""The data path feeds the fused loss directly: a packed batch's labels and segment ids, the trunk's
hidden states and the LM head give each trajectory the loss it gets when the model runs it alone."""

from __future__ import annotations

import pytest
import torch

import boost_kernels as bk
from boost.data import PackingConfig, TrajectoryPacker

from .test_packed_equals_single import one_by_one, tiny_llama


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_per_trajectory_loss_on_a_packed_batch(bpe_tokenizer, tokenized, backend):
    model = tiny_llama(len(bpe_tokenizer), "sdpa").float()
    batch = TrajectoryPacker(tokenized, PackingConfig(token_budget=1024)).collate(range(len(tokenized)))
    weights = torch.linspace(0.5, 2.0, batch.num_segments)
    with torch.no_grad():
        alone = one_by_one(model, tokenized)
    hidden = model.model(**batch.model_inputs("block_mask")).last_hidden_state[0]
    out = bk.trajectory_cross_entropy(
        hidden, model.lm_head.weight, batch.labels, batch.segment_ids, batch.num_segments,
        traj_weights=weights, backend=backend,
    )  # fmt: skip
    torch.testing.assert_close(out.per_trajectory, alone.float(), rtol=2e-5, atol=2e-5)
    assert out.num_tokens.tolist() == batch.num_counted.tolist()
    torch.testing.assert_close(
        out.loss, (weights * alone.float()).sum() / batch.num_segments, rtol=2e-5, atol=0
    )

    # The weighted loss trains the trunk: its gradient matches the same weighting of the
    # one-by-one losses, parameter by parameter.
    out.loss.backward()
    fused_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ((weights * one_by_one(model, tokenized).float()).sum() / batch.num_segments).backward()
    for fused, ref in zip(fused_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-6)
