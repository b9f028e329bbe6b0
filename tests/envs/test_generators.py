"""Scripted policies, the real/synthetic generators and the `python -m boost.generate` CLI."""

from __future__ import annotations

import json
import random

import pytest

from boost.data.format import Trajectory
from boost.envs import CorruptExpert, EnvError, EpsilonExpert, expert_policy, make_env, play_episode
from boost.envs.policies import malform_action, truncate_action
from boost.generate import main as generate_main
from boost.generators import GeneratorConfig, generate, parse_sources, summarize

SOURCES = {"real": 8, "expert_shifted": 30, "eps0.1": 60, "eps0.6": 60, "random": 60, "corrupt": 30}


@pytest.fixture(scope="module")
def gridnav_data() -> list[Trajectory]:
    return generate(GeneratorConfig(env="gridnav", sources=SOURCES, seed=0), progress=False)


def test_every_source_gets_its_count_and_a_visible_name(gridnav_data):
    counts = {}
    for traj in gridnav_data:
        counts[traj.source] = counts.get(traj.source, 0) + 1
    assert counts == SOURCES
    for traj in gridnav_data:
        assert Trajectory.from_dict(json.loads(json.dumps(traj.to_dict()))) == traj
        assert traj.messages[0]["role"] == "system" and traj.messages[-1]["role"] == "user"
        assert traj.meta["env"] == ("gridnav-large" if traj.source == "expert_shifted" else "gridnav")
        assert traj.task_id.startswith(traj.meta["env"] + "/")
        assert traj.meta["split"] == "train"


def test_ground_truth_in_meta(gridnav_data):
    by_source = {}
    for traj in gridnav_data:
        by_source.setdefault(traj.source, []).append(traj)
    for traj in by_source["real"]:
        assert traj.meta["generator"] == "expert" and traj.meta["shift"] is None and traj.meta["success"]
    for traj in by_source["expert_shifted"]:
        assert traj.meta["shift"] == "gridnav-large" and traj.meta["success"] and traj.reward == 1.0
    for traj in by_source["eps0.6"]:
        assert traj.meta["generator"] == "eps_expert" and traj.meta["epsilon"] == 0.6
        assert 0 <= traj.meta["n_random_actions"] <= traj.meta["turns"]
    for traj in by_source["corrupt"]:
        assert traj.meta["n_corrupted"] == traj.meta["n_truncate"] + traj.meta["n_malform"]
    # every corrupted action of gridnav is malformed (a proper prefix or junk is never a move)
    assert sum(t.meta["n_invalid"] for t in by_source["corrupt"]) == sum(
        t.meta["n_corrupted"] for t in by_source["corrupt"]
    )
    assert sum(t.meta["n_corrupted"] for t in by_source["corrupt"]) > 0
    for traj in gridnav_data:
        assistant = sum(m["role"] == "assistant" for m in traj.messages)
        assert assistant == traj.meta["turns"]
        assert traj.meta["success"] == (traj.meta["end_reason"] == "success")
        assert (traj.reward > 0) == traj.meta["success"]


def test_quality_ordering_matches_the_ground_truth(gridnav_data):
    summary = summarize(gridnav_data)
    assert summary["real"]["success_rate"] == 1.0 and summary["real"]["mean_return"] == 1.0
    assert (
        summary["eps0.1"]["mean_return"] > summary["eps0.6"]["mean_return"] > summary["random"]["mean_return"]
    )
    assert summary["random"]["success_rate"] < 0.5
    assert summary["corrupt"]["invalid_per_turn"] > 0.1
    assert summary["eps0.1"]["invalid_per_turn"] == 0.0
    assert summary["real"]["count"] == 8 and summary["real"]["distinct_tasks"] == 8


def test_generation_is_deterministic_and_sources_are_independent(gridnav_data):
    again = generate(
        GeneratorConfig(env="gridnav", sources={"eps0.6": 60, "real": 8}, seed=0), progress=False
    )
    assert [t for t in gridnav_data if t.source == "eps0.6"] == [t for t in again if t.source == "eps0.6"]
    assert [t for t in gridnav_data if t.source == "real"] == [t for t in again if t.source == "real"]
    other = generate(GeneratorConfig(env="gridnav", sources={"real": 8}, seed=1), progress=False)
    assert {t.task_id for t in other}.isdisjoint({t.task_id for t in again if t.source == "real"})


