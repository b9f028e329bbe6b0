"""Host-side launchers for the Triton kernels: the same three primitives as ``chunked.py``.

Block sizes come from an explicit table (no ``@triton.autotune``: it fails without a GPU and its
benchmarking runs would be charged to the first training step). Under the Triton interpreter
(``TRITON_INTERPRET=1``) the operands are upcast to float32 before ``tl.dot``, because the
interpreter's bf16 dot is wrong.
"""

from __future__ import annotations

import functools
import os
import types
from dataclasses import dataclass

import torch
import triton

from boost_kernels.chunked import is_transform_wrapped
from boost_kernels.triton_kernels import token_grads_kernel, token_stats_kernel


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
    ("grads", True, False): BlockConfig(64, 64, 32, 8, 1),
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
    ("stats", False, False): BlockConfig(128, 128, 64, 8, 3),
    ("stats", True, False): BlockConfig(64, 128, 64, 8, 3),
    ("grads", False, False): BlockConfig(128, 128, 32, 8, 3),
    ("grads", True, False): BlockConfig(64, 128, 32, 8, 3),
    ("grads_ordered", False, False): BlockConfig(64, 128, 32, 8, 3),  # 128x128 spills (OWNER=2)
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
    v_blocks = triton.cdiv(V, cfg.block_v)
    # Enough programs to fill the card about four times over, never an empty vocabulary split.
    wanted = max(1, triton.cdiv(4 * gpu.num_sms, t_blocks))
    blocks_per_split = triton.cdiv(v_blocks, min(wanted, v_blocks))
    v_per_split = blocks_per_split * cfg.block_v
    num_splits = triton.cdiv(V, v_per_split)

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


# 16-bit gradients accumulate in float32 scratch of at most this many bytes and are rounded to the
# input dtype once, at the end. When d_hidden and d_weight fit together, one launch covers every
# tile. Otherwise two passes each recompute the logit tiles: d_hidden one token slab at a time (each
# launch sweeps the whole vocabulary), then d_weight one vocabulary slab at a time (each launch
# sweeps every token). float32 inputs accumulate straight into the gradients (no scratch, one launch).
SCRATCH_BYTES = 56 * 2**20  # + O(T) statistics stays under the 64 MiB of extra memory


