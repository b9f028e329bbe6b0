"""What ``python -m boost.train`` prints: one-line errors without a usage banner, quiet output by
default (``--verbose`` brings transformers' bars and every packing summary back), and a warning when
a CPU-preset run has too few steps to beat the random policy."""

from __future__ import annotations

import logging

import numpy as np
import pytest

import boost.train.cli as cli
from boost.data.packing import PackingConfig, TrajectoryPacker
from boost.train.__main__ import main
from boost.train.preset import MIN_PRESET_STEPS, budget_warning
from tests.data.test_packing import fake


class _Stop(Exception):
    pass


@pytest.fixture
def no_training(monkeypatch, tmp_path):
    """The CLI up to building the run (the trainer), which stops it: ``seen["run"]`` is called in its place."""
    monkeypatch.chdir(tmp_path)
    seen = {"run": lambda: None}

    def trainer(cfg, progress):
        seen["result"] = seen["run"]()
        raise _Stop

    monkeypatch.setattr(cli, "build_run", trainer)  # where the CLI builds its run
    monkeypatch.setattr(cli, "ensure_default_data", lambda *a, **k: False)
    return seen


@pytest.mark.parametrize(
    "argv, message",
    [
        (["stepz=3"], "unknown key 'stepz' for TrainConfig"),
        (["--config", "no/such.yaml"], "no/such.yaml: no such config file"),
        (["reweight=false"], "reweight=false is gone: use weighting.method=uniform"),
    ],
)
def test_an_error_is_one_line_without_the_usage_banner(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err
    assert err.count("\n") == 1 and "usage:" not in err, err
    assert err.startswith("python -m boost.train: error: ") and "--help" in err


def test_too_few_preset_steps_are_warned_about(no_training, caplog):
    caplog.set_level(logging.WARNING)
    with pytest.raises(_Stop):
        main(["--preset", "cpu", "steps=60"])
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "steps=60 is fewer than the 300 of the shortest CPU-preset run on record" in warning
    caplog.clear()
    with pytest.raises(_Stop):
        main(["--preset", "cpu", f"steps={MIN_PRESET_STEPS}"])
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_the_budget_warning_is_for_the_cpu_preset_only():
    assert budget_warning("cpu", MIN_PRESET_STEPS - 1) and not budget_warning("cpu", MIN_PRESET_STEPS)
    assert budget_warning("smollm2", 10) is None  # no record to go by


def _packing_lines(caplog) -> list[str]:
    packer = TrajectoryPacker(
        [fake(i, 30, np.random.default_rng(i), "real" if i % 2 else "eps") for i in range(12)],
        PackingConfig(token_budget=120),
        name="train",
    )
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="boost.data.packing"):  # a repeated summary is DEBUG
        for epoch in range(3):
            packer.plan(epoch)
    return [r.getMessage()[:14] for r in caplog.records]


def test_output_is_quiet_by_default_and_verbose_brings_it_back(no_training, caplog):
    from transformers.utils import logging as hf_logging

    no_training["run"] = lambda: (hf_logging.is_progress_bar_enabled(), _packing_lines(caplog))
    bars_before = hf_logging.is_progress_bar_enabled()
    with pytest.raises(_Stop):
        main(["--preset", "cpu"])
    # no "Loading weights" / "Writing model shards" bars, and not the same packing block every epoch
    assert no_training["result"] == (False, ["train, epoch 0"])
    with pytest.raises(_Stop):
        main(["--preset", "cpu", "--verbose"])
    assert no_training["result"] == (True, ["train, epoch 0", "train, epoch 1", "train, epoch 2"])
    # the process is left as it was (a caller's, or the next test's, logging is not changed)
    assert hf_logging.is_progress_bar_enabled() == bars_before
    assert _packing_lines(caplog) == ["train, epoch 0", "train, epoch 1", "train, epoch 2"]
