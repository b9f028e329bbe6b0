"""Triton kernels for the fused LM-head primitives (see ``chunked.py`` for the readable spec).

Three kernels, each specialised by constexpr flags:

* ``token_stats_kernel`` — one program per (token block, vocabulary split), 1-D grid with the
  splits of a token block adjacent. Each program streams its vocabulary range in ``BLOCK_V``
  tiles, computing logit tiles ``h Wᵀ`` on the tensor cores and an online softmax: running max
  ``m``, ``s = Σ exp(z - m)``, the label logit ``z[y]`` and, with a tangent,
  ``q = Σ exp(z - m)·dz`` and ``dz[y]``. It writes these per split; the host combines the splits
  in O(T·splits).
* ``token_grads_kernel`` — one program per (token block, vocabulary block), 1-D grid in grouped
  order (``GROUP_T`` token blocks sweep the vocabulary together, for L2 reuse). Each program
  recomputes one logit tile, forms ``p - e_y`` (GRAD mode) or the Hessian-vector tiles (HVP mode)
  and accumulates into float32 d_hidden and d_weight with relaxed atomics (``REDG``: no GPU-wide
  fence per atomic, unlike Triton's default ``acq_rel``). Used when the float32 accumulators are
  the gradients (float32 inputs) or fit the scratch bound.
* ``token_grads_slab_kernel`` — the same tiles in one launch of two passes (d_hidden by token
  slabs, then d_weight by vocabulary slabs) through a ring of float32 scratch slots, each slab
  rounded once to 16 bits by its last program; or, with ``OWNER`` 1 (the deterministic mode), one
  program per row block adding in a fixed order without float atomics.

16-bit dot operands are built so that nothing underflows (see the comment at the gradient tile).
An optional gradient filter (``FILTER_EPS``) skips tiles whose |p - e_y| is negligible.

No [T, V] buffer exists anywhere. Interpreter pitfalls (docs/design.md): under TRITON_INTERPRET=1 the
operands are upcast to float32 before ``tl.dot`` (``UPCAST``; computed operands are
first rounded to the input dtype, as on a GPU), tanh is written with ``exp``, and
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
    T, V, D, V_PER_SPLIT, NUM_SPLITS,
    stride_ht, stride_hd, stride_wv, stride_wd, stride_uv, stride_ud, stride_dht, stride_dhd,
    softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_U: tl.constexpr, HAS_DH: tl.constexpr, HAS_BETA: tl.constexpr, WITH_TANGENT: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # The splits of one token block are neighbours in launch order: they run together and share
    # the block's hidden rows in L2, while the token blocks in flight share each split's W tiles.
    pid_t = tl.program_id(0) // NUM_SPLITS
    pid_s = tl.program_id(0) % NUM_SPLITS
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
def _round(x, dtype, UPCAST: tl.constexpr):
    """float32 ``x`` rounded to ``dtype`` to nearest even, as the GPU's conversion does. The
    interpreter's float32 -> bfloat16 conversion truncates, so there the rounding is done on the
    bits first (the result is then exact in bfloat16; NaN aside)."""
    if UPCAST:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _operand(x, dtype, UPCAST: tl.constexpr):
    """A computed tile as a dot operand: rounded to the input dtype, as the GPU's tensor cores see it.

    Under the interpreter (UPCAST) it is rounded and then widened again, because the interpreter's
    16-bit dot is wrong; the rounding itself is kept, so interpreter runs carry the GPU's error.
    """
    if UPCAST:
        return _round(x, dtype, UPCAST).to(tl.float32)
    return x.to(dtype)


@triton.jit
def _operand_scale(x):
    """A power of two s with max|x|·s in [2^13, 2^14): x·s is exact and, rounded to fp16, keeps its
    small entries (probabilities ~1/V) out of fp16's subnormal range. 1 for an all-zero tile."""
    big = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    return tl.where(big > 0.0, tl.exp2(13.0 - tl.floor(tl.log2(tl.maximum(big, 1e-30)))), 1.0)


