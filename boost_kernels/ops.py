"""Public ops: per-trajectory weighted fused linear cross-entropy, its JVP and its HVP.

Shapes (T tokens, D hidden size, V vocabulary, S trajectories in the packed batch):

    hidden      [T, D]  float16 / bfloat16 / float32 (float64: PyTorch path only)
    weight      [V, D]  same dtype as hidden (the LM head)
    bias        [V]     same dtype, optional
    labels      [T]     int; hidden[t] predicts labels[t]; ignore_index never counts
    segment_ids [T]     int in [-1, S); -1 = the token does not count (prompt, env turn, padding)
    traj_weights[S]     float, optional (default 1): w_i

    L_i = (1/N_i) Σ_{s(t)=i} loss_t  (normalize="mean"; N_i counted tokens, empty -> 0)
          Σ_{s(t)=i} loss_t          (normalize="sum")
    loss = Σ_i w_i L_i / Z           (Z = normalizer, default S)

CUDA tensors run the Triton kernels; CPU tensors (and float64) run the chunked PyTorch spec.
``backend="triton"`` forces the kernels (on CPU only under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import types
from typing import NamedTuple

import torch

from boost_kernels import _validate, chunked
from boost_kernels.autograd import TokenLosses


class TrajectoryLoss(NamedTuple):
    loss: torch.Tensor  # [] float32: Σ_i w_i L_i / Z
    per_trajectory: torch.Tensor  # [S] float32: L_i
    num_tokens: torch.Tensor  # [S] int64: N_i, the counted tokens of each trajectory


class TrajectoryJVP(NamedTuple):
    per_trajectory: torch.Tensor  # [S] float32: L_i
    tangent: torch.Tensor  # [S] float32: dL_i along (tangent_weight, tangent_hidden, tangent_bias)
    num_tokens: torch.Tensor  # [S] int64


class HeadHVP(NamedTuple):
    """Tangent of the gradient of the weighted loss; None for a block that was not asked for."""

    weight: torch.Tensor | None  # [V, D]: d(dL/dW)
    hidden: torch.Tensor | None  # [T, D]: d(dL/dh)
    bias: torch.Tensor | None  # [V]: d(dL/db)


def select_impl(
    backend: str,
    hidden: torch.Tensor,
    deterministic: bool = False,
    grad_filter: bool | float = False,
    scratch_bytes: int | None = _validate.DEFAULT_SCRATCH_BYTES,
) -> types.ModuleType:
    """The module implementing the three primitives for this backend and these tensors.

    ``deterministic``: Triton gradients without atomics, bitwise the same run to run (the PyTorch
    path is deterministic already). ``grad_filter``: the Triton path's first-order gradients skip
    tiles of negligible probability (see ``triton_ops.token_loss_grads``); the PyTorch path, the
    JVP, the HVP and the double backward stay exact. ``scratch_bytes``: the Triton backward's
    float32 scratch for 16-bit gradients (see ``trajectory_cross_entropy``); the PyTorch path
    ignores it."""
    _validate.check_scratch_bytes(scratch_bytes)
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "torch":
        return chunked
    wants_triton = backend == "triton" or (hidden.device.type == "cuda" and hidden.dtype != torch.float64)
    if not wants_triton:
        return chunked
    from boost_kernels import triton_ops  # triton is Linux-only; import on demand

    if hidden.dtype == torch.float64:
        raise TypeError("backend='triton' does not support float64; use backend='torch' (or 'auto')")
    if hidden.device.type != "cuda" and not triton_ops.interpreting():
        raise ValueError(
            "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 to run the kernels on CPU"
        )
    return triton_ops.with_options(deterministic, grad_filter, scratch_bytes)


class _Prepared(NamedTuple):
    labels: torch.Tensor  # [T] int64 in [0, V) or -1
    segments: torch.Tensor  # [T] int64 in [0, S) (uncounted tokens mapped to 0 with zero scale)
    counted: torch.Tensor  # [T] bool
    num_tokens: torch.Tensor  # [S] int64
    impl: types.ModuleType


def _prepare(
    hidden,
    weight,
    labels,
    segment_ids,
    num_segments,
    bias,
    ignore_index,
    backend,
    validate,
    deterministic=False,
    grad_filter=False,
    scratch_bytes=_validate.DEFAULT_SCRATCH_BYTES,
) -> _Prepared:
    _validate.check_float("hidden", hidden, 2)
    _validate.check_float("weight", weight, 2)
    T, D = hidden.shape
    V = weight.shape[0]
    if weight.shape[1] != D:
        raise ValueError(
            f"weight must have shape (V, D={D}) to match hidden [T, D], got {tuple(weight.shape)}"
        )
    _validate.check_same("weight", weight, "hidden", hidden)
    _validate.check_same("bias", bias, "hidden", hidden, shape=(V,))
    _validate.check_index("labels", labels, T, hidden.device)
    _validate.check_index("segment_ids", segment_ids, T, hidden.device)
    labels = labels.long().contiguous()
    segment_ids = segment_ids.long().contiguous()
    counted = (segment_ids >= 0) & (labels != ignore_index)
    if validate:
        _validate.check_segment_values(segment_ids, num_segments)
        _validate.check_label_values(labels, counted, V, ignore_index)
    safe_labels = torch.where(counted, labels, -1)
    segments = torch.where(counted, segment_ids, 0)
    num_tokens = torch.bincount(segment_ids[counted], minlength=num_segments)
    impl = select_impl(backend, hidden, deterministic, grad_filter, scratch_bytes)
    if T == 0:
        impl = chunked  # nothing to launch; the PyTorch path returns empty results
    return _Prepared(safe_labels, segments, counted, num_tokens, impl)


def _token_scale(prep: _Prepared, normalize: str, dtype: torch.dtype) -> torch.Tensor:
    """[T] factor turning token losses into per-trajectory losses: 1/N_i (mean) or 1 (sum), 0 if not counted."""
    if normalize == "mean":
        inv = 1.0 / prep.num_tokens.clamp(min=1).to(dtype)
        scale = inv[prep.segments]
    else:
        scale = torch.ones(prep.segments.shape, dtype=dtype, device=prep.segments.device)
    return torch.where(prep.counted, scale, 0.0)


def _token_coef(prep: _Prepared, scale: torch.Tensor, w: torch.Tensor, z: float) -> torch.Tensor:
    """[T] coefficient a_t = w_{s(t)} · scale_t / Z of each token's loss in the weighted total."""
    return scale * w.to(scale.dtype)[prep.segments] / z


