"""LoRA adapters through ``peft`` for any Hugging Face causal LM, and which hypergradient block fits.

With LoRA the trunk's weights are frozen and low-rank adapters (``lora.target_modules``, peft's
``"all-linear"`` by default: every linear layer but the output head) are trained. The hypergradient
block must then be chosen explicitly (:func:`check_block`):

- ``lora.train_head=true`` trains the LM head as well (peft's ``modules_to_save``: a trainable copy,
  saved with the adapter), so ``block=head`` stays the exact fused HVP/JVP over the head. A tied
  head (input embeddings = output head, e.g. SmolLM2) is untied by the copy: the input embeddings
  stay frozen.
- ``block=trainable`` takes the hypergradient over every trained parameter (the adapters, and the
  head if trained) by central finite differences.

``block=head`` with a frozen head is refused: there would be no trained head to differentiate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoraSettings:
    enabled: bool = False  # true: train LoRA adapters (peft) instead of every model weight
    r: int = 16  # rank of each adapter
    alpha: float = 32.0  # scaling numerator: the adapter's update is multiplied by alpha / r
    dropout: float = 0.0  # dropout on the adapters' input (> 0 draws from the RNG, checkpointed)
    target_modules: str | tuple[str, ...] = "all-linear"  # peft's names, e.g. [q_proj, v_proj]
    train_head: bool = False  # also train the LM head (needed by block=head)

    def __post_init__(self):
        if not (self.r >= 1 and self.alpha > 0 and 0 <= self.dropout < 1):
            raise ValueError(
                f"lora.r must be >= 1, lora.alpha > 0 and lora.dropout in [0, 1); "
                f"got {self.r}, {self.alpha}, {self.dropout}"
            )
        if not self.target_modules:
            raise ValueError("lora.target_modules is empty; give module names or 'all-linear'")


def check_block(lora: LoraSettings, block: str) -> None:
    """Refuse ``block=head`` with a frozen head under LoRA, naming the two ways out."""
    if lora.enabled and block == "head" and not lora.train_head:
        raise ValueError(
            "block=head needs a trained LM head, but with lora.enabled=true the head is frozen; "
            "either set lora.train_head=true (the exact fused hypergradient over the head) or "
            "block=trainable (finite differences over the LoRA parameters; use solver.method=identity "
            "or neumann)"
        )


def apply_lora(model: torch.nn.Module, lora: LoraSettings) -> torch.nn.Module:
    """``model`` wrapped by peft (adapters on ``lora.target_modules``; the head copied and trained if
    ``lora.train_head``), or ``model`` itself when LoRA is off."""
    if not lora.enabled:
        return model
    from peft import LoraConfig, get_peft_model

    head_name = _module_name(model, model.get_output_embeddings())
    targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        modules_to_save=[head_name] if lora.train_head else None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _module_name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name.rsplit(".", 1)[-1]
    raise ValueError(f"{type(model).__name__}: its output embeddings are not one of its modules")


def output_head(model: torch.nn.Module) -> torch.nn.Module:
    """The linear layer that computes the logits: peft's trainable copy when the head is trained."""
    head = model.get_output_embeddings()
    copies = getattr(head, "modules_to_save", None)
    if copies is not None:  # peft's ModulesToSaveWrapper: the active adapter's copy is used
        (active,) = [copies[name] for name in head.active_adapters if name in copies]
        return active
    return head
