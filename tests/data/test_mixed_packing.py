"""Source-mixed packing: batches hold several sources in proportion, rows lay out like one row."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from boost.data import PackingConfig, TrajectoryPacker
from tests.data.test_packed_equals_single import one_by_one, per_trajectory_loss, tiny_llama
from tests.data.test_packing import fake


def two_source_set(n: int = 120, seed: int = 0):
    """Short ``real``/``eps0.1`` trajectories and long ``random`` ones: length packing separates them."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        source = ("eps0.1", "random", "real")[i % 3]
        length = int(rng.integers(20, 40)) if source != "random" else int(rng.integers(120, 160))
        items.append(fake(i, length, rng, source))
    return items


def test_the_default_trainer_packing_mixes_two_synthetic_sources():
    from boost.train.config import DataConfig

    data = DataConfig()
    packer = TrajectoryPacker(two_source_set(), PackingConfig(token_budget=512, mode=data.packing, rows=1))
    for epoch in range(3):
        plan = packer.plan(epoch)
        stats = packer.epoch_stats[epoch]
        full = plan[:-2]  # the last batches of an epoch hold what is left
        assert all({packer.sources[p] for p in batch} >= {"eps0.1", "random"} for batch in full)
        assert stats.multi_synthetic_share >= 0.8 and stats.fill >= 0.9, stats.summary()
        assert sorted(p for batch in plan for p in batch) == list(range(120))


def test_length_packing_of_the_same_set_comes_out_single_source():
    """The failure the mixed mode exists for (a control: the default test above must not pass by luck)."""
    packer = TrajectoryPacker(two_source_set(), PackingConfig(token_budget=512, mode="length"))
    assert packer.stats(packer.plan(0)).multi_synthetic_share <= 0.6  # measured: 0.5


def test_sources_come_in_proportion_to_the_data():
    rng = np.random.default_rng(1)
    items = [fake(i, 30, rng, "a" if i % 4 else "b") for i in range(400)]  # 3:1
    packer = TrajectoryPacker(items, PackingConfig(token_budget=300, mode="mixed"))
    for batch in packer.plan(0)[:-1]:
        share_b = sum(packer.sources[p] == "b" for p in batch) / len(batch)
        assert 0.1 <= share_b <= 0.4


@pytest.mark.parametrize("rows", [2, 4])
def test_rows_give_each_trajectory_the_loss_it_gets_alone(rows):
    rng = np.random.default_rng(2)
    items = [fake(i, int(rng.integers(5, 40)), rng, ("a", "b")[i % 2]) for i in range(12)]
    for item in items:
        item.input_ids %= 50
    packer = TrajectoryPacker(items, PackingConfig(token_budget=rows * 64, mode="mixed", rows=rows))
    model = tiny_llama(50, "sdpa")
    for positions in packer.plan(0):
        batch = packer.collate(positions)
        assert batch.num_tokens == rows * 64 and batch.rows == rows
        inputs = batch.model_inputs("block_mask", torch.bool)
        assert inputs["input_ids"].shape == (rows, 64) and inputs["attention_mask"].shape == (rows, 1, 64, 64)
        logits = model(**inputs).logits.flatten(0, 1)
        packed = per_trajectory_loss(logits, batch.labels, batch.segment_ids, batch.num_segments)
        alone = one_by_one(model, [items[i] for i in batch.trajectory_index.tolist()])
        torch.testing.assert_close(packed, alone)
        assert int(batch.num_counted.sum()) == int((batch.segment_ids >= 0).sum())


def test_rows_need_mixed_mode_and_fitting_trajectories():
    with pytest.raises(ValueError, match="rows > 1 needs mode='mixed'"):
        PackingConfig(token_budget=128, rows=2)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"longer than the row length 64 \(budget / rows\)"):
        TrajectoryPacker([fake(0, 65, rng)], PackingConfig(token_budget=128, rows=2, mode="mixed"))


def test_max_seqlen_counts_a_row_of_padding_only():
    """A batch in rows whose last row holds no trajectory: cu_seqlens lists that row as one sequence of
    the row length, so max_seqlen (handed to varlen attention) must cover it."""
    rng = np.random.default_rng(3)
    items = [fake(i, 10, rng, "a") for i in range(2)]  # 20 tokens: one row of 4 x 64 is enough
    packer = TrajectoryPacker(items, PackingConfig(token_budget=4 * 64, mode="mixed", rows=4))
    batch = packer.collate(packer.plan(0)[0])
    lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
    assert 64 in lengths, lengths  # the test needs a row of padding only
    assert batch.max_seqlen == max(lengths)


def test_a_repeated_epoch_summary_is_logged_once_at_info(caplog):
    """A one-source split (validation, all real) cycled for many epochs logs its summary once at INFO,
    the repeats at DEBUG; a summary that changes is logged again."""
    import logging

    rng = np.random.default_rng(3)
    packer = TrajectoryPacker([fake(i, 30, rng, "real") for i in range(8)], PackingConfig(token_budget=120),
                              name="validation")  # fmt: skip
    with caplog.at_level(logging.DEBUG, logger="boost.data.packing"):
        for epoch in range(5):
            packer.plan(epoch)
    info = [r for r in caplog.records if r.levelno == logging.INFO]
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(info) == 1 and "validation, epoch 0" in info[0].getMessage()
    assert len(debug) == 4
    packer.config = PackingConfig(token_budget=240)  # other batches: another summary, logged again
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="boost.data.packing"):
        packer.plan(5)
    assert [r.getMessage()[:19] for r in caplog.records] == ["validation, epoch 5"]
