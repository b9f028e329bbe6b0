"""The CPU preset end to end: compact envs, the in-process tokenizer, a trainer run whose saved model
``python -m boost.rollout.evaluate`` plays, task-success metrics in final.json, and every baseline arm."""

from __future__ import annotations

import json
import math
import random

import pytest

from boost.config import load_config
from boost.data import TokenizeConfig, tokenize_trajectories
from boost.envs import EnvError, expert_policy, make_env, play_episode
from boost.envs.registry import compact_env_name
from boost.generate import main as generate
from boost.rollout.evaluate import main as evaluate
from boost.train import TrainConfig, Trainer
from boost.train.baselines import DATA_FILTERS
from boost.train.preset import build_word_tokenizer, corpus

TINY = ["model.name=cpu", "model.hidden_size=32", "model.layers=1", "model.heads=2", "data.token_budget=2048",
        "data.rows=4", "data.max_length=512", "optim.lr=0.003", "steps=3", "eval.episodes=3",
        "eval.max_new_tokens=2", "checkpoint_every=0", "threads=1"]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("preset") / "gridnav.jsonl"
    sources = "real:24,eps0.1:8,random:8,corrupt:8"
    assert (
        generate(["--env", "gridnav-compact", "--out", str(path), "--sources", sources, "--no-progress"]) == 0
    )
    return path


@pytest.mark.parametrize("name", ["gridnav", "guess"])
def test_compact_views_play_the_same_tasks_with_shorter_text(name):
    verbose, compact = make_env(name), make_env(compact_env_name(name))
    seed = verbose.sample_tasks("train", 1, seed=0)[0].seed
    a = play_episode(verbose, verbose.task(f"{name}/{seed}"), expert_policy, random.Random(0))
    b = play_episode(compact, compact.task(f"{name}-compact/{seed}"), expert_policy, random.Random(0))
    assert [m["content"] for m in a.messages if m["role"] == "assistant"] == [
        m["content"] for m in b.messages if m["role"] == "assistant"
    ]
    assert (a.success, a.reward) == (b.success, b.reward)
    assert sum(len(m["content"]) for m in b.messages) < 0.7 * sum(len(m["content"]) for m in a.messages)
    with pytest.raises(EnvError, match="has no compact view"):
        compact_env_name("textworld")


def test_the_word_tokenizer_keeps_grid_cells_and_numbers_whole(data):
    from boost.data import read_trajectories

    trajectories, _ = read_trajectories(data)
    tok = build_word_tokenizer(corpus(trajectories))
    assert tok.convert_ids_to_tokens(tok("A 0 2 G 3 4 ; # . A")["input_ids"]) == list("A02G34;#.A")
    tokenized, report = tokenize_trajectories(trajectories[:8], tok, TokenizeConfig(max_length=512))
    assert report.kept == 8 and all(t.num_counted >= 2 for t in tokenized)  # each reply: move + end of turn
    assert tok.unk_token_id not in {int(i) for t in tokenized for i in t.input_ids}


def test_a_trainer_checkpoint_is_evaluable_by_boost_evaluate(data, tmp_path):
    cfg = load_config(
        TrainConfig,
        None,
        [
            *TINY,
            f"data.path={data}",
            f"out_dir={tmp_path / 'run'}",
            "weighting.method=uniform",
            "eval.every=2",
        ],
    )
    final = Trainer(cfg, progress=False).train()
    assert final["env"] == "gridnav-compact" and final["episodes"] == 3
    lo, hi = final["success_ci95"]
    assert 0 <= lo <= final["success_rate"] <= hi <= 1
    assert 0 <= final["test_agent_token_accuracy"] <= 1 and final["packing"]["0"]["multi_synthetic_share"] > 0
    (during,) = [json.loads(x) for x in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert during["step"] == 2 and during["episodes"] == 3 and "success_ci95" in during
    out = tmp_path / "eval"
    argv = ["--model", str(tmp_path / "run" / "model"), "--env", "gridnav-compact", "--episodes", "2",
            "--max-new-tokens", "2", "--out", str(out), "--no-progress", "--transcripts", "0"]  # fmt: skip
    assert evaluate(argv) == 0
    assert json.loads((out / "metrics.json").read_text())["episodes"] == 2


@pytest.mark.parametrize(
    "overrides",
    [
        ["weighting.method=real_only"],
        ["weighting.method=return_filter", "weighting.top_fraction=0.5"],
        ["weighting.method=loss_filter", "weighting.awr_beta=1.0"],
        ["weighting.method=per_source", "head.num_sources=6", "weighting.freeze_mass=true"],
        ["weighting.method=mwn", "solver.method=identity"],
        ["weighting.method=oracle"],
        ["weighting.method=random_filter", "weighting.top_fraction=0.25", "weighting.subset_seed=3"],
        ["weighting.method=boost", "weighting.outer_start=2"],
    ],
)
def test_every_baseline_is_a_config_of_the_same_trainer(data, tmp_path, overrides):
    cfg = load_config(TrainConfig, None, [*TINY, f"data.path={data}", f"out_dir={tmp_path}", "eval.episodes=0",
                                          *overrides])  # fmt: skip
    trainer = Trainer(cfg, progress=False)
    final = trainer.train()
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    learned = trainer.method in ("boost", "per_source", "mwn")
    outer_steps = [m["step"] for m in metrics if "n_eff" in m]
    assert outer_steps == ([3] if "weighting.outer_start=2" in overrides else [1, 2, 3] if learned else [])
    pool = [json.loads(x) for x in (tmp_path / "pool_weights.jsonl").read_text().splitlines()]
    assert len(pool) == final["n_synthetic_pool"] == 24  # the whole pool, whatever a filter kept
    kept = [r for r in pool if r["weight"] > 0]
    assert final["n_filtered_out"] == len(trainer.data.filtered_out)
    if trainer.method in DATA_FILTERS:  # data-level filters: weights 1 or 0
        assert len(pool) - len(kept) == final["n_filtered_out"] and {r["weight"] for r in kept} <= {1.0}
    else:
        assert final["n_filtered_out"] == 0
    if "weighting.awr_beta=1.0" in overrides:  # the pool's weights carry the AWR factor the loss applied
        factor = {
            r["key"]: 1.0 if r["return"] is None else math.exp(r["return"] - trainer.awr_baseline)
            for r in pool
        }
        assert all(r["weight"] == pytest.approx(factor[r["key"]]) or r["weight"] == 1.0 for r in kept)
        assert any(r["weight"] != 1.0 for r in kept)
    if trainer.method == "random_filter":  # a fixed share of the pool: round(0.25 * 24)
        assert len(kept) == 6
    if trainer.method == "real_only":
        assert not kept and final["mean_weight_per_source"] == {}
    if trainer.method == "oracle":
        assert kept and all((r["weight"] == 1.0) == (r["quality"] >= 0.9) for r in pool)
        assert any("ANALYSIS ONLY" in line for line in trainer.data.summary)
    if trainer.method == "return_filter":  # mean weight per source: the share kept, over the overall share
        share = {s: sum(r["weight"] for r in pool if r["source"] == s) / 8 for s in ("eps0.1", "random")}
        overall = len(kept) / len(pool)
        assert 0 < len(kept) < len(pool) and final["mean_weight_per_source"]["random"] < 1
        for source, value in share.items():
            assert final["mean_weight_per_source"][source] == pytest.approx(value / overall)
    if trainer.method == "per_source":
        assert trainer.head.log_mass.item() == 0.0  # frozen at log(init_mass)
