"""Implicit hypergradients over the LM-head block (DESIGN.md, "Implicit hypergradient").

The inner problem trains θ on the weighted loss L_in(θ, w) = Σ_i w_i L_i(θ) / Z (+ λ/2 |θ|², the
damping of the linear system below); the outer objective is L_out(θ*) on real validation
trajectories. By the implicit function theorem, with H = ∇²_θ L_in and g = ∇_θ L_out,

    dL_out/dw_i = −σ_i / Z,   σ_i = <∇_θ L_i, v>,   v = H⁻¹ g.

Here θ is the head block (W, the [V, D] LM-head weight), so every quantity comes from the fused
ops on the hidden states the inner step already computed: H·u from :func:`boost_kernels.trajectory_hvp`
and all σ_i in one pass from :func:`boost_kernels.trajectory_jvp`. Nothing here builds [T, V].

Three approximations of v (``method``):

* ``identity``: v = α g, the one-step look-ahead of Learning-to-Reweight (α the inner step size);
* ``neumann``: v = α Σ_{k=0..K} (I − αH)^k g, K = ``steps`` (converges when 0 < α < 2/λ_max(H));
* ``cg``: ``steps`` conjugate-gradient iterations on (H + λI) v = g (H is positive semi-definite
  for the head block without softcap, so CG applies; λ > 0 makes it definite).

Shapes: hidden [T, D] (any float dtype the ops take), weight [V, D], labels / segment_ids [T] int,
traj_weights [S]. Vectors (g, v) are shaped like the weight, float32 (float64 for float64 weights);
for a 16-bit head each HVP and the JVP see the vector rounded to the head's dtype (the fused ops
take tangents in the weight's dtype) and return float32. A bias, if any, is held fixed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

import boost_kernels as bk

METHODS = ("identity", "neumann", "cg")


@dataclass(frozen=True)
class HeadBatch:
    """A packed batch as the LM head sees it: the trunk's last hidden states and the targets.

    hidden [T, D], labels [T], segment_ids [T] in [-1, S); the rest as in
    :func:`boost_kernels.trajectory_cross_entropy`.
    """

    hidden: torch.Tensor
    labels: torch.Tensor
    segment_ids: torch.Tensor
    num_segments: int
    bias: torch.Tensor | None = None
    normalize: str = "mean"
    ignore_index: int = -100
    softcap: float | None = None
    backend: str = "auto"  # of the fused ops: "auto" (Triton on CUDA), "torch" or "triton"

    def _common(self) -> dict:
        return dict(
            labels=self.labels, segment_ids=self.segment_ids, num_segments=self.num_segments, bias=self.bias,
            normalize=self.normalize, ignore_index=self.ignore_index, softcap=self.softcap, backend=self.backend,
        )  # fmt: skip


@dataclass(frozen=True)
class SolverConfig:
    """How v ≈ H⁻¹ g is approximated (see the module docstring)."""

    method: str = "cg"
    steps: int = 5  # Neumann terms K, or CG iterations
    alpha: float = 1e-2  # α: the inner step size (identity, neumann)
    damping: float = 0.0  # λ: H + λI (neumann and cg); the inner weight decay, if any
    residual: bool = True  # report |(H + λI) v − g| / |g| (one more HVP pass)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"SolverConfig.method must be one of {METHODS}, got {self.method!r}")
        if self.steps < 0:
            raise ValueError(f"SolverConfig.steps must be >= 0, got {self.steps}")
        if not self.alpha > 0:
            raise ValueError(f"SolverConfig.alpha must be > 0, got {self.alpha}")
        if not self.damping >= 0:
            raise ValueError(f"SolverConfig.damping must be >= 0, got {self.damping}")


class Hypergradient(NamedTuple):
    traj_weights: torch.Tensor  # [S] float32: dL_out/dw_i = −σ_i / Z
    scores: torch.Tensor  # [S] float32: σ_i = <∇_W L_i, v>
    v: torch.Tensor  # [V, D]: the approximation of H⁻¹ g
    residual: float  # |(H + λI) v − g| / |g|: how well v solves the system (nan: identity, or not asked)


def head_hvp(
    batch: HeadBatch,
    weight: torch.Tensor,
    traj_weights: torch.Tensor,
    normalizer: float | None,
    u: torch.Tensor,
) -> torch.Tensor:
    """H u for H = ∇²_W Σ_i w_i L_i / Z: [V, D] in float32 (float64 for float64 weights)."""
    out = bk.trajectory_hvp(
        batch.hidden, weight, tangent_weight=u.to(weight.dtype), traj_weights=traj_weights,
        normalizer=normalizer, need_hidden=False, need_bias=False, validate=False, **batch._common(),
    )  # fmt: skip
    return out.weight.to(u.dtype)


def inverse_hvp(hvp, g: torch.Tensor, cfg: SolverConfig) -> torch.Tensor:
    """v ≈ (H + λI)⁻¹ g by ``cfg.method``; ``hvp(u)`` returns H u (without the damping).

    Memory: besides what ``hvp`` uses, CG holds four vectors shaped like g (x, r, p and the product),
    Neumann three; they are updated in place. ``g`` and ``hvp``'s results are never modified.
    """
    if cfg.method == "identity":
        return cfg.alpha * g

    def damped(u):
        out = hvp(u)
        return torch.add(out, u, alpha=cfg.damping) if cfg.damping else out

    if cfg.method == "neumann":
        term, total = g.clone(), g.clone()
        for _ in range(cfg.steps):
            term.sub_(damped(term), alpha=cfg.alpha)
            total.add_(term)
        return total.mul_(cfg.alpha)
    return _conjugate_gradient(damped, g, cfg.steps)


def _conjugate_gradient(apply, b: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` CG iterations on A x = b from x = 0 (A symmetric positive semi-definite)."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rr = _dot(r, r)
    tiny = torch.finfo(b.dtype).tiny
    for _ in range(steps):
        if rr <= tiny:  # solved exactly (or g = 0)
            break
        ap = apply(p)
        pap = _dot(p, ap)
        if pap <= 0:
            raise FloatingPointError(
                f"conjugate gradients met a direction with <p, (H + λI) p> = {pap:.3g} <= 0: the system is not "
                "positive definite (a softcap or the trunk block makes H indefinite); use method='neumann' or "
                "raise SolverConfig.damping"
            )
        step = rr / pap
        x.add_(p, alpha=step)
        r.sub_(ap, alpha=step)
        del ap
        rr_next = _dot(r, r)
        p.mul_(rr_next / rr).add_(r)
        rr = rr_next
    return x


def solve_residual(hvp, v: torch.Tensor, g: torch.Tensor, cfg: SolverConfig) -> float:
    """|(H + λI) v − g| / |g| (one more HVP), or nan for ``identity`` or ``cfg.residual=False``."""
    if not cfg.residual or cfg.method == "identity":
        return float("nan")
    res = hvp(v).add_(v, alpha=cfg.damping).sub_(g)
    return float(res.norm() / g.norm().clamp_min(torch.finfo(g.dtype).tiny))


_DOT_CHUNK = 1 << 20


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """<a, b> accumulated in float64 over 1M-element float32 dot products (no temporary copies)."""
    a, b = a.reshape(-1), b.reshape(-1)
    return sum(
        float(torch.dot(a[i : i + _DOT_CHUNK], b[i : i + _DOT_CHUNK]))
        for i in range(0, a.numel(), _DOT_CHUNK)
    )


def trajectory_scores(batch: HeadBatch, weight: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """σ_i = <∇_W L_i, v> for every trajectory of the batch, [S] float32, in one vocabulary pass."""
    out = bk.trajectory_jvp(
        batch.hidden, weight, tangent_weight=v.to(weight.dtype), validate=False, **batch._common()
    )
    return out.tangent


def head_hypergradient(
    train: HeadBatch,
    weight: torch.Tensor,
    traj_weights: torch.Tensor,
    val_grad: torch.Tensor,
    cfg: SolverConfig,
    normalizer: float | None = None,
) -> Hypergradient:
    """dL_out/dw_i for the trajectories of ``train`` through the implicit function theorem.

    Args:
        train: the inner batch (hidden states from the inner step's forward, detached).
        weight [V, D]: the LM head θ_S at which the inner problem is taken to be solved.
        traj_weights [S]: w_i of the inner loss (held fixed).
        val_grad [V, D]: g = ∇_W L_out on a validation batch.
        normalizer: Z of the inner loss (default S).
    Returns:
        :class:`Hypergradient`; backpropagate ``traj_weights`` into whatever produced w.
    """
    if val_grad.shape != weight.shape:
        raise ValueError(
            f"val_grad must be shaped like weight {tuple(weight.shape)}, got {tuple(val_grad.shape)}"
        )
    if traj_weights.shape != (train.num_segments,):
        raise ValueError(
            f"traj_weights must have shape ({train.num_segments},), got {tuple(traj_weights.shape)}"
        )
    with torch.no_grad():
        w = traj_weights.detach()
        g = val_grad.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32)

        def hvp(u):
            return head_hvp(train, weight.detach(), w, normalizer, u)

        v = inverse_hvp(hvp, g, cfg)
        residual = solve_residual(hvp, v, g, cfg)
        scores = trajectory_scores(train, weight.detach(), v)
        z = float(normalizer) if normalizer is not None else float(train.num_segments)
        return Hypergradient(-scores / z, scores, v, residual)
