"""benchmarks/memory_model.py: its parameter counts are transformers' own for the same shapes (built
on the meta device: no memory), and the sharded outer step's rows fall as 1/N."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.memory_model import LLAMA3_8B, LLAMA3_70B, lora_count, parameter_count, per_rank


@pytest.mark.parametrize("shape", [LLAMA3_8B, LLAMA3_70B], ids=lambda s: s.name)
def test_parameter_counts_are_the_ones_transformers_builds(shape):
    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, tie_word_embeddings=False)  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert parameter_count(shape) == sum(p.numel() for p in model.parameters())


def test_lora_counts_match_peft_on_a_small_llama():
    from peft import LoraConfig, get_peft_model

    from benchmarks.memory_model import Shape

    shape = Shape("small", 1000, 64, 176, 2, 4, 2)
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=8, target_modules="all-linear"))
    assert lora_count(shape, 8) == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def test_the_sharded_outer_step_falls_as_one_over_n_and_today_s_does_not():
    eight, sixty_four = per_rank(LLAMA3_70B, 8, lora=True), per_rank(LLAMA3_70B, 64, lora=True)
    assert eight["outer_gathered"] == sixty_four["outer_gathered"]
    assert eight["outer_sharded_rows"] == pytest.approx(8 * sixty_four["outer_sharded_rows"])
    # the gathered tokens grow with N (every rank's counted tokens on each rank)
    assert sixty_four["outer_sharded_tokens"] == pytest.approx(8 * eight["outer_sharded_tokens"])
    # streamed (sharded_tokens=streamed): its own block and one received, whatever N is
    assert sixty_four["outer_streamed_tokens"] == eight["outer_streamed_tokens"]
    assert sixty_four["outer_streamed_tokens"] == pytest.approx(2 * eight["outer_sharded_tokens"] / 8)
    assert sixty_four["total_streamed"] < sixty_four["total_sharded"]
