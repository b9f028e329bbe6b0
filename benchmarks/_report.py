"""Result rows, markdown tables and target checks shared by the benchmark suites.

A target compares two measured rows (or one row with a constant) and says PASS, MISS, or why it
could not be evaluated; it never fills in a number that was not measured.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from benchmarks._common import MIB, Peaks, Problem, op_flops


@dataclass
class Row:
    """One measured (or skipped) computation."""

    problem: str  # Problem.label
    op: str
    name: str
    description: str
    status: str = "ok"  # ok | skipped | error | oom
    seconds: float | None = None
    timing: str = ""  # how ``seconds`` was taken, e.g. "min of 3 rounds"
    peak_bytes: int | None = None  # above the inputs
    extra_bytes: int | None = None  # peak minus the op's outputs (gradients, d(dL/dW))
    floor_fraction: float | None = None
    matmul_fraction: float | None = None  # op FLOPs / time / measured matmul rate
    rel_err: float | None = None  # vs the reference variant's result, same run
    reference: str | None = None
    note: str = ""
    section: str = ""  # which table of a suite the row belongs to
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def fill_rates(row: Row, problem: Problem, peaks: Peaks | None) -> None:
    """Set the floor fraction and the matmul-rate fraction of a timed row from the measured peaks."""
    if row.seconds is None or peaks is None or row.seconds <= 0:
        return
    row.floor_fraction = peaks.floor_seconds(row.op, problem) / row.seconds
    row.matmul_fraction = op_flops(row.op, problem) / row.seconds / peaks.matmul_flops


def _num(value: float | None, spec: str, scale: float = 1.0, unit: str = "") -> str:
    if value is None or math.isnan(value):
        return "–"
    return format(value * scale, spec) + unit


def _time(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.2f} s"


def find(rows: list[Row], problem: str, op: str, name: str) -> Row | None:
    for row in rows:
        if (row.problem, row.op, row.name) == (problem, op, name) and row.status == "ok":
            return row
    return None


def markdown_table(rows: list[Row], baseline: str = "ours", wall_column: bool = False) -> str:
    """Rows in the given order; "× ours" is this row's time over our row's time for the same op.

    ``wall_column`` adds the wall-clock minimum (``extra["wall_seconds"]``) when ``time`` is CPU time.
    """
    head = [
        "problem", "op", "variant", "time", "× ours", "peak above inputs", "extra beyond outputs",
        "% of floor", "% of matmul peak (fused FLOPs)", "rel. err vs ref", "status",
    ] + (["wall clock"] if wall_column else [])  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        ours = find(rows, row.problem, row.op, baseline)
        ratio = row.seconds / ours.seconds if row.seconds and ours and ours.seconds else None
        err = f"{row.rel_err:.1e} vs {row.reference}" if row.rel_err is not None else "–"
        status = row.status if not row.note else f"{row.status}: {row.note}"
        status = " ".join(status.replace("|", "/").split())
        cells = [
            row.problem,
            row.op,
            row.name,
            _time(row.seconds),
            _num(ratio, ".2f"),
            _num(row.peak_bytes, ".0f", 1 / MIB, " MiB"),
            _num(row.extra_bytes, ".0f", 1 / MIB, " MiB"),
            _num(row.floor_fraction, ".0f", 100),
            _num(row.matmul_fraction, ".0f", 100),
            err,
            status,
        ] + ([_time(row.extra.get("wall_seconds"))] if wall_column else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Target:
    """``metric(row_a) / metric(row_b)`` (or ``metric(row_a)`` alone when b is None) ``sense`` ``limit``."""

    description: str
    problem: str
    a: tuple[str, str]  # (op, name)
    metric: str  # "seconds" | "extra_bytes" | "peak_bytes" | "matmul_fraction"
    sense: str  # "<=" | ">="
    limit: float
    b: tuple[str, str] | None = None


def _value(row: Row, metric: str) -> float | None:
    value = getattr(row, metric)
    return None if value is None else float(value)


def evaluate(target: Target, rows: list[Row]) -> tuple[str, float | None, str]:
    """(verdict, measured value, detail): verdict is PASS, MISS or NOT MEASURED."""
    row_a = find(rows, target.problem, *target.a)
    row_b = find(rows, target.problem, *target.b) if target.b else None
    wanted = [(target.a, row_a)] + ([(target.b, row_b)] if target.b else [])
    missing = [f"{op}/{name}" for (op, name), row in wanted if row is None]
    if missing:
        return "NOT MEASURED", None, f"no measured row for {', '.join(missing)}"
    a = _value(row_a, target.metric)
    if a is None:
        return "NOT MEASURED", None, f"{target.metric} of {target.a[1]} not measured"
    if row_b is None:
        value = a
    else:
        b = _value(row_b, target.metric)
        if b is None:
            return "NOT MEASURED", None, f"{target.metric} of {target.b[1]} not measured"
        # A non-positive denominator (no extra memory at all) makes the ratio unbounded.
        value = a / b if b > 0 else math.inf
    ok = value <= target.limit if target.sense == "<=" else value >= target.limit
    return ("PASS" if ok else "MISS"), value, ""


def targets_markdown(targets: list[Target], rows: list[Row]) -> tuple[str, list[dict]]:
    """A markdown list of the targets with measured values, and the same as dicts for JSON."""
    lines, records = [], []
    for t in targets:
        verdict, value, detail = evaluate(t, rows)
        in_mib = t.b is None and t.metric.endswith("_bytes")  # an absolute memory target
        scale, unit = (1 / MIB, " MiB") if in_mib else (1.0, "")
        shown = "–" if value is None else ("∞" if math.isinf(value) else f"{value * scale:.3g}{unit}")
        suffix = f" ({detail})" if detail else ""
        lines.append(
            f"- **{verdict}** {t.description}: measured {shown}, target {t.sense} {t.limit * scale:g}{unit}{suffix}"
        )
        records.append({"target": t.description, "verdict": verdict, "value": value, "limit": t.limit,
                        "sense": t.sense, "detail": detail})  # fmt: skip
    return "\n".join(lines), records


def loss_targets_cpu(problem: str) -> list[Target]:
    fb = "fwd_bwd"
    return [
        Target(
            "CPU fwd+bwd peak memory above inputs (gradients included), ours / naive",
            problem,
            (fb, "ours"),
            "peak_bytes",
            "<=",
            1 / 8,
            (fb, "naive"),
        ),
        Target(
            "CPU fwd+bwd extra memory beyond inputs and gradients, ours / naive",
            problem,
            (fb, "ours"),
            "extra_bytes",
            "<=",
            1 / 8,
            (fb, "naive"),
        ),  # fmt: skip
        Target("CPU fwd+bwd time, ours / naive", problem, (fb, "ours"), "seconds", "<=", 1.3, (fb, "naive")),
    ]


def loss_targets_gpu(problem: str) -> list[Target]:
    fb = "fwd_bwd"
    return [
        Target(
            "fwd+bwd time, ours / Cut Cross-Entropy", problem, (fb, "ours"), "seconds", "<=", 1.0, (fb, "cce")
        ),
        Target("fwd+bwd time, ours / Liger", problem, (fb, "ours"), "seconds", "<=", 0.6, (fb, "liger")),
        Target(
            "fwd+bwd extra memory beyond inputs and gradients, ours",
            problem,
            (fb, "ours"),
            "extra_bytes",
            "<=",
            64 * MIB,
        ),  # fmt: skip
        Target(
            "fwd+bwd rate, ours (8·T·D·V FLOPs / time) / measured bf16 matmul rate",
            problem,
            (fb, "ours"),
            "matmul_fraction",
            ">=",
            0.5,
        ),  # fmt: skip
    ]


def second_order_targets(problem: str) -> list[Target]:
    """Issue 3 targets; ``ours_weighted`` is our fused loss on the same S-trajectory problem."""
    return [
        Target(
            "JVP time / our fused forward",
            problem,
            ("jvp", "ours"),
            "seconds",
            "<=",
            1.3,
            ("fwd", "ours_weighted"),
        ),
        Target(
            "HVP time / our fused forward+backward",
            problem,
            ("hvp", "ours"),
            "seconds",
            "<=",
            1.3,
            ("fwd_bwd", "ours_weighted"),
        ),  # fmt: skip
        Target(
            "torch.func JVP time / our JVP",
            problem,
            ("jvp", "torch_func"),
            "seconds",
            ">=",
            3.0,
            ("jvp", "ours"),
        ),
        Target(
            "torch.func HVP time / our HVP",
            problem,
            ("hvp", "torch_func"),
            "seconds",
            ">=",
            3.0,
            ("hvp", "ours"),
        ),
        Target(
            "torch.func JVP extra memory / ours",
            problem,
            ("jvp", "torch_func"),
            "extra_bytes",
            ">=",
            10.0,
            ("jvp", "ours"),
        ),  # fmt: skip
        Target(
            "torch.func HVP extra memory / ours",
            problem,
            ("hvp", "torch_func"),
            "extra_bytes",
            ">=",
            10.0,
            ("hvp", "ours"),
        ),  # fmt: skip
    ]


def weighting_note(problem: str, rows: list[Row]) -> str:
    """How much the S=64 weighting costs over the unweighted mean, per op, from the same run."""
    parts = []
    for op in ("fwd", "fwd_bwd"):
        plain, weighted = find(rows, problem, op, "ours"), find(rows, problem, op, "ours_weighted")
        if plain and weighted and plain.seconds and weighted.seconds:
            parts.append(f"{op}: weighted / unweighted time = {weighted.seconds / plain.seconds:.2f}")
    return "; ".join(parts)
