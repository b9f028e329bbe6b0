"""The textarena adapter (the `envs` extra; CI installs it). Skipped only when textarena cannot be imported."""

from __future__ import annotations

import random

import pytest

from boost.envs import SPLITS, expert_policy, make_env, play_episode, random_policy, shifted_env_name
from boost.envs.base import EnvError
from boost.envs.textarena_env import (
    COMPACT_GAMES,
    COMPACT_SUFFIX,
    GAMES,
    PREFIX,
    TextArenaEnv,
    hanoi_moves,
    mastermind_feedback,
)

ta = pytest.importorskip("textarena", reason="textarena is not installed: pip install 'boost[envs]'")

TEXTARENA_ENVS = [PREFIX + game for game in GAMES] + [
    PREFIX + game + COMPACT_SUFFIX for game in COMPACT_GAMES
]


@pytest.mark.parametrize("name", TEXTARENA_ENVS)
def test_textarena_expert_wins_every_task(name):
    env = make_env(name)
    for split in ("train", "test"):
        for task in env.sample_tasks(split, 15, seed=0):
            episode = play_episode(env, task, expert_policy, random.Random(0))
            assert episode.success and episode.reward == 1.0 and episode.n_invalid == 0, episode.messages[-1]
    assert shifted_env_name(name) in TEXTARENA_ENVS


@pytest.mark.parametrize("name", TEXTARENA_ENVS)
def test_textarena_episodes_are_deterministic_and_leave_global_random_alone(name):
    env = make_env(name)
    tasks = env.sample_tasks("train", 3, seed=1)
    random.seed(1234)
    expected_next = random.Random(1234).random()
    runs = [
        [play_episode(env, task, random_policy, random.Random(i)).messages for i, task in enumerate(tasks)]
        for _ in range(2)
    ]
    assert runs[0] == runs[1]
    assert random.random() == expected_next, "textarena's reseeding leaked into the global random module"
    assert env.instructions and "[" in env.instructions, "the game's prompt, with its action format"


def test_textarena_interleaved_episodes_match_sequential_ones():
    """Minesweeper draws its mines on the first reveal from the (private) random state."""
    name = PREFIX + "Minesweeper-v0-small"
    tasks = make_env(name).sample_tasks("train", 2, seed=0)
    sequential = [play_episode(make_env(name), t, expert_policy, random.Random(0)).messages for t in tasks]
    envs = [make_env(name) for _ in tasks]
    logs = [[env.reset(task)] for env, task in zip(envs, tasks)]
    running = [True, True]
    while any(running):
        for i, env in enumerate(envs):  # one step each, alternating
            if running[i]:
                step = env.step(env.expert_action())
                logs[i].append(step.observation)
                running[i] = not step.done
    assert [[m["content"] for m in messages if m["role"] == "user"] for messages in sequential] == logs


@pytest.mark.parametrize("game", ["GuessTheNumber-v0", "Mastermind-v0", "FrozenLake-v0"])
def test_textarena_splits_are_disjoint_in_content(game):
    env = make_env(PREFIX + game)
    assert env.content_disjoint_splits
    keys = {split: {t.key for t in env.sample_tasks(split, 10, seed=0)} for split in SPLITS}
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["validation"]
    assert not keys["validation"] & keys["test"]


def test_textarena_small_pools_repeat_and_say_so(caplog):
    env = make_env(PREFIX + "TowerOfHanoi-v0")
    assert not env.content_disjoint_splits  # one instance: only the seeds differ
    env = make_env(PREFIX + "GuessTheNumber-v0")  # 20 secret numbers in all
    tasks = env.sample_tasks("test", 30, seed=0)
    distinct = len({t.key for t in tasks})
    assert len(tasks) == 30 and distinct < 20
    assert f"has only {distinct} distinct tasks in split 'test'; 30 requested" in caplog.text


def test_textarena_invalid_replies_follow_the_game_rules():
    env = make_env(PREFIX + "GuessTheNumber-v0")
    env.reset(env.sample_tasks("train", 1)[0])
    first = env.step("no brackets here")
    assert first.info["invalid"] and not first.done and "invalid move" in first.observation.lower()
    second = env.step("still nothing")  # textarena allows one invalid reply, the second ends the game
    assert second.done and second.info["invalid"] and not second.info["success"]
    assert "Game over" in second.observation


