"""Implicit hypergradients over the LM-head block (docs/design.md, "Implicit hypergradient").

The inner problem trains θ on the weighted loss L_in(θ, w) = Σ_i w_i L_i(θ) / Z (+ λ/2 |θ|², the
damping of the linear system below); the outer objective is L_out on real validation trajectories.
With g = ∇_θ L_out and v ≈ "the response of θ to the inner gradient, applied to g",

    dL_out/dw_i = −σ_i / Z,   σ_i = <∇_θ L_i, v>.

Here θ is the head block (W, the [V, D] LM-head weight), so every quantity comes from the fused
ops on the hidden states the inner step already computed: H·u from :func:`boost_kernels.trajectory_hvp`
and all σ_i in one pass from :func:`boost_kernels.trajectory_jvp`. Nothing here builds [T, V].

Three approximations of v (``method``), and the state each one linearises at:

* ``identity``: the one-step look-ahead of Learning-to-Reweight. d/dw_i L_out(θ_{t+1}(w)) with
  θ_{t+1} the parameters after the inner step: v = J_stepᵀ g with g = ∇L_out(θ_{t+1}) and J_step the
  step's response to its gradient; σ_i = <∇L_i(θ_t), v> at the parameters θ_t *before* the step (the
  ones the inner gradient was taken at; hidden states and head from that same state). J_step comes
  from the inner optimiser (:mod:`boost.bilevel.step_response`: lr for SGD, lr·P for Adam/AdamW, through
  gradient clipping); without one, v = α g with ``alpha``. This is exact to first order in w for
  the head block (tested against a finite difference through a real optimiser step).
* ``neumann``: v = α Σ_{k=0..K} (I − α(H + λI))^k g (Richardson iterations; converges when
  0 < α < 2/λ_max);
* ``cg``: conjugate gradients on (H + λI) v = g (H is positive semi-definite for the head block
  without softcap; λ > 0 makes it definite).

Neumann and CG are the implicit function theorem at an inner problem that is never solved: they
linearise at θ_t (H and σ_i on the inner batch as the step saw it) and take g at θ_{t+1}, and with a
few steps they solve the linear system only approximately. They are *approximate* IFT hypergradients:
:attr:`Hypergradient.residual` = |(H + λI) v − g| / |g| says how approximate, and both warm-start
from the previous outer step's v (``warm_start``; the system changes little between nearby steps).

Shapes: hidden [T, D] (any float dtype the ops take), weight [V, D], labels / segment_ids [T] int,
traj_weights [S]. Vectors (g, v) are shaped like the weight, float32 (float64 for float64 weights);
for a 16-bit head each HVP and the JVP see the vector rounded to the head's dtype (the fused ops
take tangents in the weight's dtype) and return float32. A bias, if any, is held fixed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

import boost_kernels as bk
from boost_kernels.chunked import _logits as chunk_logits  # the softcapped logits of the CPU spec
from boost_kernels.vocab_parallel import ShardedHeadBatch

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
    # of the Triton HVP (boost_kernels.trajectory_hvp): float32 scratch (None: no limit), no atomics
    scratch_bytes: int | None = bk.DEFAULT_SCRATCH_BYTES
    deterministic: bool = False

    def _common(self) -> dict:
        return dict(
            labels=self.labels, segment_ids=self.segment_ids, num_segments=self.num_segments, bias=self.bias,
            normalize=self.normalize, ignore_index=self.ignore_index, softcap=self.softcap, backend=self.backend,
        )  # fmt: skip


@dataclass(frozen=True)
class SolverConfig:
    """How v is approximated (see the module docstring)."""

    method: str = "cg"  # how v ≈ H⁻¹g is found: "cg", "neumann" or "identity"
    steps: int = 5  # Neumann / CG: Hessian-vector products per solve (the residual check is one more)
    # Neumann's step size α; for ``identity`` only where no inner optimiser defines the step (the
    # trainer and the toy take lr·P from the optimiser and refuse an alpha here)
    alpha: float | None = None
    damping: float = 0.0  # λ: H + λI (neumann and cg); the inner weight decay, if any
    warm_start: bool = True  # neumann / cg: start from the previous solve's v (see inverse_hvp)
    residual: bool = True  # report |(H + λI) v − g| / |g| (one more HVP pass); the trainer always does

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"SolverConfig.method must be one of {METHODS}, got {self.method!r}")
        if self.steps < 0:
            raise ValueError(f"SolverConfig.steps must be >= 0, got {self.steps}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"SolverConfig.alpha must be > 0, got {self.alpha}")
        if self.method == "neumann" and self.alpha is None:
            raise ValueError(
                "SolverConfig.alpha (the Neumann step size, < 2/λ_max(H)) is required for 'neumann'"
            )
        if not self.damping >= 0:
            raise ValueError(f"SolverConfig.damping must be >= 0, got {self.damping}")


class Hypergradient(NamedTuple):
    traj_weights: torch.Tensor  # [S] float32: dL_out/dw_i = −σ_i / Z
    scores: torch.Tensor  # [S] float32: σ_i = <∇_W L_i, v>
    v: torch.Tensor  # [V, D]: the approximation of H⁻¹ g
    residual: float  # |(H + λI) v − g| / |g|: how well v solves the system (nan: identity, or not asked)
    warm_started: bool = False  # the solve started from the previous v (False: from 0, or identity)


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
        normalizer=normalizer, need_hidden=False, need_bias=False, validate=False,
        scratch_bytes=batch.scratch_bytes, deterministic=batch.deterministic, **batch._common(),
    )  # fmt: skip
    return out.weight.to(u.dtype)


class Solve(NamedTuple):
    v: torch.Tensor  # shaped like g
    warm_started: bool  # True when the solve kept the initial guess (see inverse_hvp)


def inverse_hvp(
    hvp,
    g: torch.Tensor,
    cfg: SolverConfig,
    init: torch.Tensor | None = None,
    precondition: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """v ≈ (H + λI)⁻¹ g by ``cfg.method``; ``hvp(u)`` returns H u (without the damping).

    ``identity``: ``precondition(g)`` (the inner optimiser's response, :mod:`boost.bilevel.step_response`),
    else ``cfg.alpha · g``. Neumann and CG use ``cfg.steps`` Hessian-vector products in all; with
    ``init`` (the previous v) and ``cfg.warm_start`` they start from it, the first product giving
    its residual; when that residual is no smaller than |g| (the guess is worse than 0) they drop
    it and go on from 0. Memory: besides what ``hvp`` uses, CG holds four vectors shaped like g,
    Neumann three. ``g``, ``init`` and ``hvp``'s results are never modified.
    """
    return solve(hvp, g, cfg, init, precondition).v


def solve(hvp, g, cfg: SolverConfig, init=None, precondition=None, dot=None) -> Solve:
    """:func:`inverse_hvp`, also saying whether the warm start was kept. ``dot(a, b)`` -> float: the
    inner product of two vectors shaped like g (default :func:`_dot`; a sharded g sums over ranks)."""
    dot = dot or _dot
    if cfg.method == "identity":
        if precondition is not None:
            return Solve(precondition(g), False)
        if cfg.alpha is None:
            raise ValueError(
                "method 'identity' needs the inner step: pass the optimiser's response (precondition=) or set "
                "SolverConfig.alpha to the inner SGD learning rate"
            )
        return Solve(cfg.alpha * g, False)

    def damped(u):
        out = hvp(u)
        return torch.add(out, u, alpha=cfg.damping) if cfg.damping else out

    steps, x, r = cfg.steps, None, None
    if init is not None and cfg.warm_start and steps > 0:
        if init.shape != g.shape:
            raise ValueError(
                f"init (the previous v) must be shaped like g {tuple(g.shape)}, got {tuple(init.shape)}"
            )
        x = init.to(g.dtype).clone()
        r = damped(x).neg_().add_(g)
        steps -= 1
        if dot(r, r) >= dot(g, g):
            x, r = None, None
    warm = x is not None
    if cfg.method == "neumann":
        if x is None:
            x = cfg.alpha * g  # from 0, the first iteration needs no product
        else:
            x.add_(r, alpha=cfg.alpha)  # the iteration whose product gave the warm start's residual
        for _ in range(steps):
            x.add_(damped(x).neg_().add_(g), alpha=cfg.alpha)
        return Solve(x, warm)
    return Solve(_conjugate_gradient(damped, g, steps, x, r, dot), warm)


def _conjugate_gradient(apply, b: torch.Tensor, steps: int, x=None, r=None, dot=None) -> torch.Tensor:
    """``steps`` CG iterations on A x = b from x (default 0, then r = b); A positive semi-definite."""
    dot = dot or _dot
    if x is None:
        x, r = torch.zeros_like(b), b.clone()
    p = r.clone()
    rr = dot(r, r)
    tiny = torch.finfo(b.dtype).tiny
    for _ in range(steps):
        if rr <= tiny:  # solved exactly (or g = 0)
            break
        ap = apply(p)
        pap = dot(p, ap)
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
        rr_next = dot(r, r)
        p.mul_(rr_next / rr).add_(r)
        rr = rr_next
    return x


def solve_residual(hvp, v: torch.Tensor, g: torch.Tensor, cfg: SolverConfig, dot=None) -> float:
    """|(H + λI) v − g| / |g| (one more HVP), or nan for ``identity`` or ``cfg.residual=False``."""
    if not cfg.residual or cfg.method == "identity":
        return float("nan")
    res = hvp(v).add_(v, alpha=cfg.damping).sub_(g)
    if dot is None:
        return float(res.norm() / g.norm().clamp_min(torch.finfo(g.dtype).tiny))
    return (dot(res, res) / max(dot(g, g), torch.finfo(torch.float64).tiny)) ** 0.5


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


def trajectory_gradient_norms(
    batch: HeadBatch, weight: torch.Tensor, vocab_chunk: int = 16384
) -> torch.Tensor:
    """|∇_W L_i|_F for every trajectory of the batch, [S] float32 (float64 for a float64 weight).

    With a_t = ∂ℓ_t/∂z_raw,t (the softmax minus the one-hot label, times the softcap's derivative) and
    ∇_W L_i = (1/N_i) Σ_t a_t h_tᵀ over i's counted tokens (N_i = 1 for ``normalize="sum"``),
    |∇_W L_i|² = (1/N_i²) Σ_{t,s} <a_t, a_s> <h_t, h_s>: two passes over the vocabulary in chunks of
    ``vocab_chunk`` rows per trajectory (the log-sum-exp, then the Gram of the a_t), so memory is
    O(N_i² + N_i · vocab_chunk) and no [V, D] gradient is built. The bias, if any, is held fixed (the
    gradient is the weight's). Plain PyTorch on any device (no Triton kernel: it runs once per
    selection, not per step). An empty trajectory has norm 0.
    """
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    W = weight.detach().to(dtype)
    bias = None if batch.bias is None else batch.bias.detach().to(dtype)
    vocab = W.shape[0]
    keep = (batch.segment_ids >= 0) & (batch.labels != batch.ignore_index)
    segments, labels = batch.segment_ids[keep], batch.labels[keep]
    hidden = batch.hidden.detach()[keep].to(dtype)
    counts = torch.bincount(segments, minlength=batch.num_segments)
    norms = torch.zeros(batch.num_segments, dtype=dtype, device=W.device)

    def logits(h, start):  # (softcapped logits of one vocabulary chunk, their derivative or None)
        rows = slice(start, start + vocab_chunk)
        return chunk_logits(h, W[rows], None if bias is None else bias[rows], batch.softcap)

    for i in segments.unique().tolist():
        rows = segments == i
        h, y = hidden[rows], labels[rows]
        lse = torch.full((h.shape[0],), -torch.inf, dtype=dtype, device=W.device)
        for start in range(0, vocab, vocab_chunk):
            lse = torch.logaddexp(lse, torch.logsumexp(logits(h, start)[0], dim=1))
        gram = torch.zeros(h.shape[0], h.shape[0], dtype=dtype, device=W.device)
        for start in range(0, vocab, vocab_chunk):
            z, slope = logits(h, start)
            a = torch.exp(z - lse[:, None])
            here = (y >= start) & (y < start + z.shape[1])
            a[here.nonzero().squeeze(1), y[here] - start] -= 1.0
            if slope is not None:
                a = a * slope
            gram += a @ a.T
        scale = 1.0 / float(counts[i]) if batch.normalize == "mean" else 1.0
        norms[i] = scale * torch.sqrt(torch.clamp((gram * (h @ h.T)).sum(), min=0.0))
    return norms


def head_hypergradient(
    train: HeadBatch,
    weight: torch.Tensor,
    traj_weights: torch.Tensor,
    val_grad: torch.Tensor,
    cfg: SolverConfig,
    normalizer: float | None = None,
    init: torch.Tensor | None = None,
    precondition: Callable[[torch.Tensor], torch.Tensor] | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Hypergradient:
    """dL_out/dw_i for the trajectories of ``train`` (see the module docstring for the method).

    Args:
        train: the inner batch (hidden states from the inner step's forward, detached).
        weight [V, D]: the LM head θ_S at which the inner batch is linearised: for a look-ahead, the
            head *before* the inner step, the one that saw ``train.hidden``.
        traj_weights [S]: w_i of the inner loss (held fixed).
        val_grad [V, D]: g = ∇_W L_out on a validation batch (after the inner step).
        normalizer: Z of the inner loss (default S).
        init: the previous outer step's v, to warm-start Neumann / CG (``cfg.warm_start``).
        precondition: ``identity`` only, g -> v: the inner optimiser's response
            (:func:`boost.bilevel.step_response.optimizer_response`); default ``cfg.alpha · g``.
        reduce: data parallelism (:mod:`boost.train.distributed`): ``train`` is this rank's share of
            the batch, ``normalizer`` the global count, ``val_grad`` already summed over ranks, and
            ``reduce(Hu)`` sums each local [V, D] product over ranks (in place allowed). The scores
            stay local: the result holds this rank's trajectories.
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
            out = head_hvp(train, weight.detach(), w, normalizer, u)
            return out if reduce is None else reduce(out)

        v, warm = solve(hvp, g, cfg, init, precondition)
        residual = solve_residual(hvp, v, g, cfg)
        scores = trajectory_scores(train, weight.detach(), v)
        z = float(normalizer) if normalizer is not None else float(train.num_segments)
        return Hypergradient(-scores / z, scores, v, residual, warm)


def sharded_head_hypergradient(
    train: ShardedHeadBatch,
    traj_weights: torch.Tensor,
    val_grad: torch.Tensor,
    cfg: SolverConfig,
    normalizer: float,
    init: torch.Tensor | None = None,
    precondition: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Hypergradient:
    """:func:`head_hypergradient` with the head's rows split over ranks (vocabulary parallelism,
    :mod:`boost_kernels.vocab_parallel`), the same numbers without a [V, D] vector on any rank.

    Args:
        train: the inner batch (this rank's counted tokens, every rank's gathered) against this rank's
            rows of θ_t, the head before the inner step.
        traj_weights [S_r]: w_i of this rank's trajectories (held fixed).
        val_grad [V_r, D]: this rank's rows of g = ∇_W L_out (already over every rank's validation
            tokens: not summed again).
        normalizer: Z of the inner loss (the global trajectory count).
        init, precondition: as in :func:`head_hypergradient`, on this rank's rows (``identity``'s
            response is elementwise but for the clipping projection, whose inner product the caller
            sums over ranks).
    Returns:
        :class:`Hypergradient` of this rank's trajectories; ``v`` is this rank's [V_r, D] rows. The
        solver's inner products are summed over ranks (one scalar all-reduce each), its HVPs reduce
        one [chunk] vector per chunk of tokens, the scores one [T] vector.
    """
    if val_grad.shape != train.shard.weight.shape:
        raise ValueError(
            f"val_grad must be this rank's rows of g, shaped like the shard {tuple(train.shard.weight.shape)}, "
            f"got {tuple(val_grad.shape)}"
        )
    if traj_weights.shape != (train.num_segments,):
        raise ValueError(
            f"traj_weights must have shape ({train.num_segments},), got {tuple(traj_weights.shape)}"
        )
    collective = train.shard.collective

    def dot(a: torch.Tensor, b: torch.Tensor) -> float:
        local = torch.tensor([_dot(a, b)], dtype=torch.float64, device=a.device)
        return float(collective.sum_(local))

    with torch.no_grad():
        dtype = torch.float64 if train.shard.weight.dtype == torch.float64 else torch.float32
        g = val_grad.detach().to(dtype)
        coef = train.coefficients(traj_weights.detach(), normalizer)

        def hvp(u):
            return train.hvp(coef, u.to(train.shard.weight.dtype)).to(u.dtype)

        v, warm = solve(hvp, g, cfg, init, precondition, dot=dot)
        residual = solve_residual(hvp, v, g, cfg, dot=dot)
        scores = train.tangents(v.to(train.shard.weight.dtype))
        return Hypergradient(-scores / float(normalizer), scores, v, residual, warm)
