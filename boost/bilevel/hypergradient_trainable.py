"""Implicit hypergradients over all trainable parameters (e.g. LoRA), by finite differences.

docs/design.md, "Parameter block": for θ_S = every trainable parameter, σ_i and Hessian-vector products
come from central finite differences of plain forward and backward passes,

    σ_i ≈ [L_i(θ + εv) − L_i(θ − εv)] / (2ε),      H u ≈ [∇L_in(θ + εu) − ∇L_in(θ − εu)] / (2ε),

so no double backward is needed: this path works under DDP and FSDP2 and with any attention kernel
(flash-attn has no double backward). The error is O(ε²|v|³) from the curvature plus rounding of
order (machine epsilon · |L|) / ε; ``step`` is the norm of the perturbation εv, so the trade-off
does not depend on the scale of v. The parameters are restored bit for bit from a saved copy after
every evaluation (adding and subtracting εv would not round back to θ).

The solver (identity / Neumann / CG) is the one of :mod:`boost.bilevel.hypergradient`, run on the
parameters flattened into one vector (LoRA-sized blocks: a few million entries).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch

from boost.bilevel.hypergradient import Hypergradient, SolverConfig, solve, solve_residual


def local_part(x: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: an FSDP2 DTensor's local shard (a view), else ``x`` itself."""
    from torch.distributed.tensor import DTensor

    return x.to_local() if isinstance(x, DTensor) else x


