"""Host-side launchers for the Triton kernels: the same three primitives as ``chunked.py``.

Block sizes come from an explicit table (no ``@triton.autotune``: it fails without a GPU and its
benchmarking runs would be charged to the first training step). Under the Triton interpreter
(``TRITON_INTERPRET=1``) the operands are upcast to float32 before ``tl.dot``, because the
interpreter's bf16 dot is wrong.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import types
from dataclasses import dataclass

import torch
import triton

from boost_kernels._validate import DEFAULT_SCRATCH_BYTES, check_scratch_bytes
from boost_kernels.chunked import is_transform_wrapped
from boost_kernels.triton_kernels import token_grads_kernel, token_grads_slab_kernel, token_stats_kernel


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class BlockConfig:
    block_t: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class DeviceInfo:
    """What the launchers need to know of the GPU: compute capability (major·10 + minor) and SM count."""

    arch: int
    num_sms: int


# Set by boost_kernels.launch_capture to plan launches for a GPU that is not there; None otherwise.
FORCED_DEVICE: DeviceInfo | None = None


def device_info(device: torch.device) -> DeviceInfo:
    if FORCED_DEVICE is not None:
        return FORCED_DEVICE
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return DeviceInfo(props.major * 10 + props.minor, props.multi_processor_count)
    return DeviceInfo(0, 2)  # the interpreter


# (kernel, tangent/HVP mode, float32 inputs) -> blocks on a GPU, per architecture family
# (80: Ampere/Ada, mma.sync; 90: Hopper, wgmma). Each entry compiles with zero local-memory spills
# at its launch-time specialisation (tests/kernels/test_aot_compile.py; `python -m boost_kernels.aot`
# prints them). Not yet timed on a GPU. float32 runs exact IEEE dots (no tensor cores), hence much
# smaller tiles.
_AMPERE_CONFIGS = {
    ("stats", False, False): BlockConfig(64, 128, 64, 8, 3),
    ("stats", True, False): BlockConfig(32, 128, 32, 8, 2),
    ("grads", False, False): BlockConfig(64, 128, 32, 8, 2),
    ("grads", True, False): BlockConfig(64, 128, 32, 8, 2),  # 64x64 s1 before the slab kernel
    ("stats", False, True): BlockConfig(32, 32, 32, 4, 2),
    ("stats", True, True): BlockConfig(16, 32, 32, 4, 1),
    ("grads", False, True): BlockConfig(32, 32, 32, 4, 1),
    ("grads", True, True): BlockConfig(32, 32, 16, 4, 1),
}
# deterministic=True runs the gradient kernel with one program per row block sweeping the other axis
# ("grads_ordered"): same tiles unless they spill there.
_AMPERE_CONFIGS |= {("grads_ordered", *key[1:]): c for key, c in _AMPERE_CONFIGS.items() if key[0] == "grads"}
# Hopper: wgmma needs 64 rows per warpgroup; 128x128 logit tiles double the forward's FLOPs per byte
# of the 64x128 ones (64 vs 43), the tangent kernels move from 32-row mma.sync tiles to wgmma, and
# every 16-bit kernel pipelines 3 stages. 128x256 tiles spill (registers), so they are not used.
_HOPPER_CONFIGS = dict(_AMPERE_CONFIGS) | {
    ("grads_ordered", False, True): BlockConfig(32, 32, 16, 4, 1),  # 32x32x32 spills 8 bytes here
    ("stats", False, False): BlockConfig(128, 128, 64, 8, 3),
    ("stats", True, False): BlockConfig(64, 128, 64, 8, 3),
    ("grads", False, False): BlockConfig(128, 128, 32, 8, 3),
    ("grads", True, False): BlockConfig(64, 128, 32, 8, 3),
    ("grads_ordered", False, False): BlockConfig(64, 128, 32, 8, 3),  # 128x128 spilled (owner mode)
    ("grads_ordered", True, False): BlockConfig(64, 128, 32, 8, 3),
}
GPU_CONFIGS = {80: _AMPERE_CONFIGS, 90: _HOPPER_CONFIGS}
# Token blocks that sweep the vocabulary together in the gradient kernel (L2 reuse of W tiles).
GROUP_T = 8
# The interpreter runs each program in numpy: larger blocks mean fewer, faster programs.
INTERPRETER_CONFIG = BlockConfig(32, 64, 32, 4, 1)


def arch_family(arch: int) -> int:
    """90 for Hopper, whose tiles the launch-time report checked; 80 (the table every GPU used
    before) for anything else, Blackwell included, until the report covers it."""
    return 90 if arch // 10 == 9 else 80


def block_config(kernel: str, tangent: bool, dtype: torch.dtype, arch: int) -> BlockConfig:
    if interpreting():
        return INTERPRETER_CONFIG
    return GPU_CONFIGS[arch_family(arch)][(kernel, tangent, dtype == torch.float32)]


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs must not silently drop to tf32: the op promises float32 accuracy.
    return "ieee" if dtype == torch.float32 else "tf32"


def _require_plain(*tensors) -> None:
    """Triton launches need real storage; torch.func transforms hand custom rules wrapped tensors.

    Unwrapping them would silently drop the derivatives of outer transform levels, so refuse.
    """
    for x in tensors:
        if is_transform_wrapped(x):
            raise RuntimeError(
                "torch.func transforms (jvp, grad, vmap, hessian) cannot run through the Triton kernels. "
                "Use torch.autograd.forward_ad or double backward (both exact on the Triton path), "
                "boost_kernels.trajectory_jvp / trajectory_hvp, or backend='torch' for torch.func."
            )


def _check_index_range(hidden: torch.Tensor, weight: torch.Tensor) -> None:
    """Kernel offsets are int32: refuse shapes whose element offsets would overflow."""
    limit = 2**31 - 1
    for name, x in (("hidden", hidden), ("weight", weight)):
        span = sum((n - 1) * abs(st) for n, st in zip(x.shape, x.stride())) + 1
        if max(span, x.numel()) > limit:
            raise ValueError(
                f"{name} {tuple(x.shape)} spans more than 2**31 elements, beyond the kernels' int32 offsets; "
                "split the batch into smaller chunks of tokens"
            )


def _vec(x: torch.Tensor | None) -> torch.Tensor | None:
    """1-D operands are read with unit stride by the kernels."""
    return None if x is None else x.contiguous()


def _strides(x: torch.Tensor | None) -> tuple[int, int]:
    return (0, 0) if x is None else (x.stride(0), x.stride(1))


# The forward's token blocks in flight re-read their hidden rows once per vocabulary tile, so the
# rows of all of them should stay in L2 (50 MiB on an H100, 40 MiB on an A100) next to the weight
# tiles streaming through: at most this many bytes. Not measured; see forward_splits.
L2_HIDDEN_BYTES = 24 * 2**20


def forward_splits(T: int, V: int, cfg: BlockConfig, num_sms: int, hidden_rows: int) -> tuple[int, int]:
    """(vocabulary entries per split, splits) of the forward grid (token_stats_kernel).

    Enough programs to fill the card about four times over, never an empty vocabulary split; and
    at least enough splits that the token blocks in flight (``num_sms`` programs, the splits of a
    token block adjacent in launch order, so num_sms / splits token blocks) hold at most
    L2_HIDDEN_BYTES of hidden rows (``hidden_rows`` bytes per token block). Without that bound,
    T=65536, D=8192 on an H100 had 2 splits: 66 token blocks of 2 MiB in flight, 132 MiB against
    a 50 MiB L2. Each split is a contiguous vocabulary range; any split count gives the same
    result up to float32 rounding of the log-sum-exp combination.
    """
    t_blocks = triton.cdiv(T, cfg.block_t)
    v_blocks = triton.cdiv(V, cfg.block_v)
    wanted = max(1, triton.cdiv(4 * num_sms, t_blocks))
    fit = max(1, L2_HIDDEN_BYTES // hidden_rows)  # token blocks whose hidden rows fit the bound
    if t_blocks > fit:  # one program per SM (the Hopper forward uses 255 registers)
        wanted = max(wanted, triton.cdiv(num_sms, fit))
    blocks_per_split = triton.cdiv(v_blocks, min(wanted, v_blocks))
    v_per_split = blocks_per_split * cfg.block_v
    return v_per_split, triton.cdiv(V, v_per_split)


def token_losses(
    hidden, weight, bias, labels, softcap, tangent_weight=None, tangent_hidden=None, tangent_bias=None
):
    """Triton version of :func:`boost_kernels.chunked.token_losses` (same arguments and returns)."""
    _require_plain(hidden, weight, bias, tangent_weight, tangent_hidden, tangent_bias)
    _check_index_range(hidden, weight)
    bias, labels, tangent_bias = _vec(bias), _vec(labels), _vec(tangent_bias)
    T, D = hidden.shape
    V = weight.shape[0]
    with_tangent = any(x is not None for x in (tangent_weight, tangent_hidden, tangent_bias))
    gpu = device_info(hidden.device)
    cfg = block_config("stats", with_tangent, hidden.dtype, gpu.arch)
    t_blocks = triton.cdiv(T, cfg.block_t)
    hidden_rows = (1 + (tangent_hidden is not None)) * cfg.block_t * D * hidden.element_size()
    v_per_split, num_splits = forward_splits(T, V, cfg, gpu.num_sms, hidden_rows)

    f32 = dict(dtype=torch.float32, device=hidden.device)
    m_part = torch.empty(num_splits, T, **f32)
    s_part = torch.empty(num_splits, T, **f32)
    zy_part = torch.empty(num_splits, T, **f32)
    q_part = torch.empty(num_splits, T, **f32) if with_tangent else m_part
    dzy_part = torch.empty(num_splits, T, **f32) if with_tangent else m_part
    dummy = hidden  # never read: the matching HAS_* flag is False
    token_stats_kernel[(t_blocks * num_splits,)](
        hidden, weight, bias if bias is not None else dummy, labels,
        tangent_weight if tangent_weight is not None else dummy,
        tangent_hidden if tangent_hidden is not None else dummy,
        tangent_bias if tangent_bias is not None else dummy,
        m_part, s_part, zy_part, q_part, dzy_part,
        T, V, D, v_per_split, num_splits,
        *_strides(hidden), *_strides(weight), *_strides(tangent_weight), *_strides(tangent_hidden),
        float(softcap) if softcap is not None else 1.0,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        HAS_U=tangent_weight is not None, HAS_DH=tangent_hidden is not None,
        HAS_BETA=tangent_bias is not None, WITH_TANGENT=with_tangent,
        UPCAST=interpreting(), DOT_PRECISION=_dot_precision(hidden.dtype),
        BLOCK_T=cfg.block_t, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    m = m_part.max(0).values
    scale = torch.exp(m_part - m)
    s = (s_part * scale).sum(0)
    lse = m + torch.log(s)
    counted = labels >= 0
    loss = torch.where(counted, lse - zy_part.sum(0), 0.0)
    if not with_tangent:
        return loss, lse, None, None
    pdz = (q_part * scale).sum(0) / s
    dloss = torch.where(counted, pdz - dzy_part.sum(0), 0.0)
    return loss, lse, dloss, pdz


# 16-bit gradients accumulate in float32 scratch of at most ``scratch_bytes`` (default
# SCRATCH_BYTES; None: no limit) and are rounded to the input dtype once, at the end. When the
# float32 d_hidden and d_weight fit together, one launch covers every tile in one pass over the
# logits (token_grads_kernel: 8·T·D·V FLOPs for both gradients). Otherwise one launch runs two
# passes that each recompute the logit tiles (10·T·D·V): d_hidden token slab by token slab, then
# d_weight vocabulary slab by vocabulary slab, through a ring of SCRATCH_SLOTS float32 slots
# (token_grads_slab_kernel). Both are exact in the same sense (float32 accumulation, one
# rounding). float32 inputs accumulate straight into the gradients (no scratch, one launch).
SCRATCH_BYTES = DEFAULT_SCRATCH_BYTES  # + O(T) statistics stays under the 64 MiB of extra memory
# Slots of the ring: while one slab is rounded out by its last program, the next SCRATCH_SLOTS - 1
# slabs keep the GPU busy. More slots mean narrower slabs (less L2 reuse inside a slab).
SCRATCH_SLOTS = 4


def _ring(
    D: int, block_t: int, block_v: int, slabs_wanted, scratch_bytes: int | None, longest: int
) -> tuple[int, int]:
    """(rows per slot, slots) of the float32 ring: slots·rows·D·4 <= scratch_bytes unless a single
    slot of one block of rows is already larger (then one slot of one block). Rows are a multiple
    of both block sizes and no more than ``longest`` (the longest axis a slab covers) rounded up to
    one; ``slabs_wanted(rows)`` is the number of slabs at that slot size. ``scratch_bytes`` None:
    no limit, one slot per slab."""
    unit = math.lcm(block_t, block_v)
    row_bytes = 4 * D
    most = triton.cdiv(longest, unit) * unit
    if scratch_bytes is None:
        return most, slabs_wanted(most)
    rows = min(most, max(unit, scratch_bytes // (SCRATCH_SLOTS * row_bytes) // unit * unit))
    slots = max(1, min(scratch_bytes // (rows * row_bytes), slabs_wanted(rows)))
    return rows, slots


def one_pass_fits(
    T: int, V: int, D: int, need_hidden: bool, need_weight: bool, scratch_bytes: int | None
) -> bool:
    """Whether float32 accumulators for the 16-bit gradients asked for fit ``scratch_bytes`` (None:
    no limit), so that the backward runs in one pass over the logits (token_grads_kernel)."""
    return scratch_bytes is None or (need_hidden * T + need_weight * V) * D * 4 <= scratch_bytes


def grad_filter_eps(grad_filter: bool | float, dtype: torch.dtype) -> float:
    """The gradient filter's threshold on |p - e_y|: 0 (off) for False, Cut Cross-Entropy's
    ``finfo(dtype).eps / 32`` for True (2^-12 for bf16), or the given positive float."""
    if grad_filter is False or grad_filter is None:
        return 0.0
    if grad_filter is True:
        return torch.finfo(dtype).eps / 32
    eps = float(grad_filter)
    if not eps > 0.0:
        raise ValueError(f"grad_filter must be True, False or a positive threshold, got {grad_filter!r}")
    return eps


def _launch_grads(
    hidden, weight, bias, labels, softcap, coef, lse, pdz, tangents, need_hidden, need_weight, need_bias,
    deterministic=False, filter_eps=0.0, scratch_bytes=SCRATCH_BYTES,
):  # fmt: skip
    """Accumulate (d_hidden [T, D], d_weight [V, D], d_bias float32 [V]).

    d_hidden and d_weight come back in float32 for float32 inputs and in the input dtype for 16-bit
    inputs, each element accumulated in float32 and rounded once (see SCRATCH_BYTES). A small
    constant number of launches whatever T and V. ``scratch_bytes`` (16-bit inputs): float32
    scratch allowed, None for no limit; when the accumulators of the gradients asked for fit, one
    pass over the logits, else two (see SCRATCH_BYTES). ``deterministic``: no floating-point atomics; one
    program owns each token block (d_hidden) or vocabulary block (d_weight, d_bias) and adds its
    tiles in a fixed order, so the result is bitwise the same run to run (two passes over the
    logits, and fewer programs in flight: slower). ``filter_eps`` > 0 (gradients only, not HVP):
    skip the tiles where every |p - e_y| is below it (see grad_filter_eps).
    """
    T, D = hidden.shape
    V = weight.shape[0]
    _require_plain(hidden, weight, bias, coef, *(tangents or ()))
    bias, labels = _vec(bias), _vec(labels)
    hvp = tangents is not None
    if hvp and filter_eps:
        raise ValueError("the gradient filter is for first-order gradients only; the HVP stays exact")
    tangent_weight, tangent_hidden, tangent_bias = tangents if hvp else (None, None, None)
    tangent_bias = _vec(tangent_bias)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    exact = hidden.dtype == torch.float32
    check_scratch_bytes(scratch_bytes)
    one_pass = not deterministic and (
        exact or one_pass_fits(T, V, D, need_hidden, need_weight, scratch_bytes)
    )
    cfg = block_config("grads" if not deterministic else "grads_ordered", hvp, hidden.dtype,
                       device_info(hidden.device).arch)  # fmt: skip
    dummy = coef
    operands = (
        hidden, weight, bias if bias is not None else hidden, labels, coef, lse,
        tangent_weight if tangent_weight is not None else hidden,
        tangent_hidden if tangent_hidden is not None else hidden,
        tangent_bias if tangent_bias is not None else hidden,
        pdz if pdz is not None else dummy,
    )  # fmt: skip
    strides = (*_strides(hidden), *_strides(weight), *_strides(tangent_weight), *_strides(tangent_hidden))
    flags = dict(
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, HVP=hvp,
        HAS_U=tangent_weight is not None, HAS_DH=tangent_hidden is not None,
        HAS_BETA=tangent_bias is not None,
        NEED_DH=need_hidden, NEED_DW=need_weight, NEED_DB=need_bias,
        UPCAST=interpreting(), DOT_PRECISION=_dot_precision(hidden.dtype),
        BLOCK_T=cfg.block_t, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, GROUP_T=GROUP_T,
        FILTER_EPS=float(filter_eps), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    cap = float(softcap) if softcap is not None else 1.0
    d_bias = torch.zeros(V, **f32) if need_bias else None
    t_blocks, v_blocks = triton.cdiv(T, cfg.block_t), triton.cdiv(V, cfg.block_v)

    if one_pass:  # every tile in one launch, float32 accumulators (the gradients themselves if fp32)
        d_hidden = torch.zeros(T, D, **f32) if need_hidden else None
        d_weight = torch.zeros(V, D, **f32) if need_weight else None
        token_grads_kernel[(t_blocks * v_blocks,)](
            *operands,
            d_hidden if d_hidden is not None else dummy,
            d_weight if d_weight is not None else dummy,
            d_bias if d_bias is not None else dummy,
            T, V, D, 0, *strides, cap, **flags,
        )  # fmt: skip
        if not exact:
            d_hidden = d_hidden.to(hidden.dtype) if d_hidden is not None else None
            d_weight = d_weight.to(hidden.dtype) if d_weight is not None else None
        return d_hidden, d_weight, d_bias

    # One launch, two passes (token_grads_slab_kernel): token slabs, then vocabulary slabs.
    owner = 1 if deterministic else 0
    bias_first = need_bias and need_hidden and owner == 0
    second_pass = need_weight or (need_bias and not bias_first)
    unit = math.lcm(cfg.block_t, cfg.block_v)

    def slabs(rows):
        return (triton.cdiv(T, rows) if need_hidden else 0) + triton.cdiv(V, rows)

    if exact:  # no scratch: one slab per pass, nothing to wait for
        rows, slots = triton.cdiv(max(T, V), unit) * unit, 1
    else:
        rows, slots = _ring(
            D, cfg.block_t, cfg.block_v, slabs, scratch_bytes, max(T if need_hidden else 0, V)
        )
    programs = 0
    if need_hidden:
        programs += t_blocks * v_blocks if owner == 0 else t_blocks
    if second_pass:
        programs += t_blocks * v_blocks if owner == 0 else v_blocks
    out = f32 if exact else dict(dtype=hidden.dtype, device=hidden.device)
    make = torch.zeros if exact else torch.empty
    d_hidden = make(T, D, **out) if need_hidden else None
    d_weight = make(V, D, **out) if need_weight else None
    scratch = None if exact else torch.zeros(slots, rows, D, **f32)
    sync = None if exact else torch.zeros(1 + 2 * slabs(rows), dtype=torch.int32, device=hidden.device)
    token_grads_slab_kernel[(programs,)](
        *operands,
        d_hidden if d_hidden is not None else dummy,
        d_weight if d_weight is not None else dummy,
        d_bias if d_bias is not None else dummy,
        scratch if scratch is not None else dummy,
        sync if sync is not None else dummy,
        T, V, D, 0, slots, rows, *strides, cap, OWNER=owner, STAGED=not exact, **flags,
    )  # fmt: skip
    return d_hidden, d_weight, d_bias


def token_loss_grads(
    hidden, weight, bias, labels, softcap, coef, lse=None, need_hidden=True, need_weight=True, need_bias=True,
    deterministic=False, grad_filter=False, scratch_bytes=SCRATCH_BYTES,
):  # fmt: skip
    """Triton version of :func:`boost_kernels.chunked.token_loss_grads` (``deterministic``,
    ``scratch_bytes``: see _launch_grads).

    ``grad_filter`` (off by default): skip the (token block, vocabulary block) tiles in which every
    |p - e_y| is below a threshold (True: Cut Cross-Entropy's finfo(dtype).eps / 32, 2^-12 for
    bf16; or a float). Each skipped entry changes d_hidden[t, :] by coef_t·g_tv·W[v, :] and
    d_weight[v, :] by coef_t·g_tv·h[t, :] with |g_tv| < threshold, so
    |Δd_hidden[t, d]| <= threshold·|coef_t|·Σ_v |W[v, d]|,
    |Δd_weight[v, d]| <= threshold·Σ_t |coef_t|·|h[t, d]| and |Δd_bias[v]| <= threshold·Σ_t |coef_t|.
    """
    if lse is None:
        lse = token_losses(hidden, weight, bias, labels, softcap)[1]
    return _launch_grads(
        hidden,
        weight,
        bias,
        labels,
        softcap,
        coef.float().contiguous(),
        lse.contiguous(),
        None,
        None,
        need_hidden,
        need_weight,
        need_bias and bias is not None,
        deterministic,
        grad_filter_eps(grad_filter, hidden.dtype),
        scratch_bytes,
    )


def token_loss_hvp(
    hidden, weight, bias, labels, softcap, coef, tangent_weight, tangent_hidden, tangent_bias,
    need_hidden=True, need_weight=True, need_bias=True, deterministic=False, scratch_bytes=SCRATCH_BYTES,
):  # fmt: skip
    """Triton version of :func:`boost_kernels.chunked.token_loss_hvp`.

    Runs the tangent forward first for lse_t and <p_t, dz_t>, then one HVP pass (``scratch_bytes``:
    see _launch_grads; the HVP's 16-bit outputs take the same one- or two-pass path).
    """
    _, lse, _, pdz = token_losses(
        hidden, weight, bias, labels, softcap, tangent_weight, tangent_hidden, tangent_bias
    )
    return _launch_grads(
        hidden, weight, bias, labels, softcap, coef.float().contiguous(), lse, pdz,
        (tangent_weight, tangent_hidden, tangent_bias),
        need_hidden, need_weight, need_bias and bias is not None, deterministic,
        scratch_bytes=scratch_bytes,
    )  # fmt: skip


def with_options(
    deterministic: bool = False, grad_filter: bool | float = False, scratch_bytes: int | None = SCRATCH_BYTES
):
    """The three primitives with these options: this module itself when all are the defaults.

    With ``grad_filter`` only ``token_loss_grads`` filters; the namespace's ``exact`` is the
    unfiltered implementation, for the derivatives of the gradient (they stay exact)."""
    check_scratch_bytes(scratch_bytes)
    filtered = bool(grad_filter_eps(grad_filter, torch.float32))
    if not deterministic and not filtered and scratch_bytes == SCRATCH_BYTES:
        return sys.modules[__name__]
    return _options(bool(deterministic), grad_filter if filtered else False, scratch_bytes)


@functools.lru_cache(maxsize=64, typed=True)
def _options(deterministic: bool, grad_filter: bool | float, scratch_bytes: int | None):
    """The namespace of these options, the same object for the same options (as the module is)."""
    filtered = grad_filter is not False
    opts = dict(deterministic=deterministic, scratch_bytes=scratch_bytes)
    exact = types.SimpleNamespace(
        token_losses=token_losses,
        token_loss_grads=functools.partial(token_loss_grads, **opts),
        token_loss_hvp=functools.partial(token_loss_hvp, **opts),
    )
    if not filtered:
        return exact
    return types.SimpleNamespace(
        token_losses=token_losses,
        token_loss_grads=functools.partial(token_loss_grads, grad_filter=grad_filter, **opts),
        token_loss_hvp=exact.token_loss_hvp,
        exact=exact,
    )
