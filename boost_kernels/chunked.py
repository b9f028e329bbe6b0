"""Chunked PyTorch implementation of the fused LM-head primitives.

This is the CPU path, the readable specification of what the Triton kernels compute, and what
``torch.compile`` users get. It never builds the ``[T, V]`` logits: tokens are processed in chunks
of ``rows_per_chunk(V)`` rows, so the working memory is one ``[chunk, V]`` float32 block plus
``O(T)`` statistics.

Notation (see docs/design.md): for token t with hidden state ``h_t`` (row of ``hidden [T, D]``) and
label ``y_t`` (``-1``: not counted),

    z_raw = W h_t + b,   z = c·tanh(z_raw / c) (softcap c) or z_raw,   p = softmax(z),
    loss_t = logsumexp(z) - z[y_t]   (0 when y_t < 0).

All three primitives take ``labels`` already sanitised to ``[0, V)`` or ``-1`` and return float32
(float64 for float64 inputs, so that ``gradcheck`` can run on this path).
"""

from __future__ import annotations

import torch
from torch._C import _functorch

# Upper bound on the elements of one [chunk, V] float32 block (12 MiB; read at call time, so it can
# be changed at run time). Larger chunks read the [V, D] head fewer times (CPU matmuls with few rows
# are bound by reading W); smaller ones save memory. Measured at T=2048, D=576, V=49152 on one
# thread, fwd+bwd time and peak memory relative to materialised logits: 4 Mi elements (85 rows)
# 1.03x / 0.129, 3 Mi (64 rows) 1.00x / 0.122, 2 Mi (42 rows) 1.13x / 0.114.
CHUNK_ELEMENTS = 3 << 20


