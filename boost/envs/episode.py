"""Episodes: the transcript of one task played to the end, and scripted play with a policy.

A transcript is a chat: the environment's instructions as the system message, each observation as a
user message, each action as an assistant message, and the final feedback as a last user message.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from boost.data.format import Trajectory
from boost.envs.base import Env, Task

# A reply the model left empty is shown as this, so the record stays valid and the emptiness visible.
EMPTY_REPLY = "(empty reply)"

# The ways an episode ends.
END_REASONS = ("success", "failure", "turn_limit", "context_limit")


def _visible(text: str, placeholder: str) -> str:
    return text if text.strip() else placeholder


@dataclass
class Episode:
    """One task played to the end.

    Attributes:
        task: the task played.
        messages: the chat transcript (see the module docstring).
        reward: the return (sum of step rewards).
        success: whether the environment reported success.
        turns: number of actions taken.
        n_invalid: actions the environment rejected as invalid.
        end_reason: one of :data:`END_REASONS` (``turn_limit`` covers the environment's own limit and
            the caller's; ``context_limit`` means the model's context could not hold the next prompt).
        extra: per-generator ground truth (kept in the trajectory's ``meta``).
    """

    task: Task
    messages: list[dict[str, str]]
    reward: float = 0.0
    success: bool = False
    turns: int = 0
    n_invalid: int = 0
    end_reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def start(cls, env: Env, task: Task, observation: str) -> Episode:
        messages = [
            {"role": "system", "content": env.instructions},
            {"role": "user", "content": _visible(observation, "(no observation)")},
        ]
        return cls(task=task, messages=messages)

    @property
    def done(self) -> bool:
        return bool(self.end_reason)

    def record(self, action: str, observation: str, reward: float, done: bool, info: dict[str, Any]) -> None:
        """Add one action and the environment's answer."""
        self.messages.append({"role": "assistant", "content": _visible(action, EMPTY_REPLY)})
        self.messages.append({"role": "user", "content": _visible(observation, "(no observation)")})
        self.reward += reward
        self.turns += 1
        self.n_invalid += bool(info.get("invalid"))
        if done:
            self.success = bool(info.get("success"))
            self.end_reason = (
                "success" if self.success else "turn_limit" if info.get("truncated") else "failure"
            )

    def stop(self, reason: str) -> None:
        """End an episode the environment has not ended (the caller's turn or context limit)."""
        if reason not in END_REASONS:
            raise ValueError(f"unknown end reason {reason!r}; expected one of {END_REASONS}")
        self.end_reason = reason

    def to_trajectory(self, source: str, meta: dict[str, Any] | None = None) -> Trajectory:
        """A :class:`~boost.data.format.Trajectory`; ground truth goes to ``meta`` (analysis only)."""
        full_meta = {
            "env": self.task.env,
            "split": self.task.split,
            "success": self.success,
            "turns": self.turns,
            "n_invalid": self.n_invalid,
            "end_reason": self.end_reason,
            **self.extra,
            **(meta or {}),
        }
        return Trajectory(
            messages=[dict(m) for m in self.messages],
            source=source,
            reward=self.reward,
            task_id=self.task.task_id,
            meta=full_meta,
        )


Policy = Callable[[Env, random.Random], str]


def play_episode(
    env: Env, task: Task, policy: Policy, rng: random.Random, max_turns: int | None = None
) -> Episode:
    """Play ``task`` with a scripted ``policy(env, rng) -> action`` until done or ``max_turns``."""
    limit = env.max_turns if max_turns is None else min(max_turns, env.max_turns)
    episode = Episode.start(env, task, env.reset(task))
    while not episode.done:
        if episode.turns >= limit:
            episode.stop("turn_limit")
            break
        action = policy(env, rng)
        observation, reward, done, info = env.step(action)
        episode.record(action, observation, reward, done, info)
    return episode
