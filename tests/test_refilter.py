"""Refiltering (``weighting.refilter_every``, boost/train/refilter.py): the head's weights choose the
training set every k steps, the loss weighs what it chose 1, and a resumed run continues bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import boost.train.loop as loop
from benchmarks.kill_resume import make_assets
from boost.data import PackingConfig, TrajectoryPacker
from boost.data.tokenize import TokenizedTrajectory
from boost.train import Trainer
from boost.train.config import WeightingConfig
from boost.train.refilter import choose, is_refilter_step, packer_for
from tests.test_train import _config, _metrics, saved_checkpoint

RUN = ("weighting.method=boost", "weighting.refilter_every=2", "steps=5", "solver.method=identity")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("refilter"))


def _pool(sources):
    items = [
        TokenizedTrajectory(np.array([1, 2, 3], dtype=np.int32), np.array([False, True, True]), index=10 + i,
                            source=s, reward=None, task_id=None, num_messages=2)
        for i, s in enumerate(sources)
    ]  # fmt: skip
    return TrajectoryPacker(items, PackingConfig(token_budget=64, seed=3))


def test_choose_keeps_every_real_trajectory_and_the_top_share_of_the_synthetic_ones():
    pool = _pool(["real", "a", "a", "b", "b", "real"])
    weights = {11: 0.1, 12: 0.9, 13: 0.5, 14: 0.2}  # by trajectory index; real ones need none
    chosen = choose(pool, weights, top_fraction=0.5, step=4)
    assert chosen.positions == [0, 2, 3, 5]
    assert chosen.kept == {"a": [1, 2], "b": [1, 2]}
    assert "training on 2 of 4 synthetic trajectories (a 1/2, b 1/2)" in chosen.note()
    with pytest.raises(ValueError, match="1 synthetic trajectories were not scored .*index 14"):
        choose(pool, {11: 0.1, 12: 0.9, 13: 0.5}, top_fraction=0.5, step=4)


def test_refilter_steps_and_the_refiltered_packer():
    assert [s for s in range(1, 11) if is_refilter_step(s, 3, outer_start=3, steps=9)] == [6]
    assert not any(is_refilter_step(s, 0, 0, 10) for s in range(1, 11))
    pool = _pool(["real", "a", "a", "b"])
    packer = packer_for(pool, [0, 2], step=6)
    assert [t.index for t in packer.trajectories] == [10, 12] and packer.config.seed != pool.config.seed
    assert packer_for(pool, [0, 2], step=8).config.seed != packer.config.seed
    with pytest.raises(ValueError, match="no trajectory left"):
        packer_for(pool, [], step=6)


def test_refilter_needs_a_learned_head():
    with pytest.raises(ValueError, match="weighting.method=uniform has neither"):
        WeightingConfig(method="uniform", refilter_every=5)
    with pytest.raises(ValueError, match=">= 0"):
        WeightingConfig(method="boost", refilter_every=-1)


def test_training_continues_on_the_refiltered_set_with_weight_one(assets, tmp_path, monkeypatch):
    seen, applied = [], []
    inner = Trainer.inner_step

    def spy(self, batch, micro=None):
        record, state = inner(self, batch, micro)
        seen.append((self.step + 1, set(batch.trajectory_index.tolist())))
        applied.append(state["w_local"])
        return record, state

    monkeypatch.setattr(Trainer, "inner_step", spy)
    trainer = Trainer(_config(assets, tmp_path, *RUN), progress=False)
    final = trainer.train()
    assert [r["step"] for r in final["refilters"]] == [2, 4]
    pool = trainer.data.train.trajectories
    synthetic = sum(t.source != "real" for t in pool)
    for record in final["refilters"]:
        kept = sum(k for k, _ in record["kept"].values())
        assert synthetic // 2 <= kept < synthetic  # the top half, ties kept
    chosen = {pool[p].index for p in trainer.refiltered.positions}
    assert all(indices <= chosen for step, indices in seen if step > 4)  # step 5 draws from step 4's set
    assert all(torch.equal(w, torch.ones_like(w)) for w in applied)
    assert [m["refilter"]["step"] for m in _metrics(tmp_path) if "refilter" in m] == [2, 4]
    assert "n_eff" in _metrics(tmp_path)[-1]  # the head still takes outer steps


def _rows(out):
    rows = []
    for m in _metrics(out):
        m = {k: v for k, v in m.items() if k not in ("inner_seconds", "outer_seconds")}
        if "refilter" in m:
            m["refilter"] = {k: v for k, v in m["refilter"].items() if k != "seconds"}
        rows.append(m)
    return rows


def test_a_refiltering_run_resumes_bit_for_bit(assets, tmp_path):
    Trainer(_config(assets, tmp_path / "reference", *RUN), progress=False).train()
    Trainer(_config(assets, tmp_path / "run", *RUN[:-2], "steps=3", RUN[-1]), progress=False).train()
    state = json.loads((tmp_path / "run" / "final.json").read_text())
    assert [r["step"] for r in state["refilters"]] == [2]
    final = Trainer(_config(assets, tmp_path / "run", *RUN), progress=False).train(resume=True)
    assert [r["step"] for r in final["refilters"]] == [2, 4]  # the one before the resume is kept
    assert _rows(tmp_path / "run") == _rows(tmp_path / "reference")
    ours, ref = saved_checkpoint(tmp_path / "run"), saved_checkpoint(tmp_path / "reference")
    assert all(torch.equal(ours["model"][k], ref["model"][k]) for k in ref["model"])


def test_the_cycle_restarts_on_the_refiltered_packer(assets, tmp_path, monkeypatch):
    names = []
    original = loop._cycle

    def cycle(packer, skip=0, collate=None):
        names.append((packer.name, skip))
        return original(packer, skip, collate)

    monkeypatch.setattr(loop, "_cycle", cycle)
    Trainer(_config(assets, tmp_path, *RUN), progress=False).train()
    train = [n for n in names if n[0].startswith("train")]
    assert train == [
        ("train", 0),
        ("train (refiltered after step 2)", 0),
        ("train (refiltered after step 4)", 0),
    ]
