"""The first-order response of a real optimiser step to its gradient: the ``identity`` look-ahead.

A look-ahead hypergradient differentiates the validation loss after one inner step,
L_out(θ_{t+1}), with respect to the trajectory weights w. The step is θ_{t+1} = θ_t − Δ(G) with
G = Σ_i w_i ∇L_i(θ_t) / Z the (weighted) inner gradient, so

    dL_out/dw_i = −<∇L_i(θ_t), v> / Z,   v = J_Δᵀ g,   g = ∇L_out(θ_{t+1}),   J_Δ = ∂Δ/∂G.

This module computes v = J_Δᵀ g for the step the optimiser *actually took*, read from its state
right after ``optimizer.step()`` (and before the next ``zero_grad``: the gradients it used must
still be in ``p.grad``):

* SGD (no momentum): Δ = lr·G, so v = lr·g: Learning-to-Reweight's α is the inner lr.
* Adam / AdamW: Δ_j = lr·m̂_j / (√v̂_j + ε) per coordinate, m̂ = (β1 m + (1−β1) G)/(1−β1^t),
  v̂ = (β2 v + (1−β2) G²)/(1−β2^t). The Jacobian is diagonal, v = lr·P ⊙ g with

      P = [ (1−β1)/c1 − m̂ (1−β2) G / (c2 √v̂ (√v̂ + ε)) ] / (√v̂ + ε),   c_k = 1 − β_k^t.

  SAMA's preconditioner is the first factor alone, 1/(√v̂ + ε) (up to the constant (1−β1)/c1): it
  treats the second moment as fixed. The second term is its dependence on this step's gradient;
  it is not small early on (at t = 1, Adam's step is G/(|G| + ε) ≈ sign(G), whose response is
  ≈ ε/G² ≈ 0: the first step barely reacts to the weights), and it decays as (1−β2)/c2 → 1−β2.
  We keep it, so the look-ahead is exact to first order for the step taken.
* Weight decay (AdamW's decoupled θ ← θ(1 − lr·wd), or SGD/Adam's coupled wd·θ added to G) does not
  depend on w: it moves θ_{t+1}, which g already sees, and adds nothing to J_Δ.
* Gradient clipping (``torch.nn.utils.clip_grad_norm_`` with max norm c, pre-clip total norm n):
  when active, G_c = G·c/(n + 10⁻⁶), whose Jacobian c/(n + 10⁻⁶)·(I − G Gᵀ/(n (n + 10⁻⁶))) scales the
  response down and removes its component along the gradient itself (weighting every trajectory up
  together changes nothing once the norm is clipped). :class:`ClipRecord` carries c and n; the
  projection uses the block's part of G (the parameters passed), exact for that block.

Anything else (SGD momentum, AMSGrad, ``maximize``, other optimisers) raises a clear error rather
than returning an approximation nobody asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

_CLIP_EPS = 1e-6  # the constant torch.nn.utils.clip_grad_norm_ adds to the norm


@dataclass(frozen=True)
class ClipRecord:
    """What ``clip_grad_norm_`` did: its ``max_norm`` and the pre-clip total norm it returned."""

    max_norm: float
    total_norm: float

    @property
    def coef(self) -> float:
        return min(1.0, self.max_norm / (self.total_norm + _CLIP_EPS))


def _group_of(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    raise ValueError("a parameter passed to optimizer_response is not one the optimiser steps")


def _diagonal_response(
    optimizer: torch.optim.Optimizer, param: torch.Tensor, g: torch.Tensor
) -> torch.Tensor:
    """J_Δᵀ g for one parameter without clipping, in g's dtype."""
    group = _group_of(optimizer, param)
    lr = float(group["lr"])
    if group.get("maximize", False):
        raise NotImplementedError(
            "optimizer_response: maximize=True is not supported (the inner step minimises)"
        )
    if isinstance(optimizer, torch.optim.SGD):
        if group.get("momentum", 0.0):
            raise NotImplementedError(
                "optimizer_response: SGD with momentum is not supported (its response depends on whether the "
                "buffer existed); use momentum=0 or AdamW"
            )
        return lr * g
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        if group.get("amsgrad", False):
            raise NotImplementedError("optimizer_response: AMSGrad is not supported (max of second moments)")
        state = optimizer.state.get(param)
        if not state or "exp_avg" not in state:
            raise ValueError("optimizer_response: call it right after optimizer.step() (no Adam state yet)")
        if param.grad is None:
            raise ValueError("optimizer_response: the parameter's .grad is gone; call it before zero_grad()")
        beta1, beta2 = group["betas"]
        eps = float(group["eps"])
        t = float(state["step"])
        c1, c2 = 1.0 - beta1**t, 1.0 - beta2**t
        dtype = g.dtype
        m_hat = state["exp_avg"].to(dtype) / c1
        root = (state["exp_avg_sq"].to(dtype) / c2).sqrt()
        denom = root + eps
        grad = param.grad.to(dtype)
        # the second moment's dependence on this step's gradient; 0 where it never saw one (root = 0)
        second = torch.where(
            root > 0, m_hat * (1.0 - beta2) * grad / (c2 * root.clamp_min(1e-300) * denom), 0.0
        )
        return lr * ((1.0 - beta1) / c1 - second) / denom * g
    raise NotImplementedError(
        f"optimizer_response: {type(optimizer).__name__} is not supported (SGD without momentum, Adam, AdamW)"
    )


def optimizer_response(
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    clip: ClipRecord | None = None,
    total: Callable[[float], float] | None = None,
) -> list[torch.Tensor]:
    """v = J_Δᵀ g for the step ``optimizer`` just took, one tensor per parameter (g's dtype).

    Args:
        params: the block's parameters (each stepped by ``optimizer``; ``p.grad`` = the gradient the
            step used, i.e. after clipping).
        grads: g = ∇L_out after the step, one tensor shaped like each parameter.
        clip: what gradient clipping did before the step, or None.
        total: when ``params`` are this rank's rows of the block (the sharded outer step), the sum
            over ranks of a float (the clipping projection's inner product spans the whole block).
    """
    if len(params) != len(grads) or any(p.shape != g.shape for p, g in zip(params, grads)):
        raise ValueError(
            "optimizer_response: grads must hold one tensor shaped like each parameter, in order"
        )
    with torch.no_grad():
        out = [_diagonal_response(optimizer, p, g) for p, g in zip(params, grads)]
        if clip is None or clip.coef >= 1.0:
            return out
        coef, n = clip.coef, clip.total_norm
        # p.grad holds the clipped gradient coef·G: the block's raw G is p.grad / coef
        raw = [p.grad.to(v.dtype) / coef for p, v in zip(params, out)]
        along = sum(float((r * v).sum(dtype=torch.float64)) for r, v in zip(raw, out))
        along = (along if total is None else total(along)) / (n * (n + _CLIP_EPS))
        return [coef * (v - along * r) for v, r in zip(out, raw)]
