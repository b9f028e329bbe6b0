"""boost_kernels: fused per-trajectory weighted linear cross-entropy, its JVP and HVP.

CUDA tensors run Triton kernels; CPU tensors run a chunked PyTorch implementation that is also the
readable specification (``boost_kernels.chunked``). Neither builds the [tokens, vocab] logits.
"""

from boost_kernels._validate import DEFAULT_SCRATCH_BYTES
from boost_kernels.ops import (
    HeadHVP,
    TrajectoryJVP,
    TrajectoryLoss,
    trajectory_cross_entropy,
    trajectory_hvp,
    trajectory_jvp,
)

__all__ = [
    "DEFAULT_SCRATCH_BYTES",
    "HeadHVP",
    "TrajectoryJVP",
    "TrajectoryLoss",
    "trajectory_cross_entropy",
    "trajectory_hvp",
    "trajectory_jvp",
]
