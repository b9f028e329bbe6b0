"""Autograd Functions for the per-token LM-head loss, with forward-mode and double-backward rules.

``TokenLosses``      (hidden, weight, bias, labels, coef) -> (loss [T], lse [T], Σ_t coef_t·loss_t)
``TokenLossGrads``   (hidden, weight, bias, labels, coef) -> (d_hidden, d_weight, d_bias)
                     the gradient of Σ_t coef_t·loss_t; it is what ``TokenLosses.backward`` returns.

Differentiating the gradient is a Hessian-vector product (the Hessian is symmetric), plus, for
``coef``, the per-token directional derivative. Both are fused primitives, so:

* reverse over reverse (``create_graph=True`` then grad again) is exact: ``TokenLossGrads.backward``;
* forward mode (``torch.func.jvp``, ``torch.autograd.forward_ad``) is exact: ``TokenLosses.jvp``;
* forward over reverse (``jvp(grad(f))``, ``torch.func.hessian``'s inner step) is exact:
  ``TokenLossGrads.jvp``;
* a third derivative raises (``once_differentiable``) instead of returning a wrong value;
* ``torch.func.vmap`` runs the primitives once per batch entry (a loop, correct and explicit).

None of these builds a [T, V] tensor: every rule calls the chunked PyTorch or Triton primitives.
"""

from __future__ import annotations

import torch
from torch._C import _functorch
from torch.autograd.function import once_differentiable


def _cast(x: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    if x is None or like is None:
        return None
    return x.to(like.dtype)


def _known_zero(x: torch.Tensor) -> bool:
    """True only when x is certainly all zeros; under vmap the values cannot be read, so False.

    torch.func's forward-over-reverse hands the gradient rule a materialised zero tangent for the
    upstream coefficients; skipping it saves a full pass over the vocabulary.
    """
    if _functorch.is_batchedtensor(x):
        return False
    try:
        return not bool(x.ne(0).any())
    except RuntimeError:  # a transform that forbids reading values
        return False


def _looped_vmap(fn, info, in_dims, *args):
    """vmap rule: call ``fn`` on each batch entry and stack the outputs along dim 0."""
    outputs = []
    for i in range(info.batch_size):
        sliced = [
            a.select(d, i) if d is not None and isinstance(a, torch.Tensor) else a
            for a, d in zip(args, in_dims)
        ]
        outputs.append(fn(*sliced))
    stacked, out_dims = [], []
    for k in range(len(outputs[0])):
        if outputs[0][k] is None:
            stacked.append(None)
            out_dims.append(None)
        else:
            stacked.append(torch.stack([o[k] for o in outputs]))
            out_dims.append(0)
    return tuple(stacked), tuple(out_dims)


class TokenLosses(torch.autograd.Function):
    """Per-token cross-entropy of the LM head and its coefficient-weighted total.

    ``(hidden, weight, bias, labels, coef, softcap, impl, eager) -> (loss [T], lse [T], total [])``
    with labels in [0, V) or -1 (loss 0) and total = Σ_t coef_t · loss_t (differentiable in coef).

    ``eager`` = (need_hidden, need_weight, need_bias) or None. When given, the forward also computes
    the gradient of ``total`` in the same pass over the logits (``impl.token_losses_with_grads``),
    and a plain backward of ``total`` (no ``create_graph``) just scales it by the incoming gradient:
    the logits are computed once instead of twice; a backward with ``create_graph`` reuses it too.
    Gradients flowing into ``loss`` as well cost one more (recomputing) pass; a second backward with
    ``retain_graph`` recomputes the total's gradient the same way the forward computed it.
    """

    @staticmethod
    def forward(hidden, weight, bias, labels, coef, softcap, impl, eager):
        if eager is None:
            loss, lse, _, _ = impl.token_losses(hidden, weight, bias, labels, softcap)
            grads = None
        else:
            loss, lse, *grads = impl.token_losses_with_grads(
                hidden, weight, bias, labels, softcap, coef, *eager
            )
        total = (coef.to(loss.dtype) * loss).sum()
        return loss, lse, total, grads

    @staticmethod
    def setup_context(ctx, inputs, output):
        hidden, weight, bias, labels, coef, softcap, impl, _ = inputs
        loss, lse, _, grads = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(hidden, weight, bias, labels, coef, lse, loss)
        ctx.save_for_forward(hidden, weight, bias, labels, coef, loss)
        ctx.softcap, ctx.impl = softcap, impl
        # Plain tensors without autograd history, handed over (and dropped) by the first backward.
        ctx.eager, ctx.eager_grads = grads is not None, grads

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse, grad_total, _grad_grads):
        hidden, weight, bias, labels, coef, lse, loss = ctx.saved_tensors
        need_h, need_w, need_b, _, need_coef = ctx.needs_input_grad[:5]
        d_coef = grad_total * loss if need_coef else None
        eager, ctx.eager_grads = ctx.eager_grads, None
        if not (need_h or need_w or need_b):
            return None, None, None, None, d_coef, None, None, None
        needs = (need_h, need_w, need_b)

        def grads_of(token_coef, precomputed=None):  # gradient of Σ_t token_coef_t · loss_t
            return TokenLossGrads.apply(
                hidden, weight, bias, labels, token_coef, lse, ctx.softcap, ctx.impl, *needs, precomputed
            )

        if not ctx.eager or not _known_zero(grad_loss):
            # One pass with the combined coefficient. When the per-token losses were used as well,
            # the eager gradient of the total is dropped: adding a second, separately rounded pass
            # for the per-token part would cost the same pass and lose 16-bit precision wherever
            # the two coefficients cancel (measured: 3e-3 relative error in fp16 vs 2e-4).
            grads = grads_of(coef.to(grad_loss.dtype) * grad_total + grad_loss)
        else:
            # The forward computed the gradient of the total and hands it over once: a plain backward
            # scales it in place; with create_graph it gets TokenLossGrads' derivative rules attached
            # (no recompute either). A second backward (retain_graph) recomputes it, bitwise the same.
            if eager is not None and not torch.is_grad_enabled():
                grads = [None if g is None else g.mul_(grad_total) for g in eager]
            else:
                grads = [None if g is None else g * grad_total for g in grads_of(coef, eager)]
        d_h, d_w, d_b = (
            _cast(g, like) if need else None for g, like, need in zip(grads, (hidden, weight, bias), needs)
        )
        return d_h, d_w, d_b, None, d_coef, None, None, None

    @staticmethod
    def jvp(ctx, t_hidden, t_weight, t_bias, _t_labels, t_coef, _t_softcap, _t_impl, _t_eager):
        hidden, weight, bias, labels, coef, loss = ctx.saved_tensors
        d_loss = None
        if t_hidden is not None or t_weight is not None or t_bias is not None:
            _, _, d_loss, _ = ctx.impl.token_losses(
                hidden, weight, bias, labels, ctx.softcap, t_weight, t_hidden, t_bias
            )
        if d_loss is None:
            d_loss = torch.zeros_like(loss)
        d_total = (coef.to(loss.dtype) * d_loss).sum()
        if t_coef is not None:
            d_total = d_total + (t_coef.to(loss.dtype) * loss).sum()
        return d_loss, None, d_total, None

    @staticmethod
    def vmap(info, in_dims, hidden, weight, bias, labels, coef, softcap, impl, eager):
        return _looped_vmap(
            TokenLosses.apply, info, in_dims, hidden, weight, bias, labels, coef, softcap, impl, eager
        )