def _flat(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return torch.cat([local_part(t).detach().reshape(-1).to(dtype) for t in tensors])


@contextmanager
def _shifted(params: Sequence[torch.Tensor], direction: torch.Tensor, scale: float, refresh=None):
    """Temporarily set θ ← θ + scale · direction (flat over the local parts), restoring θ exactly;
    ``refresh()`` after each change (FSDP2: drop the unsharded copies so that the next forward
    gathers the changed shards)."""
    saved = [local_part(p).detach().clone() for p in params]
    try:
        with torch.no_grad():
            offset = 0
            for p in params:
                lp = local_part(p)
                n = lp.numel()
                lp.add_(direction[offset : offset + n].view_as(lp).to(lp.dtype), alpha=scale)
                offset += n
        if refresh:
            refresh()
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                local_part(p).copy_(s)
        if refresh:
            refresh()


def _check(params: Sequence[torch.Tensor], step: float) -> int:
    if not params:
        raise ValueError("params is empty: pass the trainable parameters (e.g. the LoRA weights)")
    if not step > 0:
        raise ValueError(f"step (the norm of the finite-difference perturbation) must be > 0, got {step}")
    return sum(local_part(p).numel() for p in params)


def _epsilon(params: Sequence[torch.Tensor], direction: torch.Tensor, name: str, step: float,
             dot=None) -> float | None:  # fmt: skip
    """ε with |ε·direction| = step, after checking the inputs; None for a zero direction. ``dot``: the
    inner product over every rank's part (sharded parameters: the same ε on every rank)."""
    n = _check(params, step)
    if direction.shape != (n,):
        raise ValueError(
            f"{name} must be flat with {n} entries (the trainable parameters), got shape {tuple(direction.shape)}"
        )
    norm = float(direction.norm()) if dot is None else dot(direction, direction) ** 0.5
    return None if norm == 0.0 else step / norm


def autograd_gradients(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """∇ loss for each parameter (zeros where it is unused), by ``torch.autograd.grad``."""
    grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def finite_difference_scores(
    per_trajectory_loss: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    v: torch.Tensor,
    step: float = 1e-3,
    dot=None,
    refresh=None,
) -> torch.Tensor:
    """σ_i ≈ <∇_θ L_i, v> for every trajectory, from two forward passes.

    Args:
        per_trajectory_loss: evaluates the batch at the current parameters, returns L [S].
        params: the trainable parameters θ (modified in place during the call, then restored).
        v: flat [sum of numels] direction.
        step: |εv|, the size of the perturbation.
        dot: sharded parameters (FSDP2): the inner product of two flat local parts summed over ranks.
        refresh: called after each in-place change of the parameters (FSDP2: drop the unsharded copies).
    Returns:
        [S] in v's dtype.
    """
    eps = _epsilon(params, v, "v", step, dot)
    if eps is None:
        with torch.no_grad():
            return torch.zeros_like(per_trajectory_loss(), dtype=v.dtype)
    with torch.no_grad():
        with _shifted(params, v, eps, refresh):
            plus = per_trajectory_loss().to(v.dtype)
        with _shifted(params, v, -eps, refresh):
            minus = per_trajectory_loss().to(v.dtype)
    return (plus - minus) / (2 * eps)


def finite_difference_hvp(
    loss: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    u: torch.Tensor,
    step: float = 1e-3,
    dot=None,
    gradients=autograd_gradients,
    refresh=None,
) -> torch.Tensor:
    """H u ≈ [∇L(θ + εu) − ∇L(θ − εu)] / (2ε) for the scalar ``loss()``, from two backward passes.

    Returns a flat tensor in u's dtype. Only first-order autograd is used. ``gradients(loss, params)``:
    one tensor per parameter (default :func:`autograd_gradients`; FSDP2: each rank's local shards of
    the gradient, reduce-scattered); ``dot``, ``refresh`` as in :func:`finite_difference_scores`.
    """
    eps = _epsilon(params, u, "u", step, dot)
    if eps is None:
        return torch.zeros_like(u)

    def grad_at(scale):
        with _shifted(params, u, scale, refresh), torch.enable_grad():
            grads = gradients(loss(), params)
        return torch.cat([g.reshape(-1).to(u.dtype) for g in grads])

    return (grad_at(eps) - grad_at(-eps)) / (2 * eps)


def trainable_hypergradient(
    inner_loss: Callable[[], torch.Tensor],
    per_trajectory_loss: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    val_grad: Sequence[torch.Tensor],
    cfg: SolverConfig,
    normalizer: float,
    step: float = 1e-3,
    init: torch.Tensor | None = None,
    precondition=None,
    reduce=None,
    dot=None,
    gradients=autograd_gradients,
    refresh=None,
) -> Hypergradient:
    """dL_out/dw_i for θ_S = ``params`` by the implicit function theorem, with finite differences.

    Args:
        inner_loss: the weighted training loss Σ_i w_i L_i / Z at the current parameters (w fixed).
        per_trajectory_loss: the same batch's L_i, [S].
        params: the trainable parameters θ_S.
        val_grad: g = ∇_θ L_out, one tensor per parameter.
        normalizer: Z of the inner loss.
        step: |εu| of every finite difference.
        init: the previous flat v (warm start of Neumann / CG).
        precondition: ``identity`` only, flat g -> flat v: the inner optimiser's response.
        reduce: data parallelism: the losses are this rank's share (normalised by the global count),
            ``val_grad`` is summed over ranks already, and ``reduce(Hu)`` sums each local flat product
            over ranks. v, hence every perturbation θ ± εv, is then the same on every rank.
        dot, gradients: sharded parameters (FSDP2): every flat vector is this rank's local parts,
            ``dot`` sums an inner product over ranks and ``gradients(loss, params)`` returns the local
            shards of the gradient already summed over ranks (``reduce`` is then None); ``refresh()``
            after each in-place change of the parameters (FSDP2: drop the unsharded copies).
    Returns:
        :class:`boost.bilevel.hypergradient.Hypergradient` with v flat (parameters concatenated).
    """
    _check(params, step)
    if len(val_grad) != len(params) or any(g.shape != local_part(p).shape for g, p in zip(val_grad, params)):
        raise ValueError("val_grad must hold one tensor shaped like each parameter, in the same order")
    dtype = torch.float64 if params[0].dtype == torch.float64 else torch.float32
    g = _flat(val_grad, dtype)

    def hvp(u):
        out = finite_difference_hvp(inner_loss, params, u, step, dot, gradients, refresh)
        return out if reduce is None else reduce(out)

    v, warm = solve(hvp, g, cfg, init, precondition, dot=dot)
    residual = solve_residual(hvp, v, g, cfg, dot=dot)
    scores = finite_difference_scores(per_trajectory_loss, params, v, step, dot, refresh)
    return Hypergradient(-scores / float(normalizer), scores, v, residual, warm)
