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


def test_interquartile_mean_and_probability_of_improvement_by_hand():
    from scipy.stats import trim_mean

    from boost.stats import interquartile_mean, probability_of_improvement, stratified_bootstrap_ci95

    for values in (
        [1, 2, 3, 4],
        [0.1, 0.9, 0.4, 0.3, 0.8, 0.2, 0.6, 0.5],
        [3, 1, 2, 5, 4, 7, 6, 9, 8, 0, 11, 10],
    ):
        assert interquartile_mean(values) == pytest.approx(trim_mean(values, 0.25))  # n divisible by 4
    assert interquartile_mean([1, 3, 5, 7, 100]) == pytest.approx((0.75 * 3 + 5 + 0.75 * 7) / 2.5)
    # stratum 1: 3 of 4 pairs won, stratum 2: a tie (1/2) and a win -> (0.75 + 0.75) / 2
    assert probability_of_improvement([[2, 3], [1.0]], [[1, 2.5], [1.0, 0.0]]) == pytest.approx(0.75)
    lo, hi = stratified_bootstrap_ci95([[[0.5, 0.6, 0.7]]], lambda s: sum(s[0]) / 3)
    assert 0.5 <= lo <= 0.6 <= hi <= 0.7
    assert stratified_bootstrap_ci95([[[0.4, 0.4]]], lambda s: min(s[0])) == (0.4, 0.4)


def test_aggregate_over_grids_reads_their_results_and_needs_one_reference(tmp_path, capsys):
    def grid(name, reference, runs):
        folder = tmp_path / name
        folder.mkdir()
        results = {"spec": {"reference": reference},
                   "runs": {a: {str(s): {"success_rate": v} for s, v in enumerate(vs)} for a, vs in runs.items()}}  # fmt: skip
        (folder / "results.json").write_text(json.dumps(results))
        return str(folder)

    a = grid("a", "ours", {"ours": [0.6, 0.7, 0.8], "base": [0.4, 0.5, 0.6], "only_a": [0.1]})
    b = grid("b", "ours", {"ours": [0.5, 0.5], "base": [0.5, 0.2]})
    assert main(["analyse", "aggregate", a, b]) == 0
    out = capsys.readouterr().out
    assert "| ours | 3/2 |" in out and "only_a" not in out
    # a: 8 of 9 pairs won + 1 tie -> 8.5/9; b: (0.5 + 1 + 0.5 + 1) / 4 = 0.75
    assert "| base | 3/2 | " in out and f"{(8.5 / 9 + 0.75) / 2:.2f} [" in out
    c = grid("c", "base", {"ours": [0.1], "base": [0.2]})
    assert main(["analyse", "aggregate", a, c]) == 1
    assert "different or no reference" in capsys.readouterr().out
