"""training.png of report.md: panels only for numbers the run has, whole-number step ticks."""

from __future__ import annotations

import pytest

from boost.train.report import panels, success_line, training_figure

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
