"""BOOST end to end on the toy head (boost/toy.py): the reweighting head, trained by head-block
hypergradients, must downweight corrupted synthetic trajectories of batches it has not seen yet and
beat uniform weighting on held-out real data; the CLI writes its report."""

from __future__ import annotations

import json

from boost import toy
from tests.kernels.cases import fresh_seed


def test_boost_downweights_corrupted_trajectories_of_unseen_batches_and_beats_uniform():
    seed = fresh_seed()
    cfg = toy.ToyConfig(seed=seed)
    boost, uniform = toy.run_arm(cfg, "boost"), toy.run_arm(cfg, "uniform")
    # each round's weights are the head's output on that round's fresh batch, before its outer step;
    # over 25 seeds: clean / corrupted >= 171 and BOOST below uniform every time
    last = boost["history"][-1]
    assert last["weight_clean"] > 2.0 * last["weight_corrupted"], f"{last}: seed={seed}"
    assert boost["history"][0]["weight_clean"] == boost["history"][0]["weight_corrupted"] == 1.0
    assert boost["test_loss"] < uniform["test_loss"], f"seed={seed}"


def test_cli_writes_the_report_history_and_plot(tmp_path):
    assert toy.main(["--out", str(tmp_path), "--rounds", "3", "--arms", "boost", "uniform"]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "| boost |" in report and "| uniform |" in report and "weights.png" in report
    history = json.loads((tmp_path / "history.json").read_text())
    assert [r["arm"] for r in history["results"]] == ["boost", "uniform"]
    assert len(history["results"][0]["history"]) == 3
    assert (tmp_path / "weights.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left
