"""Each attention path gets packed inputs that give every trajectory the loss it gets alone.

What is proven here, on the CPU, in float64 on a tiny Llama:

- ``block_mask`` and ``position_ids``: the real code path (``sdpa``), end to end;
- ``flash_varlen``: ``transformers``' own ``flash_attention_2`` code (the attention interface, its
  mask function, ``_flash_attention_forward``'s varlen branch) runs on the exact inputs the trainer
  builds (:func:`boost.train.attention_backend.model_inputs`: ``cu_seq_lens_q/k``, ``max_length_q/k``
  from the batch, per-trajectory ``position_ids``, no mask), with the CUDA kernel replaced by
  :func:`boost.data.attention.reference_varlen_attention`, its contract written in PyTorch; the kernel
  is shown to receive the batch's own ``cu_seqlens`` (not sequences inferred elsewhere).

What needs a GPU: that ``flash_attn_varlen_func`` itself meets that contract in bf16 (and the losses of
both paths agree in training), which ``benchmarks/gpu_suite.py``'s ``attention`` row checks.
"""

from __future__ import annotations

import pytest
import torch
import transformers.modeling_flash_attention_utils as flash_utils

from boost.data import PackingConfig, TrajectoryPacker
from boost.data.attention import reference_varlen_attention, varlen_kwargs
from boost.train.attention_backend import model_inputs, resolve_attention
from boost.train.precision import resolve_precision
from tests.data.test_packed_equals_single import one_by_one, packed_loss, tiny_llama


@pytest.fixture
def reference_flash(monkeypatch):
    """``transformers``' flash-attention path with the reference kernel; the ``cu_seqlens`` it gets."""
    received = []

    def kernel(*args, **kwargs):
        received.append(kwargs["cu_seqlens_q"].clone())
        return reference_varlen_attention(*args, **kwargs)

    process = flash_utils._lazy_define_process_function(reference_varlen_attention)
    monkeypatch.setattr(
        flash_utils,
        "lazy_import_flash_attention",
        lambda *a, **k: ((None, kernel, None, None, None), (process, dict)),
    )
    return received


def flash_model(vocab_size: int):
    model = tiny_llama(vocab_size, "sdpa")
    # what prepare_model's set_attn_implementation("flash_attention_2") does, without its CUDA check
    model.config._attn_implementation = "flash_attention_2"
    return model


LAYOUTS = {
    "one row": PackingConfig(token_budget=1024),
    "one row, padded": PackingConfig(token_budget=1024, pad_to_budget=True),
    "two rows": PackingConfig(token_budget=1024, mode="mixed", rows=2),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("path", ["flash_varlen", "block_mask", "position_ids"])
def test_every_path_gives_each_trajectory_its_loss_alone(
    bpe_tokenizer, tokenized, reference_flash, path, layout
):
    packer = TrajectoryPacker(tokenized, LAYOUTS[layout])
    (plan,) = packer.plan(epoch=0)
    batch = packer.collate(plan)
    model = (
        flash_model(len(bpe_tokenizer)) if path == "flash_varlen" else tiny_llama(len(bpe_tokenizer), "sdpa")
    )
    with torch.no_grad():
        logits = model(**model_inputs(batch, path)).logits.flatten(0, 1)
        packed = packed_loss_from_logits(logits, batch)
        alone = one_by_one(tiny_llama(len(bpe_tokenizer), "sdpa"), [tokenized[p] for p in plan])
    torch.testing.assert_close(packed, alone, rtol=1e-10, atol=1e-10)
    if path == "flash_varlen":  # every layer's kernel got the batch's own sequences
        assert len(reference_flash) == model.config.num_hidden_layers
        assert all(torch.equal(cu, batch.cu_seqlens) for cu in reference_flash)


def packed_loss_from_logits(logits, batch):
    from tests.data.test_packed_equals_single import per_trajectory_loss

    return per_trajectory_loss(logits, batch.labels, batch.segment_ids, batch.num_segments)


def test_the_flash_path_gradients_equal_the_sum_of_one_by_one_gradients(
    bpe_tokenizer, tokenized, reference_flash
):
    batch = TrajectoryPacker(tokenized, PackingConfig(token_budget=1024)).collate(range(6))
    model = flash_model(len(bpe_tokenizer))
    packed_loss(model, batch, **model_inputs(batch, "flash_varlen")).sum().backward()
    packed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.config._attn_implementation = "sdpa"
    one_by_one(model, tokenized).sum().backward()
    for ours, alone in zip(packed, (p.grad for p in model.parameters())):
        torch.testing.assert_close(ours, alone, rtol=1e-9, atol=1e-11)


def test_one_sequence_for_the_whole_batch_attends_across_trajectories(
    bpe_tokenizer, tokenized, reference_flash
):
    """Negative control: the same flash inputs with cu_seqlens = [0, T] change the losses."""
    batch = TrajectoryPacker(tokenized, PackingConfig(token_budget=1024)).collate(range(6))
    model = flash_model(len(bpe_tokenizer))
    inputs = model_inputs(batch, "flash_varlen")
    whole = torch.tensor([0, batch.num_tokens], dtype=torch.int32)
    with torch.no_grad():
        right = packed_loss(model, batch, **inputs)
        crossing = packed_loss(model, batch, **{**inputs, **varlen_kwargs(whole)})
    assert (crossing - right).abs().max() > 1e-3


def test_varlen_kwargs_refuse_inconsistent_inputs():
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    assert varlen_kwargs(cu)["max_length_q"] == 4
    with pytest.raises(ValueError, match="int32"):
        varlen_kwargs(cu.long())
    with pytest.raises(ValueError, match="starting at 0"):
        varlen_kwargs(cu[1:])


def test_auto_picks_flash_only_on_cuda_in_bf16_with_flash_attn(monkeypatch):
    import boost.train.attention_backend as backend

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_attention("auto", cpu, "fp32")[0] == "block_mask"
    with pytest.raises(ValueError, match="needs a CUDA device.*use model.attention=block_mask"):
        resolve_attention("flash_varlen", cpu, "fp32")
    monkeypatch.setattr(backend, "flash_attn_installed", lambda: True)
    assert resolve_attention("auto", cuda, "bf16")[0] == "flash_varlen"
    choice, why = resolve_attention("auto", cuda, "fp32")
    assert choice == "block_mask" and "precision=bf16" in why
    monkeypatch.setattr(backend, "flash_attn_installed", lambda: False)
    choice, why = resolve_attention("auto", cuda, "bf16")
    assert choice == "block_mask" and "flash-attn" in why
    with pytest.raises(ValueError, match="flash-attn package"):
        resolve_attention("flash_varlen", cuda, "bf16")
    assert resolve_attention("position_ids", cpu, "fp32")[0] == "position_ids"


def test_the_cpu_stays_float32_unless_bf16_is_asked_for():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu)[0] == "fp32"
    assert resolve_precision("fp32", cpu)[0] == "fp32"
    precision, why = resolve_precision("bf16", cpu)
    assert precision == "bf16" and "CPU" in why
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16"):
        resolve_precision("fp16", cpu)
