"""benchmarks/gpu_suite.py runs end to end on the CPU (``--dry-run``), so a broken suite is caught
here rather than on a borrowed GPU."""

from __future__ import annotations

import json

import torch

from benchmarks import gpu_suite
from benchmarks._common import Problem, make_inputs
from benchmarks._variants import Variant


def test_dry_run_writes_a_complete_report(tmp_path):
    assert gpu_suite.main(["--dry-run", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    text = (tmp_path / "gpu_suite.md").read_text()
    assert report["dry_run"] and "DRY RUN" in text

    assert len(report["correctness"]) == 22 and all(c["passed"] for c in report["correctness"])
    rows = {(r["section"], r["op"], r["name"]): r for r in report["rows"]}
    for key in [("loss", op, "ours") for op in ("fwd", "fwd_bwd")] + [
        ("jvp_hvp", "jvp", "ours"),
        ("jvp_hvp", "hvp", "ours"),
        ("jvp_hvp", "outer", "ours"),
    ]:
        row = rows[key]
        assert row["status"] == "ok" and row["seconds"] > 0 and row["peak_bytes"] is not None, row
        assert row["rel_err"] is not None and row["rel_err"] < 5e-2, row  # agrees with naive / torch.func
    assert not [r for r in report["rows"] if r["status"] not in ("ok", "skipped")]
    for name in ("liger", "cce"):  # CUDA-only competitors: skipped with the reason, never timed
        row = rows[("loss", "fwd_bwd", name)]
        assert row["status"] == "skipped" and "CUDA" in row["note"] and row["seconds"] is None
    verdicts = {t["target"]: t["verdict"] for t in report["targets"]}
    assert verdicts["fwd+bwd time, ours / Liger"] == "NOT MEASURED"


def test_time_budget_skips_rows_but_keeps_correctness(tmp_path):
    assert gpu_suite.main(["--dry-run", "--budget-s", "0", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert report["correctness"] and report["rows"]
    assert all(r["status"] == "skipped" and "budget" in r["note"] for r in report["rows"])


def test_a_failing_competitor_becomes_an_error_row():
    args = gpu_suite.parse_args(["--dry-run"])
    suite = gpu_suite.Suite(gpu_suite.make_config(args), None, True, [])
    problem = Problem(8, 4, 16, "float32", segments=2)

    def broken(inputs):
        def run():
            raise RuntimeError("competitor exploded")

        return run

    row = suite._run_one(problem, make_inputs(problem), Variant("boom", "fwd", "raises", broken), {})
    assert row.status == "error" and "competitor exploded" in row.note and row.seconds is None
    assert torch.is_grad_enabled()


def test_the_report_plots_with_every_row_accounted_for(tmp_path):
    from benchmarks import plot_results

    assert gpu_suite.main(["--dry-run", "--out", str(tmp_path)]) == 0
    assert plot_results.main([str(tmp_path / "gpu_suite.json")]) == 0
    png = tmp_path / "gpu_suite.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
