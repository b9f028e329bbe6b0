"""``python -m boost.train --help`` lists every setting with its default and a one-line meaning,
generated from the config dataclasses (boost/train/settings_help.py)."""

from __future__ import annotations

import dataclasses

import pytest

from boost.train.__main__ import main
from boost.train.config import TrainConfig
from boost.train.settings_help import settings_lines


def _leaf_keys(config, prefix=""):
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaf_keys(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def test_help_lists_every_setting_with_its_default_and_a_meaning(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    text = capsys.readouterr().out
    assert exit_.value.code == 0 and "``" not in text
    assert "examples:\n    python -m boost.train\n" in text
    rows = dict(settings_lines(TrainConfig()))
    keys = list(_leaf_keys(TrainConfig()))
    assert [row.split("=")[0] for row in rows] == keys
    missing = [key for key, meaning in rows.items() if not meaning]
    assert missing == [], f"settings without a comment in their dataclass: {missing}"
    for key, meaning in rows.items():
        assert f"  {key}" in text and meaning in text
    assert "  solver.damping=0.001  " in text and "  lora.target_modules=all-linear  " in text