def test_hanoi_solver_is_optimal_from_the_start_and_from_any_position():
    for n in range(1, 7):
        assert len(hanoi_moves({"A": list(range(n, 0, -1)), "B": [], "C": []})) == 2**n - 1
    towers = {"A": [3], "B": [2, 1], "C": []}
    assert hanoi_moves(towers) == [("A", "C"), ("B", "A"), ("B", "C"), ("A", "C")]


def test_mastermind_feedback_agrees_with_textarena():
    env = ta.make("Mastermind-v0-raw")
    env.reset(num_players=1, seed=0)
    rng = random.Random(0)
    for _ in range(300):
        secret, guess = rng.sample(range(1, 7), 4), rng.sample(range(1, 7), 4)
        env.state.game_state["secret_code"] = list(secret)
        assert mastermind_feedback(tuple(secret), tuple(guess)) == env._evaluate_guess(list(guess))
    assert mastermind_feedback((1, 1, 2, 3), (1, 2, 1, 1)) == (1, 2)


def test_generators_run_on_a_textarena_game():
    from boost.generators import GeneratorConfig, generate, summarize

    sources = {"real": 3, "expert_shifted": 2, "eps0.3": 4, "random": 3, "corrupt": 4}
    trajectories = generate(GeneratorConfig(env=PREFIX + "TowerOfHanoi-v0", sources=sources), progress=False)
    summary = summarize(trajectories)
    assert {source: row["count"] for source, row in summary.items()} == sources
    assert summary["real"]["success_rate"] == 1.0 and summary["expert_shifted"]["success_rate"] == 1.0
    assert all(t.meta["env"] == PREFIX + "TowerOfHanoi-v0-medium" for t in trajectories if t.meta["shift"])
    assert summary["random"]["success_rate"] == 0.0


def _compact_board(observation: str) -> tuple[list[list[str]], tuple[int, int], tuple[int, int]]:
    """(rows of cells, player, goal) read back from a compact FrozenLake observation."""
    outcome, board, positions = observation.split(" ; ")
    rows = [row.split() for row in board.split(" / ")]
    p, pr, pc, g, gr, gc = positions.split()
    assert (p, g) == ("P", "G") and outcome in ("start", "moved", "invalid")
    return rows, (int(pr), int(pc)), (int(gr), int(gc))


@pytest.mark.parametrize("game", COMPACT_GAMES)
def test_compact_view_plays_the_same_game_in_short_observations(game):
    """The same actions in both views: the same rewards, ends and flags; the compact board is the game's."""
    full, compact = make_env(PREFIX + game), make_env(PREFIX + game + COMPACT_SUFFIX)
    assert shifted_env_name(compact.name) == PREFIX + GAMES[game] + COMPACT_SUFFIX
    outcomes = set()
    for i, task in enumerate(compact.sample_tasks("train", 12, seed=0)):
        observation = compact.reset(task)
        full.reset(full.task(f"{full.name}/{task.seed}"))
        assert len(compact.instructions.split()) < 40 and "[up]" in compact.instructions
        rng, done = random.Random(i), False
        while not done:
            rows, player, goal = _compact_board(observation)
            state = compact._game.state.game_state
            assert (player, goal) == (tuple(state["player_pos"]), tuple(state["goal_pos"]))
            assert rows[player[0]][player[1]] == "P" and rows[goal[0]][goal[1]] in ("G", "P")
            assert all(
                (cell == "H") == (state["grid"][r][c] == "H")
                for r, row in enumerate(rows) for c, cell in enumerate(row) if (r, c) != player
            )  # fmt: skip
            # mostly the expert, sometimes a random move or a malformed reply, to reach every outcome
            action = rng.choice([compact.expert_action()] * 3 + [compact.random_action(rng), "[jump]"])
            got, want = compact.step(action), full.step(action)
            assert (got.reward, got.done, got.info) == (want.reward, want.done, want.info)
            observation, done = got.observation, got.done
            outcomes.add(observation.split(" ; ")[0])
        assert observation.endswith(" ; game over")
    assert {"moved", "invalid", "won"} <= outcomes and outcomes & {"lost", "invalid twice"}


def test_compact_view_of_a_game_without_one_is_refused():
    other = next(game for game in GAMES if game not in COMPACT_GAMES)
    with pytest.raises(EnvError, match="has no compact view; games with one: FrozenLake"):
        TextArenaEnv(other, compact=True)
