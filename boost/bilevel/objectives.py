"""What the outer step optimises: the validation objective L_out whose gradient g = ∇_W L_out the
hypergradient solvers turn into per-trajectory scores (:mod:`boost.bilevel.hypergradient`).

``outer.objective`` names one term or a mixture of them (``"decision+0.5*return"``):

* ``nll``: the mean per-trajectory token NLL of real validation trajectories (open loop, expert
  states). Unbounded; dominated by the tokens the model gets most wrong; every agent token counts,
  format tokens included.
* ``decision``: 1 − p(expert action | expert state), averaged over the actions of a real validation
  trajectory, then over trajectories. An *action* is the run of reply tokens inside the span the
  environment's parser reads (:meth:`boost.envs.base.Env.action_span`; free text without a parser:
  the whole reply), so p(action) is the product of its tokens' probabilities. Bounded in [0, 1] (the
  loss the PAC-Bayes reading assumes); its gradient weighs each action by p(action), so actions the
  model already nearly gets right count most, and formatting tokens not at all.
* ``return``: −J(θ), J the expected return of the *sampled* policy on held-out real validation tasks
  played in the environment (its own reward, no judge). By the score function,
  ∇(−J) = E[(R − b) ∇L(τ)] with L(τ) = −log π(τ's actions) (the NLL of the rollout's own reply
  tokens, summed), so g is the fused op's gradient of Σ_j (R_j − b_j) L_j / n: per-trajectory weights
  R_j − b_j on a "sum"-normalised loss. b_j is the leave-one-out mean return of the other episodes
  of the same task (RLOO), which leaves the estimate unbiased.

This module holds the configuration and the batch-level math; :mod:`boost.train.outer_signal` runs the
rollouts and builds the validation batches.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

import boost_kernels as bk

TERMS = ("nll", "decision", "return")
ROLLOUT_TERMS = ("return",)  # play validation tasks with the current model
_TERM = re.compile(r"^\s*(?:(?P<beta>[0-9.eE+-]+)\s*\*\s*)?(?P<name>[a-z_]+)\s*$")


def parse_objective(text: str) -> dict[str, float]:
    """``"decision+0.5*return"`` -> ``{"decision": 1.0, "return": 0.5}``; a clear error for anything else."""
    terms: dict[str, float] = {}
    for part in text.split("+"):
        match = _TERM.match(part)
        name = match and match["name"]
        if not match or name not in TERMS:
            raise ValueError(
                f"outer.objective={text!r}: cannot read {part.strip()!r}; write one of {', '.join(TERMS)} or a "
                "mixture such as 'decision+0.5*return'"
            )
        beta = float(match["beta"]) if match["beta"] else 1.0
        if not (math.isfinite(beta) and beta > 0) or name in terms:
            raise ValueError(
                f"outer.objective={text!r}: each term once, with a finite factor > 0 (got {part.strip()!r})"
            )
        terms[name] = beta
    return terms


@dataclass(frozen=True)
class OuterConfig:
    """The outer step's validation objective (see the module docstring) and its rollouts."""

    objective: str = "nll"  # a term of TERMS or a mixture, e.g. "decision+0.5*return"
    # return: fresh validation rollouts every this many outer steps; between them g
    # is reused (the estimate is kept, not recomputed)
    rollout_every: int = 5
    rollout_tasks: int = 16  # validation tasks played per rollout (rotating through the validation tasks)
    # sampled episodes per task (temperature 1: the score function is that of the sampled policy);
    # >= 2, the leave-one-out baseline needs others
    episodes_per_task: int = 4

    def __post_init__(self):
        terms = parse_objective(self.objective)
        if self.rollout_every < 1 or self.rollout_tasks < 1:
            raise ValueError("outer.rollout_every and outer.rollout_tasks must be >= 1")
        if "return" in terms and self.episodes_per_task < 2:
            raise ValueError(
                "outer.episodes_per_task must be >= 2 for the return objective (each episode's baseline is the "
                f"mean return of the task's other episodes); got {self.episodes_per_task}"
            )
        if self.episodes_per_task < 1:
            raise ValueError(f"outer.episodes_per_task must be >= 1, got {self.episodes_per_task}")

    @property
    def terms(self) -> dict[str, float]:
        return parse_objective(self.objective)

    @property
    def uses_rollouts(self) -> bool:
        return any(t in ROLLOUT_TERMS for t in self.terms)


# ---- decision tokens ---------------------------------------------------------------------------


