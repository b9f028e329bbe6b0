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
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

from boost.bilevel.objectives import (
    action_segments,
    decision_loss,
    decision_mask,
    leave_one_out_advantages,
    return_gradient_loss,
)
from boost.data import TokenizeConfig, TrajectoryPacker, tokenize_trajectories
from boost.envs import make_env
from boost.rollout.generation import RolloutConfig, rollout
from boost.train.attention_backend import attention_for_generation
from boost.train.evaluation import env_of

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


@dataclass
class ReturnEstimate:
    grad: torch.Tensor  # [V, D] float32: the score-function estimate of −∇J
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
        out = {
            "outer_signal_steps": torch.tensor(self.outer_steps),
            "outer_rollouts": torch.tensor(self.rollouts),
        }
        if self.estimate is not None:
            out["return_grad"] = self.estimate.grad
        return out

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        if "outer_signal_steps" in tensors:
            self.outer_steps = int(tensors["outer_signal_steps"])
            self.rollouts = int(tensors["outer_rollouts"])
        if "return_grad" in tensors:
            self.estimate = ReturnEstimate(
                tensors["return_grad"].to(self.trainer.device), {"return_reused": True}
            )

    # ---- the gradient --------------------------------------------------------------------------
    def gradient(self, val, val_hidden: torch.Tensor, weight: torch.Tensor, nll_loss: torch.Tensor):
        """(g [V, D], objective value, record) on the validation batch ``val``.

        val_hidden [T, D]: its hidden states (no grad); weight: the head at θ_{t+1}, requiring grad;
        nll_loss: the validation NLL from ``weight`` (the ``nll`` term, differentiable in ``weight``).
        """
        g, value, record = torch.zeros_like(weight, dtype=torch.float32), 0.0, {}
        for name, beta in self.terms.items():
            if name == "nll":
                (part,) = torch.autograd.grad(nll_loss, weight)
                term = float(nll_loss.detach())
            elif name == "decision":
                part, term, record["decision_trajectories"] = self._decision(val, val_hidden, weight)
            else:
                part, term, extra = self._return(weight)
                record.update(extra)
            g += beta * part.float()
            value += beta * term
            record[f"outer_{name}"] = term
        self.outer_steps += 1
        return g, value, record

    def _decision(self, val, val_hidden, weight):
        labels = self.decision(val.labels, val.segment_ids)
        keep = labels != -100
        action_ids, num_actions, owner = action_segments(labels, val.segment_ids)
        loss, n = decision_loss(
            val_hidden[keep], weight, labels[keep], action_ids[keep], num_actions, owner, val.num_segments,
            bias=self.trainer._bias(), **self.trainer.cfg.kernels.loss_options(),
        )  # fmt: skip
        if n == 0:
            raise ValueError(
                f"outer.objective=decision: no validation reply of this batch parsed to an action in "
                f"{self.env_name} ({self.decision.unparsed} of {self.decision.replies} replies so far did not); "
                "check the environment's action format, or use outer.objective=nll"
            )
        (part,) = torch.autograd.grad(loss, weight)
        return part, float(loss.detach()), n

    def _return(self, weight):
        if self.estimate is None or self.outer_steps % self.cfg.rollout_every == 0:
            self.estimate = self._estimate_return(weight)
            return self.estimate.grad, -self.estimate.record["return_mean"], self.estimate.record
        # reused: the value is the last rollout's (unknown right after a resume)
        return self.estimate.grad, -self.estimate.record.get("return_mean", math.nan), {"return_reused": True}

    def _play(self):
        """Sampled episodes of the current model on the next ``rollout_tasks`` validation tasks."""
        trainer, cfg = self.trainer, self.cfg
        n = len(self.tasks)
        start = (self.rollouts * cfg.rollout_tasks) % n
        chosen = [self.tasks[(start + k) % n] for k in range(min(cfg.rollout_tasks, n))]
        env = make_env(self.env_name)
        try:
            tasks = [env.task(task_id) for task_id in chosen for _ in range(cfg.episodes_per_task)]
        finally:
            env.close()
        config = RolloutConfig(
            max_new_tokens=trainer.cfg.eval.max_new_tokens, temperature=1.0, batch_size=trainer.cfg.eval.batch_size,
            seed=trainer.cfg.seed * 100_003 + self.rollouts,
        )  # fmt: skip
        model = trainer.model
        was_training = model.training
        model.eval()
        try:
            with attention_for_generation(model, trainer.attention):
                episodes = rollout(model, trainer.tokenizer, self.env_name, tasks, config, progress=False)
        finally:
            model.train(was_training)
        self.rollouts += 1
        return episodes

    def _estimate_return(self, weight) -> ReturnEstimate:
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
            grads.append(self._score_function(weight, [tokenized[i] for i in chosen],
                                              [advantages[i] for i in chosen], len(tokenized)))  # fmt: skip
        grad = grads[0] + grads[1]
        a, b = grads
        cosine = float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-30)) if len(tasks) > 1 else None
        mean = math.fsum(returns) / max(len(returns), 1)
        record = {
            "return_mean": mean,
            "return_std": (math.fsum((r - mean) ** 2 for r in returns) / max(len(returns), 1)) ** 0.5,
            "return_success": sum(e.success for e in episodes) / max(len(episodes), 1),
            "return_episodes": len(tokenized),
            "return_dropped": len(episodes) - len(tokenized),
            "return_nonzero_advantage": sum(abs(x) > 1e-12 for x in advantages) / max(len(advantages), 1),
            "return_halves_cosine": cosine,
            "return_grad_norm": float(grad.norm()),
            "return_rollout_seconds": played,
            "return_seconds": time.perf_counter() - started,
        }
        if report.num_dropped:
            log.warning("return objective: %s", report.summary())
        return ReturnEstimate(grad.detach(), record)

    def _score_function(self, weight, tokenized, advantages, n) -> torch.Tensor:
        """Σ over these rollouts of (R_j − b_j) ∇L_j / n: [V, D] (zeros without any)."""
        trainer = self.trainer
        total = torch.zeros_like(weight, dtype=torch.float32)
        if not tokenized:
            return total
        packer = TrajectoryPacker(tokenized, trainer.data.validation.config, name="rollout")
        by_index = {t.index: a for t, a in zip(tokenized, advantages)}
        for batch in packer.batches(0):
            batch = batch.to(trainer.device)
            with torch.no_grad():
                hidden = trainer.hidden_states(batch)
            keep = batch.segment_ids >= 0
            adv = torch.tensor([by_index[int(i)] for i in batch.trajectory_index], device=trainer.device)
            loss = return_gradient_loss(
                hidden[keep], weight, batch.labels[keep], batch.segment_ids[keep], adv, float(n),
                bias=trainer._bias(), **trainer.cfg.kernels.loss_options(),
            )  # fmt: skip
            (part,) = torch.autograd.grad(loss, weight)
            total += part.float()
        return total

    def close(self) -> None:
        if self.decision is not None:
            self.decision.close()