@triton.jit
def _grouped_tile(pid, num_t, num_v, GROUP_T: tl.constexpr):
    """(token block, vocabulary block) of program ``pid``: GROUP_T token blocks sweep the vocabulary
    together, so programs running at the same time share their W tiles and hidden rows in L2."""
    per_group = GROUP_T * num_v
    first_t = (pid // per_group) * GROUP_T
    rows = tl.minimum(num_t - first_t, GROUP_T)
    pid_t = first_t + (pid % per_group) % rows
    pid_v = (pid % per_group) // rows
    return pid_t, pid_v


@triton.jit
def _accumulate(ptr, value, mask, ATOMIC: tl.constexpr):
    """Add ``value`` into float32 memory: a relaxed atomic (``REDG``, no fence) when several programs
    add into the same rows, a plain read-modify-write when this program owns them (deterministic)."""
    if ATOMIC:
        tl.atomic_add(ptr, value, mask=mask, sem="relaxed")
    else:
        tl.store(ptr, tl.load(ptr, mask=mask, other=0.0) + value, mask=mask)


@triton.jit
def _grad_tile(
    pid_t, pid_v,
    H, W, B, Y, COEF, LSE, U, DH, BETA, PDZ, DH_OUT, DW_OUT, DB_OUT, T, V, D, V0,
    stride_ht, stride_hd, stride_wv, stride_wd, stride_uv, stride_ud, stride_dht, stride_dhd,
    softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HVP: tl.constexpr,
    HAS_U: tl.constexpr, HAS_DH: tl.constexpr, HAS_BETA: tl.constexpr,
    NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    ATOMIC: tl.constexpr, FILTER_EPS: tl.constexpr,
):  # fmt: skip
    """The gradient contributions of one (token block, vocabulary block) tile (pointers DH_OUT / DW_OUT
    are indexed by global token / vocabulary rows). FILTER_EPS > 0 (GRAD mode only): the tile is
    skipped when every |p - e_y| in it is below FILTER_EPS (Cut Cross-Entropy's gradient filter)."""
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    t_mask = offs_t < T
    v_mask = offs_v < V
    coef = tl.load(COEF + offs_t, mask=t_mask, other=0.0)
    coef_max = tl.max(tl.abs(coef), axis=0)
    if coef_max > 0.0:  # else nothing in this token block counts (prompt, padding, or zero weight)
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
        g = p - tl.where((V0 + offs_v)[None, :] == y[:, None], 1.0, 0.0)
        if HVP:
            pdz = tl.load(PDZ + offs_t, mask=t_mask, other=0.0)
            a = p * (dz - pdz[:, None])  # tangent of p
            if HAS_SOFTCAP:
                a = a * sp - (2.0 / (softcap * softcap)) * g * z * dz
                g = g * sp
            a = tl.where(valid, a, 0.0)
        else:
            if HAS_SOFTCAP:
                g = g * sp
        g = tl.where(valid, g, 0.0)
        if not HVP:
            a = g
        keep = True
        if FILTER_EPS > 0.0:
            keep = tl.max(tl.max(tl.abs(g), axis=1), axis=0) >= FILTER_EPS
        if keep:
            # a: the tile that multiplies W and h; in HVP mode g also multiplies U and dh. Neither carries the
            # per-token coefficient: coef·(p - e_y) rounded to fp16 underflows for small coefficients.
            # d_hidden rows are scaled by coef after the dot; d_weight sums over tokens, so its operands
            # carry coef relative to the block's largest |coef| and the dot is scaled back. Every operand is
            # also scaled by an exact power of two (_operand_scale) before it is rounded to 16 bits.
            dtype = H.dtype.element_ty
            rel = (coef / coef_max)[:, None]
            if HVP:
                h_scale = _operand_scale(tl.abs(a) + tl.abs(g))
                w_scale = _operand_scale((tl.abs(a) + tl.abs(g)) * rel)
            else:
                h_scale = _operand_scale(a)
                w_scale = _operand_scale(a * rel)
            a_h = _operand(a * h_scale, dtype, UPCAST)
            a_w = _operand(a * (rel * w_scale), dtype, UPCAST)
            if HVP:
                g_h = _operand(g * h_scale, dtype, UPCAST)
                g_w = _operand(g * (rel * w_scale), dtype, UPCAST)
            row_out = coef / h_scale
            col_out = coef_max / w_scale

            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                d_mask = offs_d < D
                if NEED_DH:
                    w = _load_tile(W, offs_v, offs_d, stride_wv, stride_wd, v_mask, d_mask)  # [BV, BD]
                    if UPCAST:
                        w = w.to(tl.float32)
                    part = tl.dot(a_h, w, input_precision=DOT_PRECISION)
                    if HVP:
                        if HAS_U:
                            u = _load_tile(U, offs_v, offs_d, stride_uv, stride_ud, v_mask, d_mask)
                            if UPCAST:
                                u = u.to(tl.float32)
                            part = tl.dot(g_h, u, part, input_precision=DOT_PRECISION)
                    _accumulate(
                        DH_OUT + offs_t[:, None] * D + offs_d[None, :],
                        part * row_out[:, None],
                        t_mask[:, None] & d_mask[None, :],
                        ATOMIC,
                    )
                if NEED_DW:
                    h = _load_tile(H, offs_t, offs_d, stride_ht, stride_hd, t_mask, d_mask)  # [BT, BD]
                    if UPCAST:
                        h = h.to(tl.float32)
                    part = tl.dot(tl.trans(a_w), h, input_precision=DOT_PRECISION)
                    if HVP:
                        if HAS_DH:
                            dh = _load_tile(DH, offs_t, offs_d, stride_dht, stride_dhd, t_mask, d_mask)
                            if UPCAST:
                                dh = dh.to(tl.float32)
                            part = tl.dot(tl.trans(g_w), dh, part, input_precision=DOT_PRECISION)
                    _accumulate(
                        DW_OUT + offs_v[:, None] * D + offs_d[None, :],
                        part * col_out,
                        v_mask[:, None] & d_mask[None, :],
                        ATOMIC,
                    )
            if NEED_DB:
                _accumulate(DB_OUT + offs_v, tl.sum(a * coef[:, None], axis=0), v_mask, ATOMIC)


@triton.jit
def token_grads_kernel(
    H, W, B, Y, COEF, LSE, U, DH, BETA, PDZ,  # inputs
    DH_OUT, DW_OUT, DB_OUT,  # float32 accumulators: [T, D], [V, D], [V] (contiguous)
    T, V, D, V0,  # V0: the vocabulary id of W's first row (labels are global ids)
    stride_ht, stride_hd, stride_wv, stride_wd, stride_uv, stride_ud, stride_dht, stride_dhd,
    softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HVP: tl.constexpr,
    HAS_U: tl.constexpr, HAS_DH: tl.constexpr, HAS_BETA: tl.constexpr,
    NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_T: tl.constexpr,
    FILTER_EPS: tl.constexpr,
):  # fmt: skip
    """One tile per program (grouped order), every gradient accumulated by relaxed atomics straight
    into float32 memory: float32 gradients, or 16-bit ones whose float32 copies fit the scratch."""
    pid_t, pid_v = _grouped_tile(tl.program_id(0), tl.cdiv(T, BLOCK_T), tl.cdiv(V, BLOCK_V), GROUP_T)
    _grad_tile(
        pid_t, pid_v,
        H, W, B, Y, COEF, LSE, U, DH, BETA, PDZ, DH_OUT, DW_OUT, DB_OUT, T, V, D, V0,
        stride_ht, stride_hd, stride_wv, stride_wd, stride_uv, stride_ud, stride_dht, stride_dhd,
        softcap, HAS_BIAS, HAS_SOFTCAP, HVP, HAS_U, HAS_DH, HAS_BETA, NEED_DH, NEED_DW, NEED_DB,
        UPCAST, DOT_PRECISION, BLOCK_T, BLOCK_V, BLOCK_D,
        True, FILTER_EPS,
    )  # fmt: skip


@triton.jit
def _wait_for_slot(SYNC, num_slabs, slab, NUM_SLOTS):
    """Block until the slab that last used this slab's scratch slot (``slab - NUM_SLOTS``) has been
    rounded out and its slot zeroed. Spins on relaxed reads (no fence in the loop), then one acquire.
    The awaited slab's programs all hold smaller tickets, so they are running or done."""
    if slab >= NUM_SLOTS:
        flag = SYNC + 1 + num_slabs + (slab - NUM_SLOTS)
        done = tl.atomic_add(flag, 0, sem="relaxed")
        while done == 0:
            done = tl.atomic_add(flag, 0, sem="relaxed")
        tl.atomic_add(flag, 0, sem="acquire")
        tl.debug_barrier()  # every thread's adds into the slot come after the acquire


@triton.jit
def _arrive_and_round(
    SYNC, num_slabs, slab, expected, SLOT, OUT, row0, nrows, D,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Count this program's tiles of ``slab`` as done (release); the program that completes the slab
    (acquire) rounds its float32 rows [row0, row0 + nrows) once into the 16-bit ``OUT``, zeroes
    the slot for the slab that reuses it and publishes that with a release flag."""
    tl.debug_barrier()  # every thread's adds precede the release below
    arrived = tl.atomic_add(SYNC + 1 + slab, 1, sem="acq_rel")
    if arrived == expected - 1:
        tl.debug_barrier()
        for r0 in range(0, nrows, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = offs_r < nrows
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                mask = r_mask[:, None] & (offs_d < D)[None, :]
                at = offs_r[:, None] * D + offs_d[None, :]
                x = tl.load(SLOT + at, mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(OUT + row0 * D + at, _round(x, OUT.dtype.element_ty, UPCAST), mask=mask)
                tl.store(SLOT + at, tl.zeros((BLOCK_R, BLOCK_D), tl.float32), mask=mask)
        tl.debug_barrier()
        tl.atomic_xchg(SYNC + 1 + num_slabs + slab, 1, sem="release")


@triton.jit
def token_grads_slab_kernel(
    H, W, B, Y, COEF, LSE, U, DH, BETA, PDZ,  # inputs
    DH_OUT, DW_OUT, DB_OUT,  # [T, D], [V, D] gradients (16-bit when STAGED, else float32), [V] float32
    SCRATCH, SYNC,  # STAGED: float32 [NUM_SLOTS, SLOT_ROWS, D]; int32 [1 + 2 * slabs] zeros
    T, V, D, V0, NUM_SLOTS, SLOT_ROWS,
    stride_ht, stride_hd, stride_wv, stride_wd, stride_uv, stride_ud, stride_dht, stride_dhd,
    softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HVP: tl.constexpr,
    HAS_U: tl.constexpr, HAS_DH: tl.constexpr, HAS_BETA: tl.constexpr,
    NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_T: tl.constexpr,
    OWNER: tl.constexpr, STAGED: tl.constexpr, FILTER_EPS: tl.constexpr,
):  # fmt: skip
    """Both gradient passes in one launch, in slabs of SLOT_ROWS rows: first d_hidden by token slabs
    (every vocabulary block of a slab's tokens), then d_weight (and d_bias) by vocabulary slabs
    (every token block of a slab's vocabulary rows); each pass recomputes the logit tiles.

    STAGED (16-bit gradients): slab k accumulates in float32 scratch slot k % NUM_SLOTS; the last
    program to finish a slab rounds it once into the 16-bit gradient and zeroes the slot, and the
    programs of slab k + NUM_SLOTS wait for that. Programs take their linear id from a ticket
    (an atomic counter), so a program only ever waits for programs that started before it: no
    assumption on the order the GPU dispatches blocks in. The interpreter runs programs in order,
    so there it never waits. Without STAGED (float32) the gradients are their own accumulators.

    OWNER 0: one (token block, vocabulary block) tile per program, relaxed float32 atomics (d_bias
    rides with the d_hidden pass when there is one). OWNER 1 (deterministic): one program per token
    block (d_hidden) or vocabulary block (d_weight, d_bias) sweeps the other axis in order and adds
    with plain loads and stores: bitwise the same run to run.
    """
    num_t = tl.cdiv(T, BLOCK_T)
    num_v = tl.cdiv(V, BLOCK_V)
    if STAGED:
        pid = tl.atomic_add(SYNC, 1, sem="relaxed")
    else:
        pid = tl.program_id(0)
    slab_t = SLOT_ROWS // BLOCK_T  # token blocks per token slab
    slab_v = SLOT_ROWS // BLOCK_V
    slabs_1 = tl.cdiv(num_t, slab_t) if NEED_DH else 0
    num_slabs = slabs_1 + tl.cdiv(num_v, slab_v)
    if OWNER == 0:
        progs_1 = num_t * num_v if NEED_DH else 0
    else:
        progs_1 = num_t if NEED_DH else 0
    bias_first: tl.constexpr = NEED_DB and NEED_DH and OWNER == 0
    if pid < progs_1:  # d_hidden, token slab by token slab
        per_slab = slab_t * num_v if OWNER == 0 else slab_t
        slab = pid // per_slab
        first = slab * slab_t
        blocks = tl.minimum(slab_t, num_t - first)
        acc = DH_OUT
        if STAGED:
            acc = SCRATCH + ((slab % NUM_SLOTS) * SLOT_ROWS - first * BLOCK_T) * D
            _wait_for_slot(SYNC, num_slabs, slab, NUM_SLOTS)
        if OWNER == 0:
            pid_t, pid_v = _grouped_tile(pid % per_slab, blocks, num_v, GROUP_T)
            _grad_tile(
                first + pid_t, pid_v,
                H, W, B, Y, COEF, LSE, U, DH, BETA, PDZ, acc, DW_OUT, DB_OUT, T, V, D, V0,
                stride_ht, stride_hd, stride_wv, stride_wd, stride_uv, stride_ud, stride_dht, stride_dhd,
                softcap, HAS_BIAS, HAS_SOFTCAP, HVP, HAS_U, HAS_DH, HAS_BETA, True, False, bias_first,
                UPCAST, DOT_PRECISION, BLOCK_T, BLOCK_V, BLOCK_D,
                True, FILTER_EPS,
            )  # fmt: skip
        else:
            for pid_v in range(0, num_v):
                _grad_tile(
                    pid, pid_v,
                    H, W, B, Y, COEF, LSE, U, DH, BETA, PDZ, acc, DW_OUT, DB_OUT, T, V, D, V0,
                    stride_ht, stride_hd, stride_wv, stride_wd, stride_uv, stride_ud, stride_dht, stride_dhd,
                    softcap, HAS_BIAS, HAS_SOFTCAP, HVP, HAS_U, HAS_DH, HAS_BETA, True, False, False,
                    UPCAST, DOT_PRECISION, BLOCK_T, BLOCK_V, BLOCK_D,
                    False, FILTER_EPS,
                )  # fmt: skip
        if STAGED:
            row0 = first * BLOCK_T
            _arrive_and_round(
                SYNC, num_slabs, slab, blocks if OWNER != 0 else blocks * num_v,
                SCRATCH + (slab % NUM_SLOTS) * SLOT_ROWS * D, DH_OUT, row0,
                tl.minimum(SLOT_ROWS, T - row0), D, BLOCK_T, BLOCK_D, UPCAST,
            )  # fmt: skip
    else:  # d_weight (and d_bias), vocabulary slab by vocabulary slab
        pid2 = pid - progs_1
        per_slab = slab_v * num_t if OWNER == 0 else slab_v
        slab2 = pid2 // per_slab
        slab = slabs_1 + slab2
        first = slab2 * slab_v
        blocks = tl.minimum(slab_v, num_v - first)
        acc = DW_OUT
        if STAGED and NEED_DW:  # (a bias-only pass has no slab to wait for)
            acc = SCRATCH + ((slab % NUM_SLOTS) * SLOT_ROWS - first * BLOCK_V) * D
            _wait_for_slot(SYNC, num_slabs, slab, NUM_SLOTS)
        if OWNER == 0:
            pid_v, pid_t = _grouped_tile(pid2 % per_slab, blocks, num_t, GROUP_T)
            _grad_tile(
                pid_t, first + pid_v,
                H, W, B, Y, COEF, LSE, U, DH, BETA, PDZ, DH_OUT, acc, DB_OUT, T, V, D, V0,
                stride_ht, stride_hd, stride_wv, stride_wd, stride_uv, stride_ud, stride_dht, stride_dhd,
                softcap, HAS_BIAS, HAS_SOFTCAP, HVP, HAS_U, HAS_DH, HAS_BETA, False, NEED_DW,
                NEED_DB and not bias_first,
                UPCAST, DOT_PRECISION, BLOCK_T, BLOCK_V, BLOCK_D,
                True, FILTER_EPS,
            )  # fmt: skip
        else:
            for pid_t in range(0, num_t):
                _grad_tile(
                    pid_t, pid2,
                    H, W, B, Y, COEF, LSE, U, DH, BETA, PDZ, DH_OUT, acc, DB_OUT, T, V, D, V0,
                    stride_ht, stride_hd, stride_wv, stride_wd, stride_uv, stride_ud, stride_dht, stride_dhd,
                    softcap, HAS_BIAS, HAS_SOFTCAP, HVP, HAS_U, HAS_DH, HAS_BETA, False, NEED_DW, NEED_DB,
                    UPCAST, DOT_PRECISION, BLOCK_T, BLOCK_V, BLOCK_D,
                    False, FILTER_EPS,
                )  # fmt: skip
        if STAGED and NEED_DW:
            row0 = first * BLOCK_V
            _arrive_and_round(
                SYNC, num_slabs, slab, blocks if OWNER != 0 else blocks * num_t,
                SCRATCH + (slab % NUM_SLOTS) * SLOT_ROWS * D, DW_OUT, row0,
                tl.minimum(SLOT_ROWS, V - row0), D, BLOCK_V, BLOCK_D, UPCAST,
            )  # fmt: skip
