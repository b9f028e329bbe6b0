"""Attention that never crosses trajectory borders in a packed batch.

Two ways, both checked against one-by-one runs in ``tests/data/test_packed_equals_single.py``:

- an explicit block-diagonal causal mask, ``[1, 1, T, T]`` (:func:`block_causal_mask`): works with
  every attention implementation that takes a 4D mask (``sdpa`` with a bool mask, ``eager`` with an
  additive float mask), at O(T^2) memory, so for CPU runs and tests;
- ``position_ids`` alone: recent ``transformers`` (those with
  ``masking_utils.find_packed_sequence_indices``) start a new sequence wherever the position ids do
  not increase by one, for sdpa/eager/flex and flash-attention alike. This needs ``use_cache=False``
  (a cache disables the detection) and no ``attention_mask``.
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


def has_native_packed_sequences() -> bool:
    """Whether the installed ``transformers`` derives packed-sequence masks from ``position_ids``."""
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        return False
    return True
