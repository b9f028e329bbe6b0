"""The outer objectives (boost/bilevel/objectives.py, boost/train/outer_signal.py): the decision mask
picks the parsed action's tokens, the decision loss is 1 − p(action), and the return's score-function
estimate has the exact policy gradient as its expectation (brute force over an enumerable policy)."""

from __future__ import annotations

import math
import random

import pytest
import torch

import boost_kernels as bk
from boost.bilevel.objectives import (
    OuterConfig,
    action_segments,
    decision_loss,
    decision_weights,
    leave_one_out_advantages,
    parse_objective,
    return_gradient_loss,
    trajectories_with_actions,
)
from boost.data import PackingConfig, TokenizeConfig, TrajectoryPacker, tokenize_trajectories
from boost.envs import expert_policy, make_env, play_episode
from boost.train import Trainer
from boost.train.outer_signal import DecisionLabels
from boost.train.preset import build_word_tokenizer, corpus
from boost.train.report import write_report
from tests.test_train import _config, _metrics
from tests.test_train import assets as train_assets  # noqa: F401 (a fixture)


def test_objective_mixtures_parse_and_bad_ones_say_how_to_write_them():
    assert parse_objective("nll") == {"nll": 1.0}
    assert parse_objective("decision + 0.5*return") == {"decision": 1.0, "return": 0.5}
    for bad in ("nlll", "decision+decision", "0*return", "decision+", "-1*nll"):
        with pytest.raises(ValueError, match="outer.objective"):
            parse_objective(bad)
    with pytest.raises(ValueError, match="episodes_per_task must be >= 2"):
        OuterConfig(objective="return", episodes_per_task=1)
    assert OuterConfig(objective="decision+return").uses_rollouts and not OuterConfig().uses_rollouts


def _expert_batch(env_name: str, episodes: int = 3):
    env = make_env(env_name)
    try:
        played = [
            play_episode(env, task, expert_policy, random.Random(k))
            for k, task in enumerate(env.sample_tasks("validation", episodes, seed=1))
        ]
    finally:
        env.close()
    trajectories = [e.to_trajectory("real") for e in played]
    tokenizer = build_word_tokenizer(corpus(trajectories))
    tokenized, _ = tokenize_trajectories(trajectories, tokenizer, TokenizeConfig(max_length=2048))
    packer = TrajectoryPacker(tokenized, PackingConfig(token_budget=8192))
    (batch,) = list(packer.batches(0))
    return batch, tokenizer, played


@pytest.mark.parametrize(
    "env_name, action_text",
    [
        ("gridnav", lambda reply: reply.strip().lower()),
        ("guess-compact", lambda reply: reply.strip()),
        # textarena replies wrap the move in brackets: the move is what is inside
        ("textarena:GuessTheNumber-v0", lambda reply: reply.strip()[1:-1]),
    ],
)
def test_the_decision_mask_picks_exactly_the_parsed_action_tokens(env_name, action_text):
    if env_name.startswith("textarena"):
        pytest.importorskip("textarena")
    batch, tokenizer, played = _expert_batch(env_name)
    labels = DecisionLabels(env_name, tokenizer)(batch.labels, batch.segment_ids)
    counted = batch.labels != -100
    assert bool((labels[counted] != -100).any()) and bool((labels[~counted] == -100).all())
    # one action per expert reply, in order: decode each action's decision tokens
    action_ids, num_actions, owner = action_segments(batch.labels, batch.segment_ids)
    # the batch packs trajectories in its own order: action a belongs to segment owner[a]
    replies_of = {s: [m["content"] for m in played[int(i)].messages if m["role"] == "assistant"]
                  for s, i in enumerate(batch.trajectory_index)}  # fmt: skip
    replies = [replies_of[int(s)].pop(0) for s in owner]
    assert num_actions == sum(e.turns for e in played) and not any(replies_of.values())
    for a, reply in enumerate(replies):
        tokens = batch.labels[action_ids == a]
        picked = labels[action_ids == a]
        chosen = tokens[picked != -100].tolist()
        assert tokenizer.decode(chosen, skip_special_tokens=True).replace(" ", "") == action_text(reply)
        # the rest of the reply (end of turn, brackets) is not a decision token
        rest = tokens[picked == -100].tolist()
        assert action_text(reply) not in tokenizer.decode(rest, skip_special_tokens=True)


def test_the_decision_loss_is_one_minus_the_probability_of_each_action():
    torch.manual_seed(0)
    V, D = 11, 5
    W = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    # two trajectories: actions {0,1}, {2}, {3,4}; tokens 2 and 5 not counted
    segment_ids = torch.tensor([0, 0, -1, 0, 1, 1, -1])
    labels = torch.tensor([3, 4, -100, 7, 1, 2, -100])
    hidden = torch.randn(len(labels), D, dtype=torch.float64)
    action_ids, A, owner = action_segments(labels, segment_ids)
    assert action_ids.tolist() == [0, 0, -1, 1, 2, 2, -1] and A == 3 and owner.tolist() == [0, 0, 1]
    keep = labels != -100
    loss, n = decision_loss(hidden[keep], W, labels[keep], action_ids[keep], A, owner, 2, backend="torch")
    logp = torch.log_softmax(hidden @ W.T, -1).gather(1, labels.clamp(min=0)[:, None])[:, 0]
    p = [logp[[0, 1]].sum().exp(), logp[3].exp(), logp[[4, 5]].sum().exp()]
    expected = ((1 - p[0]) + (1 - p[1])) / 2 / 2 + (1 - p[2]) / 2
    assert n == 2 and torch.allclose(loss, expected, rtol=1e-12)
    (g,) = torch.autograd.grad(loss, W)
    (g_ref,) = torch.autograd.grad(expected, W)
    assert torch.allclose(g, g_ref, rtol=1e-10, atol=1e-12)

    # as weights on per-action NLLs (how a sharded head or a run over ranks computes it): the same
    # loss and gradient, here with the batch's trajectories split over two "ranks"
    n_all = trajectories_with_actions(owner, 2)
    per_action = bk.trajectory_cross_entropy(hidden[keep], W.detach(), labels[keep], action_ids[keep], A,
                                             normalize="sum", backend="torch").per_trajectory  # fmt: skip
    terms, weights = decision_weights(per_action, owner, 2, n_all)
    assert n_all == 2 and torch.allclose(terms.sum(), expected, rtol=1e-12)
    W2 = W.detach().requires_grad_()
    out = bk.trajectory_cross_entropy(hidden[keep], W2, labels[keep], action_ids[keep], A, traj_weights=weights,
                                      normalize="sum", normalizer=1.0, backend="torch")  # fmt: skip
    (g_w,) = torch.autograd.grad(out.loss, W2)
    assert torch.allclose(g_w, g_ref, rtol=1e-10, atol=1e-12)
    terms_1, _ = decision_weights(per_action[:2], owner[:2], 2, normalizer=1)  # rank 0 alone: its own count
    assert torch.allclose(terms_1.sum(), (2 - p[0] - p[1]) / 2, rtol=1e-12)


