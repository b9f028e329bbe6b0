"""Shared pieces of the kernel benchmarks: problem sizes, inputs, the work model, device peaks, run info.

A :class:`Problem` is plain data (it travels to memory-probe subprocesses as JSON); :func:`make_inputs`
turns it into tensors, deterministically from its seed, so a subprocess rebuilds exactly the inputs
the timing process used.

Work model. Two FLOP counts per op, each the same for every row of that op, so the columns compare
implementations rather than FLOP bookkeeping:

* the floor counts the least work any implementation does (one that stores the logits):
  fwd 2·T·D·V, fwd_bwd 6·T·D·V, jvp 4·T·D·V, hvp 6·T·D·V (logits, tangent logits, d(dL/dW));
* the rate counts the work of a fused implementation, which recomputes the logits in its second
  pass: fwd 2, fwd_bwd 8 (the count the issue uses), jvp 4, hvp 10 (both passes form the logits and
  tangent logits, the second also d(dL/dW)), all times T·D·V. A row that stores the logits does
  less work than that and can exceed 100% of the matmul peak by this count.
* outer (a head-block hypergradient: K = OUTER_CG_STEPS conjugate-gradient HVPs, then one JVP for
  the scores): K·hvp + jvp in both counts.

Bytes are the inputs read once and the outputs written once (per HVP/JVP for outer). The floor is
max(floor FLOPs / measured matmul rate, bytes / measured copy bandwidth).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
MIB = float(1 << 20)

OPS = ("fwd", "fwd_bwd", "jvp", "hvp", "outer")
# "outer": one head-block hypergradient, OUTER_CG_STEPS conjugate-gradient HVPs then one JVP.
OUTER_CG_STEPS = 5
_FUSED_FLOPS = {"fwd": 2, "fwd_bwd": 8, "jvp": 4, "hvp": 10, "outer": 10 * OUTER_CG_STEPS + 4}  # × T·D·V
_FLOOR_FLOPS = {"fwd": 2, "fwd_bwd": 6, "jvp": 4, "hvp": 6, "outer": 6 * OUTER_CG_STEPS + 4}


@dataclass(frozen=True)
class Problem:
    """Sizes of one benchmark problem. ``segments`` is S for the weighted / per-trajectory rows."""

    T: int
    D: int
    V: int
    dtype: str = "float32"  # a torch dtype name: "float32", "bfloat16", "float16"
    device: str = "cpu"
    segments: int = 64
    backend: str = "auto"  # boost_kernels backend for our rows
    seed: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def label(self) -> str:
        return f"T={self.T} D={self.D} V={self.V} {self.dtype}"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Problem:
        return cls(**json.loads(text))


@dataclass
class Inputs:
    """Tensors of one problem. ``hidden``/``weight`` are leaves that require grad (use ``.detach()``
    for forward-only rows); ``tangent_weight`` is the direction U for JVP/HVP rows."""

    problem: Problem
    hidden: torch.Tensor  # [T, D]
    weight: torch.Tensor  # [V, D]
    labels: torch.Tensor  # [T] int64, all in [0, V): every token counts, as in every competitor
    one_segment: torch.Tensor  # [T] int64 zeros: S=1, the unweighted mean all competitors compute
    segment_ids: torch.Tensor  # [T] int64 in [0, S): S contiguous trajectories of random length
    traj_weights: torch.Tensor  # [S] float32, positive, mean 1
    tangent_weight: torch.Tensor  # [V, D]

    @property
    def num_segments(self) -> int:
        return self.problem.segments

    def clear_grads(self) -> None:
        self.hidden.grad = None
        self.weight.grad = None

    def input_bytes(self) -> int:
        tensors = (self.hidden, self.weight, self.labels, self.one_segment, self.segment_ids)
        return sum(t.numel() * t.element_size() for t in tensors)


def random_segments(T: int, S: int, gen: torch.Generator) -> torch.Tensor:
    """[T] ids of S contiguous, non-empty trajectories with random lengths (S <= T)."""
    if S > T:
        raise ValueError(f"need at least one token per trajectory, got S={S} > T={T}")
    cuts = torch.randperm(T - 1, generator=gen)[: S - 1] + 1
    starts = torch.zeros(T, dtype=torch.int64)
    starts[cuts] = 1
    return torch.cumsum(starts, 0)


def make_inputs(problem: Problem) -> Inputs:
    """Deterministic inputs: hidden ~ N(0, 1), weight and U ~ N(0, 1/D) (logits of unit scale)."""
    dev, dt = torch.device(problem.device), problem.torch_dtype
    T, D, V, S = problem.T, problem.D, problem.V, problem.segments
    cpu_gen = torch.Generator().manual_seed(problem.seed)
    dev_gen = torch.Generator(device=dev).manual_seed(problem.seed)

    def normal(*shape, std):
        return (torch.randn(*shape, generator=dev_gen, device=dev, dtype=torch.float32) * std).to(dt)

    hidden = normal(T, D, std=1.0).requires_grad_()
    weight = normal(V, D, std=D**-0.5).requires_grad_()
    tangent = normal(V, D, std=D**-0.5)
    labels = torch.randint(0, V, (T,), generator=cpu_gen).to(dev)
    segments = random_segments(T, S, cpu_gen).to(dev)
    w = torch.rand(S, generator=cpu_gen) + 0.5
    return Inputs(
        problem=problem,
        hidden=hidden,
        weight=weight,
        labels=labels,
        one_segment=torch.zeros(T, dtype=torch.int64, device=dev),
        segment_ids=segments,
        traj_weights=(w / w.mean()).to(dev),
        tangent_weight=tangent,
    )


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """‖x − ref‖ / ‖ref‖, computed in float32 (enough for consistency checks of ~1e-3; large GPU
    results would need gigabytes in float64)."""
    x, ref = x.detach().float(), ref.detach().float()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def op_flops(op: str, problem: Problem, floor: bool = False) -> float:
    """FLOPs of ``op``: a fused implementation's (default) or the least any implementation does."""
    factor = (_FLOOR_FLOPS if floor else _FUSED_FLOPS)[op]
    return float(factor) * problem.T * problem.D * problem.V


