"""The model's learning-rate schedule (boost/train/schedule.py): its shape, the rates the trainer
uses, resume across a schedule, and the refusal of a resume that would change its horizon."""

from __future__ import annotations

import math

import pytest

from benchmarks.kill_resume import make_assets
from boost.train import Trainer
from boost.train.schedule import lr_factor
from tests.test_train import _config, _metrics

SEEDLESS = ("inner_seconds", "outer_seconds")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("schedule"))


def test_warmup_then_cosine_or_linear_decay_to_the_floor():
    def f(t, kind):
        return lr_factor(t, schedule=kind, warmup=2, total=6, min_ratio=0.1)

    assert [f(t, "cosine") for t in (0, 1)] == [0.5, 1.0]
    assert (
        f(2, "cosine") == 1.0
        and f(6, "cosine") == pytest.approx(0.1)
        and f(9, "cosine") == pytest.approx(0.1)
    )
    assert f(4, "cosine") == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 2)) / 2)
    assert f(4, "linear") == pytest.approx(0.55) and f(5, "constant") == 1.0


def test_the_trainer_steps_with_the_scheduled_rates_and_resumes_them_exactly(assets, tmp_path):
    run = (
        "optim.schedule=cosine",
        "optim.warmup_steps=2",
        "optim.lr=1e-3",
        "steps=5",
        "solver.method=identity",
    )
    Trainer(_config(assets, tmp_path / "reference", *run), progress=False).train()
    rates = [m["lr"] for m in _metrics(tmp_path / "reference")]
    expected = [1e-3 * lr_factor(t, schedule="cosine", warmup=2, total=5, min_ratio=0) for t in range(5)]
    assert rates == pytest.approx(expected) and rates[0] < rates[1] > rates[4]
    # a run stopped at step 3 and resumed with a longer steps (its horizon fixed) continues the same rates
    Trainer(_config(assets, tmp_path / "run", *run[:-2], "steps=3", "optim.schedule_steps=5", run[-1]),
            progress=False).train()  # fmt: skip
    with pytest.raises(ValueError, match=r"horizon of 5 steps .* optim.schedule_steps=5"):
        Trainer(_config(assets, tmp_path / "run", *run[:-2], "steps=6", run[-1]), progress=False).train(
            resume=True
        )
    Trainer(_config(assets, tmp_path / "run", *run), progress=False).train(resume=True)

    def rows(out):
        return [{k: v for k, v in m.items() if k not in SEEDLESS} for m in _metrics(out)]

    assert rows(tmp_path / "run") == rows(tmp_path / "reference")


def test_the_head_follows_the_schedule_only_when_asked(assets, tmp_path):
    run = ("optim.schedule=linear", "optim.min_lr_ratio=0.5", "steps=2", "solver.method=identity")
    last = lr_factor(1, schedule="linear", warmup=0, total=2, min_ratio=0.5)
    for head, expected in (("false", 1e-2), ("true", 1e-2 * last)):
        trainer = Trainer(
            _config(assets, tmp_path / head, *run, f"optim.schedule_head={head}"), progress=False
        )
        trainer.train()
        assert trainer.head_opt.param_groups[0]["lr"] == pytest.approx(expected)
    assert last == pytest.approx(0.75)
