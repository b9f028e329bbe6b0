"""LoRA through peft (boost/train/lora.py) on the tiny chat model: both hypergradient blocks end to
end, the refusal of block=head with a frozen head, the adapter in peft's format, bit-for-bit resume."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.kill_resume import make_assets
from boost.config import load_config
from boost.rollout.generation import load_model
from boost.train import TrainConfig, Trainer
from boost.train.checkpoint_io import ADAPTER_DIR, latest_checkpoint
from tests.test_train import _config, _metrics, saved_checkpoint

SEEDLESS = ("inner_seconds", "outer_seconds")
HEAD = ("lora.enabled=true", "lora.r=4", "lora.train_head=true")
TRAINABLE = ("lora.enabled=true", "lora.r=4", "block=trainable", "solver.method=identity")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("lora"))


def _frozen_weights_unchanged(trainer, base_path) -> bool:
    base, _ = load_model(str(base_path))
    ours = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
            for k, v in trainer.model.state_dict().items()}  # fmt: skip
    return all(torch.equal(ours[k], v) for k, v in base.state_dict().items() if not k.startswith("lm_head"))


def test_lora_with_a_trained_head_runs_block_head_and_saves_a_peft_adapter(assets, tmp_path):
    trainer = Trainer(_config(assets, tmp_path, "steps=3", *HEAD), progress=False)
    head_before = trainer.lm_head.weight.detach().clone()
    trainer.train()
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or "lm_head" in n for n in trained)
    assert not torch.equal(trainer.lm_head.weight, head_before)  # the head is trained (and its block)
    assert _frozen_weights_unchanged(trainer, assets[0])
    metrics = _metrics(tmp_path)
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(m["n_eff"] > 0 for m in metrics)
    # peft's own format: PeftModel.from_pretrained on the base model gives the trained model's logits
    from peft import PeftModel

    adapter = latest_checkpoint(tmp_path) / ADAPTER_DIR
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    base, _ = load_model(str(assets[0]))
    reloaded = PeftModel.from_pretrained(base, str(adapter)).eval()
    ids = torch.arange(1, 30)[None]
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(input_ids=ids).logits
        assert torch.equal(reloaded(input_ids=ids).logits, expected)
        # out_dir/model, for boost.rollout.evaluate: the adapters merged into a plain checkpoint (merging
        # rounds: close, not bitwise)
        merged, _ = load_model(str(tmp_path / "model"))
        assert not hasattr(merged, "peft_config")
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)


def test_lora_with_block_trainable_moves_the_adapters_and_the_reweighting_head(assets, tmp_path):
    trainer = Trainer(_config(assets, tmp_path, "steps=2", *TRAINABLE), progress=False)
    reweighting = [p.detach().clone() for p in trainer.head.parameters()]
    trainer.train()
    trained = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)  # the LM head stays frozen
    assert _frozen_weights_unchanged(trainer, assets[0])
    assert any(not torch.equal(a, b) for a, b in zip(reweighting, trainer.head.parameters()))
    assert all(m["n_eff"] > 0 for m in _metrics(tmp_path))


def test_block_head_with_a_frozen_lora_head_is_refused_naming_both_ways_out(assets, tmp_path):
    with pytest.raises(ValueError, match=r"lora.train_head=true .* or block=trainable"):
        load_config(TrainConfig, None, ["lora.enabled=true", "block=head"])


def test_lora_resumes_bit_for_bit_with_adapter_dropout(assets, tmp_path):
    run = (*HEAD, "lora.dropout=0.1", "steps=4", "checkpoint_every=2", "solver.steps=2")
    Trainer(_config(assets, tmp_path / "reference", *run), progress=False).train()
    Trainer(_config(assets, tmp_path / "run", *run[:-3], "steps=2", *run[-2:]), progress=False).train()
    Trainer(_config(assets, tmp_path / "run", *run), progress=False).train(resume=True)

    def rows(out):
        return [{k: v for k, v in m.items() if k not in SEEDLESS} for m in _metrics(out)]

    assert rows(tmp_path / "run") == rows(tmp_path / "reference")
    ours, ref = saved_checkpoint(tmp_path / "run"), saved_checkpoint(tmp_path / "reference")
    assert ours["step"] == 4 and set(ours["model"]) == set(ref["model"])
    assert all(torch.equal(ours["model"][k], ref["model"][k]) for k in ref["model"])
