"""``python -m boost.experiment analyse``: the analyses of finished runs read the committed records
and print what benchmarks/RESULTS.md recorded from them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from boost.analysis import read_pool_rows
from boost.experiment import main

LOWREAL = Path(__file__).resolve().parents[1] / "benchmarks" / "experiments" / "gridnav-lowreal"


def test_read_pool_rows_skips_blank_lines(tmp_path):
    path = tmp_path / "pool_weights.jsonl"
    rows = [
        {"source": "eps0.1", "weight": 0.5, "quality": 1.0, "key": "a"},
        {"source": "random", "weight": 0.0},
    ]
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    assert read_pool_rows(path) == rows


def test_ranking_reproduces_the_recorded_spearman_and_the_shift_blind_ceiling(capsys):
    files = [LOWREAL / "boost" / "seed4-pool_weights.jsonl", LOWREAL / "mwn" / "seed0-pool_weights.jsonl"]
    assert main(["analyse", "ranking", *map(str, files)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "Spearman(w, quality) +0.517" in lines[0]  # RESULTS: BOOST seed 4, 0.52
    assert "Spearman(w, quality) +0.216" in lines[1] and "eps0.1 +0.450" in lines[1]  # MWN seed 0
    assert lines[2].startswith("pool of 1500: ceiling") and lines[2].endswith("Spearman +0.422")


def test_ranking_refuses_files_of_another_pool(tmp_path, capsys):
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"key": "x", "source": "random", "quality": 0.0, "weight": 1.0}) + "\n")
    assert main(["analyse", "ranking", str(LOWREAL / "mwn" / "seed0-pool_weights.jsonl"), str(other)]) == 1
    assert "another pool" in capsys.readouterr().out


def test_analyse_needs_a_known_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["analyse", "nonsense"])
    assert exit_.value.code == 2
