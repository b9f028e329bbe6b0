"""Built-in environments: determinism, disjoint splits, experts that solve them, invalid actions."""

from __future__ import annotations

import math
import random
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from boost.envs import (
    BUILTIN_ENVS,
    SPLITS,
    EnvError,
    expert_policy,
    make_env,
    play_episode,
    random_policy,
    shifted_env_name,
    split_of,
)
from boost.envs.gridnav import GridNavConfig, GridNavEnv, build_grid
from boost.envs.guess import GuessConfig, GuessEnv, binary_search_budget


def transcript(name: str, seed: int, policy=expert_policy) -> list[dict[str, str]]:
    env = make_env(name)
    task = env.sample_tasks("train", 1, seed=seed)[0]
    return play_episode(env, task, policy, random.Random(seed)).messages


@pytest.mark.parametrize("name", BUILTIN_ENVS)
def test_tasks_and_episodes_are_deterministic_in_the_seed(name):
    a, b = make_env(name), make_env(name)
    assert a.sample_tasks("train", 20, seed=3) == b.sample_tasks("train", 20, seed=3)
    assert a.sample_tasks("train", 20, seed=3) != a.sample_tasks("train", 20, seed=4)
    assert transcript(name, 5, random_policy) == transcript(name, 5, random_policy)
    assert transcript(name, 5) != transcript(name, 6)


@pytest.mark.parametrize("name", BUILTIN_ENVS)
def test_split_pools_are_disjoint_in_content(name):
    env = make_env(name)
    keys = {split: {t.key for t in env.sample_tasks(split, 150, seed=0)} for split in SPLITS}
    for split in SPLITS:
        assert len(keys[split]) == 150, "tasks of one sample are distinct"
        assert all(split_of(key) == split for key in keys[split])
    assert not keys["train"] & keys["validation"]
    assert not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]


def test_split_sizes_follow_the_hash_buckets():
    counts = {split: 0 for split in SPLITS}
    for i in range(20_000):
        counts[split_of(f"key-{i}")] += 1
    assert abs(counts["train"] / 20_000 - 0.8) < 0.01
    assert abs(counts["validation"] / 20_000 - 0.1) < 0.01


@pytest.mark.parametrize("name", BUILTIN_ENVS)
@pytest.mark.parametrize("split", ["train", "test"])
def test_expert_solves_every_task_optimally(name, split):
    env = make_env(name)
    for task in env.sample_tasks(split, 200, seed=1):
        episode = play_episode(env, task, expert_policy, random.Random(0))
        assert episode.success and episode.end_reason == "success"
        assert episode.reward == 1.0
        assert episode.n_invalid == 0


@pytest.mark.parametrize("name", BUILTIN_ENVS)
def test_random_policy_mostly_fails_and_is_well_formed(name):
    env = make_env(name)
    episodes = [
        play_episode(env, task, random_policy, random.Random(i))
        for i, task in enumerate(env.sample_tasks("train", 100, seed=2))
    ]
    assert sum(e.success for e in episodes) < 40
    assert sum(e.n_invalid for e in episodes) == 0
    assert all(e.end_reason in ("success", "turn_limit") for e in episodes)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_gridnav_grids_are_solvable_and_the_expert_walks_a_shortest_path(seed):
    config = GridNavConfig()
    grid = build_grid(config, seed)
    distance = grid.distances_to_goal()[grid.start]
    assert distance >= config.min_distance
    env = GridNavEnv(config=config)
    task = env.task(f"gridnav/{seed}")
    assert play_episode(env, task, expert_policy, random.Random(0)).turns == distance


@pytest.mark.parametrize("width", range(2, 80))
def test_guess_binary_search_stays_within_budget_for_every_secret(width):
    env = GuessEnv(config=GuessConfig(min_width=width, max_width=width, max_low=0, slack=0))
    seeds = {}
    for seed in range(5000):  # find a seed for every secret in [0, width)
        seeds.setdefault(env.task_key(seed), seed)
        if len(seeds) == width:
            break
    assert len(seeds) == width
    for seed in seeds.values():
        episode = play_episode(env, env.task(f"guess/{seed}"), expert_policy, random.Random(0))
        assert episode.success and episode.turns <= binary_search_budget(width)
    assert binary_search_budget(width) == math.ceil(math.log2(width + 1))