def test_validation_reals_come_from_the_validation_pool():
    val = generate(GeneratorConfig(env="guess", sources={"real": 20}, split="validation"), progress=False)
    train = generate(GeneratorConfig(env="guess", sources={"real": 200}, split="train"), progress=False)
    assert all(t.meta["split"] == "validation" for t in val)
    env = make_env("guess")
    val_keys = {env.task(t.task_id).key for t in val}
    assert len(val_keys) == 20 and val_keys.isdisjoint({env.task(t.task_id).key for t in train})


def test_epsilon_zero_is_the_expert_and_one_is_random():
    env = make_env("guess")
    task = env.sample_tasks("train", 1)[0]
    expert = play_episode(env, task, expert_policy, random.Random(0))
    assert play_episode(env, task, EpsilonExpert(0.0), random.Random(0)).messages == expert.messages
    policy = EpsilonExpert(1.0)
    episode = play_episode(env, task, policy, random.Random(0))
    assert policy.counts["n_random_actions"] == episode.turns


def test_corruptions():
    rng = random.Random(0)
    for action in ("up", "right", "[A C]", "take the red key", "42"):
        cut = truncate_action(action, rng)
        assert cut and action.startswith(cut) and len(cut) < len(action)
        bad = malform_action(action, rng)
        assert len(bad) == len(action) and bad != action
    with pytest.raises(EnvError, match="one-character"):
        truncate_action("7", rng)
    policy = CorruptExpert(1.0, kinds=("truncate",))
    env = make_env("guess")
    episode = play_episode(env, env.sample_tasks("train", 1)[0], policy, random.Random(0))
    assert policy.counts["n_corrupted"] == episode.turns  # one-digit guesses fall back to malform


def test_source_specs_and_settings_are_validated():
    assert parse_sources("real:3, eps0.25:7,random:0") == {"real": 3, "eps0.25": 7, "random": 0}
    bad = {
        "real": "NAME:COUNT",
        "real:-1": "NAME:COUNT",
        "expert:3": "unknown source 'expert'",
        "eps0:3": "epsilon must be in",
        "eps1.5:3": "epsilon must be in",
        "real:1,real:2": "given twice",
        "": "no sources given",
    }
    for spec, message in bad.items():
        with pytest.raises(EnvError, match=message):
            parse_sources(spec)
    with pytest.raises(EnvError, match="corrupt_prob"):
        GeneratorConfig(env="gridnav", sources={"corrupt": 1}, corrupt_prob=0.0)
    with pytest.raises(EnvError, match="corruption kinds"):
        GeneratorConfig(env="gridnav", sources={"corrupt": 1}, corruptions=("shuffle",))
    with pytest.raises(EnvError, match="needs a model"):
        GeneratorConfig(env="gridnav", sources={"lm_rollout": 1})
    with pytest.raises(EnvError, match="unknown split"):
        GeneratorConfig(env="gridnav", sources={"real": 1}, split="dev")
    with pytest.raises(EnvError, match="epsilon"):
        EpsilonExpert(1.5)


def test_cli_writes_jsonl_and_summary(tmp_path, capsys):
    out = tmp_path / "guess.jsonl"
    code = generate_main(
        ["--env", "guess", "--out", str(out), "--sources", "real:4,eps0.3:6,corrupt:5", "--no-progress"]
    )
    assert code == 0
    records = [Trajectory.from_dict(json.loads(line)) for line in out.read_text().splitlines()]
    assert [r.source for r in records] == ["real"] * 4 + ["eps0.3"] * 6 + ["corrupt"] * 5
    summary = json.loads((tmp_path / "guess.summary.json").read_text())
    assert summary["written"] == 15 and summary["sources"]["real"]["success_rate"] == 1.0
    assert summary["sources"] == summarize(records)
    printed = capsys.readouterr().out
    assert "eps0.3" in printed and "wrote 15 trajectories" in printed


