"""Guards of a training run: the device, non-finite steps, and JSON-safe metrics.

A non-finite number *skips* the update that would use it: a non-finite loss, head weight or
gradient norm skips the model's optimiser step (and the step's outer step), a non-finite
validation loss, hypergradient or outer objective skips the head's; parameters and optimiser states
stay as they were (an AdamW step on a NaN gradient would poison its moments too). The step is
logged (its non-finite numbers as JSON ``null``, the names in ``"skipped"``) and counted;
:class:`BadStepCounter` stops the run after ``max_bad_steps`` in a row with
:class:`NonFiniteStepError`. The loop saves no checkpoint while steps are failing, so the last one
on disk is from a good step.
"""

from __future__ import annotations

import math
from typing import Any

import torch


class DeviceError(ValueError):
    """The configured device does not exist on this machine."""


class NonFiniteStepError(FloatingPointError):
    """``max_bad_steps`` steps in a row were non-finite; the message says which and what is kept."""


def resolve_device(name: str) -> str:
    """``"auto"`` -> ``"cuda"`` if available else ``"cpu"``; ``"cuda"`` without CUDA is a :class:`DeviceError`."""
    cuda = torch.cuda.is_available()
    if name == "auto":
        return "cuda" if cuda else "cpu"
    if name.split(":")[0] == "cuda" and not cuda:
        built = (
            "a CPU-only build"
            if torch.version.cuda is None
            else f"CUDA {torch.version.cuda}, no device visible"
        )
        raise DeviceError(f"device={name} but this torch {torch.__version__} ({built}) has no CUDA device; "
                         "use device=cpu or device=auto")  # fmt: skip
    return name


def nonfinite(**values: torch.Tensor | float | None) -> list[str]:
    """The names of the given tensors (or numbers) that hold a NaN or an infinity; None is skipped."""
    bad = []
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, torch.Tensor):
            if not bool(torch.isfinite(value.detach()).all()):
                bad.append(name)
        elif not math.isfinite(value):
            bad.append(name)
    return bad


def gradient_norm(parameters: list[torch.nn.Parameter], clip: float) -> torch.Tensor:
    """The total gradient norm, clipping the gradients to ``clip`` first when ``clip > 0``."""
    if clip:
        return torch.nn.utils.clip_grad_norm_(parameters, clip)
    return torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (NaN and Infinity are not JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class BadStepCounter:
    """Counts skipped steps; :meth:`update` raises after ``max_bad_steps`` of them in a row."""

    def __init__(self, max_bad_steps: int, start: int = 0):
        self.max_bad_steps = max_bad_steps
        self.streak = 0  # bad steps in a row, up to now
        self.total = 0
        self.last_good_step = start  # the step the run started (or resumed) from counts as good

    def update(self, step: int, bad: list[str], kept: str) -> None:
        """Record ``step`` (``bad``: what was non-finite, empty for a good step).

        ``kept`` says what survives a stop (e.g. "the checkpoint ... of step 4 is intact"), for the message.
        """
        if not bad:
            self.streak, self.last_good_step = 0, step
            return
        self.streak += 1
        self.total += 1
        if self.streak >= self.max_bad_steps:
            raise NonFiniteStepError(
                f"stopped at step {step}: {self.streak} steps in a row (max_bad_steps={self.max_bad_steps}) had "
                f"a non-finite {', '.join(bad)} (the last good step was {self.last_good_step}); no update was "
                f"taken from a non-finite number, and {kept}. Lower optim.lr or optim.head_lr, check the "
                "data, or raise max_bad_steps"
            )
