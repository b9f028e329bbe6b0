"""training.png of report.md: panels only for numbers the run has, whole-number step ticks."""

from __future__ import annotations

import pytest

from boost.train.report import applied_settings, panels, run_title, success_line, training_figure

pytest.importorskip("matplotlib")


def _uniform_rows(steps):
    return [{"step": s, "loss": 1.0 / s, "real_train_loss": 1.2 / s, "inner_seconds": 0.1} for s in steps]


def _boost_rows(steps):
    weights = {"real": {"mean": 1.0}, "corrupt": {"mean": 0.5}}
    return [
        {**row, "val_loss": 1.1 / row["step"], "n_eff": 10.0, "mass": 1.0, "weights": weights}
        for row in _uniform_rows(steps)
    ]


def _ticks(fig):
    fig.canvas.draw()
    return [list(ax.get_xticks()) for ax in fig.axes]


def test_a_uniform_run_gets_one_panel_with_whole_step_ticks():
    rows = _uniform_rows([1, 2, 3, 4])
    assert panels(rows) == ["loss"]
    fig = training_figure(rows)
    assert [ax.get_title() for ax in fig.axes] == ["loss"]
    (ticks,) = _ticks(fig)
    assert ticks and all(float(t).is_integer() for t in ticks), ticks  # matplotlib alone puts 1.5, 2.5


def test_a_boost_run_gets_the_weight_panels_and_skipped_steps_stay_gaps():
    rows = _boost_rows([1, 2, 3])
    rows[1] = {**rows[1], "skipped": ["loss"], "loss": None, "val_loss": None, "n_eff": None}
    assert panels(rows) == ["loss", "n_eff_mass", "weights"]
    fig = training_figure(rows)
    assert [ax.get_title() for ax in fig.axes] == [
        "loss", "effective sample size and mass", "mean weight per source",
    ]  # fmt: skip
    assert all(ax.lines for ax in fig.axes)
    assert all(float(t).is_integer() for ticks in _ticks(fig) for t in ticks)
    sources = {line.get_label() for line in fig.axes[2].lines}
    assert sources == {"real", "corrupt"}


def test_the_success_line_names_the_interval_and_the_random_policy():
    final = {"success_rate": 0.5, "success_ci95": [0.3, 0.7], "episodes": 20, "env": "gridnav-compact"}
    line = success_line(final, {"success_rate": 0.1, "success_ci95": [0.03, 0.3]})
    assert line == (
        "held-out task success: 0.50 [0.30, 0.70] (95% Wilson) on 20 test tasks of gridnav-compact; "
        "the random policy on the same tasks: 0.10 [0.03, 0.30]"
    )
    assert "not measured" in success_line({"step": 3})


def _run_folder(tmp_path, *overrides):
    """A finished run's files as the loop writes them: config.yaml, final.json, metrics.jsonl."""
    import json

    import yaml

    from boost.config import load_config, to_dict
    from boost.train.config import TrainConfig

    cfg = load_config(TrainConfig, None, ["model.name=cpu", "steps=4", "eval.episodes=0", *overrides])
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    (tmp_path / "final.json").write_text(json.dumps({"step": 4, "validation_loss": 1.0, "test_loss": 1.1}))
    rows = _uniform_rows([1, 2, 3, 4]) if cfg.weighting.method == "uniform" else _boost_rows([1, 2, 3, 4])
    if cfg.weighting.method != "uniform":
        rows = [{**r, "solver_residual": 0.1, "outer_seconds": 0.2,
                 "weights": {s: {"count": 2, "mean": 1.0, "min": 0.5, "max": 1.5} for s in ("real", "eps")}}
                for r in rows]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def _config_section(text):
    import yaml

    return yaml.safe_load(text.split("```yaml\n", 1)[1].split("```", 1)[0])


@pytest.mark.parametrize(
    "overrides, title",
    [
        (["weighting.method=uniform"], "# uniform run: "),
        (["weighting.method=return_filter"], "# return_filter run: "),
        ([], "# BOOST run (head, cg): "),
        (["weighting.method=mwn", "solver.method=identity"], "# mwn run (head, identity): "),
    ],
)
def test_the_report_is_titled_by_what_ran(tmp_path, overrides, title):
    from boost.train.report import write_report

    text = write_report(_run_folder(tmp_path, *overrides), ["data"]).read_text()
    assert text.startswith(title + tmp_path.name + "\n"), text[:80]


def test_the_reports_config_shows_only_the_settings_that_applied(tmp_path):
    from boost.train.report import write_report

    uniform = _config_section(
        write_report(_run_folder(tmp_path / "u", "weighting.method=uniform"), []).read_text()
    )
    assert uniform["weighting"] == {"method": "uniform", "awr_beta": 0.0}
    for never in ("solver", "head", "block", "fd_step", "outer_every", "reweight"):
        assert never not in uniform, never
    assert "head_lr" not in uniform["optim"] and uniform["lora"] == {"enabled": False}
    assert uniform["eval"] == {"episodes": 0} and uniform["steps"] == 4
    boost = _config_section(write_report(_run_folder(tmp_path / "b"), []).read_text())
    assert boost["solver"]["method"] == "cg" and "head" in boost and boost["optim"]["head_lr"] == 0.01
    assert "fd_step" not in boost and "loss_drop" not in boost["weighting"]
    filtered = _config_section(
        write_report(_run_folder(tmp_path / "r", "weighting.method=return_filter"), []).read_text()
    )
    assert filtered["weighting"]["top_fraction"] == 0.5 and "solver" not in filtered


def test_the_report_warns_when_the_preset_had_too_few_steps(tmp_path):
    from boost.train.report import write_report

    text = write_report(_run_folder(tmp_path, "weighting.method=uniform"), []).read_text()
    assert "**Warning:** steps=4 is fewer than the 300 of the shortest CPU-preset run on record" in text
    enough = _run_folder(tmp_path / "300", "weighting.method=uniform", "steps=300")
    assert "Warning" not in write_report(enough, []).read_text()


def test_an_influence_run_shows_the_outer_objective_it_scored_by():
    from dataclasses import asdict

    from boost.config import load_config
    from boost.train import TrainConfig

    scored = asdict(load_config(TrainConfig, None, ["weighting.method=influence", "outer.objective=return"]))
    assert run_title(scored) == "influence run (scored by outer objective return)"
    assert applied_settings(scored)["outer"] == {
        "objective": "return",
        "rollout_tasks": 16,
        "episodes_per_task": 4,
    }
    plain = asdict(load_config(TrainConfig, None, ["weighting.method=influence"]))
    assert run_title(plain) == "influence run" and "outer" not in applied_settings(plain)
