"""What is timed: our ops and the competitors, each as a :class:`Variant` = (name, op, closure builder).

Loss rows (ops ``fwd`` and ``fwd_bwd``) compute the unweighted mean cross-entropy over all tokens,
the quantity every competitor computes; ``ours_weighted`` adds S per-trajectory means and weights,
which only we support. ``fwd`` rows run under ``no_grad`` on detached inputs (Liger computes its
gradients inside the forward when its inputs require grad, which would charge it for a backward).
``fwd_bwd`` rows compute the gradients of hidden and weight.

JVP / HVP rows differentiate with respect to the head weight W along U, hidden fixed, on the
S-trajectory problem: the JVP gives dL_i for every trajectory, the HVP gives d(dL/dW) of the
weighted loss Σ_i w_i L_i / S.

Competitors that cannot run here (CUDA-only Triton kernels on a CPU, or a package that does not
import) report why through :meth:`Variant.unavailable`; callers skip them with that reason.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import boost_kernels as bk
from benchmarks._common import OUTER_CG_STEPS, Inputs, Problem
from boost.bilevel.hypergradient import HeadBatch, SolverConfig, head_hypergradient, inverse_hvp


# ----------------------------------------------------------------------------- naive PyTorch
def naive_mean_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The textbook LM-head loss: materialised logits in the input dtype, upcast for the softmax."""
    logits = hidden @ weight.T
    return F.cross_entropy(logits.float(), labels)


def naive_per_trajectory(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    segment_ids: torch.Tensor,
    num_segments: int,
    ignore_index: int = -100,
) -> torch.Tensor:
    """[S] per-trajectory mean losses from materialised logits (float64 inputs stay float64).

    Tokens with segment id -1 or label ``ignore_index`` do not count; an empty trajectory gives 0.
    Also the float64 reference of the GPU suite's correctness checks.
    """
    logits = hidden @ weight.T
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    counted = (segment_ids >= 0) & (labels != ignore_index)
    safe_labels = torch.where(counted, labels, 0)
    token = torch.where(counted, F.cross_entropy(logits, safe_labels, reduction="none"), 0.0)
    segments = torch.where(counted, segment_ids, 0)
    counts = torch.bincount(segments[counted], minlength=num_segments).clamp(min=1).to(token.dtype)
    return (
        torch.zeros(num_segments, dtype=token.dtype, device=token.device).index_add(0, segments, token)
        / counts
    )


def naive_weighted_loss(hidden, weight, labels, segment_ids, num_segments, traj_weights) -> torch.Tensor:
    per = naive_per_trajectory(hidden, weight, labels, segment_ids, num_segments)
    return (traj_weights.to(per.dtype) * per).sum() / num_segments


@functools.cache
def compiled_naive_loss(backend: str) -> Callable:
    """``torch.compile`` of :func:`naive_mean_loss`, one per compiler backend (compiled lazily on use)."""
    return torch.compile(naive_mean_loss, backend=backend)


# ----------------------------------------------------------------------------- ours
def ours_mean_loss(hidden, weight, inp: Inputs) -> torch.Tensor:
    return bk.trajectory_cross_entropy(
        hidden, weight, inp.labels, inp.one_segment, 1, backend=inp.problem.backend
    ).loss


def _ours_mean_loss_with(**options) -> Callable:
    """``ours`` with keyword options of the op (e.g. ``scratch_bytes=None``, ``grad_filter=True``)."""

    def loss(hidden, weight, inp: Inputs) -> torch.Tensor:
        return bk.trajectory_cross_entropy(
            hidden, weight, inp.labels, inp.one_segment, 1, backend=inp.problem.backend, **options
        ).loss

    return loss


def ours_weighted_loss(hidden, weight, inp: Inputs) -> torch.Tensor:
    return bk.trajectory_cross_entropy(
        hidden, weight, inp.labels, inp.segment_ids, inp.num_segments,
        traj_weights=inp.traj_weights, backend=inp.problem.backend,
    ).loss  # fmt: skip


# ----------------------------------------------------------------------------- competitors
def _liger_loss(hidden, weight, inp: Inputs) -> torch.Tensor:
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss()(weight, hidden, inp.labels)


