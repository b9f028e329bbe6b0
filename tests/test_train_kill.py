"""kill -9 while a checkpoint is being written, then --resume (once here, the process killing itself
in its second torch.save; benchmarks/kill_resume.py kills from outside at random moments and during
checkpoint writes, 20 times, and compares with an uninterrupted run)."""

from __future__ import annotations

from benchmarks.kill_resume import kill_and_resume, make_assets


def test_kill_9_while_checkpointing_leaves_a_loadable_checkpoint_and_unique_steps(tmp_path):
    model, data = make_assets(tmp_path)
    result = kill_and_resume(
        model,
        data,
        tmp_path / "run",
        "save:2",
        (0.0, 120.0),
        None,
        steps=3,
        settings=("weighting.method=uniform",),
    )
    assert result["killed"] and result["temporaries_left"], "not killed in the middle of a checkpoint write"
    assert result["problems"] == []
