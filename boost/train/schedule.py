"""The model's learning-rate schedule: linear warm-up, then constant, cosine or linear decay.

The rate is a function of the step alone (:func:`lr_factor`), so a resumed run continues it exactly
from the checkpointed step; no scheduler state is saved. Its horizon is ``optim.schedule_steps``, or
the run's ``steps`` when that is 0 (a resume that changes ``steps`` is then refused: the remaining
rates would change; see :func:`horizon`).

    factor(t) = (t + 1) / warmup                                   t < warmup
              = 1                                                  constant
              = min_ratio + (1 - min_ratio)·(1 + cos(π·p)) / 2     cosine,  p = (t - warmup) / (horizon - warmup)
              = min_ratio + (1 - min_ratio)·(1 - p)                linear

for the inner step t = 0, 1, ... (p clipped to [0, 1]); the rate is ``optim.lr · factor(t)``, and with
``optim.schedule_head`` the head's is ``optim.head_lr · factor(t)`` for the outer step after step t.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("constant", "cosine", "linear")


def horizon(schedule_steps: int, steps: int) -> int:
    return schedule_steps or steps


def lr_factor(step: int, *, schedule: str, warmup: int, total: int, min_ratio: float) -> float:
    """The multiplier of the base rate at inner step ``step`` (0-based) of ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(max((step - warmup) / max(total - warmup, 1), 0.0), 1.0)
    decay = (1 + math.cos(math.pi * progress)) / 2 if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * decay


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