def decision_mask(label_ids: Sequence[int], decode, span_of, special: set[int]) -> tuple[list[bool], bool]:
    """Which tokens of one reply are decision tokens.

    Args:
        label_ids: the reply's counted token ids in order (its content, then end-of-turn tokens).
        decode(ids) -> str: the tokenizer's decoding (special tokens skipped).
        span_of(text) -> (start, end) | None: the environment's :meth:`~boost.envs.base.Env.action_span`.
        special: ids of special tokens (end of turn): never part of an action.
    Returns:
        (mask, parsed): one bool per token; ``parsed`` is False when the reply parses to no action
        (then the mask is all False).
    """
    ends, text = [], ""
    for k in range(len(label_ids)):
        text = decode(list(label_ids[: k + 1]))
        ends.append(len(text))
    span = span_of(text)
    if span is None:
        return [False] * len(label_ids), False
    start, end = _trim(text, *span)
    mask, previous = [], 0
    for token, stop in zip(label_ids, ends):
        # a token's own characters, without the whitespace a decoder puts between tokens
        first, last = _trim(text, previous, stop)
        mask.append(int(token) not in special and last > first and first < end and last > start)
        previous = stop
    return mask, True


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    """``text[start:end]`` without surrounding whitespace, as offsets into ``text``."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def action_segments(labels: torch.Tensor, segment_ids: torch.Tensor, ignore_index: int = -100):
    """Each run of consecutive counted tokens of a trajectory is one action.

    labels [T], segment_ids [T] in [-1, S) of a packed batch (before dropping uncounted tokens).
    Returns (action_ids [T] in [-1, A), A, owner [A]: the trajectory of each action).
    """
    counted = (labels != ignore_index) & (segment_ids >= 0)
    before = torch.cat([counted.new_zeros(1), counted[:-1]])
    before_segment = torch.cat([segment_ids.new_full((1,), -2), segment_ids[:-1]])
    start = counted & (~before | (before_segment != segment_ids))
    ids = torch.cumsum(start.long(), 0) - 1
    return torch.where(counted, ids, torch.full_like(ids, -1)), int(start.sum()), segment_ids[start].long()


def decision_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    action_ids: torch.Tensor,
    num_actions: int,
    owner: torch.Tensor,
    num_trajectories: int,
    bias: torch.Tensor | None = None,
    **options,
) -> tuple[torch.Tensor, int]:
    """Mean over trajectories (with an action) of the mean over their actions of 1 − p(action).

    hidden [T, D], labels [T] and action_ids [T] (from :func:`action_segments`, restricted to the same T
    tokens), owner [A]. p(action) = exp(−Σ_t ℓ_t) over its tokens, from the fused op with
    ``normalize="sum"``: differentiable in ``weight`` (and hidden, bias) without [T, V] logits.
    Returns (loss [], trajectories counted).
    """
    out = bk.trajectory_cross_entropy(
        hidden, weight, labels, action_ids, num_actions, bias=bias, normalize="sum", precompute_grad=False,
        **options,
    )  # fmt: skip
    miss = 1.0 - torch.exp(-out.per_trajectory)  # [A] 1 − p(action)
    per = miss.new_zeros(num_trajectories).index_add(0, owner, miss)
    count = torch.bincount(owner, minlength=num_trajectories).to(miss.dtype)
    has = count > 0
    n = int(has.sum())
    if n == 0:
        return miss.sum() * 0.0, 0
    return (per[has] / count[has]).sum() / n, n


def decision_weights(action_losses: torch.Tensor, owner: torch.Tensor, num_trajectories: int,
                     normalizer: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The decision loss as weights on per-action NLLs, for heads that cannot run autograd through it
    (a vocabulary-sharded head; a loss spread over ranks).

    action_losses [A]: L_a = −log p(action a) (no grad); owner [A]: each action's trajectory;
    normalizer n: the trajectories with an action over the *whole* validation batch (every rank's).
    With c_a = 1 / (n · actions of a's trajectory), the loss is Σ_a c_a (1 − exp(−L_a)) and its gradient
    is Σ_a c_a exp(−L_a) ∇L_a. Returns (the loss's terms here [A], the gradient's weights [A]);
    with n = :func:`decision_loss`'s count both give exactly its loss and gradient.
    """
    count = torch.bincount(owner, minlength=num_trajectories).to(action_losses.dtype)
    c = 1.0 / (float(normalizer) * count[owner])
    return c * (1.0 - torch.exp(-action_losses)), c * torch.exp(-action_losses)


def trajectories_with_actions(owner: torch.Tensor, num_trajectories: int) -> int:
    """How many of ``num_trajectories`` own at least one action (``owner`` [A])."""
    return int((torch.bincount(owner, minlength=num_trajectories) > 0).sum())


# ---- the return's score function -----------------------------------------------------------------


def leave_one_out_advantages(returns: Sequence[float], groups: Sequence[str]) -> list[float]:
    """R_j − b_j with b_j the mean return of the other episodes of the same group (task).

    An episode alone in its group has no baseline from its task: b_j is then the mean of every other
    episode (still independent of its own return, so the estimate stays unbiased).
    """
    by_group: dict[str, list[int]] = defaultdict(list)
    for j, g in enumerate(groups):
        by_group[g].append(j)
    total, n = math.fsum(returns), len(returns)
    out = []
    for j, r in enumerate(returns):
        mates = by_group[groups[j]]
        if len(mates) > 1:
            b = (math.fsum(returns[k] for k in mates) - r) / (len(mates) - 1)
        else:
            b = (total - r) / (n - 1) if n > 1 else r
        out.append(r - b)
    return out


def return_gradient_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    segment_ids: torch.Tensor,
    advantages: torch.Tensor,
    normalizer: float,
    bias: torch.Tensor | None = None,
    **options,
) -> torch.Tensor:
    """Σ_j (R_j − b_j) L_j / n for the S rollouts of a packed batch: its gradient in ``weight`` is the
    score-function estimate of −∇J (L_j = −log π of rollout j's reply tokens, ``normalize="sum"``).

    hidden [T, D], labels [T], segment_ids [T] in [-1, S), advantages [S] (held fixed), normalizer n:
    the episodes of the whole estimate (it may span several batches).
    """
    out = bk.trajectory_cross_entropy(
        hidden, weight, labels, segment_ids, advantages.shape[0], traj_weights=advantages.to(hidden.dtype),
        bias=bias, normalize="sum", normalizer=normalizer, **options,
    )  # fmt: skip
    return out.loss
