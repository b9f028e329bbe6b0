"""The environment protocol shared by built-in games and adapters.

An environment plays one task at a time::

    task = env.sample_tasks("train", n=1, seed=0)[0]
    observation = env.reset(task)
    while True:
        observation, reward, done, info = env.step(action_text)
        if done:
            break

Tasks are identified by ``task_id`` (``"<env name>/<seed>"``): the seed rebuilds the task
deterministically. Every task also has a content ``key`` (what the task *is*: the grid, the secret
number, ...); the split of a task is a hash of its key, so train / validation / test pools never
share a task even when two seeds build the same instance.
"""

from __future__ import annotations

import hashlib
import logging
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")

# Out of 10 hash buckets: 8 train, 1 validation, 1 test.
_SPLIT_OF_BUCKET = ("train",) * 8 + ("validation", "test")


# the name suffix of a game's compact view (short observations for small models: "gridnav-compact")
COMPACT_SUFFIX = "-compact"


class EnvError(ValueError):
    """Bad input to an environment (unknown name, task, split or setting); the message names the fix."""


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise EnvError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return split


def split_of(key: str) -> str:
    """The split a task with content ``key`` belongs to (a stable hash, the same on every machine)."""
    bucket = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) % len(_SPLIT_OF_BUCKET)
    return _SPLIT_OF_BUCKET[bucket]


@dataclass(frozen=True)
class Task:
    """One task instance.

    Attributes:
        env: registered name of the environment that builds it (e.g. ``"gridnav"``).
        seed: rebuilds the instance deterministically.
        key: what the instance is (its content); decides the split.
        split: ``"train"``, ``"validation"`` or ``"test"``.
    """

    env: str
    seed: int
    key: str = field(repr=False)
    split: str

    @property
    def task_id(self) -> str:
        return f"{self.env}/{self.seed}"


class Step(NamedTuple):
    """What :meth:`Env.step` returns; unpacks as ``observation, reward, done, info``.

    ``info`` always holds ``"invalid"`` (the action was rejected as the environment defines it) and,
    once ``done``, ``"success"`` and ``"truncated"`` (the turn limit ended the episode).
    """

    observation: str
    reward: float
    done: bool
    info: dict[str, Any]


def stripped_span(text: str, chars: str) -> tuple[int, int]:
    """(start, end) of ``text.strip().strip(chars).strip()`` inside ``text`` (what a parser that strips
    whitespace, then the characters ``chars``, then whitespace again reads)."""
    start, end = 0, len(text)
    for inside in (str.isspace, chars.__contains__, str.isspace):
        while start < end and inside(text[start]):
            start += 1
        while end > start and inside(text[end - 1]):
            end -= 1
    return start, end


def parse_task_id(task_id: str, env_name: str) -> int:
    """The seed in ``"<env_name>/<seed>"``; a clear error for anything else."""
    prefix, sep, seed = task_id.rpartition("/")
    if not sep or prefix != env_name or not seed.lstrip("-").isdigit():
        raise EnvError(
            f"task id {task_id!r} does not belong to environment {env_name!r}; "
            f"task ids look like '{env_name}/<seed>', e.g. '{env_name}/12345'"
        )
    return int(seed)


class Env(ABC):
    """A multi-turn text environment with an expert and a random policy.

    Subclasses set ``name`` and ``max_turns`` and implement the abstract methods. ``instructions``
    (the rules and the action format, used as the system message) is valid after :meth:`reset`.
    """

    name: str
    max_turns: int
    # False where two tasks of different splits may be the same instance (see the adapter's docs).
    content_disjoint_splits: bool = True

    # ---- tasks -------------------------------------------------------------------------------
    @abstractmethod
    def task_key(self, seed: int) -> str:
        """The content key of the task built from ``seed``."""

    def task(self, task_id: str) -> Task:
        """Rebuild a task from its id (``"<env name>/<seed>"``)."""
        seed = parse_task_id(task_id, self.name)
        key = self.task_key(seed)
        return Task(env=self.name, seed=seed, key=key, split=split_of(key))

    def sample_tasks(self, split: str, n: int, seed: int = 0) -> list[Task]:
        """``n`` tasks of ``split``, deterministic in ``seed``, distinct while the pool allows.

        A pool smaller than ``n`` (possible only for adapters of games with few instances) is cycled,
        so some tasks repeat; count the distinct ``task.key`` values to see how many there are.
        """
        check_split(split)
        if n < 0:
            raise EnvError(f"number of tasks must be >= 0, got {n}")
        rng = random.Random(f"{self.name}|{split}|{seed}")
        tasks: list[Task] = []
        seen: set[str] = set()
        misses = 0
        # A split holds at least ~10% of the keys, so 200 misses in a row means the pool is exhausted.
        while len(tasks) < n and misses < 200 + 20 * n:
            task_seed = rng.randrange(2**31)
            key = self.task_key(task_seed)
            if key in seen or split_of(key) != split:
                misses += 1
                continue
            seen.add(key)
            tasks.append(Task(env=self.name, seed=task_seed, key=key, split=split))
            misses = 0
        if not tasks and n > 0:
            raise EnvError(f"environment {self.name!r} has no task in split {split!r}")
        if len(tasks) < n:
            log.warning(
                "environment %r has only %d distinct tasks in split %r; %d requested, so tasks repeat",
                self.name,
                len(tasks),
                split,
                n,
            )
        return [tasks[i % len(tasks)] for i in range(n)]

    # ---- episodes ----------------------------------------------------------------------------
    @property
    @abstractmethod
    def instructions(self) -> str:
        """Rules and action format for the current task (the system message)."""

    @abstractmethod
    def reset(self, task: Task) -> str:
        """Start ``task``; returns the first observation."""

    @abstractmethod
    def step(self, action: str) -> Step:
        """Apply the action text; invalid actions are handled as the environment defines."""

    @abstractmethod
    def expert_action(self) -> str:
        """The expert's action in the current state (an expert that solves the target tasks)."""

    @abstractmethod
    def random_action(self, rng: random.Random) -> str:
        """A uniformly random well-formed action (it may still be a bad move)."""

    def action_span(self, reply: str) -> tuple[int, int] | None:
        """Where the action the environment parses sits in ``reply``: ``(start, end)`` character offsets,
        or None when the reply parses to no action. The decision tokens of the ``decision`` outer
        objective (:mod:`boost.bilevel.objectives`) are the reply tokens inside this span.

        The default is for free text without a parser: the whole reply (every agent token decides).
        """
        return (0, len(reply))

    def close(self) -> None:  # noqa: B027 (an optional hook: most environments hold nothing to release)
        """Release resources (processes, files); the default has none."""

    def _check_task(self, task: Task) -> None:
        if not isinstance(task, Task):
            raise EnvError(f"reset() takes a Task (from sample_tasks or task), got {type(task).__name__}")
        if task.env != self.name:
            raise EnvError(
                f"task {task.task_id!r} belongs to environment {task.env!r}, not {self.name!r}; "
                f"make it with make_env({task.env!r})"
            )
