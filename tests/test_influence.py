"""Selection by influence (``weighting.method=influence``, boost/train/influence.py): the scores are
the influence function of the validation NLL over the LM head, checked against plain autograd; the run
trains on every gate passer until ``select_at`` and on its top share by score after; the random
control, rescoring, resume and the refusals."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from benchmarks.kill_resume import make_assets
from boost.bilevel.step_response import optimizer_response
from boost.train import Trainer, outer_signal
from boost.train.config import WeightingConfig
from boost.train.influence import (
    influence_vector,
    is_selection_step,
    objective_gradient,
    pool_scores,
    random_scores,
    validation_gradient,
)
from boost.train.outer_signal import HeadGradients, OuterSignal
from tests.test_train import _config, _metrics, saved_checkpoint

RUN = ("weighting.method=influence", "weighting.select_at=2", "steps=4")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("influence"))


def _per_trajectory(trainer, batch, weight):
    """[S] mean token NLL per trajectory, by plain PyTorch (the [T, V] logits built)."""
    hidden = trainer.hidden_states(batch)
    logits = hidden @ weight.T
    nll = F.cross_entropy(logits, batch.labels.clamp_min(0), reduction="none")
    ids = batch.segment_ids
    keep = ids >= 0
    sums = torch.zeros(batch.num_segments).index_add(0, ids[keep], nll[keep])
    counts = torch.zeros(batch.num_segments).index_add(0, ids[keep], torch.ones(int(keep.sum())))
    return sums / counts


def test_scores_are_the_influence_function_of_the_validation_nll(assets, tmp_path):
    trainer = Trainer(
        _config(assets, tmp_path, *RUN, "steps=1", "solver.steps=60", "solver.damping=0.05",
                "weighting.influence_batches=2"),
        progress=False,
    )  # fmt: skip
    trainer.train()  # one AdamW step; select_at=2 is never reached
    trainer.model.eval()
    W = trainer.lm_head.weight.detach().clone()
    v, record = influence_vector(trainer)

    def loss_over(packer, limit=None):
        def f(weight):
            total, count = 0.0, 0
            for k, batch in enumerate(packer.batches(0)):
                if limit is not None and k >= limit:
                    break
                per = _per_trajectory(trainer, batch, weight)
                total, count = total + per.sum(), count + batch.num_segments
            return total / count

        return f

    with torch.no_grad():
        val = loss_over(trainer.data.validation)
        g = torch.func.grad(val)(W)
        assert record["val_loss"] == pytest.approx(float(val(W)), rel=1e-5)
        assert record["val_loss"] == pytest.approx(trainer.evaluate(trainer.data.validation), rel=1e-5)
        assert record["g_norm"] == pytest.approx(float(g.norm()), rel=1e-4)
        # (H + λI) v = g for H the head Hessian of the uniform loss over the first 2 training batches
        train = loss_over(trainer.train_packer, limit=2)
        Hv = torch.func.jvp(torch.func.grad(train), (W,), (v,))[1]
        assert float((Hv + 0.05 * v - g).norm() / g.norm()) < 1e-3
        assert record["solver_residual"] < 1e-3
        scores = pool_scores(trainer, v)
        synthetic = [t.index for t in trainer.data.train.trajectories if t.source != "real"]
        assert sorted(scores) == sorted(synthetic)
        checked = 0
        batch = next(iter(trainer.data.train.batches(0)))  # one batch is enough
        jac = torch.func.jacrev(lambda w: _per_trajectory(trainer, batch, w))(W)  # [S, V, D]
        sigma = (jac * v).sum(dim=(1, 2))
        for i, s, real in zip(batch.trajectory_index.tolist(), sigma.tolist(), batch.is_real.tolist()):
            if not real:
                assert scores[i] == pytest.approx(s, rel=1e-3, abs=1e-6 * float(sigma.abs().max()))
                checked += 1
        assert checked > 0
        # influence_norm=gradient: σ_i / |∇_W L_i|, the norm from the same Jacobian
        trainer.cfg = replace(
            trainer.cfg, weighting=replace(trainer.cfg.weighting, influence_norm="gradient")
        )
        normalised = pool_scores(trainer, v)
        cosine = sigma / jac.flatten(1).norm(dim=1)
        for i, c, real in zip(batch.trajectory_index.tolist(), cosine.tolist(), batch.is_real.tolist()):
            if not real:
                assert normalised[i] == pytest.approx(c, rel=1e-3, abs=1e-6 * float(cosine.abs().max()))


def test_identity_is_the_adamw_response_to_the_validation_gradient(assets, tmp_path):
    """``solver.method=identity``: v = J_Δᵀ g of the last AdamW step (optimizer_response, tested in
    tests/test_step_response.py) applied to the validation gradient."""
    trainer = Trainer(_config(assets, tmp_path, *RUN, "steps=1", "solver.method=identity"), progress=False)
    trainer.train()
    W = trainer.lm_head.weight
    g, _ = validation_gradient(trainer, W.detach())
    v, record = influence_vector(trainer)
    assert record["solver"] == "identity" and record["solver_residual"] is None
    torch.testing.assert_close(v, optimizer_response(trainer.opt, [W], [g])[0], rtol=0, atol=0)
    assert float(v.norm()) > 0


ROLLOUTS = (
    "outer.rollout_tasks=3",
    "outer.episodes_per_task=2",
    "eval.max_new_tokens=3",
    "eval.batch_size=4",
)


def test_the_return_objective_scores_by_the_rollouts_score_function(assets, tmp_path, monkeypatch):
    """``outer.objective=nll+0.5*return``: g is the validation NLL's gradient plus half the
    score-function estimate that the in-loop outer step computes from the same sampled episodes (the
    same seeds: a fresh :class:`OuterSignal` at the same model), and the record carries the rollouts'.
    (The tiny untrained model fails every episode alike, so every advantage would be 0: fixed ±1
    advantages stand in for them, the same in both computations.)"""
    monkeypatch.setattr(
        outer_signal,
        "leave_one_out_advantages",
        lambda returns, groups: [(-1.0) ** k for k in range(len(returns))],
    )
    trainer = Trainer(
        _config(assets, tmp_path, *RUN, "steps=1", "outer.objective=nll+0.5*return", *ROLLOUTS),
        progress=False,
    )
    trainer.train()
    W = trainer.lm_head.weight.detach()
    g, record = objective_gradient(trainer, W)
    g_nll, val_loss = validation_gradient(trainer, W)
    signal = OuterSignal(trainer)
    estimate = signal.return_gradient(HeadGradients(trainer, weight=W.clone().requires_grad_()))
    signal.close()
    assert float(estimate.grad.norm()) > 0
    torch.testing.assert_close(g, g_nll + 0.5 * estimate.grad, rtol=1e-6, atol=1e-9)
    assert record["val_loss"] == val_loss and record["objective"] == "nll+0.5*return"
    assert record["return_episodes"] + record["return_dropped"] == 6
    assert record["return_mean"] == estimate.record["return_mean"]


def test_the_decision_objective_is_the_same_whatever_the_validation_batches(assets, tmp_path):
    """``outer.objective=decision`` over the whole validation split: each batch's term weighted by the
    trajectories it counts, so one batch or several give the same g and value."""
    results = []
    for budget in (512, 8192):
        cfg = _config(assets, tmp_path / str(budget), *RUN, "steps=1", "outer.objective=decision",
                      "data.rows=2", f"data.validation_token_budget={budget}")  # fmt: skip
        trainer = Trainer(cfg, progress=False)
        trainer.train()
        batches = sum(1 for _ in trainer.data.validation.batches(0))
        g, record = objective_gradient(trainer, trainer.lm_head.weight.detach())
        results.append((batches, g, record["outer_decision"], record["decision_trajectories"]))
    (many, g1, v1, n1), (few, g2, v2, n2) = results
    assert many > few and n1 == n2 > 0
    assert 0 < v1 < 1 and v1 == pytest.approx(v2, rel=1e-5)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-8)


def test_a_run_selects_by_influence_on_the_validation_return(assets, tmp_path):
    trainer = Trainer(_config(assets, tmp_path, *RUN, "outer.objective=return", *ROLLOUTS), progress=False)
    final = trainer.train()
    (selection,) = final["refilters"]
    assert selection["objective"] == "return" and selection["return_episodes"] >= 1
    assert "return_halves_cosine" in selection and selection["val_loss"] > 0
    assert_kept_the_top_share(tmp_path)


def _batches_seen(monkeypatch) -> list[tuple[int, set[int]]]:
    """(inner step, trajectory indices of its batch) for every inner step a Trainer takes from now on."""
    seen = []
    inner = Trainer.inner_step

    def spy(self, batch, micro=None):
        seen.append((self.step + 1, set(batch.trajectory_index.tolist())))
        return inner(self, batch, micro)

    monkeypatch.setattr(Trainer, "inner_step", spy)
    return seen


def assert_kept_the_top_share(out) -> list[dict]:
    """The run in ``out`` kept the top share by its selection's scores (``influence_scores.jsonl``):
    ``pool_weights.jsonl`` gives every kept trajectory weight 1, the rest 0, and each one left out
    scores below every one kept. Returns the pool_weights rows."""
    by_key = {
        r["key"]: r["weight"]
        for r in map(json.loads, (out / "influence_scores.jsonl").read_text().splitlines())
    }
    weights = [json.loads(line) for line in (out / "pool_weights.jsonl").read_text().splitlines()]
    lowest_kept = min(by_key[w["key"]] for w in weights if w["weight"] == 1.0)
    assert all(by_key[w["key"]] < lowest_kept for w in weights if w["weight"] == 0.0)
    return weights


def test_the_run_trains_on_the_top_share_after_select_at(assets, tmp_path, monkeypatch):
    seen = _batches_seen(monkeypatch)
    trainer = Trainer(_config(assets, tmp_path, *RUN), progress=False)
    final = trainer.train()
    assert [r["step"] for r in final["refilters"]] == [2]
    pool = trainer.data.train.trajectories
    chosen = {pool[p].index for p in trainer.refiltered.positions}
    assert all(indices <= chosen for step, indices in seen if step > 2)
    assert all(t.index in chosen for t in pool if t.source == "real")
    rows = [json.loads(line) for line in (tmp_path / "influence_scores.jsonl").read_text().splitlines()]
    synthetic = [t for t in pool if t.source != "real"]
    assert len(rows) == len(synthetic)
    kept = sum(k for k, _ in final["refilters"][0]["kept"].values())
    assert len(synthetic) // 2 <= kept < len(synthetic)
    assert_kept_the_top_share(tmp_path)
    assert "refilter" in [m for m in _metrics(tmp_path) if m["step"] == 2][0]
    assert final["refilters"][0]["solver"] == "cg" and final["refilters"][0]["solver_residual"] is not None


def test_the_random_control_rescoring_and_a_resume(assets, tmp_path):
    run = (*RUN[:-1], "weighting.select_by=random", "weighting.refilter_every=2", "steps=5")
    reference = Trainer(_config(assets, tmp_path / "reference", *run), progress=False).train()
    assert [r["step"] for r in reference["refilters"]] == [2, 4]
    assert all(r["select_by"] == "random" for r in reference["refilters"])
    Trainer(_config(assets, tmp_path / "run", *run[:-1], "steps=3"), progress=False).train()
    final = Trainer(_config(assets, tmp_path / "run", *run), progress=False).train(resume=True)
    assert [r["step"] for r in final["refilters"]] == [2, 4]
    ours, ref = saved_checkpoint(tmp_path / "run"), saved_checkpoint(tmp_path / "reference")
    assert all(torch.equal(ours["model"][k], ref["model"][k]) for k in ref["model"])


def test_a_warm_up_on_the_real_trajectories_only_and_its_resume(assets, tmp_path, monkeypatch):
    seen = _batches_seen(monkeypatch)
    run = (*RUN[:-1], "weighting.warmup_on=real", "weighting.select_at=3", "steps=5")
    trainer = Trainer(_config(assets, tmp_path / "reference", *run), progress=False)
    final = trainer.train()
    pool = trainer.data.train.trajectories
    real = {t.index for t in pool if t.source == "real"}
    chosen = {pool[p].index for p in trainer.refiltered.positions}
    assert all(indices <= real for step, indices in seen if step <= 3)
    assert any(indices - real for step, indices in seen if step > 3)  # synthetic ones after the selection
    assert all(indices <= chosen for step, indices in seen if step > 3)
    assert [r["step"] for r in final["refilters"]] == [3]
    Trainer(_config(assets, tmp_path / "run", *run[:-1], "steps=2"), progress=False).train()
    Trainer(_config(assets, tmp_path / "run", *run), progress=False).train(resume=True)
    ours, ref = saved_checkpoint(tmp_path / "run"), saved_checkpoint(tmp_path / "reference")
    assert all(torch.equal(ours["model"][k], ref["model"][k]) for k in ref["model"])


def test_select_by_return_keeps_the_top_share_by_return(assets, tmp_path):
    trainer = Trainer(_config(assets, tmp_path, *RUN, "weighting.select_by=return"), progress=False)
    final = trainer.train()
    assert final["refilters"][0]["select_by"] == "return"
    pool = trainer.data.train.trajectories
    synthetic = [t for t in pool if t.source != "real"]
    kept = {pool[p].index for p in trainer.refiltered.positions if pool[p].source != "real"}
    assert kept and len(kept) < len(synthetic)
    assert min(t.reward for t in synthetic if t.index in kept) >= max(
        t.reward for t in synthetic if t.index not in kept
    )


def test_random_scores_differ_per_step_and_repeat_per_seed(assets, tmp_path):
    trainer = Trainer(_config(assets, tmp_path, *RUN, "weighting.select_by=random"), progress=False)
    assert random_scores(trainer, 2) == random_scores(trainer, 2) != random_scores(trainer, 4)


def test_selection_steps():
    assert [s for s in range(1, 11) if is_selection_step(s, 3, 0, 10)] == [3]
    assert [s for s in range(1, 11) if is_selection_step(s, 3, 4, 10)] == [3, 7]
    assert not any(is_selection_step(s, 10, 0, 10) for s in range(1, 11))  # never after the last step


def test_refusals(assets, tmp_path):
    with pytest.raises(ValueError, match="select_at and weighting.influence_batches must be >= 1"):
        WeightingConfig(method="influence", select_at=0)
    with pytest.raises(ValueError, match="select_by must be one of influence, random, discriminator, return"):
        WeightingConfig(method="influence", select_by="loss")
    with pytest.raises(ValueError, match="has neither"):
        WeightingConfig(method="uniform", refilter_every=5)
    WeightingConfig(method="influence", return_gate="real_min", refilter_every=5)  # allowed
    with pytest.raises(ValueError, match="warmup_on must be 'pool' or 'real'"):
        WeightingConfig(method="influence", warmup_on="expert")
    with pytest.raises(ValueError, match="influence_norm must be 'none' or 'gradient'"):
        WeightingConfig(method="influence", influence_norm="l2")
    with pytest.raises(ValueError, match="goes with weighting.method=influence and select_by=influence"):
        WeightingConfig(method="influence", select_by="random", influence_norm="gradient")
    with pytest.raises(ValueError, match="has no such phase"):
        WeightingConfig(method="random_filter", warmup_on="real")
    with pytest.raises(ValueError, match="does not read block=trainable"):
        _config(assets, tmp_path, *RUN, "block=trainable", "solver.method=identity")
    with pytest.raises(ValueError, match="select_by=random does not read it"):
        _config(assets, tmp_path, *RUN, "outer.objective=return", "weighting.select_by=random")
    with pytest.raises(ValueError, match="runs on one process"):
        _config(assets, tmp_path, *RUN, "parallel=ddp")