def _per_trajectory(prep: _Prepared, token_values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[S]: Σ over each trajectory's tokens of value_t · scale_t (differentiable)."""
    out = token_values.new_zeros(prep.num_tokens.shape[0])
    return out.index_add(0, prep.segments, token_values * scale)


def _normalizer(normalizer: float | None, num_segments: int) -> float:
    """Z of the weighted loss Σ_i w_i L_i / Z: the given normalizer, else the number of trajectories."""
    return float(normalizer) if normalizer is not None else float(num_segments)


def _weights(traj_weights, num_segments, device) -> torch.Tensor:
    if traj_weights is None:
        return torch.ones(num_segments, dtype=torch.float32, device=device)
    _validate.check_traj_weights(traj_weights, num_segments, device)
    return traj_weights


def trajectory_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    segment_ids: torch.Tensor,
    num_segments: int,
    traj_weights: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    normalize: str = "mean",
    normalizer: float | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    backend: str = "auto",
    validate: bool = True,
    precompute_grad: bool = True,
    deterministic: bool = False,
    grad_filter: bool | float = False,
    scratch_bytes: int | None = _validate.DEFAULT_SCRATCH_BYTES,
) -> TrajectoryLoss:
    """Fused LM head + cross-entropy, reduced per trajectory and weighted, without [T, V] logits.

    Differentiable w.r.t. hidden, weight, bias and traj_weights, in reverse mode (any order up to
    two), forward mode, and forward-over-reverse. ``validate=False`` skips the value checks on
    labels and segment ids (they synchronise with the device). ``precompute_grad`` (PyTorch path
    only): when a backward can follow, compute the gradient of ``loss`` during the forward, which
    saves the backward a pass over the logits; pass False when you will backpropagate through
    ``per_trajectory`` rather than ``loss`` (the precomputed gradient would go unused).
    ``deterministic`` (Triton path): gradients without atomics, bitwise the same run to run,
    slower (two passes over the logits; the PyTorch path is deterministic already).
    ``grad_filter`` (Triton path, off by default): Cut Cross-Entropy's filtered mode; the gradient
    skips the tiles in which every |softmax - onehot| is below a threshold (True: finfo(dtype).eps
    / 32, 2^-12 for bf16; or a float), within the bound stated in ``triton_ops.token_loss_grads``.
    Only the first-order gradient is filtered: the loss, JVP, HVP and double backward stay exact.
    ``scratch_bytes`` (Triton path, 16-bit inputs; default 56 MiB; None: no limit): float32 memory
    the backward may hold to accumulate the 16-bit gradients. When the float32 copies of the
    gradients asked for fit ((T + V)·D·4 bytes for hidden and weight), the backward makes one
    pass over the logits (8·T·D·V FLOPs in all with the forward's 2·T·D·V); otherwise it
    recomputes them once more (10·T·D·V) within the budget. Both accumulate in float32 and round
    each gradient element once: the choice trades memory for speed, not accuracy. The HVP and
    the double backward use the same budget; float32 inputs need no scratch, and the PyTorch
    path ignores it (it checks the value only).
    """
    _validate.check_options(normalize, softcap, num_segments, normalizer)
    prep = _prepare(
        hidden,
        weight,
        labels,
        segment_ids,
        num_segments,
        bias,
        ignore_index,
        backend,
        validate,
        deterministic,
        grad_filter,
        scratch_bytes,
    )
    w = _weights(traj_weights, num_segments, hidden.device)
    scale = _token_scale(prep, normalize, chunked.compute_dtype(hidden.dtype))
    coef = _token_coef(prep, scale, w, _normalizer(normalizer, num_segments))
    eager = _eager_gradients(prep.impl, hidden, weight, bias) if precompute_grad else None
    token_loss, _, total, _ = TokenLosses.apply(
        hidden, weight, bias, prep.labels, coef, softcap, prep.impl, eager
    )
    per_traj = _per_trajectory(prep, token_loss, scale)
    return TrajectoryLoss(total, per_traj, prep.num_tokens)