def test_gridnav_invalid_action_wastes_a_turn_and_says_how_to_reply():
    env = make_env("gridnav")
    task = env.sample_tasks("test", 1)[0]
    first = env.reset(task)
    observation, reward, done, info = env.step("jump over the wall")
    assert info["invalid"] and not done and reward == 0.0 and info["turn"] == 1
    assert "up, down, left, right" in observation
    assert first.split("\n")[1:] == observation.split("\n")[1:], "the agent did not move"
    assert not env.step(" Left.\nbecause the goal is there")[3]["invalid"], "first line, case, punctuation"


def test_gridnav_turn_limit_ends_with_zero_reward():
    env = make_env("gridnav")
    episode = play_episode(env, env.sample_tasks("test", 1)[0], lambda env, rng: "nope", random.Random(0))
    assert episode.turns == env.max_turns and episode.end_reason == "turn_limit"
    assert episode.reward == 0.0 and episode.n_invalid == env.max_turns and not episode.success


def test_guess_feedback_invalid_guesses_and_partial_credit():
    env = make_env("guess")
    task = env.sample_tasks("test", 1)[0]
    env.reset(task)
    low, high, secret = env._low, env._high, env._secret
    assert env.step(str(high + 1)).info["invalid"]
    assert env.step("forty").info["invalid"]
    if secret > low:
        assert env.step(str(low)).observation.startswith(f"Higher than {low}.")
    env.reset(task)
    env.step("x")  # one wasted turn, then the expert: slower than binary search, so reward < 1
    while True:
        _, reward, done, info = env.step(env.expert_action())
        if done:
            break
    assert info["success"] and 0 < reward < 1


def test_shifted_variants_differ_from_their_targets():
    for name in BUILTIN_ENVS:
        shifted = shifted_env_name(name)
        assert shifted in BUILTIN_ENVS and shifted != name
        assert shifted_env_name(shifted) == name
    assert make_env("gridnav-large").config.size > make_env("gridnav").config.size
    assert make_env("guess-wide").config.min_width > make_env("guess").config.max_width


def test_task_ids_round_trip_and_bad_ids_name_the_format():
    env = make_env("gridnav")
    for task in env.sample_tasks("validation", 5, seed=9):
        assert env.task(task.task_id) == task
    for bad in ("gridnav", "gridnav/abc", "guess/12", "gridnav-large/3"):
        with pytest.raises(EnvError, match="task ids look like 'gridnav/<seed>'"):
            env.task(bad)


def test_bad_input_gets_clear_errors():
    with pytest.raises(EnvError, match=r"unknown environment 'gridnv' \(did you mean 'gridnav'\?\)"):
        make_env("gridnv")
    env = make_env("gridnav")
    with pytest.raises(EnvError, match="unknown split 'val'; use one of train, validation, test"):
        env.sample_tasks("val", 3)
    with pytest.raises(EnvError, match="belongs to environment 'guess'"):
        env.reset(make_env("guess").sample_tasks("train", 1)[0])
    with pytest.raises(EnvError, match="before reset"):
        env.step("up")
    task = env.sample_tasks("train", 1)[0]
    play_episode(env, task, expert_policy, random.Random(0))
    with pytest.raises(EnvError, match="after the episode ended"):
        env.step("up")
    with pytest.raises(EnvError, match="n_walls"):
        GridNavConfig(size=4, n_walls=9)
    with pytest.raises(EnvError, match="min_width <= max_width"):
        GuessConfig(min_width=10, max_width=5)


def test_missing_optional_packages_name_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "textarena", None)  # makes `import textarena` fail
    monkeypatch.setitem(sys.modules, "textworld", None)
    with pytest.raises(EnvError, match=r"pip install 'boost\[envs\]'"):
        make_env("textarena:GuessTheNumber-v0")
    with pytest.raises(EnvError, match=r"pip install 'boost\[envs\]'"):
        make_env("textworld")