def op_bytes(op: str, problem: Problem) -> float:
    item = torch.empty((), dtype=problem.torch_dtype).element_size()
    h, w = problem.T * problem.D * item, problem.V * problem.D * item
    steps = OUTER_CG_STEPS
    return float(
        {
            "fwd": h + w,
            "fwd_bwd": 2 * (h + w),
            "jvp": h + 2 * w,
            "hvp": h + 3 * w,
            "outer": steps * (h + 3 * w) + h + 2 * w,
        }[op]
    )


def output_bytes(op: str, problem: Problem) -> int:
    """Bytes of what the op must hand back: the gradients for fwd_bwd, d(dL/dW) for hvp, v for outer, else ~0."""
    item = torch.empty((), dtype=problem.torch_dtype).element_size()
    h, w = problem.T * problem.D * item, problem.V * problem.D * item
    return {"fwd": 0, "fwd_bwd": h + w, "jvp": 0, "hvp": w, "outer": w}[op]


@dataclass(frozen=True)
class Peaks:
    """Measured device rates: dense matmul (FLOP/s) in ``dtype`` and copy bandwidth (bytes/s)."""

    matmul_flops: float
    matmul_dtype: str
    matmul_size: int
    bandwidth: float
    copy_bytes: int

    def best(self, other: Peaks) -> Peaks:
        """The higher of two measurements of each rate (measured at the start and the end of a run)."""
        return dataclasses.replace(
            self,
            matmul_flops=max(self.matmul_flops, other.matmul_flops),
            bandwidth=max(self.bandwidth, other.bandwidth),
        )

    def floor_seconds(self, op: str, problem: Problem) -> float:
        flops = op_flops(op, problem, floor=True)
        return max(flops / self.matmul_flops, op_bytes(op, problem) / self.bandwidth)


def time_calls(
    fn, device: torch.device, repeats: int, warmup: int = 1, clock=time.perf_counter
) -> list[float]:
    """Seconds of each of ``repeats`` calls of fn after ``warmup`` calls: CUDA events on a GPU,
    ``clock`` on the CPU (``time.process_time`` for CPU time). Each result is dropped before the next call.
    """
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = clock()
            fn()
            out.append(clock() - t0)
    return out


def measure_peaks(
    device: str, dtype: str, matmul_size: int, copy_mib: int, repeats: int = 5, clock=time.perf_counter
) -> Peaks:
    """Best-of-``repeats`` rate of an n×n×n matmul in ``dtype`` and of a device-to-device copy."""
    dev, dt = torch.device(device), getattr(torch, dtype)
    n = matmul_size
    a = torch.randn(n, n, device=dev).to(dt)
    b = torch.randn(n, n, device=dev).to(dt)
    out = torch.empty(n, n, device=dev, dtype=dt)
    mm = min(time_calls(lambda: torch.mm(a, b, out=out), dev, repeats, clock=clock))
    src = torch.ones(copy_mib * (1 << 20) // 4, device=dev)
    dst = torch.zeros_like(src)
    cp = min(time_calls(lambda: dst.copy_(src), dev, repeats, clock=clock))
    return Peaks(
        matmul_flops=2.0 * n**3 / mm,
        matmul_dtype=dtype,
        matmul_size=n,
        bandwidth=2.0 * src.numel() * 4 / cp,
        copy_bytes=src.numel() * 4,
    )


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run_info(device: str) -> dict:
    """Card / machine, date, commit and software versions, for the results header."""
    dev = torch.device(device)
    if dev.type == "cuda":
        machine = torch.cuda.get_device_name(dev)
    else:
        machine = f"{_cpu_name()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    # Only the code under test counts: other engineers' work in progress elsewhere does not.
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", "boost_kernels", "benchmarks")
    return {
        "machine": machine,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _git("rev-parse", "--short", "HEAD")
        + (" (+ uncommitted changes in boost_kernels/ or benchmarks/)" if dirty else ""),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
