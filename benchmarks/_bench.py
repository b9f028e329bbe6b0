"""pytest-benchmark plumbing shared by ``bench_loss.py`` and ``bench_jvp_hvp.py``.

:class:`Recorder` times one variant with ``benchmark.pedantic``, measures its peak memory (CUDA
allocator in-process, or a fresh subprocess on the CPU: see ``_measure.py``), checks its result
against the reference variant of the same op, stores everything in ``benchmark.extra_info`` and, at
the end of the module, prints a markdown table with the targets and writes it to
``.benchmarks/<module>.md``.

Sizes and rounds can be shrunk for a smoke run with ``BOOST_BENCH_T`` and ``BOOST_BENCH_ROUNDS``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
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


def shrink(problem: Problem) -> Problem:
    """Apply ``BOOST_BENCH_T`` (a smaller token count for smoke runs) to a problem."""
    return dataclasses.replace(problem, T=env_int("BOOST_BENCH_T", problem.T))


class Recorder:
    """Runs and records the rows of one benchmark module."""

    def __init__(self, title: str, command: str, peaks: Peaks, targets: Callable[[str], list[Target]]):
        self.title, self.command, self.peaks, self.targets = title, command, peaks, targets
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
        result = benchmark.pedantic(run, rounds=rounds, warmup_rounds=1, iterations=1)
        row.seconds = benchmark.stats.stats.min
        row.timing = f"min of {rounds} rounds after 1 warm-up"
        row.extra["median_seconds"] = benchmark.stats.stats.median
        self._measure_memory(row, variant, problem, inputs, run)
        fill_rates(row, problem, self.peaks)
        key = (problem.label, variant.op, variant.name)
        if variant.name in referenced:
            self._results[key] = result.detach()
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
            probe = probe_cpu_peak(problem, variant.name, variant.op)
            row.peak_bytes = probe["peak_bytes"]
            row.extra["memory_method"] = "VmHWM above VmRSS after the inputs, fresh subprocess"
            row.extra["base_rss_mib"] = probe["base_rss_bytes"] / MIB
        row.extra_bytes = row.peak_bytes - output_bytes(variant.op, problem)

    def _sorted_rows(self) -> list[Row]:
        problems = list(self.problems)
        return sorted(self.rows, key=lambda r: (problems.index(r.problem), OPS.index(r.op)))

    def report(self) -> str:
        info = run_info(DEVICE)
        p = self.peaks
        parts = [
            f"### {self.title}",
            "",
            f"- machine: {info['machine']}; load average (1, 5, 15 min) at the end: {info['load_average']}",
            f"- date: {info['date']}; commit: {info['commit']}; torch {info['torch']}, triton {info['triton']}",
            f"- command: `{self.command}`",
            f"- measured peaks: {p.matmul_dtype} matmul {p.matmul_flops / 1e12:.3f} TFLOP/s "
            f"(n={p.matmul_size}), copy {p.bandwidth / 1e9:.1f} GB/s",
            "- time: min over rounds after one warm-up; memory: "
            + (
                "torch.cuda.max_memory_allocated above the inputs"
                if CUDA
                else "peak RSS above the inputs, one fresh subprocess per row (benchmarks/_measure.py)"
            ),  # fmt: skip
            "",
            markdown_table(self._sorted_rows()),
            "",
        ]
        for label in self.problems:
            text, _ = targets_markdown(self.targets(label), self.rows)
            note = weighting_note(label, self.rows)
            if text or note:
                parts += (
                    [f"Targets at {label}:", "", text]
                    + ([f"- weighting cost: {note}"] if note else [])
                    + [""]
                )
        return "\n".join(parts)


def finish(request, recorder: Recorder, module: str) -> None:
    """Print the module's report in the terminal summary and write it to ``.benchmarks/<module>.md``."""
    text = recorder.report()
    out = REPO / ".benchmarks" / f"{module}.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text + "\n")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        print(f"\n{text}\n(written to {out})", flush=True)


def module_peaks(problem: Problem) -> Peaks:
    """Matmul rate and copy bandwidth of this device, measured at the start of the module."""
    if torch.device(problem.device).type == "cuda":
        return measure_peaks(problem.device, "bfloat16", 8192, 1024)
    return measure_peaks(problem.device, problem.dtype, 2048, 256)