@pytest.mark.parametrize(
    "args, message",
    [
        (["--env", "gridnv"], "did you mean 'gridnav'"),
        (["--env", "gridnav", "--sources", "eps3:1"], "epsilon must be in"),
        (["--env", "gridnav", "--sources", "real:1", "--model", "x"], "add lm_rollout:N to --sources"),
        (["--env", "gridnav", "--shift-env", "grid-huge"], "unknown environment 'grid-huge'"),
        (["--env", "gridnav", "--split", "dev"], "invalid choice: 'dev'"),
        (["--env", "gridnav", "--sources", "lm_rollout:2", "--model", "/no/such/dir"], "not a local folder"),
        (["--env", "gridnav", "--shift-env", "gridnav"], "is --env itself"),
        (
            ["--env", "guess", "--sources", "lm_rollout:2", "--model", "smollm2", "--top-p", "0"],
            "top_p must be",
        ),
    ],
)
def test_cli_bad_input_exits_with_a_message(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        generate_main(args + ["--out", str(tmp_path / "x.jsonl"), "--no-progress"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


def test_lm_rollout_source_through_the_cli(tiny_model_dir, tmp_path):
    out = tmp_path / "lm.jsonl"
    args = [
        "--env",
        "guess",
        "--out",
        str(out),
        "--sources",
        "real:2,lm_rollout:3",
        "--model",
        str(tiny_model_dir),
    ]
    assert (
        generate_main(args + ["--max-new-tokens", "4", "--batch-size", "2", "--seed", "3", "--no-progress"])
        == 0
    )
    records = [Trajectory.from_dict(json.loads(line)) for line in out.read_text().splitlines()]
    lm = [r for r in records if r.source == "lm_rollout"]
    assert len(lm) == 3 and len(records) == 5
    for record in lm:
        assert record.meta["generator"] == "lm_rollout" and record.meta["model"] == str(tiny_model_dir)
        assert record.meta["temperature"] == 1.0 and record.meta["split"] == "train"
        assert record.meta["end_reason"] in ("success", "failure", "turn_limit", "context_limit")
        assert all(len(m["content"]) > 0 for m in record.messages)
    summary = json.loads((tmp_path / "lm.summary.json").read_text())
    assert summary["sources"]["lm_rollout"]["count"] == 3


@pytest.mark.parametrize("env", ["gridnav", "guess-compact"])
def test_sticky_repeats_its_first_action_and_counts_the_non_expert_turns(env):
    from boost.train.baselines import ground_truth_quality

    data = generate(GeneratorConfig(env=env, sources={"sticky": 20, "real": 2}, seed=3), progress=False)
    sticky = [t for t in data if t.source == "sticky"]
    assert len(sticky) == 20
    firsts = set()
    for traj in sticky:
        actions = [m["content"] for m in traj.messages if m["role"] == "assistant"]
        assert len(set(actions)) == 1 and len(actions) == traj.meta["turns"]  # one action, every turn
        firsts.add(actions[0])
        assert traj.meta["generator"] == "sticky" and 0 <= traj.meta["n_random_actions"] <= traj.meta["turns"]
        assert ground_truth_quality(traj.meta) == 1.0 - traj.meta["n_random_actions"] / traj.meta["turns"]
    assert len(firsts) > 1  # the first action is random, not one fixed move
    assert sum(t.meta["n_random_actions"] for t in sticky) > sum(t.meta["turns"] for t in sticky) / 2
    assert sum(t.meta["success"] for t in sticky) < len(sticky) / 2
    with pytest.raises(EnvError, match="sticky"):
        parse_sources("stuck:3")


def test_the_command_line_reaches_lm_rollout_and_its_rollout_config_by_name():
    from boost.generate import build_parser, config_from_args
    from boost.rollout.generation import RolloutConfig

    argv = ["--env", "gridnav", "--out", "x.jsonl", "--sources", "lm_rollout:1", "--model", "smollm2",
            "--temperature", "0.7", "--top-p", "0.9", "--max-new-tokens", "5", "--batch-size", "3"]  # fmt: skip
    lm = config_from_args(build_parser().parse_args(argv)).lm
    assert (lm.model, lm.device, lm.gguf_file) == ("smollm2", "cpu", None)
    assert lm.rollout_config(seed=4) == RolloutConfig(
        max_new_tokens=5, temperature=0.7, top_p=0.9, batch_size=3, seed=4
    )
