"""pytest-benchmark plumbing shared by ``bench_loss.py`` and ``bench_jvp_hvp.py``.

:class:`Recorder` times one variant with ``benchmark.pedantic``, measures its peak memory (CUDA
allocator in-process, or a fresh subprocess on the CPU: see ``_measure.py``), checks its result
against the reference variant of the same op, stores everything in ``benchmark.extra_info`` and, at
the end of the module, prints a markdown table with the targets and writes it to
``.benchmarks/<module>.md``.

Timing. On a GPU: wall clock (the closure synchronises), min over rounds. On the CPU the dev boxes
are shared, and wall-clock times of one computation moved by 2-3x with the other processes' load,
so the table reports the process CPU time of each call (``time.process_time``) with PyTorch on one
thread (``BOOST_BENCH_THREADS``, default 1): with one thread, CPU time is the computation's own
time whatever else runs. The wall-clock minimum is reported next to it. The matmul peak is measured
the same way, at the start and at the end of the module; the higher value is used.

Sizes and rounds can be shrunk for a smoke run with ``BOOST_BENCH_T`` and ``BOOST_BENCH_ROUNDS``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable

import pytest
import torch

from benchmarks._common import (
    MIB,
    OPS,
    REPO,
    Peaks,
    Problem,
    make_inputs,
    measure_peaks,
    output_bytes,
    rel_err,
    run_info,
)
from benchmarks._measure import CudaMeter, probe_cpu_peak
from benchmarks._report import Row, Target, fill_rates, markdown_table, targets_markdown, weighting_note
from benchmarks._variants import Variant

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

# Results of variants that others are checked against must agree to this (same math, other rounding).
CONSISTENCY_TOL = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 5e-2}


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


CPU_THREADS = env_int("BOOST_BENCH_THREADS", 1)


def shrink(problem: Problem) -> Problem:
    """Apply ``BOOST_BENCH_T`` (a smaller token count for smoke runs) to a problem."""
    return dataclasses.replace(problem, T=env_int("BOOST_BENCH_T", problem.T))


def measure_device_peaks(problem: Problem) -> Peaks:
    """Matmul rate and copy bandwidth, with the clock the rows are timed with."""
    if CUDA:
        return measure_peaks(problem.device, "bfloat16", 8192, 1024, repeats=10)
    return measure_peaks(problem.device, problem.dtype, 2048, 256, clock=time.process_time)


class Recorder:
    """Runs and records the rows of one benchmark module (use through :func:`recording`)."""

    def __init__(self, title: str, command: str, problem: Problem, targets: Callable[[str], list[Target]]):
        self.title, self.command, self.targets = title, command, targets
        self.peaks = measure_device_peaks(problem)
        self.rows: list[Row] = []
        self.problems: dict[str, Problem] = {}
        self._inputs = None
        self._results: dict[tuple[str, str, str], torch.Tensor] = {}

    def inputs(self, problem: Problem):
        """Inputs of ``problem``, built once; the previous problem's are dropped (GPU sizes are large)."""
        if self._inputs is None or self._inputs.problem != problem:
            self._inputs = None
            self._results = {k: v for k, v in self._results.items() if k[0] == problem.label}
            self._inputs = make_inputs(problem)
        return self._inputs

    def run(self, benchmark, variant: Variant, problem: Problem, rounds: int, referenced: set[str]) -> Row:
        """Time, measure and check one variant; skips (with the reason) if it cannot run here."""
        self.problems[problem.label] = problem
        row = Row(problem.label, variant.op, variant.name, variant.description, reference=variant.reference)
        reason = variant.unavailable(problem)
        if reason:
            row.status, row.note = "skipped", reason
            self.rows.append(row)
            pytest.skip(reason)
        inputs = self.inputs(problem)
        run = variant.build(inputs)
        cpu_times: list[float] = []

        def timed():
            t0 = time.process_time()
            out = run()
            if CUDA:
                torch.cuda.synchronize()
            cpu_times.append(time.process_time() - t0)
            return out

        result = benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1, iterations=1)
        wall = benchmark.stats.stats.min
        if CUDA:
            row.seconds, row.timing = wall, f"wall clock, min of {rounds} rounds after 1 warm-up"
        else:
            row.seconds = min(cpu_times[1:])
            row.timing = f"CPU time on {CPU_THREADS} thread(s), min of {rounds} rounds after 1 warm-up"
            row.extra["wall_seconds"] = wall
        self._measure_memory(row, variant, problem, inputs, run)
        if variant.name in referenced:
            self._results[(problem.label, variant.op, variant.name)] = result.detach()
        ref = self._results.get((problem.label, variant.op, variant.reference))
        if ref is not None:
            row.rel_err = rel_err(result, ref)
        benchmark.extra_info.update({k: v for k, v in row.to_dict().items() if k != "extra"})
        benchmark.extra_info.update(row.extra)
        self.rows.append(row)
        if row.rel_err is not None and row.rel_err > CONSISTENCY_TOL[problem.dtype]:
            pytest.fail(f"{variant.name} disagrees with {variant.reference}: rel. err {row.rel_err:.2e}")
        return row

    def _measure_memory(self, row: Row, variant: Variant, problem: Problem, inputs, run) -> None:
        if CUDA:
            inputs.clear_grads()
            meter = CudaMeter(torch.device(problem.device))
            meter.start()
            run()
            row.peak_bytes = meter.peak()
            row.extra["memory_method"] = "torch.cuda.max_memory_allocated above the inputs"
        else:
            probe = probe_cpu_peak(problem, variant.name, variant.op, threads=CPU_THREADS)
            row.peak_bytes = probe["peak_bytes"]
            row.extra["memory_method"] = "VmHWM above VmRSS after the inputs, fresh subprocess"
            row.extra["base_rss_mib"] = probe["base_rss_bytes"] / MIB
        row.extra_bytes = row.peak_bytes - output_bytes(variant.op, problem)

    def _sorted_rows(self) -> list[Row]:
        problems = list(self.problems)
        return sorted(self.rows, key=lambda r: (problems.index(r.problem), OPS.index(r.op)))

    def report(self) -> str:
        """The markdown report; re-measures the peaks first and keeps the higher values."""
        self.peaks = self.peaks.best(measure_device_peaks(next(iter(self.problems.values()))))
        for row in self.rows:
            fill_rates(row, self.problems[row.problem], self.peaks)
        info, p = run_info(DEVICE), self.peaks
        timing = (
            "wall clock (CUDA synchronised), min over rounds after one warm-up"
            if CUDA
            else f"process CPU time with torch on {CPU_THREADS} thread(s), min over rounds after one warm-up "
            "(wall-clock min in the last column)"
        )
        memory = (
            "torch.cuda.max_memory_allocated above the inputs"
            if CUDA
            else "peak RSS above the inputs, one fresh subprocess per row (benchmarks/_measure.py)"
        )
        parts = [
            f"### {self.title}",
            "",
            f"- machine: {info['machine']}; load average (1, 5, 15 min) at the end: "
            + ", ".join(f"{x:.2f}" for x in info["load_average"] or ()),
            f"- date: {info['date']}; commit: {info['commit']}; torch {info['torch']}, triton {info['triton']}",
            f"- command: `{self.command}`",
            f"- measured peaks (best of start and end of the run): {p.matmul_dtype} matmul "
            f"{p.matmul_flops / 1e9:.1f} GFLOP/s (n={p.matmul_size}), copy {p.bandwidth / 1e9:.1f} GB/s",
            f"- time: {timing}; memory: {memory}",
            "",
            markdown_table(self._sorted_rows(), wall_column=not CUDA),
            "",
        ]
        for label in self.problems:
            text, _ = targets_markdown(self.targets(label), self.rows)
            note = weighting_note(label, self.rows)
            parts += [f"Targets at {label}:", "", text]
            parts += [f"- weighting cost: {note}"] if note else []
            parts += [""]
        return "\n".join(parts)


@contextlib.contextmanager
def recording(request, title: str, command: str, problem: Problem, targets, module: str):
    """Module fixture body: set the CPU thread count, yield a Recorder, then print and save the report."""
    threads = torch.get_num_threads()
    if not CUDA:
        torch.set_num_threads(CPU_THREADS)
    try:
        rec = Recorder(title, command, problem, targets)
        yield rec
        if rec.rows:
            _publish(request, rec.report(), module)
    finally:
        torch.set_num_threads(threads)


def _publish(request, text: str, module: str) -> None:
    """Print the report past pytest's capture and write it to ``.benchmarks/<module>.md``."""
    out = REPO / ".benchmarks" / f"{module}.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text + "\n")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        print(f"\n{text}\n(written to {out})", flush=True)
