"""Attention that never crosses trajectory borders in a packed batch.

Two ways, both checked against one-by-one runs in ``tests/data/test_packed_equals_single.py``:

- an explicit block-diagonal causal mask, ``[1, 1, T, T]`` (:func:`block_causal_mask`): works with
  every attention implementation that takes a 4D mask (``sdpa`` with a bool mask, ``eager`` with an
  additive float mask), at O(T^2) memory, so for CPU runs and tests;
- ``position_ids`` alone: recent ``transformers`` (those with
  ``masking_utils.find_packed_sequence_indices``) start a new sequence wherever the position ids do
  not increase by one, for sdpa/eager/flex and flash-attention alike. This needs ``use_cache=False``
  (a cache disables the detection) and no ``attention_mask``.

A third, for flash-attention's variable-length kernel (``flash_attn_varlen_func``): no mask at all,
the batch's own ``cu_seqlens`` handed to ``transformers`` as ``cu_seq_lens_q/k`` with
``max_length_q/k`` (:func:`varlen_kwargs`); each trajectory is then a separate sequence of the kernel.
:func:`reference_varlen_attention` is that kernel's contract written in PyTorch, so the CPU tests can
run ``transformers``' flash-attention code path on exactly those inputs
(``tests/data/test_attention_paths.py``).
"""

from __future__ import annotations

import torch


def sequence_ids(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``[T]`` int64: for every token, the index of its sequence in ``cu_seqlens`` (``[n+1]`` int32)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths)


def block_causal_mask(cu_seqlens: torch.Tensor, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """The ``[1, 1, T, T]`` mask where query t may attend key s iff same sequence and s <= t.

    Args:
        cu_seqlens: ``[n+1]`` int32 sequence starts with ``cu_seqlens[-1] == T``.
        dtype: ``torch.bool`` (True = attend; for ``sdpa``) or a float dtype for an additive mask
            (0 = attend, ``finfo(dtype).min`` = blocked; for ``eager`` attention).
    """
    return row_block_causal_mask(cu_seqlens, 1, dtype)


def row_block_causal_mask(
    cu_seqlens: torch.Tensor, rows: int, dtype: torch.dtype = torch.bool
) -> torch.Tensor:
    """The ``[rows, 1, L, L]`` mask of a batch packed into ``rows`` rows of ``L = T / rows`` tokens.

    Same rule as :func:`block_causal_mask` (same sequence and s <= t) within each row; no sequence of
    ``cu_seqlens`` may cross a row border.
    """
    seq = sequence_ids(cu_seqlens).view(rows, -1)
    L = seq.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=seq.device).tril()
    allowed = (seq[:, :, None] == seq[:, None, :]) & causal
    if dtype == torch.bool:
        return allowed[:, None]
    additive = torch.zeros(allowed.shape, dtype=dtype, device=seq.device)
    return additive.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def varlen_kwargs(cu_seqlens: torch.Tensor) -> dict[str, object]:
    """The keyword arguments with which ``transformers``' flash-attention path calls
    ``flash_attn_varlen_func`` on a packed batch, taken from the batch rather than inferred.

    Args:
        cu_seqlens: ``[n+1]`` int32 starts of the batch's sequences (trajectories, then padding), over
            the flattened ``[rows * L]`` tokens; ``cu_seqlens[-1] == T``.
    Returns:
        ``cu_seq_lens_q``, ``cu_seq_lens_k`` (int32, the same tensor) and ``max_length_q``,
        ``max_length_k`` (int, the longest sequence, padding included: computed here, because
        ``PackedBatch.max_seqlen`` of a batch in rows leaves out a row of padding only): with all four
        present ``transformers`` takes its varlen branch
        (``modeling_flash_attention_utils._flash_attention_forward``) and flattens ``[rows, L]`` to T.
    """
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.ndim != 1 or int(cu_seqlens[0]) != 0:
        raise ValueError("cu_seqlens must be a 1-D int32 tensor starting at 0 (PackedBatch.cu_seqlens)")
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return {
        "cu_seq_lens_q": cu_seqlens,
        "cu_seq_lens_k": cu_seqlens,
        "max_length_q": longest,
        "max_length_k": longest,
    }


def reference_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """``flash_attn_varlen_func``'s contract in PyTorch (no dropout, no window, no softcap): the
    readable specification the CPU tests run in place of the CUDA kernel.

    Args:
        q: ``[T, H, d]``; k, v: ``[T, H_kv, d]`` with ``H % H_kv == 0`` (grouped-query heads).
        cu_seqlens_q, cu_seqlens_k: ``[n+1]`` int32, the same sequences for queries and keys.
        max_seqlen_q, max_seqlen_k: checked against ``cu_seqlens``.
        softmax_scale: default ``d ** -0.5``. causal: query t attends keys s <= t of its sequence.
    Returns:
        ``[T, H, d]`` in q's dtype: each sequence attends only within itself.
    """
    if dropout_p:
        raise ValueError("reference_varlen_attention has no dropout; pass dropout_p=0")
    if not torch.equal(cu_seqlens_q, cu_seqlens_k):
        raise ValueError(
            "reference_varlen_attention: packed self-attention needs cu_seqlens_q == cu_seqlens_k"
        )
    lengths = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    if max(lengths) > max_seqlen_q or max(lengths) > max_seqlen_k:
        raise ValueError(f"a sequence of {max(lengths)} tokens exceeds max_seqlen {max_seqlen_q}")
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    work = torch.promote_types(q.dtype, torch.float32)  # fp32 accumulation, float64 stays float64
    out = []
    for start, n in zip(cu_seqlens_q[:-1].tolist(), lengths):
        qs, ks, vs = (x[start : start + n].transpose(0, 1).to(work) for x in (q, k, v))  # [H, n, d]
        scores = qs @ ks.transpose(1, 2) * scale
        if causal:
            scores = scores.masked_fill(
                ~torch.ones(n, n, dtype=torch.bool, device=q.device).tril(), float("-inf")
            )
        out.append((scores.softmax(-1) @ vs).transpose(0, 1).to(q.dtype))
    return torch.cat(out)


def has_native_packed_sequences() -> bool:
    """Whether the installed ``transformers`` derives packed-sequence masks from ``position_ids``."""
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        return False
    return True