def _eager_gradients(impl, hidden, weight, bias) -> tuple[bool, bool, bool] | None:
    """Which gradients the forward should compute on its way (None: none, compute them in backward).

    Only the chunked path computes them eagerly: it holds each [chunk, V] block of logits anyway,
    so turning it into gradient contributions saves recomputing it (a whole matmul pass). The
    Triton path needs the finished log-sum-exp before any gradient, so it gains nothing. Eager work
    is skipped when no backward can follow (grad mode off, nothing requires grad) and under
    torch.func transforms and torch.compile, which trace the plain recomputing backward.
    """
    if impl is not chunked or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    if any(chunked.is_transform_wrapped(x) for x in (hidden, weight, bias)):
        return None
    needs = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    return needs if any(needs) else None


def trajectory_jvp(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    segment_ids: torch.Tensor,
    num_segments: int,
    tangent_weight: torch.Tensor | None = None,
    tangent_hidden: torch.Tensor | None = None,
    tangent_bias: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    normalize: str = "mean",
    ignore_index: int = -100,
    softcap: float | None = None,
    backend: str = "auto",
    validate: bool = True,
) -> TrajectoryJVP:
    """Per-trajectory losses L_i and their directional derivatives dL_i in one vocabulary pass.

    dL_i = <∇ L_i, (tangent_weight, tangent_hidden, tangent_bias)>: with tangent_weight = v this
    is σ_i of the implicit hypergradient. Tangents are shaped like weight / hidden / bias; None = 0.
    Not differentiable (a plain computation); use ``torch.func.jvp`` on
    :func:`trajectory_cross_entropy` to differentiate through it.
    """
    _validate.check_options(normalize, softcap, num_segments, None)
    prep = _prepare(hidden, weight, labels, segment_ids, num_segments, bias, ignore_index, backend, validate)
    _check_tangents("trajectory_jvp", hidden, weight, bias, tangent_weight, tangent_hidden, tangent_bias)
    with torch.no_grad():
        loss, _, d_loss, _ = prep.impl.token_losses(
            hidden, weight, bias, prep.labels, softcap, tangent_weight, tangent_hidden, tangent_bias
        )
        scale = _token_scale(prep, normalize, loss.dtype)
        per_traj = _per_trajectory(prep, loss, scale)
        tangent = _per_trajectory(prep, d_loss, scale)
    return TrajectoryJVP(per_traj, tangent, prep.num_tokens)


