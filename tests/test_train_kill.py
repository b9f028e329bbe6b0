"""kill -9 while a checkpoint is being written, then --resume (once here; benchmarks/kill_resume.py
repeats it at random moments and compares with an uninterrupted run)."""

from __future__ import annotations

from benchmarks.kill_resume import kill_and_resume, make_assets


def test_kill_9_while_checkpointing_leaves_a_loadable_checkpoint_and_unique_steps(tmp_path):
    model, data = make_assets(tmp_path)
    result = kill_and_resume(
        model,
        data,
        tmp_path / "run",
        "checkpoint:2",
        (0.0, 120.0),
        None,
        steps=3,
        settings=("reweight=false",),
    )
    assert result["killed"], "the run finished before a checkpoint write could be interrupted"
    assert result["problems"] == []
