"""TensorBoard event files beside metrics.jsonl (boost/train/tensorboard_log.py), read back with
tensorboard's own event reader; a resumed run purges the points after its checkpoint."""

from __future__ import annotations

import shutil

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from benchmarks.kill_resume import make_assets
from boost.train import Trainer
from tests.test_train import _config, _metrics


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("tensorboard"))


def _scalars(out) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_holds_every_logged_number_of_metrics_jsonl(assets, tmp_path):
    Trainer(_config(assets, tmp_path, "steps=3"), progress=False).train()
    scalars, rows = _scalars(tmp_path), _metrics(tmp_path)
    for key, tag in (("loss", "train/loss"), ("val_loss", "outer/val_loss"), ("n_eff", "outer/n_eff"),
                     ("mass", "outer/mass"), ("inner_seconds", "time/inner_seconds"),
                     ("outer_seconds", "time/outer_seconds")):  # fmt: skip
        assert scalars[tag] == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in rows], tag
    for source in ("real", "corrupt", "eps0.3"):  # a source's mean weight on the steps it was in the batch
        expected = [(r["step"], pytest.approx(r["weights"][source]["mean"], rel=1e-6)) for r in rows
                    if source in r["weights"]]  # fmt: skip
        assert expected and scalars[f"weight/{source}"] == expected, source
    speed = [r["tokens"] / (r["inner_seconds"] + r["outer_seconds"]) for r in rows]
    assert scalars["train/tokens_per_second"] == [
        (s, pytest.approx(v, rel=1e-5)) for s, v in zip([1, 2, 3], speed)
    ]


def test_a_resumed_run_purges_the_points_after_its_checkpoint(assets, tmp_path):
    run = ("steps=4", "checkpoint_every=2", "weighting.method=uniform")
    Trainer(_config(assets, tmp_path, *run), progress=False).train()
    shutil.rmtree(tmp_path / "checkpoints" / "step-00000004")  # as if killed before saving step 4
    Trainer(_config(assets, tmp_path, *run), progress=False).train(resume=True)
    losses = _scalars(tmp_path)["train/loss"]
    assert losses == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in _metrics(tmp_path)]
    assert [s for s, _ in losses] == [1, 2, 3, 4]  # steps 3 and 4 once each
