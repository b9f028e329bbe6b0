"""``python -m boost.experiment analyse add-filtered-out`` rebuilds what the trainer now writes for a filter run."""

from __future__ import annotations

import json

import pytest

from boost import analysis as script
from boost.config import load_config
from boost.generate import main as generate
from boost.train import TrainConfig, Trainer

TINY = ["model.name=cpu", "model.hidden_size=32", "model.layers=1", "model.heads=2", "data.token_budget=2048",
        "data.rows=4", "data.max_length=512", "steps=1", "eval.episodes=0", "checkpoint_every=0",
        "threads=1"]  # fmt: skip
ANALYSIS = ("spearman_quality", "spearman_return", "mean_weight_per_source", "n_eff_pool", "n_synthetic_pool",
            "n_filtered_out")  # fmt: skip


@pytest.mark.parametrize("method", ["return_filter", "oracle"])
def test_an_old_filter_run_gets_the_rows_and_analysis_a_new_run_writes(tmp_path, method):
    data = tmp_path / "data.jsonl"
    sources = "real:24,eps0.1:8,random:8,corrupt:8"
    assert (
        generate(["--env", "gridnav-compact", "--out", str(data), "--sources", sources, "--no-progress"]) == 0
    )
    run = tmp_path / "run"
    cfg = load_config(
        TrainConfig, None, [*TINY, f"data.path={data}", f"out_dir={run}", f"weighting.method={method}"]
    )
    Trainer(cfg, progress=False).train()
    new_rows = (run / "pool_weights.jsonl").read_text().splitlines()
    new_final = json.loads((run / "final.json").read_text())
    assert 0 < new_final["n_filtered_out"] < len(new_rows)
    # an old run: kept rows only, without keys, and no n_filtered_out in final.json
    old = [json.loads(r) for r in new_rows if json.loads(r)["weight"] == 1.0]
    for row in old:
        del row["key"], row["task_id"]
    (run / "pool_weights.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    (run / "final.json").write_text(json.dumps({k: v for k, v in new_final.items() if k != "n_filtered_out"}))
    # and the retired `reweight` setting in its config.yaml, as every run of that time had
    config = run / "config.yaml"
    config.write_text("reweight: true\n" + config.read_text())
    assert "filtered out listed with weight 0" in script.add_filtered_out(run)
    redone = json.loads((run / "final.json").read_text())
    for key in ANALYSIS:  # approx takes one level of dict: the per-source means are compared alone
        assert redone[key] == pytest.approx(new_final[key]), key
    assert sorted((run / "pool_weights.jsonl").read_text().splitlines()) == sorted(new_rows)
    assert "already" in script.add_filtered_out(run)  # done once; a second call changes nothing
    # a file that lists other trajectories than the filter keeps is refused, nothing written
    (run / "final.json").write_text(json.dumps({k: v for k, v in new_final.items() if k != "n_filtered_out"}))
    (run / "pool_weights.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old[1:]))
    with pytest.raises(script.RunError, match="nothing written"):
        script.add_filtered_out(run)
    assert "n_filtered_out" not in json.loads((run / "final.json").read_text())
