"""The trainer's arithmetic: float32 everywhere, or the trunk under bfloat16 autocast.

``precision`` (a :class:`boost.train.config.TrainConfig` setting):

- ``"auto"`` (default): ``"bf16"`` on a CUDA device that supports it, ``"fp32"`` otherwise (the CPU
  stays float32);
- ``"fp32"``: everything in float32;
- ``"bf16"``: the model's forward and backward run under ``torch.autocast(dtype=torch.bfloat16)``
  while every parameter, gradient and optimiser state stays float32 (the master weights: AdamW
  updates float32 tensors; no loss scaling is needed with bfloat16's exponent range). The trunk's last
  hidden states are handed on as float32, so the fused head loss, the reweighting head and the
  whole hypergradient (the HVPs, the CG / Neumann solve and the scores) run in float32 on the
  values the bf16 trunk produced. Allowed on the CPU when asked for explicitly (CPU autocast works,
  and is how the tests exercise this path); ``auto`` never picks it there: the CPU stays float32 by
  default, and a CPU without bfloat16 instructions (AVX512-BF16 / AMX) runs it slowly.

float16 is not offered: it needs a loss scaler, and every GPU the project targets has bfloat16.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """``("fp32" | "bf16", why)`` for the setting ``requested`` on ``device``.

    Raises:
        ValueError: an unknown setting, or ``bf16`` on a CUDA device without bfloat16.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {requested!r}")
    cuda = device.type == "cuda"
    bf16_ok = cuda and torch.cuda.is_bf16_supported()
    if requested == "fp32":
        return "fp32", "precision=fp32"
    if requested == "bf16":
        if cuda and not bf16_ok:
            raise ValueError(
                f"precision=bf16 but {torch.cuda.get_device_name(device)} has no bfloat16; use precision=fp32"
            )
        return "bf16", "precision=bf16" + ("" if cuda else " on the CPU (slow without AVX512-BF16 / AMX)")
    if bf16_ok:
        return "bf16", "precision=auto on CUDA: bf16 autocast, float32 master weights"
    return "fp32", f"precision=auto on {'a CUDA device without bfloat16' if cuda else 'the CPU'}"


def autocast(precision: str, device: torch.device):
    """The context the model's forward runs in: bfloat16 autocast for ``"bf16"``, nothing for ``"fp32"``."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
