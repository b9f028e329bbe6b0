"""Triton kernels for the fused LM-head primitives (see ``chunked.py`` for the readable spec).

Two kernels, each specialised by constexpr flags:

* ``token_stats_kernel`` — grid (token blocks, vocabulary splits). Each program streams its
  vocabulary range in ``BLOCK_V`` tiles, computing logit tiles ``h Wᵀ`` on the tensor cores and an
  online softmax: running max ``m``, ``s = Σ exp(z - m)``, the label logit ``z[y]`` and, with a
  tangent, ``q = Σ exp(z - m)·dz`` and ``dz[y]``. It writes these per split; the host combines
  the splits in O(T·splits).
* ``token_grads_kernel`` — grid (token blocks, vocabulary blocks). Each program recomputes one logit
  tile, forms ``g = coef·(p - e_y)`` (GRAD mode) or the Hessian-vector tiles ``s``/``g`` (HVP mode),
  and accumulates ``g W`` into d_hidden and ``gᵀ h`` into d_weight with float32 atomics.

No [T, V] buffer exists anywhere. Interpreter pitfalls (DESIGN.md): under TRITON_INTERPRET=1 the
operands are upcast to float32 before ``tl.dot`` (``UPCAST``), tanh is written with ``exp``, and
block sizes come from explicit tables rather than ``@triton.autotune``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    # 1 - 2 / (exp(2x) + 1): exact limits ±1 for large |x| (exp overflows to inf -> 1).
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _load_tile(ptr, offs_r, offs_c, stride_r, stride_c, mask_r, mask_c):
    return tl.load(
        ptr + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c,
        mask=mask_r[:, None] & mask_c[None, :],
        other=0.0,
    )


@triton.jit
def _logit_tiles(
    H, W, B, U, DH, BETA, offs_t, offs_v, t_mask, v_mask, D,
    stride_ht, stride_hd, stride_wv, stride_wd, stride_uv, stride_ud, stride_dht, stride_dhd,
    softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_U: tl.constexpr, HAS_DH: tl.constexpr, HAS_BETA: tl.constexpr, WITH_TANGENT: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One [BLOCK_T, BLOCK_V] tile: softcapped logits z, their tangent dz = (U h + W dh + beta)
    chained through the softcap, and the softcap slope sp = dz/dz_raw (1 without softcap)."""
    z = tl.zeros((BLOCK_T, BLOCK_V), tl.float32)
    dz = tl.zeros((BLOCK_T, BLOCK_V), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        h = _load_tile(H, offs_t, offs_d, stride_ht, stride_hd, t_mask, d_mask)
        w = _load_tile(W, offs_d, offs_v, stride_wd, stride_wv, d_mask, v_mask)  # [BD, BV]
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        z = tl.dot(h, w, z, input_precision=DOT_PRECISION)
        if WITH_TANGENT:
            if HAS_U:
                u = _load_tile(U, offs_d, offs_v, stride_ud, stride_uv, d_mask, v_mask)
                if UPCAST:
                    u = u.to(tl.float32)
                dz = tl.dot(h, u, dz, input_precision=DOT_PRECISION)
            if HAS_DH:
                dh = _load_tile(DH, offs_t, offs_d, stride_dht, stride_dhd, t_mask, d_mask)
                if UPCAST:
                    dh = dh.to(tl.float32)
                dz = tl.dot(dh, w, dz, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        z += tl.load(B + offs_v, mask=v_mask, other=0.0).to(tl.float32)[None, :]
    if WITH_TANGENT:
        if HAS_BETA:
            dz += tl.load(BETA + offs_v, mask=v_mask, other=0.0).to(tl.float32)[None, :]
    sp = tl.full((BLOCK_T, BLOCK_V), 1.0, tl.float32)
    if HAS_SOFTCAP:
        th = _tanh(z / softcap)
        z = th * softcap
        sp = 1.0 - th * th
        if WITH_TANGENT:
            dz = dz * sp
    return z, dz, sp


@triton.jit
def token_stats_kernel(
    H, W, B, Y, U, DH, BETA,  # inputs
    M_OUT, S_OUT, ZY_OUT, Q_OUT, DZY_OUT,  # [num_splits, T] float32 partials
    T, V, D, V_PER_SPLIT,
    stride_ht, stride_hd, stride_wv, stride_wd, stride_uv, stride_ud, stride_dht, stride_dhd,
    softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_U: tl.constexpr, HAS_DH: tl.constexpr, HAS_BETA: tl.constexpr, WITH_TANGENT: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    y = tl.load(Y + offs_t, mask=t_mask, other=-1)

    m = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_T,), tl.float32)
    zy = tl.zeros((BLOCK_T,), tl.float32)
    q = tl.zeros((BLOCK_T,), tl.float32)
    dzy = tl.zeros((BLOCK_T,), tl.float32)

    v_start = pid_s * V_PER_SPLIT
    v_end = tl.minimum(v_start + V_PER_SPLIT, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_mask = offs_v < v_end
        z, dz, _ = _logit_tiles(
            H, W, B, U, DH, BETA, offs_t, offs_v, t_mask, v_mask, D,
            stride_ht, stride_hd, stride_wv, stride_wd, stride_uv, stride_ud, stride_dht, stride_dhd,
            softcap, HAS_BIAS, HAS_SOFTCAP, HAS_U, HAS_DH, HAS_BETA, WITH_TANGENT, UPCAST, DOT_PRECISION,
            BLOCK_T, BLOCK_V, BLOCK_D,
        )  # fmt: skip
        z = tl.where(v_mask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])
        s = s * alpha + tl.sum(e, axis=1)
        is_y = offs_v[None, :] == y[:, None]
        zy += tl.sum(tl.where(is_y, z, 0.0), axis=1)
        if WITH_TANGENT:
            q = q * alpha + tl.sum(e * dz, axis=1)
            dzy += tl.sum(tl.where(is_y, dz, 0.0), axis=1)
        m = m_new

    out = pid_s * T + offs_t
    tl.store(M_OUT + out, m, mask=t_mask)
    tl.store(S_OUT + out, s, mask=t_mask)
    tl.store(ZY_OUT + out, zy, mask=t_mask)
    if WITH_TANGENT:
        tl.store(Q_OUT + out, q, mask=t_mask)
        tl.store(DZY_OUT + out, dzy, mask=t_mask)


@triton.jit
def token_grads_kernel(
    H, W, B, Y, COEF, LSE, U, DH, BETA, PDZ,  # inputs
    DH_OUT, DW_OUT, DB_OUT,  # float32 accumulators: [T, D], [V, D], [V] (contiguous)
    T, V, D,
    stride_ht, stride_hd, stride_wv, stride_wd, stride_uv, stride_ud, stride_dht, stride_dhd,
    softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HVP: tl.constexpr,
    HAS_U: tl.constexpr, HAS_DH: tl.constexpr, HAS_BETA: tl.constexpr,
    NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_t = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    t_mask = offs_t < T
    v_mask = offs_v < V
    coef = tl.load(COEF + offs_t, mask=t_mask, other=0.0)
    if tl.max(tl.abs(coef), axis=0) == 0.0:
        return  # nothing in this token block counts (prompt, padding, or zero weight)

    z, dz, sp = _logit_tiles(
        H, W, B, U, DH, BETA, offs_t, offs_v, t_mask, v_mask, D,
        stride_ht, stride_hd, stride_wv, stride_wd, stride_uv, stride_ud, stride_dht, stride_dhd,
        softcap, HAS_BIAS, HAS_SOFTCAP, HAS_U, HAS_DH, HAS_BETA, HVP, UPCAST, DOT_PRECISION,
        BLOCK_T, BLOCK_V, BLOCK_D,
    )  # fmt: skip

    lse = tl.load(LSE + offs_t, mask=t_mask, other=0.0)
    y = tl.load(Y + offs_t, mask=t_mask, other=-1)
    valid = t_mask[:, None] & v_mask[None, :]
    p = tl.where(valid, tl.exp(z - lse[:, None]), 0.0)
    g = p - tl.where(offs_v[None, :] == y[:, None], 1.0, 0.0)
    if HVP:
        pdz = tl.load(PDZ + offs_t, mask=t_mask, other=0.0)
        a = p * (dz - pdz[:, None])  # tangent of p
        if HAS_SOFTCAP:
            a = a * sp - (2.0 / (softcap * softcap)) * g * z * dz
            g = g * sp
        a = tl.where(valid, a * coef[:, None], 0.0)
    else:
        if HAS_SOFTCAP:
            g = g * sp
    g = tl.where(valid, g * coef[:, None], 0.0)
    if not HVP:
        a = g
    # a: the tile that multiplies W and h; in HVP mode g also multiplies U and dh.
    a_dot = a.to(tl.float32) if UPCAST else a.to(H.dtype.element_ty)
    g_dot = g.to(tl.float32) if UPCAST else g.to(H.dtype.element_ty)

    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        if NEED_DH:
            w = _load_tile(W, offs_v, offs_d, stride_wv, stride_wd, v_mask, d_mask)  # [BV, BD]
            if UPCAST:
                w = w.to(tl.float32)
            part = tl.dot(a_dot, w, input_precision=DOT_PRECISION)
            if HVP:
                if HAS_U:
                    u = _load_tile(U, offs_v, offs_d, stride_uv, stride_ud, v_mask, d_mask)
                    if UPCAST:
                        u = u.to(tl.float32)
                    part = tl.dot(g_dot, u, part, input_precision=DOT_PRECISION)
            tl.atomic_add(
                DH_OUT + offs_t[:, None] * D + offs_d[None, :],
                part,
                mask=t_mask[:, None] & d_mask[None, :],
            )
        if NEED_DW:
            h = _load_tile(H, offs_t, offs_d, stride_ht, stride_hd, t_mask, d_mask)  # [BT, BD]
            if UPCAST:
                h = h.to(tl.float32)
            part = tl.dot(tl.trans(a_dot), h, input_precision=DOT_PRECISION)
            if HVP:
                if HAS_DH:
                    dh = _load_tile(DH, offs_t, offs_d, stride_dht, stride_dhd, t_mask, d_mask)
                    if UPCAST:
                        dh = dh.to(tl.float32)
                    part = tl.dot(tl.trans(g_dot), dh, part, input_precision=DOT_PRECISION)
            tl.atomic_add(
                DW_OUT + offs_v[:, None] * D + offs_d[None, :],
                part,
                mask=v_mask[:, None] & d_mask[None, :],
            )
    if NEED_DB:
        tl.atomic_add(DB_OUT + offs_v, tl.sum(a, axis=0), mask=v_mask)
