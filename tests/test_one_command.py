"""``python -m boost.train`` with no arguments: the CPU preset, its data generated when missing, task
success on held-out tasks printed next to the random policy's and written into report.md."""

from __future__ import annotations

import dataclasses

import pytest

import boost.train.cli as cli
from boost.config import load_config
from boost.train.__main__ import main
from boost.train.config import TrainConfig
from boost.train.preset import DEFAULT_DATA, DEFAULT_OUT, GENERATE_ARGS, preset_overrides

TINY = ["model.hidden_size=32", "model.layers=1", "model.heads=2", "steps=2", "eval.episodes=3",
        "eval.max_new_tokens=2", "log_every=1"]  # fmt: skip


def test_the_preset_is_configs_cpu_preset_yaml_with_its_own_paths():
    preset = load_config(TrainConfig, None, preset_overrides())
    committed = load_config(TrainConfig, "configs/cpu_preset.yaml")
    paths = {"data": dataclasses.replace(committed.data, path=DEFAULT_DATA), "out_dir": DEFAULT_OUT}
    assert preset == dataclasses.replace(committed, **paths)


class _Stop(Exception):
    pass


def test_no_arguments_generate_the_data_and_train_the_preset(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    seen = {}

    def trainer(cfg, progress):  # stands in for the 5-minute run: what would it have trained?
        seen["cfg"] = cfg
        raise _Stop

    monkeypatch.setattr(cli, "build_run", trainer)  # where the CLI builds its run
    with pytest.raises(_Stop):
        main([])
    assert seen["cfg"] == load_config(TrainConfig, None, preset_overrides())
    out = capsys.readouterr().out
    assert "no settings given: the one-command default, the CPU preset" in out
    command = "python -m boost.generate " + " ".join(GENERATE_ARGS)
    assert f"{DEFAULT_DATA} is missing; generating it: {command}\n" in out
    assert (tmp_path / DEFAULT_DATA).stat().st_size > 0
    with pytest.raises(_Stop):  # the data are there now: not generated again
        main(["--quiet"])
    assert "generating it" not in capsys.readouterr().out


def test_the_preset_end_to_end_prints_task_success_and_writes_the_report(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--preset", "cpu", "--quiet", *TINY]) == 0
    out = capsys.readouterr().out
    assert "generating it: python -m boost.generate" in out  # the default data path: generated
    assert "held-out task success: " in out and "on 3 test tasks of gridnav-compact; the random policy" in out
    report = (tmp_path / DEFAULT_OUT / "report.md").read_text()
    assert "Held-out task success: " in report and "the random policy on the same tasks" in report
    assert (tmp_path / DEFAULT_OUT / "training.png").exists() or "install matplotlib" in report


def test_a_config_and_the_preset_are_exclusive(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--preset", "cpu", "--config", "configs/cpu_preset.yaml"])
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