def _slab_rows(n: int, D: int, block: int) -> int:
    """Rows of a [rows, D] float32 slab within SCRATCH_BYTES (a multiple of the block, at least one)."""
    return min(n, max(block, SCRATCH_BYTES // (4 * D) // block * block))


def _rows(x: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    return None if x is None else x[start:stop]


def _launch_grads(
    hidden, weight, bias, labels, softcap, coef, lse, pdz, tangents, need_hidden, need_weight, need_bias,
    deterministic=False,
):  # fmt: skip
    """Accumulate (d_hidden [T, D], d_weight [V, D], d_bias float32 [V]).

    d_hidden and d_weight come back in float32 for float32 inputs and in the input dtype for 16-bit
    inputs, rounded once (see SCRATCH_BYTES for how those are accumulated). ``deterministic``: no
    atomics; one program owns each token block (d_hidden) or vocabulary block (d_weight, d_bias)
    and adds its tiles in a fixed order, so the result is bitwise the same run to run (two passes
    over the logits, and fewer programs in flight for d_hidden: slower).
    """
    T, D = hidden.shape
    V = weight.shape[0]
    _require_plain(hidden, weight, bias, coef, *(tangents or ()))
    bias, labels = _vec(bias), _vec(labels)
    hvp = tangents is not None
    tangent_weight, tangent_hidden, tangent_bias = tangents if hvp else (None, None, None)
    tangent_bias = _vec(tangent_bias)
    kernel = "grads_ordered" if deterministic else "grads"
    cfg = block_config(kernel, hvp, hidden.dtype, device_info(hidden.device).arch)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    dummy = coef

    def launch(t0, t1, v0, v1, dh_out, dw_out, db_out, owner=0):
        """One launch over tokens [t0, t1) x vocabulary [v0, v1); None outputs are not computed."""
        t_blocks, v_blocks = triton.cdiv(t1 - t0, cfg.block_t), triton.cdiv(v1 - v0, cfg.block_v)
        grid = ((t_blocks * v_blocks, t_blocks, v_blocks)[owner],)
        token_grads_kernel[grid](
            hidden[t0:t1], weight[v0:v1], _rows(bias, v0, v1) if bias is not None else hidden,
            labels[t0:t1], coef[t0:t1], lse[t0:t1],
            _rows(tangent_weight, v0, v1) if tangent_weight is not None else hidden,
            _rows(tangent_hidden, t0, t1) if tangent_hidden is not None else hidden,
            _rows(tangent_bias, v0, v1) if tangent_bias is not None else hidden,
            pdz[t0:t1] if pdz is not None else dummy,
            dh_out if dh_out is not None else dummy,
            dw_out if dw_out is not None else dummy,
            db_out[v0:v1] if db_out is not None else dummy,
            t1 - t0, v1 - v0, D, v0,
            *_strides(hidden), *_strides(weight), *_strides(tangent_weight), *_strides(tangent_hidden),
            float(softcap) if softcap is not None else 1.0,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, HVP=hvp,
            HAS_U=tangent_weight is not None, HAS_DH=tangent_hidden is not None,
            HAS_BETA=tangent_bias is not None,
            NEED_DH=dh_out is not None, NEED_DW=dw_out is not None, NEED_DB=db_out is not None,
            UPCAST=interpreting(), DOT_PRECISION=_dot_precision(hidden.dtype),
            BLOCK_T=cfg.block_t, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, GROUP_T=GROUP_T, OWNER=owner,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip

    d_bias = torch.zeros(V, **f32) if need_bias else None
    exact = hidden.dtype == torch.float32
    out = dict(dtype=hidden.dtype, device=hidden.device)
    if exact:  # float32 gradients are their own accumulators
        d_hidden = torch.zeros(T, D, **f32) if need_hidden else None
        d_weight = torch.zeros(V, D, **f32) if need_weight else None
    else:
        d_hidden = torch.empty(T, D, **out) if need_hidden else None
        d_weight = torch.empty(V, D, **out) if need_weight else None
    if not deterministic:
        if exact:
            launch(0, T, 0, V, d_hidden, d_weight, d_bias)
            return d_hidden, d_weight, d_bias
        if (need_hidden * T + need_weight * V) * D * 4 <= SCRATCH_BYTES:  # one pass, one launch
            h_acc = torch.zeros(T, D, **f32) if need_hidden else None
            w_acc = torch.zeros(V, D, **f32) if need_weight else None
            launch(0, T, 0, V, h_acc, w_acc, d_bias)
            for acc, grad in ((h_acc, d_hidden), (w_acc, d_weight)):
                if acc is not None:
                    grad.copy_(acc)
            return d_hidden, d_weight, d_bias

    # Two passes: token slabs against the whole vocabulary, then vocabulary slabs against every
    # token. The bias gradient rides with the first pass that visits every tile (the second when
    # deterministic: only a program owning a vocabulary block may add into it without atomics).
    bias_in_first = need_hidden and not deterministic
    if need_hidden:
        rows = T if exact else _slab_rows(T, D, cfg.block_t)
        scratch = None if exact else torch.empty(rows, D, **f32)
        for t0 in range(0, T, rows):
            t1 = min(t0 + rows, T)
            acc = d_hidden[t0:t1] if exact else scratch
            if not exact:
                acc.zero_()
            launch(
                t0, t1, 0, V, acc, None, d_bias if bias_in_first else None, owner=1 if deterministic else 0
            )
            if not exact:
                d_hidden[t0:t1].copy_(scratch[: t1 - t0])
        del scratch, acc  # freed before the vocabulary pass allocates its own
    if need_weight or (need_bias and not bias_in_first):
        rows = V if exact or not need_weight else _slab_rows(V, D, cfg.block_v)
        scratch = None if exact or not need_weight else torch.empty(rows, D, **f32)
        for v0 in range(0, V, rows):
            v1 = min(v0 + rows, V)
            acc = d_weight[v0:v1] if exact and need_weight else scratch
            if scratch is not None:
                acc.zero_()
            db = None if bias_in_first else d_bias
            launch(0, T, v0, v1, None, acc, db, owner=2 if deterministic else 0)
            if scratch is not None:
                d_weight[v0:v1].copy_(scratch[: v1 - v0])
    return d_hidden, d_weight, d_bias


def token_loss_grads(
    hidden, weight, bias, labels, softcap, coef, lse=None, need_hidden=True, need_weight=True, need_bias=True,
    deterministic=False,
):  # fmt: skip
    """Triton version of :func:`boost_kernels.chunked.token_loss_grads` (``deterministic``: see _launch_grads)."""
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
    )


def token_loss_hvp(
    hidden, weight, bias, labels, softcap, coef, tangent_weight, tangent_hidden, tangent_bias,
    need_hidden=True, need_weight=True, need_bias=True, deterministic=False,
):  # fmt: skip
    """Triton version of :func:`boost_kernels.chunked.token_loss_hvp`.

    Runs the tangent forward first for lse_t and <p_t, dz_t>, then one HVP pass.
    """
    _, lse, _, pdz = token_losses(
        hidden, weight, bias, labels, softcap, tangent_weight, tangent_hidden, tangent_bias
    )
    return _launch_grads(
        hidden, weight, bias, labels, softcap, coef.float().contiguous(), lse, pdz,
        (tangent_weight, tangent_hidden, tangent_bias),
        need_hidden, need_weight, need_bias and bias is not None, deterministic,
    )  # fmt: skip


# The same primitives with bitwise-reproducible gradients (ops: ``deterministic=True``). The
# forward and the JVP have no atomics and are deterministic as they are.
DETERMINISTIC = types.SimpleNamespace(
    token_losses=token_losses,
    token_loss_grads=functools.partial(token_loss_grads, deterministic=True),
    token_loss_hvp=functools.partial(token_loss_hvp, deterministic=True),
)
