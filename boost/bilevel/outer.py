"""The outer step: one Adam step on the reweighting head from a held-out validation batch.

Right after inner step t (θ_t before it, θ_{t+1} after it), on a batch of held-out *real* tasks:

    g      = ∇ L_out(trunk(val_batch)) at θ_{t+1}
    v      = identity: the AdamW step's own response lr·P ⊙ g (:mod:`.step_response`, clipping incl.);
             neumann / cg: ≈ (H + λI)⁻¹ g, H on the inner batch at θ_t, warm-started from the last v
    dL/dw  = −<∇L_i(θ_t), v> / S
    head  <- Adam step on Σ_i w_i(φ) stopgrad(dL/dw_i) + λ_conc/√n_eff + λ_shift·Σ_syn w_i d_i / S

over one of two parameter blocks (docs/design.md, "Parameter block"):

- ``block="head"``: the LM head W, from the fused ops on the counted tokens only
  (:meth:`OuterStep.counted`), reusing the inner step's hidden states, so an outer step costs one
  trunk forward on the validation batch plus fused head passes. g is the validation NLL's unless
  the trainer has an outer signal (``outer.objective``: decision, return, mixtures), which then
  gives g and the logged ``outer_terms``; the validation NLL is computed whatever the objective
  (logged as ``val_loss``; the task-shift reference).
- ``block="trainable"``: every trained parameter, by central finite differences of the inner batch's
  losses with θ_t swapped in (two forward/backward passes of the inner batch per HVP, two forwards
  for the scores; :mod:`.hypergradient_trainable`).

:class:`OuterStep` is built with the trainer (:class:`boost.train.loop.Trainer`) and reads what it
needs from it when called, duck-typed, so this package imports nothing from :mod:`boost.train`:
``cfg`` (``block``, ``solver``, ``head``, ``kernels``, ``fd_step``), ``parallel`` (the ranks' hooks,
:mod:`boost.train.distributed`), ``hidden_states``, ``losses`` (the one fused loss), ``lm_head``,
``_bias``, ``_trained``, ``opt``, ``head``, ``head_opt``, ``signal``, ``data.sources`` and
``last_v`` (the warm start, which the trainer checkpoints and this step rewrites).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace
from functools import partial

import torch

from boost.bilevel.hypergradient import HeadBatch, head_hypergradient, sharded_head_hypergradient
from boost.bilevel.hypergradient_trainable import autograd_gradients, trainable_hypergradient
from boost.bilevel.reweighting import outer_objective, trajectory_features, weight_summary
from boost.bilevel.step_response import optimizer_response
from boost.data.packing import PackedBatch, segment_slices
from boost_kernels.vocab_parallel import ShardedHeadBatch


@contextmanager
def _parameters_set_to(params: list[torch.Tensor], values: list[torch.Tensor], refresh=None):
    """Temporarily load ``values`` into ``params`` (θ_t for the outer step), restoring them after;
    ``refresh()`` after each change (FSDP2: the next forward must gather the changed shards)."""
    current = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, x in zip(params, values):
                p.copy_(x)
        if refresh:
            refresh()
        yield
    finally:
        with torch.no_grad():
            for p, x in zip(params, current):
                p.copy_(x)
        if refresh:
            refresh()


def _sum_float(parallel, x: float) -> float:
    return parallel.sum_floats(x)[0]


class OuterStep:
    """``OuterStep(trainer, nonfinite)(batch, state, val)``: the outer step after the inner step on
    ``batch`` (``state`` is what that inner step returned) on the validation batch ``val``; returns its
    record. ``nonfinite(**values) -> names``: which values hold a NaN or an infinity (the trainer's
    check, :func:`boost.train.guards.nonfinite`); a bad outer step is skipped and named in ``skipped``."""

    def __init__(self, trainer, nonfinite: Callable[..., list[str]]):
        self.trainer, self.nonfinite = trainer, nonfinite

    def __call__(self, batch: PackedBatch, state: dict, val: PackedBatch) -> dict:
        t = self.trainer
        block = self.head_block if t.cfg.block == "head" else self.trainable_block
        if t.parallel.shards_head:
            block = self.sharded_head_block
        with t.parallel.no_sync():  # DDP: the blocks reduce their own gradients
            val_loss, hyper = block(batch, state, val)
        view = state["view"]
        # parallel: this rank's dL/dw_i (0 elsewhere), the regularisers once (rank 0); the head's
        # gradient is then summed over ranks
        objective = outer_objective(
            t.head, state["w"], view.scatter(hyper.traj_weights), state["synthetic"], pooled=state["pooled"],
            regularize=t.parallel.is_main,
        )  # fmt: skip
        t.head_opt.zero_grad(set_to_none=True)
        bad = t.parallel.agree(
            self.nonfinite(
                validation_loss=val_loss, hypergradient=hyper.traj_weights, outer_objective=objective.loss
            )
        )
        if not bad:  # a bad outer step is skipped: the head (and the warm start) are untouched
            # a batch without synthetic trajectories gives the head no gradient (real weights are fixed)
            if objective.loss.requires_grad:
                objective.loss.backward()
                t.parallel.reduce_gradients(t.head)
                t.head_opt.step()
            t.last_v = hyper.v if t.cfg.solver.warm_start else None
        t.parallel.after_outer_step(t, state, hyper.traj_weights)  # parallel_debug: ranks agree
        residual = hyper.residual if math.isfinite(hyper.residual) else None  # None: identity, no solve
        shift = float(objective.shift) if math.isfinite(float(objective.shift)) else None
        return {
            **({"skipped": bad} if bad else {}),
            **state.get("outer_terms", {}),
            "val_loss": float(val_loss),
            "n_eff": float(objective.n_eff.detach()),
            "mass": float(objective.mass.detach()),
            "synthetic_weight": float(objective.synthetic_weight.detach()),
            "task_shift_distance": shift,
            "solver_residual": residual,
            "solver_warm_started": hyper.warm_started,
            "weights": weight_summary(state["w"], view.source, t.data.sources),
        }

    # ------------------------------------------------------------------ the two blocks
    def head_block(self, batch: PackedBatch, state: dict, val: PackedBatch):
        """(validation loss, hypergradient) over the LM head, from the fused ops on the counted tokens.

        g = ∇_W L_out for ``outer.objective`` (the trainer's ``signal``; None: the validation NLL's);
        the validation NLL is computed whatever the objective (logged as ``val_loss``; the task-shift
        reference)."""
        t = self.trainer
        with torch.no_grad():
            val_hidden = t.hidden_states(val)
            val_c = self.counted(val_hidden, val)
        # θ_{t+1}; shares W's storage: no [V, D] copy (FSDP2: the head gathered on every rank)
        Wg = t.parallel.full(t.lm_head.weight).detach().requires_grad_()
        bias = t._bias()
        val_out = t.losses(val_c.hidden, val, weight=Wg, counted=val_c)  # parallel: the global count
        (g,) = torch.autograd.grad(val_out.loss, Wg)  # this rank's part of the NLL's gradient
        val_loss = t.parallel.sum(val_out.loss.detach().clone())
        if t.signal is None:  # outer.objective=nll
            g = t.parallel.sum(g)
        else:  # summed over ranks inside (the return term's rollouts are shared, not split)
            g = self.signal_gradient(val, val_hidden, g, float(val_loss), state, weight=Wg)
        self.update_reference(val_c.hidden, val_c.segment_ids, val, val_out)
        train = self.counted(state["hidden"], batch)
        if bias is not None:
            train = replace(train, bias=bias.detach())
        (w_pre,) = state["pre_step"]  # the head that produced the inner step's logits
        return val_loss, head_hypergradient(
            train, w_pre, state["w_local"].detach().float(), g, t.cfg.solver, init=t.last_v,
            precondition=self.precondition([t.lm_head.weight], state),
            normalizer=t.parallel.normalizer(batch), reduce=t.parallel.reduce,
        )  # fmt: skip

    def sharded_head_block(self, batch: PackedBatch, state: dict, val: PackedBatch):
        """:meth:`head_block` with the head's rows split over ranks (FSDP2, ``sharded_outer``): g, θ_t's
        copy, v and the solver's vectors are this rank's [V_r, D] rows; every rank's counted tokens
        are gathered instead ([T, D] per batch; ``sharded_tokens=streamed``: broadcast one rank's block
        at a time in every pass; :mod:`boost_kernels.vocab_parallel`). The same numbers
        as :meth:`head_block` (tested on 2 and 4 ranks), in the chunked PyTorch ops."""
        t = self.trainer
        with torch.no_grad():
            val_hidden = t.hidden_states(val)
            val_c = self.counted(val_hidden, val)
            shard = t.parallel.vocab_shard(t.lm_head.weight, t._bias())  # θ_{t+1}'s rows
            stream = t.cfg.sharded_tokens == "streamed"
            val_b = ShardedHeadBatch(shard, val_c.hidden, val_c.labels, val_c.segment_ids, val.num_segments,
                                     stream=stream)  # fmt: skip
            val_out = val_b.loss(t.parallel.normalizer(val))  # the loss over every rank's tokens
            del val_b  # its gathered tokens: not held through the solve
        g = val_out.weight_grad  # this rank's rows of the NLL's gradient
        if t.signal is not None:  # the objective's gradient in the same rows (the loss: every rank's)
            g = self.signal_gradient(val, val_hidden, g, float(val_out.loss), state, shard=shard)
        self.update_reference(val_c.hidden, val_c.segment_ids, val, val_out)
        train = self.counted(state["hidden"], batch)
        (w_pre,) = state["pre_step"]  # this rank's rows of the head that produced the inner step's logits
        train_b = ShardedHeadBatch(shard.with_weight(w_pre), train.hidden, train.labels, train.segment_ids,
                                   batch.num_segments, stream=stream)  # fmt: skip
        return val_out.loss.detach(), sharded_head_hypergradient(
            train_b, state["w_local"].detach().float(), g, t.cfg.solver,
            t.parallel.normalizer(batch), init=t.last_v, precondition=self.precondition(None, state),
        )  # fmt: skip

    def signal_gradient(
        self, val, val_hidden, nll_grad, nll_value: float, state: dict, **head
    ) -> torch.Tensor:
        """g for ``outer.objective`` (:class:`boost.train.outer_signal.OuterSignal`) over the head given
        as ``weight=`` (gathered) or ``shard=`` (vocabulary rows), summed over ranks; its value and
        terms go into the step's record."""
        g, value, terms = self.trainer.signal.gradient(val, val_hidden, nll_grad, nll_value, **head)
        state["outer_terms"] = {"outer_loss": value if math.isfinite(value) else None, **terms}
        return g

    def trainable_block(self, batch: PackedBatch, state: dict, val: PackedBatch):
        """(validation loss, hypergradient) over every trained parameter, by finite differences:
        g at θ_{t+1}, then H and the scores on the inner batch at θ_t (swapped in, then back)."""
        t = self.trainer
        params = t._trained()
        # FSDP2: every flat vector holds this rank's shards of the parameters; gradients come from
        # FSDP2's reduce-scatter (already summed), inner products are summed over ranks, and the
        # unsharded copies are dropped whenever the shards change in place
        sharded = t.parallel.kind == "fsdp2"
        gradients = t.parallel.param_gradients if sharded else autograd_gradients
        val_hidden = t.hidden_states(val)
        val_out = t.losses(val_hidden, val)
        g = gradients(val_out.loss, params)
        if not sharded:
            g = [t.parallel.sum(d) for d in g]
        self.update_reference(val_hidden, val.segment_ids, val, val_out)
        w = state["w_local"].detach()
        S = state["view"].size  # the global batch's trajectories
        micro = state["micro"]  # [batch], or the micro-batches of an accumulated step (batch = their union)
        # finite differences of the losses run the trunk in float32 whatever the precision: under bf16
        # autocast their error grows ~2.5x (measured: benchmarks/RESULTS.md, "Precision, attention ...")
        hidden = partial(t.hidden_states, precision="fp32")

        def inner_loss():
            parts = zip(micro, segment_slices(micro))
            return sum((w[sl] * t.losses(hidden(m), m, precompute_grad=False).per_trajectory).sum()
                       for m, sl in parts) / S  # fmt: skip

        def per_trajectory():
            return torch.cat([t.losses(hidden(m), m).per_trajectory for m in micro])

        refresh = partial(t.parallel.reshard, t) if sharded else None
        with _parameters_set_to(params, state["pre_step"], refresh):
            hyper = trainable_hypergradient(
                inner_loss, per_trajectory, params, g, t.cfg.solver, normalizer=S, step=t.cfg.fd_step,
                init=t.last_v, precondition=self.precondition(params, state, flat=True),
                reduce=None if sharded else t.parallel.reduce, dot=t.parallel.dot if sharded else None,
                gradients=gradients, refresh=refresh,
            )  # fmt: skip
        return t.parallel.sum(val_out.loss.detach().clone()), hyper

    # ------------------------------------------------------------------ pieces
    def precondition(self, params, state, flat: bool = False):
        """``identity``'s v = the inner AdamW step's response to g (lr·P ⊙ g, through clipping)."""
        t = self.trainer
        if t.cfg.solver.method != "identity":
            return None

        def response(g):
            total = None
            if t.parallel.kind == "fsdp2" and (flat or t.parallel.shards_head):
                # this rank's shards of the trained parameters (block=trainable) or of W's rows (the
                # sharded head block) with their AdamW state; the clipping projection summed over ranks
                opt, stepped = t.parallel.stepped_rows(t.opt, params if flat else None)
                total = partial(_sum_float, t.parallel)
            else:
                opt, stepped = t.parallel.stepped(t.opt, params)  # FSDP2, gathered head: W's state gathered
            grads = list(torch.split(g, [p.numel() for p in stepped])) if flat else [g]
            grads = [d.view_as(p) for d, p in zip(grads, stepped)]
            v = optimizer_response(opt, stepped, grads, state["clip"], total=total)
            return torch.cat([x.reshape(-1) for x in v]) if flat else v[0]

        return response

    def update_reference(self, val_hidden: torch.Tensor, segment_ids: torch.Tensor, val: PackedBatch,
                         val_out) -> None:  # fmt: skip
        """The task-shift term's reference: the validation trajectories' pooled hidden states
        (``val_hidden`` [T, D] with ``segment_ids`` [T], compacted to the counted tokens or not)."""
        t = self.trainer
        if t.cfg.head.task_shift:
            S = val_out.per_trajectory.shape[0]
            pooled = trajectory_features(
                val_hidden.detach(), segment_ids, segment_ids >= 0, val_out.per_trajectory, val_out.num_tokens,
                torch.zeros(S, dtype=torch.bool, device=segment_ids.device),
            ).pooled  # fmt: skip
            pooled, tokens = t.parallel.gather(val, pooled, val_out.num_tokens)  # every rank's
            t.head.update_reference(pooled[tokens > 0])

    def counted(self, hidden: torch.Tensor, batch: PackedBatch) -> HeadBatch:
        """The tokens of ``batch`` that count (segment >= 0, hence a label) as a :class:`HeadBatch`: the
        head block's loss, HVPs and JVP read nothing else, so dropping the rest is exact, and on the
        CPU preset's gridnav batches 3.5% of the tokens count (each head pass costs T·V·D)."""
        keep = batch.segment_ids >= 0
        return HeadBatch(hidden[keep], batch.labels[keep], batch.segment_ids[keep], batch.num_segments,
                         deterministic=self.trainer.cfg.kernels.deterministic)  # fmt: skip