def trajectory_hvp(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    segment_ids: torch.Tensor,
    num_segments: int,
    tangent_weight: torch.Tensor | None = None,
    tangent_hidden: torch.Tensor | None = None,
    tangent_bias: torch.Tensor | None = None,
    traj_weights: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    normalize: str = "mean",
    normalizer: float | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    need_hidden: bool | None = None,
    need_bias: bool | None = None,
    backend: str = "auto",
    validate: bool = True,
    deterministic: bool = False,
    scratch_bytes: int | None = _validate.DEFAULT_SCRATCH_BYTES,
) -> HeadHVP:
    """Hessian-vector product of the weighted loss Σ_i w_i L_i / Z along (U, dh, beta).

    Returns the tangent of (dL/dW, dL/dh, dL/db), exact including the W-h cross terms. The weights
    w_i are held fixed. By default d(dL/dh) is returned only when tangent_hidden is given, and
    d(dL/db) only when there is a bias. For the head block alone (dh = 0, no softcap) H is
    positive semi-definite, so Neumann series and conjugate gradients apply. ``deterministic``,
    ``scratch_bytes``: as in :func:`trajectory_cross_entropy` (one pass over the logits when the
    float32 copies of the outputs fit, e.g. V·D·4 bytes for the head block alone).
    """
    _validate.check_options(normalize, softcap, num_segments, normalizer)
    prep = _prepare(
        hidden,
        weight,
        labels,
        segment_ids,
        num_segments,
        bias,
        ignore_index,
        backend,
        validate,
        deterministic,
        scratch_bytes=scratch_bytes,
    )
    _check_tangents("trajectory_hvp", hidden, weight, bias, tangent_weight, tangent_hidden, tangent_bias)
    w = _weights(traj_weights, num_segments, hidden.device)
    need_hidden = tangent_hidden is not None if need_hidden is None else need_hidden
    need_bias = bias is not None if need_bias is None else (need_bias and bias is not None)
    z = _normalizer(normalizer, num_segments)
    with torch.no_grad():
        acc = chunked.compute_dtype(hidden.dtype)
        coef = _token_coef(prep, _token_scale(prep, normalize, acc), w.detach(), z)
        dd_h, dd_w, dd_b = prep.impl.token_loss_hvp(
            hidden, weight, bias, prep.labels, softcap, coef,
            tangent_weight, tangent_hidden, tangent_bias, need_hidden, True, need_bias,
        )  # fmt: skip
    return HeadHVP(
        dd_w.to(weight.dtype),
        dd_h.to(hidden.dtype) if dd_h is not None else None,
        dd_b.to(bias.dtype) if dd_b is not None else None,
    )


def _check_tangents(op: str, hidden, weight, bias, tangent_weight, tangent_hidden, tangent_bias) -> None:
    if tangent_weight is None and tangent_hidden is None and tangent_bias is None:
        raise ValueError(f"{op} needs at least one of tangent_weight, tangent_hidden, tangent_bias")
    _validate.check_same("tangent_weight", tangent_weight, "weight", weight, shape=weight.shape)
    _validate.check_same("tangent_hidden", tangent_hidden, "hidden", hidden, shape=hidden.shape)
    if tangent_bias is not None and bias is None:
        raise ValueError("tangent_bias was given but bias is None; pass the bias too or drop tangent_bias")
    if bias is not None:
        _validate.check_same("tangent_bias", tangent_bias, "bias", bias, shape=bias.shape)
