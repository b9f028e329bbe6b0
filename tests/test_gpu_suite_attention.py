"""The attention rows of benchmarks/gpu_suite.py: the trainer's steps it times, and its verdict when
two attention paths' losses disagree (the GPU itself runs them; here the dry-run configuration)."""

from __future__ import annotations

import math

from benchmarks import gpu_suite


def _dry_run_suite():
    return gpu_suite.Suite(gpu_suite.make_config(gpu_suite.parse_args(["--dry-run"])), None, True, [])


def test_train_steps_runs_the_trainers_inner_and_outer_steps(tmp_path):
    suite = _dry_run_suite()
    result = gpu_suite.train_steps("block_mask", suite.cfg, tmp_path)
    assert result["attention"] == "block_mask" and result["precision"] == "fp32"
    assert len(result["losses"]) == suite.cfg.train_steps and all(math.isfinite(x) for x in result["losses"])
    assert all(v is not None and math.isfinite(v) for v in result["val_losses"])  # an outer step each
    assert result["seconds_per_step"] > 0 and all(n > 0 for n in result["tokens"])
    assert gpu_suite.attention_unavailable("flash_varlen", "cpu").startswith("needs CUDA")
    assert gpu_suite.attention_unavailable("block_mask", "cpu") is None


def test_disagreeing_losses_fail_the_suite(monkeypatch):
    suite = _dry_run_suite()
    losses = {"block_mask": [2.0, 1.9], "flash_varlen": [2.0, 1.5]}

    def fake_steps(path, cfg, work):
        return {"precision": "bf16", "losses": losses[path], "seconds_per_step": 0.1, "peak_bytes": None}

    monkeypatch.setattr(gpu_suite, "train_steps", fake_steps)
    monkeypatch.setattr(gpu_suite, "attention_unavailable", lambda path, device: None)
    suite.attention_rows()
    rows = {r.name: r for r in suite.rows if r.section == "attention"}
    assert rows["flash_varlen"].rel_err == (1.9 - 1.5) / 1.9 and "disagree" in rows["flash_varlen"].note
    assert not suite.attention_agrees()
    text = "\n".join(gpu_suite.attention_lines(suite.rows))
    assert "flash_varlen (bf16)" in text and "disagree" in text

    losses["flash_varlen"] = [2.0, 1.9 * (1 + gpu_suite.ATTENTION_TOL / 2)]
    suite.rows.clear()
    suite.attention_rows()
    assert suite.attention_agrees()
