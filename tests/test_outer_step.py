"""The outer step (issue 10): the head block on the counted tokens only (exact), the validation batch's
own token budget, and the head's default source feature."""

from __future__ import annotations

import pytest
import torch

from boost.bilevel.hypergradient import HeadBatch, head_hypergradient
from boost.bilevel.reweighting import HeadConfig, ReweightingHead, outer_objective
from boost.config import load_config
from boost.generate import main as generate
from boost.train import TrainConfig, Trainer
from boost.train.config import DataConfig
from boost.train.loop import _cycle
from tests.envs.tiny_chat_lm import save_tiny_chat_model


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("outer")
    model = save_tiny_chat_model(root / "model")
    data = root / "data.jsonl"
    assert generate(["--env", "gridnav", "--out", str(data), "--sources", "real:40,random:16,eps0.3:16"]) == 0
    return model, data


def _trainer(assets, out, *overrides) -> Trainer:
    model, data = assets
    base = [f"data.path={data}", f"model.name={model}", f"out_dir={out}", "data.token_budget=2048",
            "data.rows=4", "data.max_length=512", "steps=2", "eval.episodes=0"]  # fmt: skip
    return Trainer(load_config(TrainConfig, None, [*base, *overrides]), progress=False)


def test_the_head_block_on_the_counted_tokens_equals_the_whole_batch(assets, tmp_path):
    """Dropping the tokens that do not count (most of a packed batch) changes no number of the outer
    step: validation gradient, CG solve and scores, against the same computation on every token."""
    trainer = _trainer(assets, tmp_path)
    batch, val = next(_cycle(trainer.data.train)), next(_cycle(trainer.data.validation))
    assert int((batch.segment_ids >= 0).sum()) < batch.num_tokens // 2  # the compaction does something
    _, state = trainer.inner_step(batch)
    val_loss, hyper = trainer.outer.head_block(batch, state, val)

    W = trainer.lm_head.weight.detach().requires_grad_()
    with torch.no_grad():
        val_hidden = trainer.hidden_states(val)
    full_val = trainer.losses(val_hidden, val, W)
    (g,) = torch.autograd.grad(full_val.loss, W)
    train = HeadBatch(state["hidden"], batch.labels, batch.segment_ids, batch.num_segments)
    w = state["w"].detach().float()
    expected = head_hypergradient(train, state["pre_step"][0], w, g, trainer.cfg.solver)
    assert torch.allclose(val_loss, full_val.loss.detach(), rtol=1e-5)
    assert torch.allclose(hyper.traj_weights, expected.traj_weights, rtol=1e-4, atol=1e-9)
    assert hyper.residual == pytest.approx(expected.residual, rel=1e-3)


def test_validation_batches_take_their_own_token_budget(assets, tmp_path):
    """data.validation_token_budget: whole rows of the training row length; 0 (the default) a quarter of
    the training budget rounded up to whole rows. Training batches keep theirs."""
    cfg = DataConfig(token_budget=6144, rows=8, max_length=768)
    assert cfg.validation_packing() == (1536, 2)  # the CPU preset's outer step
    assert DataConfig(token_budget=2048, max_length=1024).validation_packing() == (2048, 1)  # one row: as is
    explicit = DataConfig(token_budget=6144, rows=8, max_length=768, validation_token_budget=6144)
    assert explicit.validation_packing() == (6144, 8)
    with pytest.raises(ValueError, match="multiple of the row length"):
        DataConfig(token_budget=6144, rows=8, max_length=768, validation_token_budget=1000)

    trainer = _trainer(assets, tmp_path, "data.validation_token_budget=1024")
    for b in trainer.data.validation.batches(0):
        assert b.num_tokens <= 1024 and b.rows == 2
    assert max(b.num_tokens for b in trainer.data.train.batches(0)) > 1024  # 4 rows of 512
    full = _trainer(assets, tmp_path / "full", "data.validation_token_budget=2048")
    # the validation loss of a run (the mean over every validation trajectory) does not depend on it
    assert trainer.evaluate(trainer.data.validation) == pytest.approx(
        full.evaluate(full.data.validation), rel=1e-5
    )


def test_the_trainer_head_sees_each_trajectorys_source_by_default(assets, tmp_path):
    """Issue 10: on gridnav the per-trajectory hypergradient is noisy and the source explains much of it;
    without the source the head's weights stayed within ~6% of uniform (Spearman with quality -0.20),
    with it +0.26 (one seed, benchmarks/RESULTS.md). Default: one embedding per training source."""
    trainer = _trainer(assets, tmp_path)
    assert trainer.cfg.head.num_sources == len(trainer.data.sources) == 3 and trainer.head.source is not None
    batch = next(b for b in _cycle(trainer.data.train) if bool((~b.is_real).any()))
    val = next(_cycle(trainer.data.validation))
    before = trainer.head.source.weight.detach().clone()
    for _ in range(2):  # the score's last layer starts at 0: the embedding gets a gradient from step 2
        _, state = trainer.inner_step(batch)
        trainer.outer_step(batch, state, val)
    assert not torch.equal(before, trainer.head.source.weight)  # the outer steps train the embedding
    off = _trainer(assets, tmp_path / "off", "head.num_sources=0")
    assert off.head.source is None
    with pytest.raises(ValueError, match="auto"):
        ReweightingHead(4, HeadConfig(num_sources=-1))


def test_a_one_trajectory_validation_batch_leaves_the_task_shift_reference_usable():
    """A small validation batch can hold a single trajectory (no spread): it must not set the reference's
    scale to 0 (the next task-shift distance would divide by it); the term waits for a real reference."""
    head = ReweightingHead(2, HeadConfig())
    head.update_reference(torch.tensor([[1.0, 0.0]]))
    assert float(head.reference_scale) == 0.0
    f_pooled = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    synthetic = torch.tensor([False, True])
    w = torch.ones(2, requires_grad=True)

    assert (
        float(outer_objective(head, w, torch.zeros(2), synthetic, pooled=f_pooled).task_shift.detach()) == 0.0
    )
    head.update_reference(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    head.update_reference(torch.tensor([[5.0, 5.0]]))  # moves the mean, keeps the scale
    assert float(head.reference_scale) == pytest.approx(1.0)
    assert float(outer_objective(head, w, torch.zeros(2), synthetic, pooled=f_pooled).task_shift.detach()) > 0
