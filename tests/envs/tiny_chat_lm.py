"""A tiny chat model built in-process (nothing from the hub), for rollout tests and the benchmark.

A byte-level BPE tokenizer trained on the environments' own text, a ChatML chat template, and a
randomly initialised 2-layer Llama. It acts at random, which is all the rollout plumbing needs.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from boost.envs import expert_policy, make_env, play_episode

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|im_start|>", "<|im_end|>", "<unk>"]


def corpus(env_names: tuple[str, ...] = ("gridnav", "guess"), episodes: int = 20) -> list[str]:
    """Transcripts of expert episodes, to train the tokenizer on the text it will see."""
    texts = []
    for name in env_names:
        env = make_env(name)
        for task in env.sample_tasks("train", episodes, seed=0):
            episode = play_episode(env, task, expert_policy, random.Random(0))
            texts += [m["content"] for m in episode.messages]
    return texts


def build_tokenizer(texts: list[str], vocab_size: int = 400, chat_template: str | None = CHATML):
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<unk>",
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def build_model(tokenizer, hidden_size: int = 64, layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def save_tiny_chat_model(path: Path, chat_template: str | None = CHATML) -> Path:
    """Save a tiny chat model + tokenizer to ``path`` (a ``--model`` folder) and return it."""
    tokenizer = build_tokenizer(corpus(), chat_template=chat_template)
    build_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