def _cce_loss(impl: str, filter_eps) -> Callable:
    def loss(hidden, weight, inp: Inputs) -> torch.Tensor:
        from cut_cross_entropy import linear_cross_entropy

        kwargs = {} if impl == "torch_compile" else {"filter_eps": filter_eps}
        return linear_cross_entropy(hidden, weight, inp.labels, impl=impl, **kwargs)

    return loss


def _import_error(module: str) -> str | None:
    try:
        __import__(module)
    except Exception as exc:  # an optional competitor: any import failure just skips its rows
        return f"{module} does not import: {type(exc).__name__}: {exc}"
    return None


def _needs_cuda(module: str, what: str) -> Callable[[Problem], str | None]:
    def check(problem: Problem) -> str | None:
        if torch.device(problem.device).type != "cuda":
            return f"{what} runs Triton kernels that need a CUDA device; this run is on {problem.device}"
        return _import_error(module)

    return check


def _always(problem: Problem) -> str | None:
    return None


@dataclass(frozen=True)
class Variant:
    """One timed computation. ``build(inputs)`` returns a no-argument closure to time; the closure
    returns a tensor comparable with the result of the ``reference`` variant of the same op.

    ``compiles``: the first call at a new shape runs a compiler (torch.compile) on any device, so a
    CPU memory probe must warm it up first. (Triton JIT of the CUDA kernels is not flagged: CUDA rows
    are always warmed up.)
    """

    name: str
    op: str
    description: str
    build: Callable[[Inputs], Callable[[], torch.Tensor]]
    unavailable: Callable[[Problem], str | None] = _always
    compiles: bool = False
    reference: str | None = None


def _loss_builder(op: str, loss_fn: Callable) -> Callable[[Inputs], Callable[[], torch.Tensor]]:
    """Wrap ``loss_fn(hidden, weight, inputs) -> scalar`` into a ``fwd`` or ``fwd_bwd`` closure builder."""

    def build_fwd(inp: Inputs):
        hidden, weight = inp.hidden.detach(), inp.weight.detach()

        def run():
            with torch.no_grad():
                return loss_fn(hidden, weight, inp).float()

        return run

    def build_fwd_bwd(inp: Inputs):
        def run():
            inp.clear_grads()
            loss = loss_fn(inp.hidden, inp.weight, inp)
            loss.backward()
            return loss.detach().float()

        return run

    return build_fwd if op == "fwd" else build_fwd_bwd


@dataclass(frozen=True)
class _LossSpec:
    description: str
    loss: Callable  # (hidden, weight, inputs) -> scalar loss
    unavailable: Callable[[Problem], str | None] = _always
    compiles: bool = False
    reference: str | None = "naive"


def _naive_loss(hidden, weight, inp: Inputs) -> torch.Tensor:
    return naive_mean_loss(hidden, weight, inp.labels)


def _compiled_loss(compile_backend: str) -> Callable:
    return lambda hidden, weight, inp: compiled_naive_loss(compile_backend)(hidden, weight, inp.labels)


def _loss_specs(compile_backend: str) -> dict[str, _LossSpec]:
    cce_cuda = _needs_cuda("cut_cross_entropy", "Cut Cross-Entropy (impl=cce)")
    return {
        "naive": _LossSpec("PyTorch, materialised logits", _naive_loss, reference=None),
        "ours": _LossSpec("boost_kernels, S=1: the unweighted mean", ours_mean_loss),
        "ours_unlimited_scratch": _LossSpec(
            "boost_kernels, S=1, scratch_bytes=None: one-pass backward, float32 accumulators (memory for speed)",
            _ours_mean_loss_with(scratch_bytes=None),
        ),
        "ours_filtered": _LossSpec(
            "boost_kernels, S=1, grad_filter=True (CCE's threshold, natural vocabulary order)",
            _ours_mean_loss_with(grad_filter=True),
        ),
        "ours_weighted": _LossSpec(
            "boost_kernels, S=64 trajectories, weighted", ours_weighted_loss, reference=None
        ),
        "torch_compile": _LossSpec(
            f"torch.compile(naive), backend={compile_backend}", _compiled_loss(compile_backend), compiles=True
        ),
        "liger": _LossSpec(
            "Liger-Kernel LigerFusedLinearCrossEntropyLoss",
            _liger_loss,
            _needs_cuda("liger_kernel", "Liger-Kernel"),
        ),
        "cce": _LossSpec(
            "Cut Cross-Entropy impl=cce (default filter_eps='high')", _cce_loss("cce", "high"), cce_cuda
        ),
        "cce_exact": _LossSpec(
            "Cut Cross-Entropy impl=cce, filter_eps=None (no gradient filtering)",
            _cce_loss("cce", None),
            cce_cuda,
        ),
        "cce_torch_compile": _LossSpec(
            "Cut Cross-Entropy impl=torch_compile",
            _cce_loss("torch_compile", None),
            lambda problem: _import_error("cut_cross_entropy"),
            compiles=True,
        ),
    }


