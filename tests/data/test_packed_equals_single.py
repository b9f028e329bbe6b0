"""A packed batch gives each trajectory exactly the loss it gets when run alone (tiny Llama, float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from boost.data import (
    IGNORE_INDEX,
    PackingConfig,
    TrajectoryPacker,
)


def tiny_llama(vocab_size: int, attn_implementation: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        attn_implementation=attn_implementation,
    )
    return LlamaForCausalLM(config).to(torch.float64).eval()


def per_trajectory_loss(
    logits: torch.Tensor, labels: torch.Tensor, segment_ids: torch.Tensor, num_segments: int
) -> torch.Tensor:
    """``[S]`` mean cross-entropy over each trajectory's counted tokens (logits ``[T, V]``)."""
    token_loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    counted = segment_ids >= 0
    sums = torch.zeros(num_segments, dtype=logits.dtype).index_add_(
        0, segment_ids[counted], token_loss[counted]
    )
    return sums / torch.bincount(segment_ids[counted], minlength=num_segments)


def one_by_one(model, items) -> torch.Tensor:
    losses = []
    for item in items:
        ids = torch.from_numpy(item.input_ids).long()[None]
        labels = torch.from_numpy(item.labels())
        logits = model(input_ids=ids, use_cache=False).logits[0]
        losses.append(per_trajectory_loss(logits, labels, torch.where(labels != IGNORE_INDEX, 0, -1), 1))
    return torch.cat(losses)


def packed_loss(model, batch, **inputs) -> torch.Tensor:
    logits = model(**inputs).logits[0]
    return per_trajectory_loss(logits, batch.labels, batch.segment_ids, batch.num_segments)


CASES = [
    ("sdpa", "block_mask", torch.bool, False),
    ("eager", "block_mask", torch.float64, False),
    ("sdpa", "block_mask", torch.bool, True),
    ("sdpa", "position_ids", None, False),
    ("eager", "position_ids", None, False),
]


@pytest.mark.parametrize(("attn_implementation", "attention", "mask_dtype", "pad"), CASES)
def test_packed_losses_equal_one_by_one(
    bpe_tokenizer, tokenized, attn_implementation, attention, mask_dtype, pad
):
    model = tiny_llama(len(bpe_tokenizer), attn_implementation)
    packer = TrajectoryPacker(tokenized, PackingConfig(token_budget=1024, pad_to_budget=pad))
    (plan,) = packer.plan(epoch=0)
    assert len(plan) == 6  # everything in one batch, several trajectories per batch
    batch = packer.collate(plan)
    kwargs = {"mask_dtype": mask_dtype} if mask_dtype is not None else {}
    with torch.no_grad():
        packed = packed_loss(model, batch, **batch.model_inputs(attention, **kwargs))
        alone = one_by_one(model, [tokenized[p] for p in plan])
        # Negative control: the same packed ids with a plain causal mask attend across borders.
        crossing = packed_loss(model, batch, input_ids=batch.input_ids[None], use_cache=False)
    torch.testing.assert_close(packed, alone, rtol=1e-10, atol=1e-10)
    assert (crossing - alone).abs().max() > 1e-3


def test_packed_gradients_equal_the_sum_of_one_by_one_gradients(bpe_tokenizer, tokenized):
    model = tiny_llama(len(bpe_tokenizer), "sdpa")
    batch = TrajectoryPacker(tokenized, PackingConfig(token_budget=1024)).collate(range(6))
    packed_loss(model, batch, **batch.model_inputs("block_mask")).sum().backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    one_by_one(model, tokenized).sum().backward()
    for packed, alone in zip(packed_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(packed, alone, rtol=1e-9, atol=1e-11)
