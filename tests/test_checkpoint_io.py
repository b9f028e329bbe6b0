"""Checkpoint folders (boost/train/checkpoint_io.py): safetensors, no pickle loaded, the newest N kept."""

from __future__ import annotations

import pytest
import torch

from benchmarks.kill_resume import make_assets
from boost.train import Trainer
from boost.train.checkpoint_io import OPTIMIZER_FILE, CheckpointError, checkpoint_dirs, latest_checkpoint
from tests.test_train import _config, saved_checkpoint


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("checkpoint_io"))


class _Payload:
    """Unpickling this runs code: what a tampered checkpoint would smuggle in."""

    def __reduce__(self):
        return (exec, ("raise SystemExit('the payload ran')",))


def test_checkpoints_are_safetensors_folders_and_the_newest_n_stay(assets, tmp_path):
    Trainer(
        _config(assets, tmp_path, "steps=4", "checkpoint_every=1", "keep_checkpoints=2"), progress=False
    ).train()
    folders = checkpoint_dirs(tmp_path)
    assert [p.name for p in folders] == ["step-00000003", "step-00000004"]
    names = sorted(p.name for p in folders[-1].iterdir())
    assert names == ["head.safetensors", "model.safetensors", "optimizer.pt", "state.safetensors",
                     "trainer_state.json"]  # fmt: skip
    state = saved_checkpoint(tmp_path)
    assert state["step"] == 4 and state["data_position"] == {"train_batches": 4, "validation_batches": 4}
    assert state["tensors"] == ["last_v"]  # CG's warm start travels with the checkpoint
    # the optimiser file is plain data: it loads with weights_only=True
    assert set(torch.load(folders[-1] / OPTIMIZER_FILE, weights_only=True)) == {"model", "head"}


def test_a_pickle_payload_in_the_optimiser_file_is_refused_on_resume(assets, tmp_path):
    Trainer(_config(assets, tmp_path, "steps=2"), progress=False).train()
    optimizer = latest_checkpoint(tmp_path) / OPTIMIZER_FILE
    state = torch.load(optimizer, weights_only=True)
    state["model"]["payload"] = _Payload()
    torch.save(state, optimizer)
    with pytest.raises(CheckpointError, match=r"optimizer.pt: refused.*never load pickled objects"):
        Trainer(_config(assets, tmp_path, "steps=3"), progress=False).train(resume=True)


def test_a_pickled_checkpoint_of_an_older_boost_is_never_loaded(assets, tmp_path):
    Trainer(_config(assets, tmp_path, "steps=1"), progress=False).train()
    for folder in checkpoint_dirs(tmp_path):
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    torch.save({"step": 1, "payload": _Payload()}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"checkpoint.pt: a pickled checkpoint .* never loaded"):
        Trainer(_config(assets, tmp_path, "steps=2"), progress=False).train(resume=True)
