"""Which attention the trainer runs packed batches through, and the model inputs each one needs.

``model.attention`` (:class:`boost.train.config.ModelConfig`):

- ``"flash_varlen"``: ``transformers``' ``flash_attention_2`` implementation, called with the batch's
  own ``cu_seqlens`` (:func:`boost.data.attention.varlen_kwargs`) and per-trajectory
  ``position_ids``, no mask: ``flash_attn_varlen_func`` treats every trajectory (and the padding) as
  a separate sequence, so no token attends across a trajectory border, at O(T) memory. Needs CUDA,
  the ``flash-attn`` package, and ``precision=bf16`` (the kernel takes 16-bit inputs).
- ``"block_mask"``: an explicit block-diagonal causal mask with the model's own implementation
  (``sdpa`` unless the checkpoint says otherwise): any device, O(T^2) mask memory.
- ``"position_ids"``: no mask, ``transformers`` derives the sequences from the position ids.
- ``"auto"`` (default): ``flash_varlen`` on CUDA in bf16 when ``flash-attn`` is installed, else
  ``block_mask``.

The CPU tests (``tests/data/test_attention_paths.py``) run the exact inputs of each path, the flash
one through ``transformers``' flash-attention code with a PyTorch reference of the varlen kernel,
and check each trajectory's loss against running it alone.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from boost.data.attention import varlen_kwargs
from boost.data.packing import PackedBatch

ATTENTION = ("auto", "flash_varlen", "block_mask", "position_ids")
FLASH_IMPLEMENTATION = "flash_attention_2"


def flash_attn_installed() -> bool:
    """Whether the ``flash-attn`` package is importable (found, not imported: importing it costs seconds)."""
    return importlib.util.find_spec("flash_attn") is not None


def resolve_attention(
    requested: str, device: torch.device, precision: str, fp32_forwards: bool = False
) -> tuple[str, str]:
    """``(choice, why)``: the path ``requested`` resolves to on ``device`` with ``precision``.

    ``fp32_forwards``: some forwards must run in float32 whatever the precision (``block=trainable``'s
    finite differences of the losses, which bf16 rounding makes less accurate), which flash-attn
    cannot do.

    Raises:
        ValueError: an unknown setting, or ``flash_varlen`` where it cannot run (the message says why
            and what to set instead).
    """
    if requested not in ATTENTION:
        raise ValueError(f"model.attention must be one of {', '.join(ATTENTION)}; got {requested!r}")
    missing = []
    if device.type != "cuda":
        missing.append("a CUDA device")
    if not flash_attn_installed():
        missing.append("the flash-attn package (pip install flash-attn)")
    if precision != "bf16":
        missing.append("precision=bf16 (flash-attn takes 16-bit inputs)")
    if fp32_forwards:
        missing.append("no float32 forwards (block=trainable's finite differences run the trunk in float32)")
    if requested == "flash_varlen":
        if missing:
            raise ValueError(
                f"model.attention=flash_varlen needs {', '.join(missing)}; use model.attention=block_mask"
            )
        return "flash_varlen", "model.attention=flash_varlen"
    if requested == "auto":
        if not missing:
            return "flash_varlen", "model.attention=auto: flash-attn installed, CUDA, bf16"
        return (
            "block_mask",
            f"model.attention=auto: SDPA with the block mask; flash_varlen needs {missing[0]}",
        )
    return requested, f"model.attention={requested}"


def prepare_model(model, choice: str) -> None:
    """Switch ``model`` (a Hugging Face causal LM, before LoRA wraps it) to the implementation ``choice`` needs.

    ``flash_varlen`` sets ``flash_attention_2``; the other paths keep the model's implementation unless it
    is a flash one, which cannot take their mask, and then set ``sdpa``.
    """
    current = getattr(model.config, "_attn_implementation", None) or "sdpa"
    if choice == "flash_varlen":
        if current != FLASH_IMPLEMENTATION:
            set_implementation(model, FLASH_IMPLEMENTATION)
    elif "flash" in current:
        set_implementation(model, "sdpa")


def set_implementation(model, name: str) -> None:
    """``model.set_attn_implementation(name)`` (a peft model passes it on to its base model)."""
    model.set_attn_implementation(name)


@contextmanager
def attention_for_generation(model, choice: str) -> Iterator[None]:
    """Rollouts (``generate``: a KV cache, left padding, float32 weights outside autocast) run with
    ``sdpa``; the flash path is for packed training batches. Restores ``flash_attention_2`` after."""
    if choice != "flash_varlen":
        yield
        return
    set_implementation(model, "sdpa")
    try:
        yield
    finally:
        set_implementation(model, FLASH_IMPLEMENTATION)


def model_inputs(batch: PackedBatch, choice: str, mask_dtype: torch.dtype = torch.bool) -> dict[str, object]:
    """Keyword arguments for the trunk of a Hugging Face causal LM on ``batch`` for path ``choice``.

    ``flash_varlen``: ``input_ids`` and ``position_ids`` as ``[rows, T / rows]`` int64, ``use_cache=False``
    and the varlen keywords (``cu_seq_lens_q/k`` int32 ``[n+1]`` over the flattened T tokens,
    ``max_length_q/k``); no ``attention_mask``. Otherwise :meth:`PackedBatch.model_inputs`.
    """
    if choice != "flash_varlen":
        return batch.model_inputs(choice, mask_dtype)
    return {
        "input_ids": batch.input_ids.view(batch.rows, -1),
        "position_ids": batch.position_ids.view(batch.rows, -1),
        "use_cache": False,
        **varlen_kwargs(batch.cu_seqlens),
    }