class TokenLossGrads(torch.autograd.Function):
    """Gradient of Σ_t coef_t · loss_t w.r.t. (hidden, weight, bias), in their dtypes."""

    @staticmethod
    def forward(
        hidden, weight, bias, labels, coef, lse, softcap, impl, need_h, need_w, need_b, precomputed=None
    ):
        # ``precomputed``: these very gradients, already computed (TokenLosses' eager forward); the
        # Function then only attaches the derivative rules to them.
        if precomputed is not None:
            d_h, d_w, d_b = precomputed
        else:
            d_h, d_w, d_b = impl.token_loss_grads(
                hidden, weight, bias, labels, softcap, coef, lse, need_h, need_w, need_b and bias is not None
            )
        return _cast(d_h, hidden), _cast(d_w, weight), _cast(d_b, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        hidden, weight, bias, labels, coef, lse, softcap, impl, need_h, need_w, need_b, *_ = inputs
        ctx.save_for_backward(hidden, weight, bias, labels, coef)
        ctx.save_for_forward(hidden, weight, bias, labels, coef, lse)
        ctx.softcap, ctx.impl = softcap, impl
        ctx.need = (need_h, need_w, need_b and bias is not None)

    @staticmethod
    @once_differentiable
    def backward(ctx, r_hidden, r_weight, r_bias):
        # d<R, grad>/dθ = H R (H symmetric);  d<R, grad>/dcoef_t = <∇loss_t, R> (a JVP along R).
        hidden, weight, bias, labels, coef = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_coef = ctx.needs_input_grad[4]
        if r_hidden is None and r_weight is None and r_bias is None:
            return (None,) * 12
        d_h = d_w = d_b = d_coef = None
        if need_h or need_w or need_b:
            d_h, d_w, d_b = ctx.impl.token_loss_hvp(
                hidden, weight, bias, labels, ctx.softcap, coef, r_weight, r_hidden, r_bias,
                need_h, need_w, need_b and bias is not None,
            )  # fmt: skip
        if need_coef:
            _, _, d_coef, _ = ctx.impl.token_losses(
                hidden, weight, bias, labels, ctx.softcap, r_weight, r_hidden, r_bias
            )
            d_coef = d_coef.to(coef.dtype)
        return (_cast(d_h, hidden), _cast(d_w, weight), _cast(d_b, bias), None, d_coef) + (None,) * 7

    @staticmethod
    def jvp(ctx, t_hidden, t_weight, t_bias, _t_labels, t_coef, *_rest):
        hidden, weight, bias, labels, coef, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.need
        totals = [None, None, None]

        def accumulate(parts):
            for k, part in enumerate(parts):
                if part is not None:
                    totals[k] = part if totals[k] is None else totals[k] + part

        if t_hidden is not None or t_weight is not None or t_bias is not None:
            accumulate(
                ctx.impl.token_loss_hvp(
                    hidden,
                    weight,
                    bias,
                    labels,
                    ctx.softcap,
                    coef,
                    t_weight,
                    t_hidden,
                    t_bias,
                    need_h,
                    need_w,
                    need_b,
                )
            )
        if t_coef is not None and not _known_zero(t_coef):
            exact = getattr(ctx.impl, "exact", ctx.impl)  # the gradient filter is for first order only
            accumulate(
                exact.token_loss_grads(
                    hidden, weight, bias, labels, ctx.softcap, t_coef, lse, need_h, need_w, need_b
                )
            )
        outs = []
        for total, like, need in zip(totals, (hidden, weight, bias), (need_h, need_w, need_b)):
            if not need:
                outs.append(None)
            elif total is None:
                outs.append(torch.zeros_like(like))
            else:
                outs.append(total.to(like.dtype))
        return tuple(outs)

    @staticmethod
    def vmap(info, in_dims, *args):
        return _looped_vmap(TokenLossGrads.apply, info, in_dims, *args)
