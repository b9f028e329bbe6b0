"""Peak-memory measurement: CUDA allocator statistics, or the resident set size on the CPU.

On CUDA, ``torch.cuda.max_memory_allocated`` minus what was allocated before the call (the inputs):
exact for everything that goes through PyTorch's allocator (Triton kernels' buffers included).

On the CPU there is no allocator counter, so the peak is the process's resident-set high-water mark
(``VmHWM``) minus its resident set just before the call. Linux resets the high-water mark when 5 is
written to ``/proc/self/clear_refs``. To make the number mean "peak live memory of this call":

* each (variant, op) runs in a fresh subprocess (:func:`probe_cpu_peak`), so no other variant's
  allocations or allocator caches are around;
* the subprocess runs with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc then serves every block of 64 KiB
  or more with its own mmap and unmaps it on free, so freed tensors leave the resident set at once
  instead of being kept for reuse (which would hide a later call's peak);
* before the measured call the variant runs once at a tiny size, which maps library code and
  initialises lazy state without raising the high-water mark; a variant that compiles
  (torch.compile) runs once at the measured size instead, and the mark is reset afterwards.

Run as ``python -m benchmarks._measure '<problem json>' NAME OP THREADS [COMPILE_BACKEND]`` it is that
subprocess: it prints one JSON line with the measurement.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks._common import REPO, Inputs, Problem, make_inputs

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in {_STATUS}")


def rss_meter_available() -> bool:
    """Whether this process can reset and read its resident-set high-water mark (Linux >= 4.0)."""
    try:
        _CLEAR_REFS.write_text("5")
        _status_kib("VmHWM")
    except (OSError, RuntimeError):
        return False
    return True


class RssMeter:
    """Peak resident set of this process during a call, above the resident set at ``start``."""

    def start(self) -> None:
        gc.collect()
        _CLEAR_REFS.write_text("5")  # VmHWM := VmRSS
        self.base = _status_kib("VmRSS") * 1024

    def peak(self) -> int:
        return _status_kib("VmHWM") * 1024 - self.base


class CudaMeter:
    """Peak CUDA memory allocated by PyTorch's allocator during a call, above the allocation at ``start``."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - self.base


def meter_for(device: torch.device) -> CudaMeter | RssMeter:
    return CudaMeter(device) if device.type == "cuda" else RssMeter()


def _tiny(problem: Problem) -> Problem:
    return dataclasses.replace(problem, T=max(64, problem.segments), V=min(problem.V, 512))


def probe_in_this_process(problem: Problem, name: str, op: str, compile_backend: str = "inductor") -> dict:
    """Measure one variant's peak above its inputs here (meant for a fresh subprocess; CPU)."""
    from benchmarks._variants import variant

    v = variant(name, op, compile_backend)
    if v.compiles:
        inputs = make_inputs(problem)
        v.build(inputs)()
    else:
        v.build(make_inputs(_tiny(problem)))()
        inputs = make_inputs(problem)
    inputs.clear_grads()
    run = v.build(inputs)
    meter = RssMeter()
    meter.start()
    result = run()
    peak = meter.peak()
    return {
        "peak_bytes": peak,
        "base_rss_bytes": meter.base,
        "input_bytes": _input_bytes(inputs),
        "finite": bool(torch.isfinite(result).all()),
    }


def _input_bytes(inputs: Inputs) -> int:
    return inputs.input_bytes() + inputs.tangent_weight.numel() * inputs.tangent_weight.element_size()


def probe_cpu_peak(
    problem: Problem,
    name: str,
    op: str,
    threads: int,
    compile_backend: str = "inductor",
    timeout: float = 900,
) -> dict:
    """Run :func:`probe_in_this_process` in a fresh Python with ``threads`` torch threads; raise with
    its stderr if it fails."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(REPO))
    args = [problem.to_json(), name, op, str(threads), compile_backend]
    cmd = [sys.executable, "-m", "benchmarks._measure", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe {name}/{op} failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
    problem, name, op, threads = Problem.from_json(argv[0]), argv[1], argv[2], int(argv[3])
    compile_backend = argv[4] if len(argv) > 4 else "inductor"
    torch.set_num_threads(threads)
    if not rss_meter_available():
        raise SystemExit("cannot reset the resident-set high-water mark (/proc/self/clear_refs)")
    print(json.dumps(probe_in_this_process(problem, name, op, compile_backend)))


if __name__ == "__main__":
    main(sys.argv[1:])