LOSS_NAMES = (
    "naive",
    "ours",
    "ours_unlimited_scratch",
    "ours_filtered",
    "ours_weighted",
    "torch_compile",
    "liger",
    "cce",
    "cce_exact",
    "cce_torch_compile",
)


def loss_variant(name: str, op: str, compile_backend: str = "inductor") -> Variant:
    """The ``fwd`` or ``fwd_bwd`` row of competitor ``name`` (one of :data:`LOSS_NAMES`)."""
    if op not in ("fwd", "fwd_bwd"):
        raise ValueError(f"loss variants have ops 'fwd' and 'fwd_bwd', got {op!r}")
    spec = _loss_specs(compile_backend)[name]
    return Variant(
        name,
        op,
        spec.description,
        _loss_builder(op, spec.loss),
        spec.unavailable,
        spec.compiles,
        spec.reference,
    )


# ----------------------------------------------------------------------------- JVP / HVP
def _ours_jvp(inp: Inputs):
    h, w, p = inp.hidden.detach(), inp.weight.detach(), inp.problem
    return lambda: (
        bk.trajectory_jvp(
            h,
            w,
            inp.labels,
            inp.segment_ids,
            p.segments,
            tangent_weight=inp.tangent_weight,
            backend=p.backend,
        ).tangent
    )


def _ours_per_trajectory(inp: Inputs) -> Callable[[torch.Tensor], torch.Tensor]:
    h, p = inp.hidden.detach(), inp.problem
    return lambda w: (
        bk.trajectory_cross_entropy(
            h, w, inp.labels, inp.segment_ids, p.segments, backend=p.backend
        ).per_trajectory
    )


def _ours_weighted_of_w(inp: Inputs) -> Callable[[torch.Tensor], torch.Tensor]:
    h, p = inp.hidden.detach(), inp.problem
    return lambda w: (
        bk.trajectory_cross_entropy(
            h, w, inp.labels, inp.segment_ids, p.segments, traj_weights=inp.traj_weights, backend=p.backend
        ).loss
    )


def _naive_per_trajectory_of_w(inp: Inputs) -> Callable[[torch.Tensor], torch.Tensor]:
    h = inp.hidden.detach()
    return lambda w: naive_per_trajectory(h, w, inp.labels, inp.segment_ids, inp.num_segments)


def _naive_weighted_of_w(inp: Inputs) -> Callable[[torch.Tensor], torch.Tensor]:
    h = inp.hidden.detach()
    return lambda w: naive_weighted_loss(
        h, w, inp.labels, inp.segment_ids, inp.num_segments, inp.traj_weights
    )


def _func_jvp(of_w: Callable[[Inputs], Callable]):
    def build(inp: Inputs):
        f, w, u = of_w(inp), inp.weight.detach(), inp.tangent_weight
        return lambda: torch.func.jvp(f, (w,), (u,))[1]

    return build


def _forward_over_reverse(of_w: Callable[[Inputs], Callable]):
    def build(inp: Inputs):
        g, w, u = torch.func.grad(of_w(inp)), inp.weight.detach(), inp.tangent_weight
        return lambda: torch.func.jvp(g, (w,), (u,))[1]

    return build


def _double_backward(of_w: Callable[[Inputs], Callable]):
    def build(inp: Inputs):
        f, u = of_w(inp), inp.tangent_weight

        def run():
            w = inp.weight.detach().requires_grad_()
            (grad,) = torch.autograd.grad(f(w), w, create_graph=True)
            (hv,) = torch.autograd.grad(grad, w, grad_outputs=u)
            return hv

        return run

    return build


