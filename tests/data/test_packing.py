"""Packing: every epoch is a partition, batches fit the budget, tensors line up with the fused loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from boost.data import (
    IGNORE_INDEX,
    PackingConfig,
    TokenizedTrajectory,
    TrajectoryPacker,
    block_causal_mask,
)


def fake(index: int, length: int, rng: np.random.Generator, source: str = "real") -> TokenizedTrajectory:
    """A tokenised trajectory with random ids and a random agent mask (no tokenizer needed)."""
    return TokenizedTrajectory(
        input_ids=rng.integers(0, 1000, size=length, dtype=np.int32),
        agent_mask=rng.random(length) < 0.4,
        index=index,
        source=source,
        reward=None if index % 3 == 0 else float(index),
        task_id=f"task-{index % 5}",
        num_messages=2,
    )


def fakes(lengths, seed: int = 0) -> list[TokenizedTrajectory]:
    rng = np.random.default_rng(seed)
    return [fake(i, int(n), rng, "real" if i % 2 else "gen") for i, n in enumerate(lengths)]


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 64), min_size=1, max_size=120),
    budget=st.integers(64, 300),
    window=st.integers(1, 50),
    seed=st.integers(0, 3),
)
def test_every_epoch_sees_every_trajectory_exactly_once(lengths, budget, window, seed):
    packer = TrajectoryPacker(fakes(lengths), PackingConfig(token_budget=budget, window=window, seed=seed))
    for epoch in range(2):
        plan = packer.plan(epoch)
        assert sorted(p for batch in plan for p in batch) == list(range(len(lengths)))
        assert all(batch and sum(lengths[p] for p in batch) <= budget for batch in plan)
        assert plan == packer.plan(epoch)  # deterministic


def test_epochs_and_seeds_give_different_orders():
    packer = TrajectoryPacker(fakes([10] * 200), PackingConfig(token_budget=100, window=1000))
    other_seed = TrajectoryPacker(packer.trajectories, PackingConfig(token_budget=100, window=1000, seed=1))
    assert packer.plan(0) != packer.plan(1) and packer.plan(0) != other_seed.plan(0)


def test_collate_lines_up_with_the_fused_loss_layout():
    items = fakes([5, 1, 9, 3], seed=4)
    packer = TrajectoryPacker(items, PackingConfig(token_budget=32))
    batch = packer.collate([2, 0, 1, 3])
    order = [items[p] for p in (2, 0, 1, 3)]
    assert batch.num_tokens == 18 and batch.num_segments == 4 and batch.num_padding == 0
    for name in ("input_ids", "position_ids", "labels", "segment_ids"):
        assert getattr(batch, name).dtype == torch.int64 and getattr(batch, name).shape == (18,)
    assert batch.cu_seqlens.dtype == torch.int32 and batch.cu_seqlens.tolist() == [0, 9, 14, 15, 18]
    assert batch.max_seqlen == 9
    assert batch.position_ids.tolist() == [*range(9), *range(5), 0, *range(3)]
    assert batch.input_ids.tolist() == np.concatenate([t.input_ids for t in order]).tolist()
    assert batch.labels.tolist() == np.concatenate([t.labels() for t in order]).tolist()
    expected_segments = np.concatenate(
        [np.where(t.labels() != IGNORE_INDEX, i, -1) for i, t in enumerate(order)]
    )
    assert batch.segment_ids.tolist() == expected_segments.tolist()
    assert batch.num_counted.tolist() == [t.num_counted for t in order]
    assert batch.trajectory_index.tolist() == [2, 0, 1, 3]
    assert batch.lengths.tolist() == [9, 5, 1, 3]
    assert batch.sources == ["gen", "gen", "real", "real"] and batch.is_real.tolist() == [
        False,
        False,
        True,
        True,
    ]
    assert batch.has_reward.tolist() == [True, False, True, False]
    assert batch.rewards[0] == 2.0 and torch.isnan(batch.rewards[1])
    assert batch.task_ids == ["task-2", "task-0", "task-1", "task-3"]
    assert batch.fill == 18 / 32


def test_labels_never_cross_a_trajectory_border():
    rng = np.random.default_rng(0)
    items = [
        TokenizedTrajectory(
            input_ids=rng.integers(0, 50, size=4, dtype=np.int32),
            agent_mask=np.ones(4, dtype=bool),  # every token is an agent token
            index=i,
            source="real",
            reward=None,
            task_id=None,
            num_messages=2,
        )
        for i in range(3)
    ]
    batch = TrajectoryPacker(items, PackingConfig(token_budget=12)).collate([0, 1, 2])
    assert batch.labels[[3, 7, 11]].tolist() == [IGNORE_INDEX] * 3
    assert batch.segment_ids.tolist() == [0, 0, 0, -1, 1, 1, 1, -1, 2, 2, 2, -1]


def test_padding_to_the_budget_is_its_own_sequence_and_never_counts():
    items = fakes([5, 6])
    batch = TrajectoryPacker(
        items, PackingConfig(token_budget=16, pad_to_budget=True, pad_token_id=7)
    ).collate([0, 1])
    assert batch.num_tokens == 16 and batch.num_padding == 5 and batch.num_segments == 2
    assert batch.cu_seqlens.tolist() == [0, 5, 11, 16]
    assert batch.input_ids[11:].tolist() == [7] * 5 and batch.position_ids[11:].tolist() == list(range(5))
    assert (batch.labels[10:] == IGNORE_INDEX).all() and (batch.segment_ids[10:] == -1).all()


def test_packing_efficiency_on_a_realistic_length_mix():
    """10k multi-turn trajectories with log-normal lengths (median ~700 tokens, a long tail to 8k)."""
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(mean=np.log(700), sigma=0.7, size=10_000), 64, 8192).astype(int)
    packer = TrajectoryPacker(fakes(lengths), PackingConfig(token_budget=16384))
    stats = packer.stats(packer.plan(0))
    assert stats.num_trajectories == 10_000
    assert stats.fill >= 0.95, stats.summary()
    assert 0 < stats.counted_fraction < stats.fill


def test_a_trajectory_longer_than_the_budget_is_an_error():
    with pytest.raises(
        ValueError, match=r"1 trajectories are longer than token_budget=8 \(first: position 1, 9"
    ):
        TrajectoryPacker(fakes([3, 9]), PackingConfig(token_budget=8))
    packer = TrajectoryPacker(fakes([3, 6]), PackingConfig(token_budget=8))
    with pytest.raises(ValueError, match="do not fit"):
        packer.collate([0, 1])


def test_block_causal_mask_matches_a_loop():
    cu_seqlens = torch.tensor([0, 3, 4, 8], dtype=torch.int32)
    mask = block_causal_mask(cu_seqlens)
    seq = [0, 0, 0, 1, 2, 2, 2, 2]
    expected = torch.tensor([[seq[q] == seq[k] and k <= q for k in range(8)] for q in range(8)])
    assert mask.shape == (1, 1, 8, 8) and torch.equal(mask[0, 0], expected)
    additive = block_causal_mask(cu_seqlens, dtype=torch.float32)[0, 0]
    assert (
        torch.equal(additive == 0, expected) and (additive[~expected] == torch.finfo(torch.float32).min).all()
    )