def rows_per_chunk(vocab_size: int, chunk_elements: int | None = None) -> int:
    elements = CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    return max(1, elements // max(vocab_size, 1))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 inputs are computed in float64 (for gradcheck); everything else in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _up(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if x is None else x.to(dtype)


def is_transform_wrapped(x: torch.Tensor | None) -> bool:
    """Whether x is wrapped by a torch.func transform (grad/jvp wrapper or vmap batch)."""
    return x is not None and (_functorch.is_functorch_wrapped_tensor(x) or _functorch.is_batchedtensor(x))


def _plain(*tensors) -> bool:
    """True when no tensor is wrapped by a torch.func transform (in-place updates are then safe)."""
    return not any(is_transform_wrapped(x) for x in tensors)


def _accumulate(total: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    """total + part, in place when allowed (under torch.func, `part` may carry a batch dim or tangent)."""
    if total is None:
        return part
    return total.add_(part) if _plain(total, part) else total + part


def _accumulate_mm(total: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """total + a @ b without a temporary [V, D] product when no torch.func transform is active."""
    if total is not None and _plain(total, a, b):
        return total.addmm_(a, b)
    return _accumulate(total, a @ b)


def _cat(chunks: list[torch.Tensor], like: torch.Tensor, width: int | None = None) -> torch.Tensor:
    if chunks:
        return torch.cat(chunks)
    shape = (0,) if width is None else (0, width)
    return like.new_zeros(shape)


def _softmax_lse(z: torch.Tensor, need_probs: bool = True):
    """(softmax(z) or None, logsumexp(z)) over dim 1, reusing z's memory outside torch.func transforms."""
    m = z.max(dim=1, keepdim=True).values
    if _plain(z):
        p = z.sub_(m).exp_()
        s = p.sum(dim=1, keepdim=True)
        if need_probs:
            p.div_(s)
        else:
            p = None
    else:
        e = torch.exp(z - m)
        s = e.sum(dim=1, keepdim=True)
        p = e / s if need_probs else None
    return p, (m + torch.log(s)).squeeze(1)


def _scale_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """x * factor, in place when no torch.func transform is active."""
    return x.mul_(factor) if _plain(x, factor) else x * factor


def _logits(h, weight, bias, softcap):
    """Return (z, sp) for a chunk: z [n, V] float32 after softcap; sp = dz/dz_raw (None without softcap)."""
    z = h @ weight.T
    if bias is not None:
        z = _accumulate(z, bias)
    if softcap is None:
        return z, None
    t = torch.tanh(z / softcap)
    return t * softcap, 1.0 - t * t


def _tangent_logits(h, weight, tangent_weight, tangent_hidden, tangent_bias, sp, n, vocab):
    """dz_raw = U h + W dh + beta for a chunk, then chained through the softcap (times sp)."""
    dz = None
    if tangent_weight is not None:
        dz = _accumulate(dz, h @ tangent_weight.T)
    if tangent_hidden is not None:
        dz = _accumulate(dz, tangent_hidden @ weight.T)
    if tangent_bias is not None:
        dz = _accumulate(dz, tangent_bias.expand(n, vocab) if dz is None else tangent_bias)
    if sp is not None:
        dz = dz * sp
    return dz


def _onehot_rows(labels: torch.Tensor):
    """Rows with a counted label and their labels, for in-place updates of a [n, V] block."""
    rows = torch.nonzero(labels >= 0).squeeze(1)
    return rows, labels[rows]


def token_losses(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    softcap: float | None,
    tangent_weight: torch.Tensor | None = None,
    tangent_hidden: torch.Tensor | None = None,
    tangent_bias: torch.Tensor | None = None,
):
    """Per-token losses and, with tangents, their directional derivatives.

    Args:
        hidden [T, D], weight [V, D], bias [V] or None: any float dtype (computed in float32).
        labels [T] int64 in [0, V) or -1 (not counted).
        tangent_*: tangents shaped like weight / hidden / bias, or None (zero).
    Returns:
        (loss [T], lse [T], dloss [T] or None, pdz [T] or None), all float32. ``lse`` is the
        log-sum-exp of the (softcapped) logits; ``pdz`` = <p_t, dz_t>.
    """
    T, V = hidden.shape[0], weight.shape[0]
    acc = compute_dtype(hidden.dtype)
    w32, b32 = weight.to(acc), _up(bias, acc)
    u32, db32 = _up(tangent_weight, acc), _up(tangent_bias, acc)
    with_tangent = any(x is not None for x in (tangent_weight, tangent_hidden, tangent_bias))
    losses, lses, dlosses, pdzs = [], [], [], []
    step = rows_per_chunk(V)
    for start in range(0, T, step):
        sl = slice(start, min(start + step, T))
        h = hidden[sl].to(acc)
        y = labels[sl]
        counted = y >= 0
        safe_y = y.clamp(min=0)[:, None]
        z, sp = _logits(h, w32, b32, softcap)
        zy = z.gather(1, safe_y).squeeze(1)
        p, lse_c = _softmax_lse(z, need_probs=with_tangent)  # z is consumed outside torch.func
        lses.append(lse_c)
        losses.append(torch.where(counted, lse_c - zy, 0.0))
        if with_tangent:
            dh = _up(tangent_hidden[sl], acc) if tangent_hidden is not None else None
            dz = _tangent_logits(h, w32, u32, dh, db32, sp, h.shape[0], V)
            pdz = (p * dz).sum(1)
            pdzs.append(pdz)
            dlosses.append(torch.where(counted, pdz - dz.gather(1, safe_y).squeeze(1), 0.0))
    like = hidden.new_zeros(0, dtype=acc)
    loss, lse = _cat(losses, like), _cat(lses, like)
    dloss = _cat(dlosses, like) if with_tangent else None
    pdz_all = _cat(pdzs, like) if with_tangent else None
    return loss, lse, dloss, pdz_all


def _onehot_like(p: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """e_y for each row of a [n, V] chunk (a zero row where the label is -1)."""
    rows, cols = _onehot_rows(labels)
    onehot = torch.zeros_like(p)
    onehot[rows, cols] = 1.0
    return onehot


def _minus_onehot(p, labels):
    """g = p - e_y for a chunk of probabilities; in place on p when no torch.func transform is active."""
    if _plain(p):
        rows, cols = _onehot_rows(labels)
        p[rows, cols] -= 1.0
        return p
    return p - _onehot_like(p, labels)


def _skip(c: torch.Tensor) -> bool:
    """Whether a chunk has no counted token (only decidable outside torch.func transforms)."""
    return _plain(c) and not bool((c != 0).any())


class _RowBlocks:
    """A [T, D] result filled chunk by chunk (d_hidden): written into one preallocated buffer outside
    torch.func transforms (no second copy from concatenating), else collected and concatenated."""

    def __init__(self, hidden: torch.Tensor, dtype: torch.dtype, plain: bool, wanted: bool):
        self.shape, self.dtype, self.device, self.wanted = tuple(hidden.shape), dtype, hidden.device, wanted
        self.out = torch.empty(self.shape, dtype=dtype, device=self.device) if plain and wanted else None
        self.chunks: list[torch.Tensor] = []

    def zeros(self, sl: slice) -> None:
        if not self.wanted:
            return
        if self.out is not None:
            self.out[sl].zero_()
        else:
            self.chunks.append(
                torch.zeros(sl.stop - sl.start, self.shape[1], dtype=self.dtype, device=self.device)
            )

    def mm(self, sl: slice, a: torch.Tensor, b: torch.Tensor) -> None:
        """rows sl = a @ b."""
        if self.out is not None:
            torch.mm(a, b, out=self.out[sl])
        else:
            self.chunks.append(a @ b)

    def add_mm(self, sl: slice, a: torch.Tensor, b: torch.Tensor) -> None:
        """rows sl += a @ b (after :meth:`mm` on the same rows)."""
        if self.out is not None:
            self.out[sl].addmm_(a, b)
        else:
            self.chunks[-1] = self.chunks[-1] + a @ b

    def result(self) -> torch.Tensor:
        if self.out is not None:
            return self.out
        return _cat(self.chunks, torch.zeros(0, dtype=self.dtype, device=self.device), self.shape[1])


def _finish(rows, weight_total, bias_total, w32, need_hidden, need_weight, need_bias):
    """(d_hidden [T, D], d_weight [V, D], d_bias [V]) from the chunk results; zeros where no chunk counted."""
    d_hidden = rows.result() if need_hidden else None
    if need_weight and weight_total is None:
        weight_total = torch.zeros_like(w32)
    if need_bias and bias_total is None:
        bias_total = w32.new_zeros(w32.shape[0])
    return d_hidden, weight_total, bias_total


def token_loss_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    softcap: float | None,
    coef: torch.Tensor,
    lse: torch.Tensor | None = None,
    need_hidden: bool = True,
    need_weight: bool = True,
    need_bias: bool = True,
):
    """Gradients of sum_t coef_t · loss_t with respect to hidden, weight and bias.

    Args:
        coef [T] float32: upstream gradient of each token's loss (0 for tokens that do not count).
        lse [T] float32 or None: accepted for parity with the Triton path, which needs it; here the
            softmax is recomputed exactly as the forward computed it, so that a gradient computed
            during the forward (:func:`token_losses_with_grads`) and one recomputed later agree bitwise.
    Returns:
        (d_hidden [T, D], d_weight [V, D], d_bias [V]) in float32; None where not needed.
    """
    del lse  # see above
    _, _, *grads = _gradient_pass(
        hidden, weight, bias, labels, softcap, coef, need_hidden, need_weight, need_bias, False
    )
    return tuple(grads)


def token_losses_with_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    softcap: float | None,
    coef: torch.Tensor,
    need_hidden: bool = True,
    need_weight: bool = True,
    need_bias: bool = True,
):
    """Per-token losses and the gradients of sum_t coef_t · loss_t, in one pass over the logits.

    The forward of a loss whose backward is (almost) certain to follow: each [chunk, V] block of
    logits is turned into its losses and straight into its gradient contributions, so the logits
    are computed once instead of twice (three matmul passes, as materialised logits would need,
    instead of four).

    Returns:
        (loss [T], lse [T], d_hidden [T, D], d_weight [V, D], d_bias [V]) in float32 (float64 for
        float64 inputs); the gradients are None where not needed.
    """
    return _gradient_pass(
        hidden, weight, bias, labels, softcap, coef, need_hidden, need_weight, need_bias, True
    )


def _gradient_pass(
    hidden, weight, bias, labels, softcap, coef, need_hidden, need_weight, need_bias, with_losses
):
    """The chunk loop behind :func:`token_loss_grads` and :func:`token_losses_with_grads`.

    With ``with_losses`` every chunk is evaluated (its losses are wanted even where coef is 0) and
    (loss [T], lse [T]) lead the result; otherwise they are None and chunks with coef == 0 are skipped.
    """
    T, V = hidden.shape[0], weight.shape[0]
    acc = compute_dtype(hidden.dtype)
    w32, b32 = weight.to(acc), _up(bias, acc)
    plain = _plain(hidden, weight, coef)
    rows, d_bias, losses, lses = _RowBlocks(hidden, acc, plain, need_hidden), None, [], []
    d_weight = torch.zeros_like(w32) if need_weight and plain else None
    step = rows_per_chunk(V)
    for start in range(0, T, step):
        sl = slice(start, min(start + step, T))
        c = coef[sl].to(acc)
        skip_grads = _skip(c)
        if skip_grads and not with_losses:
            rows.zeros(sl)
            continue
        h = hidden[sl].to(acc)
        y = labels[sl]
        z, sp = _logits(h, w32, b32, softcap)
        zy = z.gather(1, y.clamp(min=0)[:, None]).squeeze(1) if with_losses else None
        p, lse_c = _softmax_lse(z)  # consumes z outside torch.func
        if with_losses:
            losses.append(torch.where(y >= 0, lse_c - zy, 0.0))
            lses.append(lse_c)
            if skip_grads:
                rows.zeros(sl)
                continue
        g = _minus_onehot(p, y)
        if sp is not None:
            g = _scale_(g, sp)
        g = _scale_(g, c[:, None])
        if need_hidden:
            rows.mm(sl, g, w32)
        if need_weight:
            d_weight = _accumulate_mm(d_weight, g.T, h)
        if need_bias:
            d_bias = _accumulate(d_bias, g.sum(0))
    grads = _finish(rows, d_weight, d_bias, w32, need_hidden, need_weight, need_bias)
    if not with_losses:
        return (None, None, *grads)
    like = hidden.new_zeros(0, dtype=acc)
    return (_cat(losses, like), _cat(lses, like), *grads)


def token_loss_hvp(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    softcap: float | None,
    coef: torch.Tensor,
    tangent_weight: torch.Tensor | None,
    tangent_hidden: torch.Tensor | None,
    tangent_bias: torch.Tensor | None,
    need_hidden: bool = True,
    need_weight: bool = True,
    need_bias: bool = True,
):
    """Tangent of the gradients of sum_t coef_t · loss_t along (U, dh, beta): a Hessian-vector product.

    With s_t = p_t ⊙ (dz_t − <p_t, dz_t>) and g_t = p_t − e_{y_t} (both w.r.t. the softcapped
    logits; chained through the softcap including its curvature):

        d(dL/dh_t) = coef_t (Wᵀ s_t + Uᵀ g_t),   d(dL/dW) = Σ_t coef_t (s_t h_tᵀ + g_t dh_tᵀ).

    Returns (dd_hidden [T, D], dd_weight [V, D], dd_bias [V]) in float32, None where not needed.
    """
    T, V = hidden.shape[0], weight.shape[0]
    acc = compute_dtype(hidden.dtype)
    w32, b32 = weight.to(acc), _up(bias, acc)
    u32, beta32 = _up(tangent_weight, acc), _up(tangent_bias, acc)
    plain = _plain(hidden, weight, coef, tangent_weight, tangent_hidden, tangent_bias)
    rows, dd_bias = _RowBlocks(hidden, acc, plain, need_hidden), None
    dd_weight = torch.zeros_like(w32) if need_weight and plain else None
    step = rows_per_chunk(V)
    for start in range(0, T, step):
        sl = slice(start, min(start + step, T))
        c = coef[sl].to(acc)
        if _skip(c):
            rows.zeros(sl)
            continue
        h = hidden[sl].to(acc)
        dh = _up(tangent_hidden[sl], acc) if tangent_hidden is not None else None
        z, sp = _logits(h, w32, b32, softcap)
        dz = _tangent_logits(h, w32, u32, dh, beta32, sp, h.shape[0], V)
        p = torch.softmax(z, dim=1)
        s = p * (dz - (p * dz).sum(1, keepdim=True))  # tangent of p
        g = p - _onehot_like(p, labels[sl])
        if sp is not None:
            # d(g ⊙ sp) = s ⊙ sp + g ⊙ d(sp),  d(sp) = -2 (z/c) (dz/c)
            s = s * sp - (2.0 / (softcap * softcap)) * g * z * dz
            g = g * sp
        s = s * c[:, None]
        g = g * c[:, None]
        if need_hidden:
            rows.mm(sl, s, w32)
            if u32 is not None:
                rows.add_mm(sl, g, u32)
        if need_weight:
            dd_weight = _accumulate_mm(dd_weight, s.T, h)
            if dh is not None:
                dd_weight = _accumulate_mm(dd_weight, g.T, dh)
        if need_bias:
            dd_bias = _accumulate(dd_bias, s.sum(0))
    return _finish(rows, dd_weight, dd_bias, w32, need_hidden, need_weight, need_bias)