def _ours_hvp(inp: Inputs):
    h, w, p = inp.hidden.detach(), inp.weight.detach(), inp.problem
    return lambda: bk.trajectory_hvp(
        h, w, inp.labels, inp.segment_ids, p.segments,
        tangent_weight=inp.tangent_weight, traj_weights=inp.traj_weights, backend=p.backend,
    ).weight  # fmt: skip


def _outer_config() -> SolverConfig:
    return SolverConfig("cg", steps=OUTER_CG_STEPS, damping=1e-3, residual=False)


def _ours_outer(inp: Inputs):
    """boost.bilevel.hypergradient.head_hypergradient: HVPs from trajectory_hvp, scores from trajectory_jvp."""
    p = inp.problem
    batch = HeadBatch(inp.hidden.detach(), inp.labels, inp.segment_ids, p.segments)
    w, cfg = inp.weight.detach(), _outer_config()
    return lambda: head_hypergradient(batch, w, inp.traj_weights, inp.tangent_weight, cfg).traj_weights


def _func_outer(inp: Inputs):
    """The same CG and scores with torch.func on materialised logits (what a generic implicit-
    differentiation library does): HVP by forward-over-reverse, scores by one jvp."""
    w, cfg, S = inp.weight.detach(), _outer_config(), inp.num_segments
    grad_fn, per_trajectory = torch.func.grad(_naive_weighted_of_w(inp)), _naive_per_trajectory_of_w(inp)

    def hvp(u):
        return torch.func.jvp(grad_fn, (w,), (u.to(w.dtype),))[1].float()

    def run():
        v = inverse_hvp(hvp, inp.tangent_weight.float(), cfg)
        return -torch.func.jvp(per_trajectory, (w,), (v.to(w.dtype),))[1] / S

    return run


# (name, op) -> (description, closure builder, reference)
SECOND_ORDER = {
    ("ours", "outer"): (
        f"head_hypergradient, CG {OUTER_CG_STEPS} steps (fused HVP + JVP)",
        _ours_outer,
        "torch_func",
    ),
    ("torch_func", "outer"): (
        f"CG {OUTER_CG_STEPS} steps + scores with torch.func, materialised logits",
        _func_outer,
        None,
    ),
    ("ours", "jvp"): ("trajectory_jvp (fused)", _ours_jvp, "torch_func"),
    ("ours_autograd", "jvp"): (
        "torch.func.jvp through trajectory_cross_entropy",
        _func_jvp(_ours_per_trajectory),
        "torch_func",
    ),
    ("torch_func", "jvp"): (
        "torch.func.jvp, materialised logits",
        _func_jvp(_naive_per_trajectory_of_w),
        None,
    ),
    ("ours", "hvp"): ("trajectory_hvp (fused)", _ours_hvp, "torch_func"),
    ("ours_fwd_over_rev", "hvp"): (
        "torch.func jvp(grad) through trajectory_cross_entropy",
        _forward_over_reverse(_ours_weighted_of_w),
        "torch_func",
    ),
    ("ours_double_backward", "hvp"): (
        "double backward through trajectory_cross_entropy",
        _double_backward(_ours_weighted_of_w),
        "torch_func",
    ),
    ("torch_func", "hvp"): (
        "torch.func jvp(grad), materialised logits",
        _forward_over_reverse(_naive_weighted_of_w),
        None,
    ),
    ("double_backward", "hvp"): (
        "double backward, materialised logits",
        _double_backward(_naive_weighted_of_w),
        "torch_func",
    ),
}

OUTER_NAMES = tuple(name for name, op in SECOND_ORDER if op == "outer")
JVP_NAMES = tuple(name for name, op in SECOND_ORDER if op == "jvp")
HVP_NAMES = tuple(name for name, op in SECOND_ORDER if op == "hvp")


def second_order_variant(name: str, op: str) -> Variant:
    """A ``jvp``, ``hvp`` or ``outer`` row: ours (fused or through autograd) or a materialised-logits baseline."""
    description, build, reference = SECOND_ORDER[(name, op)]
    return Variant(name, op, description, build, reference=reference)


def variant(name: str, op: str, compile_backend: str = "inductor") -> Variant:
    """Any row by (name, op): the memory probe subprocess finds its variant through this."""
    if op in ("fwd", "fwd_bwd"):
        return loss_variant(name, op, compile_backend)
    return second_order_variant(name, op)
