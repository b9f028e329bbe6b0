"""Scripted policies: the expert, the random policy, the epsilon-random expert, the format corrupter,
the stuck agent.

A policy is called as ``policy(env, rng) -> action text`` on an environment that has been reset.
Policies that deviate from the expert count their deviations in ``counts`` (reset per episode by
the caller with :meth:`reset_counts`), which the generators keep as ground truth.
"""

from __future__ import annotations

import random

from boost.envs.base import Env, EnvError

_JUNK = "#@%&*~^|"
CORRUPTIONS = ("truncate", "malform")


def expert_policy(env: Env, rng: random.Random) -> str:
    return env.expert_action()


def random_policy(env: Env, rng: random.Random) -> str:
    return env.random_action(rng)


def truncate_action(action: str, rng: random.Random) -> str:
    """A proper, non-empty prefix of ``action`` (an action cut off mid-way)."""
    if len(action) < 2:
        raise EnvError(f"cannot truncate the one-character action {action!r}")
    return action[: rng.randrange(1, len(action))]


def malform_action(action: str, rng: random.Random) -> str:
    """``action`` with about half of its characters (at least one) replaced by junk symbols."""
    chars = list(action)
    for i in rng.sample(range(len(chars)), max(1, len(chars) // 2)):
        chars[i] = rng.choice(_JUNK)
    return "".join(chars)


class EpsilonExpert:
    """The expert, except that each action is random with probability ``epsilon``."""

    def __init__(self, epsilon: float) -> None:
        if not 0.0 <= epsilon <= 1.0:
            raise EnvError(f"epsilon must be in [0, 1], got {epsilon}")
        self.epsilon = epsilon
        self.reset_counts()

    def reset_counts(self) -> None:
        self.counts = {"n_random_actions": 0}

    def __call__(self, env: Env, rng: random.Random) -> str:
        if rng.random() < self.epsilon:
            self.counts["n_random_actions"] += 1
            return env.random_action(rng)
        return env.expert_action()


class StickyPolicy:
    """A stuck agent: a random first action, then the same action every turn (an agent looping on one
    action). Its trajectories are easy to predict after the first reply (low loss once learned) and
    teach nothing of the task. ``counts["n_random_actions"]``: the turns whose action is not the
    expert's."""

    def __init__(self) -> None:
        self.reset_counts()

    def reset_counts(self) -> None:
        self.counts = {"n_random_actions": 0}
        self._action: str | None = None

    def __call__(self, env: Env, rng: random.Random) -> str:
        if self._action is None:
            self._action = env.random_action(rng)
        if self._action != env.expert_action():
            self.counts["n_random_actions"] += 1
        return self._action


class CorruptExpert:
    """The expert, except that each action's text is corrupted with probability ``prob``.

    The corrupted text is what the environment receives, so the transcript stays a real interaction
    (the environment answers a malformed action as it defines).
    """

    def __init__(self, prob: float, kinds: tuple[str, ...] = CORRUPTIONS) -> None:
        if not 0.0 < prob <= 1.0:
            raise EnvError(f"corruption probability must be in (0, 1], got {prob}")
        unknown = [k for k in kinds if k not in CORRUPTIONS]
        if not kinds or unknown:
            raise EnvError(f"corruption kinds must be a non-empty subset of {CORRUPTIONS}, got {kinds}")
        self.prob = prob
        self.kinds = tuple(kinds)
        self.reset_counts()

    def reset_counts(self) -> None:
        self.counts = {"n_corrupted": 0, **{f"n_{kind}": 0 for kind in self.kinds}}

    def __call__(self, env: Env, rng: random.Random) -> str:
        action = env.expert_action()
        if rng.random() >= self.prob:
            return action
        kind = rng.choice(self.kinds)
        if kind == "truncate" and len(action) < 2:
            kind = "malform"  # nothing to cut off a one-character action
        self.counts["n_corrupted"] += 1
        self.counts[f"n_{kind}"] = self.counts.get(f"n_{kind}", 0) + 1
        return truncate_action(action, rng) if kind == "truncate" else malform_action(action, rng)
