"""python -m boost.experiment on a tiny grid: runs, resumes, tunes lr on validation, writes results."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from boost.experiment import ExperimentError, load_spec
from boost.experiment import main as experiment

TRAIN = {
    "model": {"name": "cpu", "hidden_size": 32, "layers": 1, "heads": 2},
    "data": {"token_budget": 2048, "rows": 4, "max_length": 512},
    "eval": {"max_new_tokens": 2},
    "checkpoint_every": 0,
    "threads": 1,
}


def _spec(tmp_path, **extra):
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(TRAIN))
    spec = {"train_config": str(tmp_path / "train.yaml"), "env": "gridnav-compact",
            "sources": "real:24,eps0.1:8,random:8", "seeds": [0], "steps": 2, "episodes": 2,
            "lr_grid": [0.001, 0.003], "tune_steps": 1, "tune_episodes": 3,
            "arms": {"uniform": ["weighting.method=uniform"], "boost": ["weighting.method=boost"]},
            "quick": {"seeds": [0], "lr_grid": [0.001], "arms": ["boost"]}, **extra}  # fmt: skip
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_grid_runs_tunes_on_validation_and_resumes(tmp_path):
    path, out = _spec(tmp_path), tmp_path / "out"
    assert experiment(["--config", str(path), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["table"]) == {"uniform", "boost"} and set(results["runs"]["boost"]) == {"0"}
    tuning = results["tuning"]["boost"]  # tune_by: success (the default)
    best = min(tuning, key=lambda lr: (-tuning[lr]["validation_success"], tuning[lr]["validation_loss"]))
    assert results["lr"]["boost"] == float(best)
    for lr in tuning:  # the candidates played validation tasks, never test ones
        final = json.loads((out / "boost" / f"tune-lr{lr}" / "final.json").read_text())
        assert final["eval_split"] == "validation" and final["episodes"] == 3
        assert tuning[lr]["validation_success"] == final["success_rate"]
    assert json.loads((out / "boost" / "seed0" / "final.json").read_text())["eval_split"] == "test"
    assert results["table"]["uniform"]["success_minus_boost"] is not None
    text = (out / "results.md").read_text()
    assert "| uniform |" in text and "success − boost (paired, 95% t interval)" in text
    assert "chosen by task success on 3 validation tasks" in text
    assert (out / "success.png").exists() and (out / "weights_over_steps.png").exists()
    stamp = (out / "boost" / "seed0" / "final.json").stat().st_mtime_ns
    assert experiment(["--config", str(path), "--out", str(out)]) == 0  # resumes: nothing re-run
    assert (out / "boost" / "seed0" / "final.json").stat().st_mtime_ns == stamp


def test_quick_picks_its_subset_and_bad_files_say_which_key(tmp_path):
    spec = load_spec(_spec(tmp_path), quick=True)
    assert list(spec["arms"]) == ["boost"] and spec["seeds"] == [0]
    with pytest.raises(ExperimentError, match="unknown key 'armz'"):
        load_spec(_spec(tmp_path, armz={}))
    with pytest.raises(ExperimentError, match="quick.arms names 'nope'"):
        load_spec(_spec(tmp_path, quick={"arms": ["nope"]}), quick=True)


def test_two_stage_boost_filters_by_the_pool_weights_of_its_own_seed(tmp_path):
    out = tmp_path / "out"
    weights = str(out / "boost" / "seed{seed}" / "pool_weights.jsonl")
    arms = {"boost": ["weighting.method=boost"],
            "boost_filter": ["weighting.method=weight_filter", f"weighting.weights_path={weights}"]}  # fmt: skip
    path = _spec(tmp_path, lr_grid=[0.001], seeds=[0, 1], arms=arms)
    assert experiment(["--config", str(path), "--out", str(out)]) == 0
    for seed in (0, 1):
        learned = [json.loads(r) for r in (out / "boost" / f"seed{seed}" / "pool_weights.jsonl").open()]
        assert len(learned) == 16 and all(len(r["key"]) == 16 for r in learned)
        ranked = sorted(learned, key=lambda r: r["weight"], reverse=True)
        expected = {r["key"] for r in learned if r["weight"] >= ranked[7]["weight"]}  # top_fraction 0.5
        pool = [json.loads(r) for r in (out / "boost_filter" / f"seed{seed}" / "pool_weights.jsonl").open()]
        kept = [r for r in pool if r["weight"] == 1.0]  # the rest is listed with weight 0
        assert len(pool) == 16 and all(r["weight"] in (0.0, 1.0) for r in pool)
        assert {r["key"] for r in kept} == expected and len(kept) == len(expected) >= 8


def test_report_only_trains_nothing_and_lists_what_did_not_run(tmp_path):
    out = tmp_path / "out"
    one_seed = _spec(tmp_path, lr_grid=[0.001], arms={"uniform": ["weighting.method=uniform"]})
    assert experiment(["--config", str(one_seed), "--out", str(out)]) == 0
    two_seeds = _spec(tmp_path, lr_grid=[0.001], seeds=[0, 1], arms={"uniform": ["weighting.method=uniform"]})
    assert experiment(["--config", str(two_seeds), "--out", str(out), "--report-only"]) == 0
    assert not (out / "uniform" / "seed1").exists()
    results = json.loads((out / "results.json").read_text())
    assert results["not_run"] == ["uniform seed 1"] and set(results["runs"]["uniform"]) == {"0"}
    assert "Not run (1" in (out / "results.md").read_text()
    with pytest.raises(SystemExit):
        experiment(["--config", str(two_seeds), "--out", str(tmp_path / "empty"), "--report-only"])


def test_report_only_reads_the_committed_record_layout(tmp_path):
    """benchmarks/experiments/* keeps each run as <arm>/seed<k>-final.json and -pool_weights.jsonl, not
    as run folders: --report-only on such a folder rebuilds the same table."""
    out, records = tmp_path / "out", tmp_path / "records"
    path = _spec(tmp_path, lr_grid=[0.001])
    assert experiment(["--config", str(path), "--out", str(out)]) == 0
    for arm in ("uniform", "boost"):
        (records / arm).mkdir(parents=True)
        for name in ("final.json", "pool_weights.jsonl"):
            (records / arm / f"seed0-{name}").write_bytes((out / arm / "seed0" / name).read_bytes())
    assert experiment(["--config", str(path), "--out", str(records), "--report-only"]) == 0
    ran, recorded = (json.loads((d / "results.json").read_text())["table"] for d in (out, records))
    assert ran.keys() == recorded.keys() == {"uniform", "boost"}
    for arm in ran:
        for key in ("success_rate", "test_loss", "mean_weight_per_source", "seeds"):
            assert recorded[arm][key] == ran[arm][key]
    assert not (records / "boost" / "seed0").exists()


def test_arms_and_seeds_train_a_part_of_the_grid_and_report_the_whole(tmp_path, capsys):
    out = tmp_path / "out"
    path = _spec(tmp_path, lr_grid=[0.001], seeds=[0, 1])
    assert experiment(["--config", str(path), "--out", str(out), "--arms", "uniform", "--seeds", "1"]) == 0
    assert (out / "uniform" / "seed1" / "final.json").exists()
    assert not (out / "uniform" / "seed0").exists() and not (out / "boost").exists()
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["not_run"]) == ["boost seed 0", "boost seed 1", "uniform seed 0"]
    for bad, message in ((["--arms", "uniform,nope"], "'nope' is not an arm"),
                         (["--seeds", "0,7"], "7 is not a seed"), (["--seeds", "a"], "comma-separated integers"),
                         (["--arms", ","], "'(none given)' is not an arm"),
                         (["--report-only", "--seeds", "0"], "give one or the other")):  # fmt: skip
        with pytest.raises(SystemExit):
            experiment(["--config", str(path), "--out", str(out), *bad])
        assert message in capsys.readouterr().err


def test_the_refilter_plot_shows_the_share_kept_per_source_of_refiltering_arms_only(tmp_path):
    from boost.experiment import plot_refilters

    refilters = [
        {"step": s, "kept": {"eps0.1": [k, 10], "random": [10 - k, 10]}} for s, k in ((5, 6), (10, 9))
    ]
    assert plot_refilters({"uniform": {0: {}}, "boost": {0: {"refilters": []}}}, tmp_path) is None
    path = plot_refilters(
        {"uniform": {0: {}}, "boost_refilter": {0: {"refilters": refilters}, 1: {}}}, tmp_path
    )
    assert path == tmp_path / "refilter_kept.png" and path.read_bytes().startswith(b"\x89PNG")


def test_paired_differences_take_the_chosen_reference_with_a_t_interval(tmp_path):
    arms = {"uniform": ["weighting.method=uniform"], "boost": ["weighting.method=boost"],
            "boost_filter": ["weighting.method=weight_filter"]}  # fmt: skip
    path, out = _spec(tmp_path, seeds=[0, 1, 2], arms=arms, reference="boost_filter"), tmp_path / "out"
    success = {"uniform": (0.2, 0.3, 0.1), "boost": (0.5, 0.4, 0.6), "boost_filter": (0.6, 0.6, 0.5)}
    for arm, values in success.items():
        for seed, p in enumerate(values):
            final = {"success_rate": p, "success_ci95": [p - 0.1, p + 0.1], "test_loss": 1.0}
            (out / arm / f"seed{seed}").mkdir(parents=True)
            (out / arm / f"seed{seed}" / "final.json").write_text(json.dumps(final))
    assert experiment(["--config", str(path), "--out", str(out), "--report-only"]) == 0
    row = json.loads((out / "results.json").read_text())["table"]["uniform"]
    diffs = [u - f for u, f in zip(success["uniform"], success["boost_filter"])]  # -0.4, -0.3, -0.4
    mean = sum(diffs) / 3
    half = 4.3027 * math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2) / math.sqrt(3)
    assert row["success_minus_boost_filter"][0] == pytest.approx(mean) and row["paired_seeds"] == [0, 1, 2]
    assert row["success_minus_boost_filter_ci95"] == pytest.approx([mean - half, mean + half])
    text = (out / "results.md").read_text()
    assert "success − boost_filter (paired, 95% t interval)" in text and f"[{mean - half:+.3f}, " in text
    assert (
        experiment(["--config", str(path), "--out", str(out), "--report-only", "--reference", "boost"]) == 0
    )
    assert "success_minus_boost" in json.loads((out / "results.json").read_text())["table"]["uniform"]
    with pytest.raises(SystemExit):
        experiment(["--config", str(path), "--out", str(out), "--report-only", "--reference", "nope"])
    with pytest.raises(ExperimentError, match="reference 'nope' is not one of the arms"):
        load_spec(_spec(tmp_path, reference="nope"))


def test_an_arms_tune_grid_is_chosen_with_lr_on_validation_and_applied_to_its_runs(tmp_path):
    arms = {"return_filter": ["weighting.method=return_filter"], "uniform": ["weighting.method=uniform"]}
    tune = {"return_filter": {"weighting.top_fraction": [0.25, 0.75]}}
    path, out = _spec(tmp_path, lr_grid=[0.001], arms=arms, tune=tune, tune_by="loss"), tmp_path / "out"
    assert experiment(["--config", str(path), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    scores = {k: v["validation_loss"] for k, v in results["tuning"]["return_filter"].items()}
    assert all(v["validation_success"] is None for v in results["tuning"]["return_filter"].values())
    assert set(scores) == {"lr0.001,weighting.top_fraction=0.25", "lr0.001,weighting.top_fraction=0.75"}
    best = min(scores, key=scores.get).split("=")[-1]
    assert results["tuned"] == {"return_filter": {"weighting.top_fraction": float(best)}, "uniform": {}}
    assert results["tuning"]["uniform"] == {}  # one candidate: no tuning run
    assert (out / "return_filter" / "tune-lr0.001-weighting.top_fraction=0.25" / "final.json").exists()
    run = yaml.safe_load((out / "return_filter" / "seed0" / "config.yaml").read_text())
    assert run["weighting"]["top_fraction"] == float(best)
    assert f"weighting.top_fraction={float(best)}" in (out / "results.md").read_text()
    assert experiment(["--config", str(path), "--out", str(out), "--report-only"]) == 0  # reads them back
    assert json.loads((out / "results.json").read_text())["tuning"] == results["tuning"]
    with pytest.raises(ExperimentError, match="tune names 'nope'"):
        load_spec(_spec(tmp_path, tune={"nope": {"head.init_mass": [1.0]}}))
    with pytest.raises(ExperimentError, match="tuned by lr_grid"):
        load_spec(_spec(tmp_path, tune={"boost": {"optim.lr": [1.0]}}))
    with pytest.raises(ExperimentError, match="tune_by must be 'success' or 'loss'"):
        load_spec(_spec(tmp_path, tune_by="accuracy"))
    with pytest.raises(ExperimentError, match="tune_episodes must be an integer >= 1"):
        load_spec(_spec(tmp_path, tune_episodes=0))


def test_every_shipped_experiment_file_loads_with_and_without_quick():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = [
        root / "configs" / "experiment_gridnav.yaml",
        *sorted((root / "benchmarks" / "experiments").rglob("*.yaml")),
    ]
    assert len(files) > 10
    for path in files:
        spec = load_spec(path)
        assert set(spec["tune"]) <= set(spec["arms"]), path
        load_spec(path, quick=True)
