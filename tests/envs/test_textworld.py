"""The TextWorld adapter (the `envs` extra; CI installs it). Skipped only when TextWorld cannot be imported.

Games are generated in the test, never downloaded.
"""

from __future__ import annotations

import random

import pytest

from boost.envs import expert_policy, make_env, play_episode
from boost.generators import GeneratorConfig, generate

pytest.importorskip("textworld", reason="TextWorld is not installed: pip install 'boost[envs]'")


@pytest.fixture(scope="module")
def textworld_games(tmp_path_factory):
    return tmp_path_factory.mktemp("textworld-games")


def test_textworld_games_are_generated_locally_and_the_walkthrough_wins(textworld_games):
    env = make_env("textworld", games_dir=textworld_games)
    tasks = env.sample_tasks("train", 2, seed=0)
    for task in tasks:
        episode = play_episode(env, task, expert_policy, random.Random(0))
        assert episode.success and episode.end_reason == "success"
        assert episode.reward == pytest.approx(1.0) and episode.turns == env.config.quest_length
        assert "-= " in episode.messages[1]["content"], "the first observation describes the room"
        feedback = [m["content"] for m in episode.messages[2:] if m["role"] == "user"]
        assert not any(">" in text or "RESTART" in text or "  " in text for text in feedback)
        assert "*** The End ***" in feedback[-1]
    made = sorted(p.name for p in textworld_games.iterdir())
    assert made == sorted(f"{env.config.tag}-s{t.seed}{ext}" for t in tasks for ext in (".json", ".z8"))
    mtimes = {p: p.stat().st_mtime_ns for p in textworld_games.iterdir()}
    again = play_episode(env, tasks[0], expert_policy, random.Random(0))  # reuses the cached game
    assert {p: p.stat().st_mtime_ns for p in textworld_games.iterdir()} == mtimes
    assert again.messages == play_episode(env, tasks[0], expert_policy, random.Random(0)).messages
    env.close()


def test_textworld_invalid_and_random_commands(textworld_games):
    env = make_env("textworld", games_dir=textworld_games)
    task = env.sample_tasks("train", 1, seed=0)[0]
    env.reset(task)
    step = env.step("dance wildly")
    assert step.info["invalid"] and not step.done and step.reward == 0.0
    assert "recognise" in step.observation
    assert not env.step("look").info["invalid"]
    rng = random.Random(0)
    for _ in range(5):
        action = env.random_action(rng)
        assert action in env._state.admissible_commands
        step = env.step(action)
        assert not step.info["invalid"]
        if step.done:
            break
    env.close()


def test_generators_run_on_textworld(textworld_games):
    config = GeneratorConfig(
        env="textworld", sources={"real": 1, "random": 1}, games_dir=str(textworld_games)
    )
    real, random_play = generate(config, progress=False)
    assert real.meta["success"] and real.reward == pytest.approx(1.0)
    assert random_play.source == "random" and random_play.meta["turns"] >= 1
