"""A trainer in a child process that takes one step whenever its parent asks (``bench_cpu_preset.py``).

Why a child per case: the CPU has no allocator counter for everything a step touches (PyTorch's
tensors, peft's modules, Python objects), so peak memory is the resident set's high-water mark,
and that is a property of a whole process (``VmHWM`` / ``ru_maxrss`` only ever rise). In a process
of its own, each case's peak is its own: no earlier case's model, optimiser states or allocator
caches are counted. ``tracemalloc`` would see only Python's allocations (not tensor storage), and a
per-round reset of the high-water mark inside one shared process would still carry the previous
cases' retained heap. ``VmHWM`` rather than ``getrusage(...).ru_maxrss``: Linux carries the old
address space's high-water mark into ``ru_maxrss`` across ``exec``, and a spawned child is
vfork+exec'd from the (large) pytest process, so its ``ru_maxrss`` can be the parent's peak;
``VmHWM`` belongs to the child's own, fresh address space. The allocator is left as a user's run has it (no ``MALLOC_MMAP_THRESHOLD_``):
the step time is then the step time a run gets, and the peak is what the machine must hold.

Protocol (a ``multiprocessing`` pipe): the child builds the trainer, replies ``ready`` with the
resident set after the imports and after the build and the peak so far, then resets the high-water mark
(``/proc/self/clear_refs``) so that ``VmHWM`` from then on is the peak while stepping. Each ``step``
message runs one step and replies with its process CPU time (one torch thread: the computation's
own time on a shared box) and wall time; ``report`` replies with the memory numbers; ``stop`` ends it.
"""

from __future__ import annotations

import time
from pathlib import Path

_STATUS = Path("/proc/self/status")


def status_bytes(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in bytes."""
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in {_STATUS}")


def serve(conn, overrides: list[str], outer: bool) -> None:
    """The child's main loop: build a :class:`Trainer` from ``configs/cpu_preset.yaml`` + ``overrides``;
    each ``step`` is one inner step on a fixed batch and, if ``outer``, the outer step after it."""
    import torch

    from boost.config import load_config
    from boost.train import TrainConfig, Trainer
    from boost.train.loop import _cycle

    rss_imports = status_bytes("VmRSS")
    cfg = load_config(TrainConfig, "configs/cpu_preset.yaml", overrides)
    trainer = Trainer(cfg, progress=False)
    batch, val = next(_cycle(trainer.data.train)), next(_cycle(trainer.data.validation))
    trained = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    rss_built, peak_setup = status_bytes("VmRSS"), status_bytes("VmHWM")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: from here on, the stepping peak
    conn.send({"rss_imports": rss_imports, "rss_built": rss_built, "peak_setup": peak_setup, "tokens": int(batch.lengths.sum()),
               "trajectories": batch.num_segments, "trained_parameters": trained, "parameters": total,
               "threads": torch.get_num_threads()})  # fmt: skip
    while True:
        message = conn.recv()
        if message == "step":
            wall, cpu = time.perf_counter(), time.process_time()
            _, state = trainer.inner_step(batch)
            if outer:
                trainer.outer_step(batch, state, val)
            conn.send((time.process_time() - cpu, time.perf_counter() - wall))
        elif message == "report":
            conn.send({"peak_stepping": status_bytes("VmHWM"), "rss_now": status_bytes("VmRSS")})
        else:
            conn.close()
            return
