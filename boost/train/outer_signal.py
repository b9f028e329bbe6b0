"""g = ∇_W L_out for the trainer's outer step, for the objective ``outer.objective`` names.

The math of each term is in :mod:`boost.bilevel.objectives`; this module feeds it from the trainer:
the validation batch's hidden states (``nll``, ``decision``) and rollouts of the current model on
held-out real validation tasks (``return``). Everything runs over the LM head block (``block=head``):
g is a [V, D] tensor like the head's weight, taken at θ_{t+1} (after the inner step), as the
solvers expect.

``return``: every ``outer.rollout_every`` outer steps the model plays ``outer.rollout_tasks``
validation tasks ``outer.episodes_per_task`` times each, sampled at temperature 1 (the tasks rotate
through the real validation trajectories' task ids); the rollouts are tokenised and packed like
validation data and g is the fused op's gradient of Σ_j (R_j − b_j) L_j / n. The estimate is reused
until the next rollout (kept in checkpoints, so a resumed run continues with it). Its noise is
logged: the two halves of the tasks give two independent estimates, and ``return_halves_cosine`` is
their cosine (near 1: the estimate is stable; near 0 or below: mostly noise).

Under ``parallel=ddp|fsdp2`` every term is the one process's: the validation batch's terms are summed
over the ranks' shares, the rollouts are split over ranks and gathered (each episode samples from its
own seed, so the split changes no token), and FSDP2's sharded outer step gets g as the head's rows
(:class:`HeadGradients`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

import boost_kernels as bk
from boost.bilevel.objectives import (
    action_segments,
    decision_mask,
    decision_weights,
    leave_one_out_advantages,
    trajectories_with_actions,
)
from boost.data import TokenizeConfig, TrajectoryPacker, tokenize_trajectories
from boost.envs import make_env
from boost.rollout.generation import RolloutConfig, rollout
from boost.train.attention_backend import attention_for_generation
from boost.train.evaluation import env_of
from boost_kernels.vocab_parallel import ShardedHeadBatch

log = logging.getLogger(__name__)


def _special_ids(tokenizer) -> set[int]:
    return {int(i) for i in getattr(tokenizer, "all_special_ids", [])}


class DecisionLabels:
    """Restricts a batch's labels to its decision tokens (the environment's parsed action in each reply).

    Masks are cached by the reply's token ids: the same reply always has the same decision tokens.
    ``unparsed`` counts the replies that parsed to no action (they contribute nothing).
    """

    def __init__(self, env_name: str, tokenizer, ignore_index: int = -100):
        self.env = make_env(env_name)
        self.tokenizer, self.ignore_index = tokenizer, ignore_index
        self.special = _special_ids(tokenizer)
        self.cache: dict[tuple[int, ...], list[bool]] = {}
        self.replies = self.unparsed = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def mask(self, ids: tuple[int, ...]) -> list[bool]:
        if ids not in self.cache:
            mask, parsed = decision_mask(ids, self._decode, self.env.action_span, self.special)
            self.cache[ids] = mask
            self.unparsed += not parsed
        self.replies += 1
        return self.cache[ids]

    def __call__(self, labels: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
        """labels [T] -> labels [T] with every non-decision token set to ``ignore_index``."""
        action_ids, num_actions, _ = action_segments(labels, segment_ids, self.ignore_index)
        flat_actions, flat_labels = action_ids.tolist(), labels.tolist()
        runs: list[list[int]] = [[] for _ in range(num_actions)]
        for t, a in enumerate(flat_actions):
            if a >= 0:
                runs[a].append(t)
        keep = [False] * len(flat_labels)
        for positions in runs:
            for t, on in zip(positions, self.mask(tuple(flat_labels[t] for t in positions))):
                keep[t] = on
        keep_t = torch.tensor(keep, dtype=torch.bool, device=labels.device)
        return torch.where(keep_t, labels, torch.full_like(labels, self.ignore_index))

    def close(self) -> None:
        self.env.close()


class HeadGradients:
    """∇ over the LM head of weighted per-segment losses, for the objective terms.

    The gathered head (one process, DDP, FSDP2 with ``sharded_outer=false``): ``weight`` [V, D]
    requiring grad, fed this rank's tokens; :meth:`total` sums a gradient over ranks. The
    vocabulary-sharded head (FSDP2, ``sharded_outer``): ``shard`` (this rank's rows), fed this rank's
    tokens but gathering every rank's (:class:`boost_kernels.vocab_parallel.ShardedHeadBatch`), so each
    gradient is already this rank's rows of the global one and :meth:`total` is the identity.
    """

    def __init__(self, trainer, weight: torch.Tensor | None = None, shard=None):
        self.trainer, self.weight, self.shard = trainer, weight, shard
        self.parallel = trainer.parallel

    def _batch(self, hidden, labels, segment_ids, num_segments):
        return ShardedHeadBatch(self.shard, hidden, labels, segment_ids, num_segments, normalize="sum",
                                stream=self.trainer.cfg.sharded_tokens == "streamed")  # fmt: skip

    def per_segment(self, hidden, labels, segment_ids, num_segments: int) -> torch.Tensor:
        """[S] this rank's per-segment losses, summed over each segment's tokens (no grad)."""
        if self.shard is not None:
            batch = self._batch(hidden, labels, segment_ids, num_segments)
            return batch.loss(1.0, need_grad=False).per_trajectory
        with torch.no_grad():
            return bk.trajectory_cross_entropy(
                hidden, self.weight.detach(), labels, segment_ids, num_segments, bias=self.trainer._bias(),
                normalize="sum", **self.trainer.cfg.kernels.loss_options(),
            ).per_trajectory  # fmt: skip

    def weighted(self, hidden, labels, segment_ids, weights: torch.Tensor, normalizer: float) -> torch.Tensor:
        """∇ Σ_s weights_s L_s / normalizer (L_s summed over the segment's tokens): [V, D] (this rank's
        part) or [V_r, D] (global rows)."""
        if self.shard is not None:
            batch = self._batch(hidden, labels, segment_ids, weights.shape[0])
            return batch.loss(normalizer, traj_weights=weights).weight_grad
        out = bk.trajectory_cross_entropy(
            hidden, self.weight, labels, segment_ids, weights.shape[0], traj_weights=weights.to(hidden.dtype),
            bias=self.trainer._bias(), normalize="sum", normalizer=float(normalizer),
            **self.trainer.cfg.kernels.loss_options(),
        )  # fmt: skip
        (part,) = torch.autograd.grad(out.loss, self.weight)
        return part.float()

    def zeros(self) -> torch.Tensor:
        return torch.zeros_like(
            self.shard.weight if self.shard is not None else self.weight, dtype=torch.float32
        )

    def total(self, x: torch.Tensor) -> torch.Tensor:
        """A gradient summed over ranks (the sharded head's already is)."""
        return x if self.shard is not None else self.parallel.sum(x)

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """<a, b> of two :meth:`total` gradients (the sharded head's rows: summed over ranks)."""
        return self.parallel.dot(a, b) if self.shard is not None else float((a.double() * b.double()).sum())


@dataclass
class ReturnEstimate:
    grad: torch.Tensor  # [V, D] (the sharded head: this rank's [V_r, D] rows) float32: the estimate of −∇J
    record: dict  # what to log about it


class OuterSignal:
    """The outer step's validation gradient for ``trainer.cfg.outer`` (see the module docstring)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.cfg = trainer.cfg.outer
        self.terms = self.cfg.terms
        self.env_name = None
        if set(self.terms) - {"nll"}:
            self.env_name = env_of(trainer.data.validation.trajectories, trainer.cfg.eval.env)
        self.decision = DecisionLabels(self.env_name, trainer.tokenizer) if "decision" in self.terms else None
        # the real validation tasks the return objective plays, in a fixed order
        self.tasks = sorted({t.task_id for t in trainer.data.validation.trajectories if t.task_id})
        if self.cfg.uses_rollouts and not self.tasks:
            raise ValueError(
                "outer.objective uses 'return' but the validation trajectories carry no task ids"
            )
        self.estimate: ReturnEstimate | None = None
        self.outer_steps = 0  # outer steps taken so far (the rollout schedule)
        self.rollouts = 0

    # ---- checkpoints ---------------------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        """Tensors for the checkpoint; ``return_grad`` is head-shaped (a sharded head's: its rows)."""
        out = {
            "outer_signal_steps": torch.tensor(self.outer_steps),
            "outer_rollouts": torch.tensor(self.rollouts),
        }
        if self.estimate is not None:
            out["return_grad"] = self.estimate.grad
            out["return_mean"] = torch.tensor(
                self.estimate.record.get("return_mean", math.nan), dtype=torch.float64
            )
        return out

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        if "outer_signal_steps" in tensors:
            self.outer_steps = int(tensors["outer_signal_steps"])
            self.rollouts = int(tensors["outer_rollouts"])
        if "return_grad" in tensors:
            mean = float(tensors["return_mean"]) if "return_mean" in tensors else math.nan
            self.estimate = ReturnEstimate(
                tensors["return_grad"].to(self.trainer.device), {"return_mean": mean}
            )

    # ---- the gradient --------------------------------------------------------------------------
    def gradient(self, val, val_hidden: torch.Tensor, nll_grad: torch.Tensor, nll_value: float,
                 weight: torch.Tensor | None = None, shard=None):  # fmt: skip
        """(g, objective value, record) on the validation batch ``val`` (this rank's share), all global:
        g summed over ranks ([V, D], or the sharded head's [V_r, D] rows), the value too.

        val_hidden [T, D]: its hidden states (no grad); the head at θ_{t+1}: ``weight`` [V, D] requiring
        grad (gathered) or ``shard`` (its rows, :class:`boost_kernels.vocab_parallel.VocabShard`);
        nll_grad: ∇ of the validation NLL in the same layout, this rank's part (:meth:`HeadGradients.total`
        makes it global); nll_value: the validation NLL, already global.
        """
        parallel = self.trainer.parallel
        head = HeadGradients(self.trainer, weight=weight, shard=shard)
        local, values, record = head.zeros(), {}, {}
        for name, beta in self.terms.items():
            if name == "nll":
                part, values[name] = nll_grad, nll_value
            elif name == "decision":
                part, here, record["decision_trajectories"] = self.decision_term(val, val_hidden, head)
                (values[name],) = parallel.sum_floats(here)
            else:
                continue
            local += beta * part.float()
        g = head.total(local)
        if "return" in self.terms:
            part, values["return"], extra = self._return(head)
            g += self.terms["return"] * part
            record.update(extra)
        value = sum(self.terms[name] * values[name] for name in self.terms)
        record.update({f"outer_{name}": values[name] for name in self.terms})
        self.outer_steps += 1
        return g, value, record

    def decision_term(self, val, val_hidden, head: HeadGradients):
        """(this rank's part of ∇ decision loss, its value here, trajectories counted over all ranks)."""
        labels = self.decision(val.labels, val.segment_ids)
        keep = labels != -100
        action_ids, num_actions, owner = action_segments(labels, val.segment_ids)
        (counted,) = self.trainer.parallel.sum_floats(trajectories_with_actions(owner, val.num_segments))
        n = int(counted)
        if n == 0:  # every rank sees the same count, so every rank raises
            raise ValueError(
                f"outer.objective=decision: no validation reply of this batch parsed to an action in "
                f"{self.env_name} ({self.decision.unparsed} of {self.decision.replies} replies so far did not); "
                "check the environment's action format, or use outer.objective=nll"
            )
        # none on this rank (a phantom share): adds nothing. (The sharded head gathers every rank's tokens,
        # so every rank takes part, with no token and no segment here.)
        if num_actions == 0 and head.shard is None:
            return head.zeros(), 0.0, n
        hidden, labels, action_ids = val_hidden[keep], labels[keep], action_ids[keep]
        per_action = head.per_segment(hidden, labels, action_ids, num_actions)
        terms, weights = decision_weights(per_action, owner, val.num_segments, n)
        part = head.weighted(hidden, labels, action_ids, weights, 1.0)
        return part, float(terms.sum()), n

    def _return(self, head: HeadGradients):
        if self.estimate is None or self.outer_steps % self.cfg.rollout_every == 0:
            self.estimate = self.return_gradient(head)
            return self.estimate.grad, -self.estimate.record["return_mean"], self.estimate.record
        # reused: the value is the last rollout's (unknown right after a resume)
        return self.estimate.grad, -self.estimate.record.get("return_mean", math.nan), {"return_reused": True}

    def _play(self):
        """Sampled episodes of the current model on the next ``rollout_tasks`` validation tasks, the
        same on every rank: each rank plays its share (``parallel.share``) and the episodes are
        gathered in task order. Episode k samples from its own seed, so a share plays exactly the
        episodes one process would."""
        trainer, cfg, parallel = self.trainer, self.cfg, self.trainer.parallel
        n = len(self.tasks)
        start = (self.rollouts * cfg.rollout_tasks) % n
        chosen = [self.tasks[(start + k) % n] for k in range(min(cfg.rollout_tasks, n))]
        env = make_env(self.env_name)
        try:
            tasks = [env.task(task_id) for task_id in chosen for _ in range(cfg.episodes_per_task)]
        finally:
            env.close()
        base = (trainer.cfg.seed * 100_003 + self.rollouts) * 1_000_003
        mine = list(parallel.share(len(tasks)))
        config = RolloutConfig(
            max_new_tokens=trainer.cfg.eval.max_new_tokens, temperature=1.0, batch_size=trainer.cfg.eval.batch_size,
        )  # fmt: skip
        was_training = trainer.model.training
        trainer.model.eval()
        try:
            with (
                parallel.generation_model(trainer.model) as model,  # FSDP2: a gathered plain copy
                attention_for_generation(model, trainer.attention),
            ):
                played = rollout(model, trainer.tokenizer, self.env_name, [tasks[k] for k in mine], config,
                                 progress=False, seeds=[base + k for k in mine])  # fmt: skip
        finally:
            trainer.model.train(was_training)
        self.rollouts += 1
        return [e for _, e in sorted(parallel.gather_objects(list(zip(mine, played))), key=lambda p: p[0])]

    def return_gradient(self, head: HeadGradients) -> ReturnEstimate:
        """Fresh rollouts of the current model on the next ``rollout_tasks`` validation tasks and the
        score-function estimate of −∇J from them, with its record (noise, seconds)."""
        trainer = self.trainer
        started = time.perf_counter()
        episodes = self._play()
        played = time.perf_counter() - started
        trajectories = [e.to_trajectory("rollout") for e in episodes]
        tokenized, report = tokenize_trajectories(
            trajectories,
            trainer.tokenizer,
            TokenizeConfig(max_length=trainer.cfg.data.max_length),
            name="rollout",
        )
        returns = [float(t.reward) for t in tokenized]
        groups = [t.task_id or "" for t in tokenized]
        advantages = leave_one_out_advantages(returns, groups)
        # two independent halves (by task) give the estimate's noise; g is their count-weighted mean
        tasks = sorted(set(groups))
        half = {task: k % 2 for k, task in enumerate(tasks)}
        grads = []
        for part in (0, 1):
            chosen = [i for i, t in enumerate(tokenized) if half[groups[i]] == part]
            grads.append(self._score_function(head, [tokenized[i] for i in chosen],
                                              [advantages[i] for i in chosen], len(tokenized)))  # fmt: skip
        a, b = grads
        grad = a + b
        aa, bb, ab = head.dot(a, a), head.dot(b, b), head.dot(a, b)
        cosine = ab / max(math.sqrt(aa * bb), 1e-30) if len(tasks) > 1 else None
        mean = math.fsum(returns) / max(len(returns), 1)
        record = {
            "return_mean": mean,
            "return_std": (math.fsum((r - mean) ** 2 for r in returns) / max(len(returns), 1)) ** 0.5,
            "return_success": sum(e.success for e in episodes) / max(len(episodes), 1),
            "return_episodes": len(tokenized),
            "return_dropped": len(episodes) - len(tokenized),
            "return_nonzero_advantage": sum(abs(x) > 1e-12 for x in advantages) / max(len(advantages), 1),
            "return_halves_cosine": cosine,
            "return_grad_norm": math.sqrt(max(aa + bb + 2 * ab, 0.0)),
            "return_rollout_seconds": played,
            "return_seconds": time.perf_counter() - started,
        }
        if report.num_dropped:
            log.warning("return objective: %s", report.summary())
        return ReturnEstimate(grad.detach(), record)

    def _score_function(self, head: HeadGradients, tokenized, advantages, n) -> torch.Tensor:
        """Σ over these rollouts of (R_j − b_j) ∇L_j / n, summed over ranks (zeros without any).

        The rollouts (the same list on every rank) are packed like validation data and each rank takes
        its share of every batch (one process: all of it)."""
        trainer = self.trainer
        total = head.zeros()
        if not tokenized:
            return total
        packer = TrajectoryPacker(tokenized, trainer.data.validation.config, name="rollout")
        by_index = {t.index: a for t, a in zip(tokenized, advantages)}
        for batch in trainer.parallel.batches(packer, 0):
            batch = batch.to(trainer.device)
            with torch.no_grad():
                hidden = trainer.hidden_states(batch)
            keep = batch.segment_ids >= 0
            # a phantom share (no counted token) adds 0 whatever its advantage
            adv = torch.tensor([by_index[int(i)] for i in batch.trajectory_index], device=trainer.device)
            total += head.weighted(hidden[keep], batch.labels[keep], batch.segment_ids[keep], adv, float(n))
        return head.total(total)

    def close(self) -> None:
        if self.decision is not None:
            self.decision.close()
