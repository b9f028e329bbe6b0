"""TensorBoard event files beside ``metrics.jsonl``: ``out_dir/tensorboard/`` (``tensorboard --logdir``).

One point per logged step (the rows of ``metrics.jsonl``), under these tags:

- ``train/loss``, ``train/lr`` (with a schedule), ``train/real_loss``, ``train/tokens_per_second`` (the batch's tokens over the
  step's inner + outer seconds), ``time/inner_seconds``, ``time/outer_seconds``;
- ``outer/val_loss``, ``outer/n_eff``, ``outer/mass``, ``outer/synthetic_weight``,
  ``outer/solver_residual``, ``outer/task_shift_distance``;
- ``weight/<source>``: the mean weight of that source's trajectories in the batch.

A skipped value (None, or absent on steps without an outer step) is not written. On resume the
writer purges the points after the checkpoint's step, as :class:`~boost.train.checkpoint.MetricsLog`
drops their rows.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

TENSORBOARD = "tensorboard"
TAGS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "real_train_loss": "train/real_loss",
    "tokens_per_second": "train/tokens_per_second",
    "inner_seconds": "time/inner_seconds",
    "outer_seconds": "time/outer_seconds",
    "val_loss": "outer/val_loss",
    "n_eff": "outer/n_eff",
    "mass": "outer/mass",
    "synthetic_weight": "outer/synthetic_weight",
    "solver_residual": "outer/solver_residual",
    "task_shift_distance": "outer/task_shift_distance",
}


def tokens_per_second(record: dict[str, Any]) -> float | None:
    """The step's tokens over its inner + outer seconds (None without a time)."""
    seconds = record.get("inner_seconds", 0.0) + record.get("outer_seconds", 0.0)
    return record["tokens"] / seconds if seconds > 0 and "tokens" in record else None


def _wait_for_a_later_second(folder: Path) -> None:
    """Readers order event files by name, whose first field is the writer's start in whole seconds:
    a resumed run's file must sort after the killed run's, so a writer that would start in the same
    second as the newest file there waits for the next one (at most a second, on resume only)."""
    stamps = [
        int(p.name.split(".")[3])
        for p in folder.glob("events.out.tfevents.*")
        if p.name.split(".")[3].isdigit()
    ]
    while stamps and int(time.time()) <= max(stamps):
        time.sleep(0.05)


class TensorBoardLog:
    """Scalars of each logged step into ``out/tensorboard`` (``torch.utils.tensorboard``).

    Args:
        out: the run folder.
        resume_step: the checkpoint's step when resuming (later points are purged), 0 for a new run.
    """

    def __init__(self, out: Path, resume_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.path = Path(out) / TENSORBOARD
        _wait_for_a_later_second(self.path)
        self._writer = SummaryWriter(str(self.path), purge_step=resume_step + 1 if resume_step else None)

    def write(self, step: int, record: dict[str, Any]) -> None:
        values = {**record, "tokens_per_second": tokens_per_second(record)}
        for key, tag in TAGS.items():
            value = values.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(tag, value, step)
        for source, summary in (record.get("weights") or {}).items():
            self._writer.add_scalar(f"weight/{source}", summary["mean"], step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> TensorBoardLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
