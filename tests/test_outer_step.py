"""The outer step's cost settings (issue 10): the head block on the counted tokens only (exact), and the
validation batch's own token budget."""

from __future__ import annotations

import pytest
import torch

from boost.config import load_config
from boost.data.generate import main as generate
from boost.hypergradient import HeadBatch, head_hypergradient
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
    val_loss, hyper = trainer._head_block(batch, state, val)

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
