"""Argument checks shared by the public ops. Each error names the argument and the fix."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Default float32 scratch of the Triton backward for 16-bit gradients (``scratch_bytes``): with the
# O(T) statistics it stays under 64 MiB of extra memory.
DEFAULT_SCRATCH_BYTES = 56 * 2**20


def check_float(name: str, x: torch.Tensor, ndim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def check_same(name: str, x: torch.Tensor | None, ref_name: str, ref: torch.Tensor, shape=None) -> None:
    """x must sit on ref's device with ref's dtype (and the given shape)."""
    if x is None:
        return
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(x).__name__}")
    if x.device != ref.device:
        raise ValueError(
            f"{name} is on {x.device} but {ref_name} is on {ref.device}; move both to one device"
        )
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but {ref_name} has {ref.dtype}; cast one to match")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")


def check_index(name: str, x: torch.Tensor, num_tokens: int, device: torch.device) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
    if tuple(x.shape) != (num_tokens,):
        raise ValueError(
            f"{name} must have shape ({num_tokens},) to match hidden's tokens, got {tuple(x.shape)}"
        )
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but hidden is on {device}; move both to one device")


def check_label_values(
    labels: torch.Tensor, counted: torch.Tensor, vocab_size: int, ignore_index: int
) -> None:
    bad = counted & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        t = int(torch.nonzero(bad)[0, 0])
        raise ValueError(
            f"labels[{t}] = {int(labels[t])} is outside [0, {vocab_size}) and is not ignore_index "
            f"({ignore_index}); mask it with ignore_index or fix the tokenizer/vocabulary size"
        )


def check_segment_values(segment_ids: torch.Tensor, num_segments: int) -> None:
    bad = (segment_ids < -1) | (segment_ids >= num_segments)
    if bool(bad.any()):
        t = int(torch.nonzero(bad)[0, 0])
        raise ValueError(
            f"segment_ids[{t}] = {int(segment_ids[t])} is outside [-1, num_segments={num_segments}); "
            "use -1 for tokens that do not count and pass the number of trajectories as num_segments"
        )


def check_traj_weights(traj_weights: torch.Tensor, num_segments: int, device: torch.device) -> None:
    if not isinstance(traj_weights, torch.Tensor):
        raise TypeError(f"traj_weights must be a torch.Tensor or None, got {type(traj_weights).__name__}")
    if tuple(traj_weights.shape) != (num_segments,):
        raise ValueError(
            f"traj_weights must have shape (num_segments,) = ({num_segments},), got {tuple(traj_weights.shape)}"
        )
    if traj_weights.device != device:
        raise ValueError(f"traj_weights is on {traj_weights.device} but hidden is on {device}")
    if not traj_weights.dtype.is_floating_point:
        raise TypeError(f"traj_weights must be a float tensor, got {traj_weights.dtype}")
    if not bool(torch.isfinite(traj_weights.detach()).all()):
        raise ValueError("traj_weights contains NaN or inf; every trajectory weight must be finite")


def check_options(normalize: str, softcap: float | None, num_segments: int, normalizer) -> None:
    if normalize not in ("mean", "sum"):
        raise ValueError(f"normalize must be 'mean' or 'sum', got {normalize!r}")
    if softcap is not None and not (
        isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap > 0
    ):
        raise ValueError(f"softcap must be a positive finite number or None, got {softcap!r}")
    if not isinstance(num_segments, int) or isinstance(num_segments, bool) or num_segments < 1:
        raise ValueError(
            f"num_segments must be a positive int (the number of trajectories), got {num_segments!r}"
        )
    if normalizer is not None:
        z = float(normalizer)
        if not (math.isfinite(z) and z > 0):
            raise ValueError(f"normalizer must be a positive finite number, got {normalizer!r}")


def check_scratch_bytes(scratch_bytes) -> None:
    """``scratch_bytes``: None (no limit) or a non-negative int of bytes."""
    if scratch_bytes is None:
        return
    if isinstance(scratch_bytes, bool) or not isinstance(scratch_bytes, int):
        raise TypeError(
            f"scratch_bytes must be an int number of bytes or None (no limit), got {scratch_bytes!r} "
            f"({type(scratch_bytes).__name__}); e.g. scratch_bytes=2 * 2**30 for 2 GiB"
        )
    if scratch_bytes < 0:
        raise ValueError(f"scratch_bytes must be >= 0 bytes or None (no limit), got {scratch_bytes}")
