"""Gradient accumulation (``grad_accum``, boost/train/accumulation.py): k packed micro-batches make the
step one step on their union makes (losses, weights, outer step, parameters), and resume stays exact."""

from __future__ import annotations

import pytest
import torch

import boost.bilevel.outer as outer
import boost.train.loop as loop
from benchmarks.kill_resume import make_assets
from boost.data import PackingConfig, TrajectoryPacker
from boost.train import Trainer
from boost.train.accumulation import concat_batches, segment_slices
from tests.test_train import _config, _metrics, saved_checkpoint

SEEDLESS = ("inner_seconds", "outer_seconds")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("accumulation"))


def _unions_of(k: int, monkeypatch) -> None:
    """Make the trainer's training stream yield the union of every k consecutive batches."""
    original = loop._cycle

    def cycle(packer, skip=0, collate=None):
        stream = original(packer, skip * k if packer.name == "train" else skip, collate)
        if packer.name != "train":
            return stream
        return (concat_batches([first, *(next(stream) for _ in range(k - 1))]) for first in stream)

    monkeypatch.setattr(loop, "_cycle", cycle)


def _rows(out):
    return [{k: v for k, v in m.items() if k not in SEEDLESS} for m in _metrics(out)]


def _close(a, b, path="") -> None:
    """Equal structure, numbers equal to float tolerance."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6), path
    else:
        assert a == b, path


def _recording_hypergradients(monkeypatch) -> list[torch.Tensor]:
    """The hypergradient dL_out/dw_i [S] each outer step hands the head."""
    seen, original = [], outer.outer_objective

    def outer_objective(head, weights, hypergradient, *args, **kwargs):
        seen.append(hypergradient.detach().clone())
        return original(head, weights, hypergradient, *args, **kwargs)

    monkeypatch.setattr(outer, "outer_objective", outer_objective)
    return seen


@pytest.mark.parametrize(
    "method", [("weighting.method=uniform",), ("solver.steps=3",), ("block=trainable", "solver.method=identity")],
    ids=["uniform", "boost", "boost-trainable"],
)  # fmt: skip
def test_two_micro_batches_make_the_step_of_their_union(assets, tmp_path, monkeypatch, method):
    run = (*method, "steps=3", "checkpoint_every=0")
    with monkeypatch.context() as patch:
        ours_h = _recording_hypergradients(patch)
        accumulated = Trainer(_config(assets, tmp_path / "accumulated", *run, "grad_accum=2"), progress=False)
        accumulated.train()
    with monkeypatch.context() as patch:
        theirs_h = _recording_hypergradients(patch)
        _unions_of(2, patch)
        union = Trainer(_config(assets, tmp_path / "union", *run), progress=False)
        union.train()
    ours, theirs = _rows(tmp_path / "accumulated"), _rows(tmp_path / "union")
    assert len(ours) == len(theirs) == 3
    for a, b in zip(ours, theirs):  # losses, validation losses, n_eff, mass, weights per source
        _close(a, b)
    # twice the trajectories of a plain step: the micro-batches really were accumulated
    assert ours[0]["trajectories"] == sum(b.num_segments for b in _first_two(accumulated))
    for name, param in accumulated.model.named_parameters():
        torch.testing.assert_close(param, dict(union.model.named_parameters())[name], rtol=1e-4, atol=1e-6)
    # The outer step: the same scores for every trajectory of both micro-batches. (Not the head's
    # parameters: Adam turns the float noise of a zero gradient, like that of the last bias under
    # the batch-mean normaliser, into a full ±lr step.)
    assert len(ours_h) == len(theirs_h) == (0 if "weighting.method=uniform" in method else 3)
    # block=trainable: central differences of float32 losses (fd_step 1e-2) carry ~1e-4 of noise
    tol = 1e-3 if "block=trainable" in method else 1e-4
    for a, b, row in zip(ours_h, theirs_h, ours):
        assert a.shape == b.shape == (row["trajectories"],)
        torch.testing.assert_close(a, b, rtol=0, atol=tol * float(b.abs().max()))


def _first_two(trainer):
    stream = loop._cycle(trainer.data.train)
    return [next(stream), next(stream)]


def test_an_accumulated_run_resumes_bit_for_bit(assets, tmp_path):
    run = ("grad_accum=2", "steps=4", "checkpoint_every=2", "solver.steps=2")
    Trainer(_config(assets, tmp_path / "reference", *run), progress=False).train()
    Trainer(_config(assets, tmp_path / "run", *run[:1], "steps=2", *run[2:]), progress=False).train()
    Trainer(_config(assets, tmp_path / "run", *run), progress=False).train(resume=True)
    assert _rows(tmp_path / "run") == _rows(tmp_path / "reference")
    ours, ref = saved_checkpoint(tmp_path / "run"), saved_checkpoint(tmp_path / "reference")
    assert ours["step"] == 4 and set(ours["model"]) == set(ref["model"])
    assert all(torch.equal(ours["model"][k], ref["model"][k]) for k in ref["model"])


def test_concat_batches_shifts_segments_and_sequences(bpe_free_batches):
    first, second = bpe_free_batches
    union = concat_batches([first, second])
    assert union.num_tokens == first.num_tokens + second.num_tokens
    assert union.num_segments == first.num_segments + second.num_segments
    assert torch.equal(
        union.cu_seqlens, torch.cat([first.cu_seqlens, second.cu_seqlens[1:] + first.num_tokens])
    )
    counted = second.segment_ids >= 0
    assert torch.equal(
        union.segment_ids[first.num_tokens :][counted], second.segment_ids[counted] + first.num_segments
    )
    assert segment_slices([first, second]) == [
        slice(0, first.num_segments),
        slice(first.num_segments, union.num_segments),
    ]
    assert union.rows == 1 and concat_batches([first]) is first


@pytest.fixture
def bpe_free_batches():
    """Two packed batches of three made-up trajectories each (token ids only matter as data)."""
    import numpy as np

    from boost.data.tokenize import TokenizedTrajectory

    def item(i, n):
        ids = np.arange(n, dtype=np.int32) + i
        agent = np.arange(n) % 2 == 1
        return TokenizedTrajectory(index=i, input_ids=ids, agent_mask=agent, source="real" if i % 2 else "x",
                                   task_id=str(i), reward=None, num_messages=2)  # fmt: skip

    items = [item(i, 5 + i) for i in range(6)]
    packer = TrajectoryPacker(items, PackingConfig(token_budget=64))
    return packer.collate([0, 1, 2]), packer.collate([3, 4, 5])
