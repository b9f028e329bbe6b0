"""torchrun --max-restarts with a rank killed by SIGKILL while a distributed checkpoint is being written:
the restarted ranks resume from the newest complete checkpoint and end with the uninterrupted run's
metrics and model, bit for bit (once here, under FSDP2; benchmarks/kill_resume_distributed.py kills at
random moments and during checkpoint writes, 10 times per mode)."""

from __future__ import annotations

from benchmarks.kill_resume import make_assets
from benchmarks.kill_resume_distributed import kill_restart_and_compare, run_reference


def test_a_rank_killed_mid_checkpoint_is_restarted_and_the_run_ends_as_if_uninterrupted(tmp_path):
    model, data = make_assets(tmp_path)
    reference, first, seconds = run_reference(model, data, tmp_path / "reference", 2, "fsdp2")
    result = kill_restart_and_compare(
        model,
        data,
        tmp_path / "killed",
        2,
        "fsdp2",
        "checkpoint:3",
        (first, seconds),
        reference,
        tolerance=0.0,
    )
    assert result["killed"] and result["restarts"] >= 1, result
    assert result["problems"] == []
