"""Choosing the synthetic pool by influence once: ``weighting.method=influence``.

The in-loop head learns from hypergradients of many small batches and needs a second run (two-stage)
to pay off. This is the same implicit hypergradient taken once, over the whole pool, inside the run
that trains on its choice. After inner step ``weighting.select_at`` (training so far on the real
trajectories and every synthetic one that passed the gate, or with ``weighting.warmup_on=real`` on the
real ones only, so that the pool is scored at a behaviour-cloned model no synthetic trajectory has
shaped):

- g = ∇_W L_out over the LM head W for ``outer.objective``: ``nll`` (the default), the mean
  per-trajectory validation NLL over the whole validation split; ``decision``, the bounded loss on
  the expert's action tokens there; ``return``, the score-function estimate of −∇J from sampled
  episodes of the current model on the validation tasks (an influence on the policy's return, as
  CUPID scores demonstrations), or a β-weighted mixture (:func:`objective_gradient`);
- H = ∇²_W L_in: the head Hessian of the uniform training loss over ``weighting.influence_batches``
  batches of the current training set (with ``warmup_on=real``: of the real trajectories) (PSD: softmax cross-entropy is convex in W);
- v ≈ (H + λI)⁻¹ g by ``solver`` (``cg``: the influence function, i.e. BOOST's hypergradient
  dL_out/dw_i = −σ_i / Z at w = 1; ``identity``: v = the inner AdamW step's response P·g, an
  Adam-preconditioned gradient similarity like LESS's, exact on the head instead of projected LoRA
  gradients);
- σ_i = <∇_W L_i, v> for every synthetic trajectory of the pool, in one forward pass and one
  fused JVP per batch (``boost_kernels.trajectory_jvp``; the [V, D] gradients are never built);
  with ``weighting.influence_norm=gradient``, σ_i / |∇_W L_i|_F (a cosine up to |v|, as LESS ranks;
  :func:`boost.bilevel.hypergradient.trajectory_gradient_norms`).

Training goes on from the current model on the real trajectories plus the ``top_fraction`` of the
synthetic ones with the largest σ (weight 1 each: :mod:`boost.train.refilter`'s selection), and with
``refilter_every`` the pool is scored again from the model of that step. ``weighting.select_by=random``
keeps the schedule and draws the scores at random: the control for what the ranking adds.

Cost: one forward pass over the pool and one over the validation split per selection, plus
``solver.steps`` + 1 head HVPs over ``influence_batches`` batches; the record logs its seconds.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import replace

import torch

from boost.bilevel.hypergradient import (
    HeadBatch,
    head_hvp,
    solve,
    solve_residual,
    trajectory_gradient_norms,
    trajectory_scores,
)
from boost.bilevel.step_response import optimizer_response
from boost.train.baselines import synthetic_returns
from boost.train.outer_signal import HeadGradients, OuterSignal


def _concat(parts: list[HeadBatch]) -> HeadBatch:
    """One :class:`HeadBatch` holding the counted tokens of several (trajectory ids offset)."""
    offset, ids = 0, []
    for p in parts:
        ids.append(torch.where(p.segment_ids >= 0, p.segment_ids + offset, p.segment_ids))
        offset += p.num_segments
    return replace(
        parts[0],
        hidden=torch.cat([p.hidden for p in parts]),
        labels=torch.cat([p.labels for p in parts]),
        segment_ids=torch.cat(ids),
        num_segments=offset,
    )


def _hidden(trainer, packer, limit: int | None = None) -> Iterator[tuple]:
    """(batch, hidden [T, D]) for the first ``limit`` batches of ``packer`` (epoch 0; None: all), one
    at a time (a pass over the pool holds one batch's tokens), the hidden states computed under the
    current model in eval mode without gradients (the caller's grad mode is left alone)."""
    was_training = trainer.model.training
    trainer.model.eval()
    try:
        for k, batch in enumerate(packer.batches(0)):
            if limit is not None and k >= limit:
                break
            batch = batch.to(trainer.device)
            with torch.no_grad():
                hidden = trainer.hidden_states(batch)
            yield batch, hidden
    finally:
        trainer.model.train(was_training)


def _counted(trainer, packer, limit: int | None = None) -> Iterator[tuple]:
    """(batch, counted HeadBatch) for the batches :func:`_hidden` yields: the counted tokens only."""
    bias = trainer._bias()
    for batch, hidden in _hidden(trainer, packer, limit):
        counted = trainer.outer.counted(hidden, batch)
        yield batch, counted if bias is None else replace(counted, bias=bias.detach())


def validation_gradient(trainer, weight: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(g [V, D] float32, L_out): the mean per-trajectory NLL over the whole validation split (the
    held-out loss :meth:`Trainer.evaluate` reports) and its gradient over the LM head ``weight``."""
    if trainer.data.validation is None:
        raise ValueError("weighting.method=influence needs a validation split (data.validation > 0)")
    W = weight.detach().requires_grad_()
    g, total, count = torch.zeros_like(W, dtype=torch.float32), 0.0, 0
    for batch, counted in _counted(trainer, trainer.data.validation):
        out = trainer.losses(counted.hidden, batch, weight=W, counted=counted)
        summed = out.per_trajectory.sum()
        (grad,) = torch.autograd.grad(summed, W)
        g += grad.float()
        total, count = total + float(summed.detach()), count + batch.num_segments
    if not count:
        raise ValueError("weighting.method=influence needs a validation split (data.validation > 0)")
    return g / count, total / count


def _decision_gradient(trainer, signal: OuterSignal, head: HeadGradients) -> tuple[torch.Tensor, float, int]:
    """(g [V, D] float32, the decision loss, trajectories counted): ``outer.objective``'s ``decision``
    term (1 − p(expert action) per action, averaged per trajectory, then over trajectories) over the
    whole validation split and its gradient over the head ``head`` holds; each batch's term is weighted
    by the trajectories it counts.

    Raises:
        ValueError: a validation batch has no reply that parses to an action.
    """
    g, total, count = head.zeros(), 0.0, 0
    for batch, hidden in _hidden(trainer, trainer.data.validation):
        part, value, n = signal.decision_term(batch, hidden, head)
        g += part * n
        total, count = total + value * n, count + n
    return g / count, total / count, count


def objective_gradient(trainer, weight: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """(g [V, D] float32, a record): ∇_W of ``outer.objective`` (β-weighted terms) at the current model.

    ``nll``: :func:`validation_gradient`. ``decision``: the bounded loss on the expert's action tokens
    over the whole validation split. ``return``: the score-function estimate of −∇J from sampled
    episodes of the current model on the validation tasks (``outer.rollout_tasks`` of them, each
    ``outer.episodes_per_task`` times; see :mod:`boost.train.outer_signal`), so σ_i ranks a trajectory
    by how much training on it is predicted to raise the validation return (the CUPID reading of
    influence). The record always holds the validation NLL (``val_loss``), and each term's value and,
    for ``return``, the rollouts' record.
    """
    terms = trainer.cfg.outer.terms
    g_nll, val_loss = validation_gradient(trainer, weight)
    g = g_nll * terms["nll"] if "nll" in terms else torch.zeros_like(g_nll)
    record = {"val_loss": val_loss, "objective": trainer.cfg.outer.objective}
    if set(terms) == {"nll"}:
        return g, record
    signal = OuterSignal(trainer)
    head = HeadGradients(trainer, weight=weight.detach().requires_grad_())
    try:
        if "decision" in terms:
            part, value, count = _decision_gradient(trainer, signal, head)
            g += terms["decision"] * part
            record.update({"outer_decision": value, "decision_trajectories": count})
        if "return" in terms:
            estimate = signal.return_gradient(head)
            g += terms["return"] * estimate.grad
            record.update(estimate.record)
    finally:
        signal.close()
    return g, record


def influence_vector(trainer) -> tuple[torch.Tensor, dict]:
    """(v [V, D] float32, a record of the solve): v ≈ (H + λI)⁻¹ g by ``solver`` (``identity``: the
    AdamW response P·g), g and H as the module docstring says, at the current model.

    Raises:
        ValueError: a parallel run (not supported: one process only), or no validation split.
    """
    cfg = trainer.cfg
    if trainer.parallel.kind != "none":
        raise ValueError("weighting.method=influence runs on one process; set parallel=none")
    weight = trainer.lm_head.weight.detach()
    g, record = objective_gradient(trainer, weight)
    solver = cfg.solver
    residual = None
    if solver.method == "identity":  # the AdamW step's response: v = lr · P ⊙ g (no clipping record)
        v = optimizer_response(trainer.opt, [trainer.lm_head.weight], [g])[0]
    else:
        hessian = _concat(
            [c for _, c in _counted(trainer, trainer.train_packer, cfg.weighting.influence_batches)]
        )
        ones = torch.ones(hessian.num_segments, device=weight.device)

        def hvp(u):
            return head_hvp(hessian, weight, ones, None, u)

        v = solve(hvp, g, replace(solver, warm_start=False)).v
        residual = solve_residual(hvp, v, g, solver)
    record.update({"solver": solver.method, "solver_residual": residual, "v_norm": float(v.norm()),
                   "g_norm": float(g.norm())})  # fmt: skip
    return v, record


def pool_scores(trainer, v: torch.Tensor) -> dict[int, float]:
    """σ_i = <∇_W L_i, v> for every synthetic trajectory of the pool (``trainer.data.train``: the real
    trajectories and the synthetic ones the gate passed), trajectory index -> score; with
    ``weighting.influence_norm=gradient`` σ_i / |∇_W L_i|_F (0 for a zero gradient)."""
    weight = trainer.lm_head.weight.detach()
    normalise = trainer.cfg.weighting.influence_norm == "gradient"
    scores: dict[int, float] = {}
    for batch, counted in _counted(trainer, trainer.data.train):
        sigma = trajectory_scores(counted, weight, v)
        if normalise:
            norms = trajectory_gradient_norms(counted, weight).to(sigma.dtype)
            sigma = torch.where(norms > 0, sigma / norms.clamp_min(torch.finfo(sigma.dtype).tiny), 0.0)
        for i, s, real in zip(batch.trajectory_index.tolist(), sigma.tolist(), batch.is_real.tolist()):
            if not real:
                scores[i] = s
    return scores


def influence_scores(trainer) -> tuple[dict[int, float], dict]:
    """:func:`pool_scores` of :func:`influence_vector`'s v, and the solve's record."""
    v, record = influence_vector(trainer)
    return pool_scores(trainer, v), record


def random_scores(trainer, step: int) -> dict[int, float]:
    """The control: a score per synthetic trajectory of the pool drawn from a seed of its own per step."""
    rng = random.Random(trainer.cfg.weighting.subset_seed * 1_000_003 + step)
    return {t.index: rng.random() for t in trainer.data.train.trajectories if t.source != "real"}


def return_scores(trainer) -> dict[int, float]:
    """The return filter on the same schedule: each synthetic trajectory of the pool scored by its return.

    Raises:
        ValueError: a synthetic trajectory of the pool has no return.
    """
    synthetic = [t for t in trainer.data.train.trajectories if t.source != "real"]
    returns = synthetic_returns(synthetic, "weighting.select_by=return", "select by another score")
    return {t.index: float(r) for t, r in zip(synthetic, returns)}


def is_selection_step(step: int, select_at: int, every: int, steps: int) -> bool:
    """Whether the pool is scored after inner step ``step``: at ``select_at``, then every ``every``
    steps (0: once), never after the last step."""
    if step < select_at or step >= steps:
        return False
    return step == select_at or (every > 0 and (step - select_at) % every == 0)
