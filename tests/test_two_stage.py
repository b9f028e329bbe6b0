"""Two-stage BOOST in one command (``weighting.head_steps``, boost/train/two_stage.py): the same as a
short learned-head run followed by a ``weight_filter`` run on its weights, in one folder, with the
head phase's compute recorded and a cut-off run resumable."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from benchmarks.kill_resume import make_assets
from boost.train import Trainer
from boost.train.cli import main as cli_main
from boost.train.config import WeightingConfig
from boost.train.two_stage import TwoStageRun
from tests.test_train import _config

RUN = ("weighting.method=boost", "solver.method=identity", "weighting.head_steps=2", "steps=3")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("two_stage"))


def _weights(path):
    return {row["key"]: row["weight"] for row in map(json.loads, path.read_text().splitlines())}


def test_head_steps_needs_a_learned_head_and_one_process(assets, tmp_path):
    with pytest.raises(ValueError, match="goes with weighting.method=boost or per_source or mwn"):
        WeightingConfig(method="uniform", head_steps=5)
    with pytest.raises(ValueError, match="refilter_every=0"):
        WeightingConfig(method="boost", head_steps=5, refilter_every=2)
    with pytest.raises(ValueError, match="head_steps must be >= 0"):
        WeightingConfig(method="boost", head_steps=-1)
    WeightingConfig(method="boost", head_steps=5, return_gate="real_min")  # the gate is for the second phase
    with pytest.raises(ValueError, match="or with weighting.head_steps > 0"):
        WeightingConfig(method="boost", return_gate="real_min")
    with pytest.raises(ValueError, match="head_steps is not supported with parallel=ddp"):
        _config(assets, tmp_path, *RUN, "parallel=ddp")


def test_two_stage_equals_a_short_head_run_then_a_filtered_run(assets, tmp_path):
    trainer, final = TwoStageRun(
        _config(assets, tmp_path / "one", *RUN, "weighting.return_gate=real_min")
    ).train()
    head = tmp_path / "one" / "head"
    assert trainer.method == "weight_filter" and final["step"] == 3
    assert final["head_phase"]["steps"] == 2 and final["head_phase"]["seconds"] > 0
    assert json.loads((tmp_path / "one" / "final.json").read_text())["head_phase"] == final["head_phase"]
    assert json.loads((head / "final.json").read_text())["step"] == 2

    # by hand: the learned head for 2 steps, then weight_filter on its weights behind the same gate
    by_hand = tmp_path / "hand"
    Trainer(_config(assets, by_hand / "head", "weighting.method=boost", "solver.method=identity", "steps=2"),
            progress=False).train()  # fmt: skip
    weights = by_hand / "head" / "pool_weights.jsonl"
    assert _weights(weights) == _weights(head / "pool_weights.jsonl")
    second = _config(assets, by_hand / "filtered", "weighting.method=weight_filter", f"weighting.weights_path={weights}",
                     "weighting.return_gate=real_min", "steps=3")  # fmt: skip
    expected = Trainer(second, progress=False).train()
    assert final["validation_loss"] == expected["validation_loss"]
    assert final["test_loss"] == expected["test_loss"]
    assert trainer.data.summary == Trainer(second, progress=False).data.summary  # the same kept set


def test_resume_reuses_a_finished_head_phase(assets, tmp_path, monkeypatch):
    cfg = _config(assets, tmp_path, *RUN, "checkpoint_every=1")
    _, first = TwoStageRun(cfg, progress=False).train()
    for name in ("final.json", "metrics.jsonl", "checkpoints", "model"):  # cut off in the filtered phase
        target = tmp_path / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    calls = []
    original = Trainer.train

    def spy(self, *args, **kwargs):
        calls.append(self.cfg.weighting.method)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train", spy)
    _, again = TwoStageRun(cfg, progress=False).train(resume=True)
    assert calls == ["weight_filter"]  # the head phase was not run again
    assert again["validation_loss"] == first["validation_loss"]
    assert again["head_phase"]["seconds"] == first["head_phase"]["seconds"]


def test_the_command_line_runs_both_phases(assets, tmp_path, capsys):
    model, data = assets
    code = cli_main([f"data.path={data}", f"model.name={model}", f"out_dir={tmp_path}", "data.token_budget=1024",
                     "data.max_length=512", "eval.episodes=0", *RUN, "--quiet"])  # fmt: skip
    assert code == 0
    final = json.loads((tmp_path / "final.json").read_text())
    assert final["method"] == "weight_filter" and final["head_phase"]["method"] == "boost"
    assert (tmp_path / "head" / "pool_weights.jsonl").exists() and (tmp_path / "report.md").exists()
    assert torch.isfinite(torch.tensor(final["validation_loss"]))