def test_leave_one_out_baselines_use_the_other_episodes_of_the_task():
    adv = leave_one_out_advantages([1.0, 0.0, 0.5, 0.2], ["a", "a", "a", "b"])
    assert adv[:3] == pytest.approx([1.0 - 0.25, 0.0 - 0.75, 0.5 - 0.5])
    assert adv[3] == pytest.approx(0.2 - 0.5)  # alone in its task: the mean of every other episode


def test_the_return_estimate_is_unbiased_for_the_policy_gradient_brute_force():
    """A one-turn task with an enumerable policy: two-token replies over a 4-token vocabulary (16 replies).
    E over replies of the estimator (each reply weighted by its probability, K=2 episodes with the
    leave-one-out baseline) equals −∇J computed exactly by autograd."""
    torch.manual_seed(1)
    V, D = 4, 3
    W = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, D, dtype=torch.float64)  # the two positions' hidden states (fixed context)
    replies = [(a, b) for a in range(V) for b in range(V)]
    reward = {r: float((r[0] + 2 * r[1]) % 3) / 2 for r in replies}

    def logp(r, weight):
        lp = torch.log_softmax(h @ weight.T, -1)
        return lp[0, r[0]] + lp[1, r[1]]

    J = sum(logp(r, W).exp() * reward[r] for r in replies)
    (exact,) = torch.autograd.grad(-J, W)
    with torch.no_grad():
        prob = {r: float(logp(r, W).exp()) for r in replies}
    # E over the two episodes (r1, r2) of the estimate from return_gradient_loss
    expected = torch.zeros_like(W)
    for r1 in replies:
        for r2 in replies:
            adv = torch.tensor(
                leave_one_out_advantages([reward[r1], reward[r2]], ["t", "t"]), dtype=torch.float64
            )
            hidden = torch.cat([h, h])
            labels = torch.tensor([*r1, *r2])
            segments = torch.tensor([0, 0, 1, 1])
            loss = return_gradient_loss(hidden, W, labels, segments, adv, 2.0, backend="torch")
            (g,) = torch.autograd.grad(loss, W)
            expected += prob[r1] * prob[r2] * g
    assert torch.allclose(expected, exact, rtol=1e-9, atol=1e-12), (expected - exact).abs().max()
    assert math.isfinite(float(exact.norm())) and float(exact.norm()) > 1e-3


@pytest.mark.parametrize("objective", ["decision", "return", "nll+decision+0.5*return"])
def test_a_run_with_each_outer_objective_logs_its_terms_and_rollout_schedule(request, tmp_path, objective):
    assets = request.getfixturevalue("train_assets")
    rollouts = ["outer.rollout_tasks=2", "outer.episodes_per_task=2", "outer.rollout_every=2",
                "eval.max_new_tokens=3", "eval.batch_size=4", "log_every=2"]  # fmt: skip
    trainer = Trainer(_config(assets, tmp_path, f"outer.objective={objective}", *rollouts), progress=False)
    trainer.train()
    title = write_report(tmp_path, trainer.data.summary).read_text().splitlines()[0]
    assert f"outer objective {objective}" in title  # the report says what the head optimised
    metrics = _metrics(tmp_path)
    # log_every=2, and every fresh rollout (steps 1 and 3) is logged too
    assert [m["step"] for m in metrics] == ([1, 2, 3, 4] if "return" in objective else [2, 4])
    for m in metrics:
        for name in parse_objective(objective):
            assert f"outer_{name}" in m
        assert math.isfinite(m["val_loss"])  # the validation NLL is logged whatever the objective
        if "decision" in objective:
            assert 0 <= m["outer_decision"] <= 1 and m["decision_trajectories"] >= 1
    if "return" in objective:
        fresh = [m for m in metrics if not m.get("return_reused")]
        assert [m["step"] for m in fresh] == [1, 3]  # every rollout_every=2 outer steps
        assert all(m["return_episodes"] + m["return_dropped"] == 4 for m in fresh)
        assert all(m["return_grad_norm"] >= 0 and 0 <= m["return_success"] <= 1 for m in fresh)


def test_objectives_other_than_nll_refuse_the_trainable_block(request, tmp_path):
    assets = request.getfixturevalue("train_assets")
    with pytest.raises(ValueError, match="block=head"):
        _config(assets, tmp_path, "outer.objective=decision", "block=trainable", "solver.method=identity")
