"""Real and synthetic trajectory generators with known ground truth.

Sources (the ``source`` field of each trajectory, what a user sees):

- ``real``: the expert on the target task distribution (a user has few of these).
- ``expert_shifted``: the expert on the shifted variant of the environment (task shift).
- ``eps<E>`` (e.g. ``eps0.3``): the expert taking a random action with probability E (quality).
- ``random``: the random policy.
- ``sticky``: a stuck agent: a random first action, repeated every turn (low loss, no skill).
- ``corrupt``: the expert with a share of its actions truncated or malformed (format errors).
- ``lm_rollout``: a language model acting through its chat template (see :mod:`boost.rollout.generation`).

Ground truth (generator, epsilon, shift, success, counts of random/corrupted/invalid actions) goes
into ``meta``; the trainer never reads it. Each source draws its own tasks and random streams from
``(seed, source)``, so adding or removing a source does not change the others.
"""

from __future__ import annotations

import math
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from boost.config import from_attributes
from boost.data.format import Trajectory
from boost.envs.base import EnvError, check_split
from boost.envs.episode import Episode, play_episode
from boost.envs.policies import (
    CORRUPTIONS,
    CorruptExpert,
    EpsilonExpert,
    StickyPolicy,
    expert_policy,
    random_policy,
)
from boost.envs.registry import make_env, shifted_env_name

if TYPE_CHECKING:
    from boost.rollout.generation import RolloutConfig

FIXED_SOURCES = ("real", "expert_shifted", "random", "sticky", "corrupt", "lm_rollout")
_EPS_SOURCE = re.compile(r"eps(\d+(?:\.\d+)?)")


def check_source(name: str) -> str:
    """``name`` if it is a known source, else an error that lists the valid ones."""
    match = _EPS_SOURCE.fullmatch(name)
    if match:
        epsilon = float(match.group(1))
        if not 0.0 < epsilon <= 1.0:
            raise EnvError(f"source {name!r}: epsilon must be in (0, 1], e.g. eps0.3")
        return name
    if name not in FIXED_SOURCES:
        raise EnvError(
            f"unknown source {name!r}; use {', '.join(FIXED_SOURCES)} or eps<E> with 0 < E <= 1 (e.g. eps0.3)"
        )
    return name


def parse_sources(spec: str) -> dict[str, int]:
    """``"real:32,eps0.3:200,random:100"`` -> ``{"real": 32, "eps0.3": 200, "random": 100}``."""
    counts: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, count = item.partition(":")
        if not sep or not count.strip().isdigit():
            raise EnvError(f"bad source {item!r}: write NAME:COUNT, e.g. real:32 or eps0.3:200")
        name = check_source(name.strip())
        if name in counts:
            raise EnvError(f"source {name!r} is given twice")
        counts[name] = int(count)
    if not counts:
        raise EnvError("no sources given: write e.g. real:32,eps0.3:200,random:100")
    return counts


@dataclass
class LMRolloutSettings:
    """How the ``lm_rollout`` source samples: a model directory (or ``"smollm2"``) and decoding."""

    model: str | None = None
    gguf_file: str | None = None
    chat_template: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32
    batch_size: int = 16
    device: str = "cpu"

    def rollout_config(self, **overrides: Any) -> RolloutConfig:
        """The :class:`~boost.rollout.generation.RolloutConfig` of these settings (decoding and batch
        size), ``overrides`` last (e.g. the seed); raises RolloutError naming a bad setting."""
        from boost.rollout.generation import RolloutConfig

        return from_attributes(RolloutConfig, self, **overrides)


@dataclass
class GeneratorConfig:
    """Settings of :func:`generate`.

    Attributes:
        env: registered environment name (the target task distribution).
        sources: trajectories to make per source (see the module docstring).
        split: task pool to draw from; ``real`` trajectories for validation come from ``validation``.
        shift_env: environment for ``expert_shifted`` (default: the registered shifted variant).
        corrupt_prob: per-action probability of corruption for ``corrupt``.
        corruptions: corruption kinds to draw from.
        seed: base seed of every task sample and random stream.
        games_dir: where TextWorld games are generated and cached.
        lm: settings of ``lm_rollout``.
    """

    env: str
    sources: dict[str, int]
    split: str = "train"
    shift_env: str | None = None
    corrupt_prob: float = 0.3
    corruptions: tuple[str, ...] = CORRUPTIONS
    seed: int = 0
    games_dir: str | None = None
    lm: LMRolloutSettings = field(default_factory=LMRolloutSettings)

    def __post_init__(self) -> None:
        check_split(self.split)
        for name, count in self.sources.items():
            check_source(name)
            if count < 0:
                raise EnvError(f"source {name!r}: count must be >= 0, got {count}")
        if not 0.0 < self.corrupt_prob <= 1.0:
            raise EnvError(f"corrupt_prob must be in (0, 1], got {self.corrupt_prob}")
        CorruptExpert(self.corrupt_prob, self.corruptions)  # validates the kinds
        if self.shift_env is not None and self.shift_env == self.env:
            raise EnvError(f"--shift-env {self.shift_env!r} is --env itself; name another variant or drop it")
        if self.sources.get("lm_rollout"):
            if not self.lm.model:
                raise EnvError(
                    "source lm_rollout needs a model: pass --model PATH (a checkpoint dir) or 'smollm2'"
                )
            from boost.rollout.generation import SMOLLM2

            # Bad model paths and decoding settings fail here, before any trajectory is generated.
            if self.lm.model != SMOLLM2 and not Path(self.lm.model).is_dir():
                raise EnvError(
                    f"--model {self.lm.model!r} is not a local folder; give a checkpoint folder "
                    f"(save_pretrained) or '{SMOLLM2}' for the packaged SmolLM2-135M-Instruct"
                )
            self.lm.rollout_config()


def _scripted(config: GeneratorConfig, source: str, count: int, progress: bool) -> list[Trajectory]:
    """Episodes of one scripted source, as trajectories."""
    env_name = config.env
    shift = None
    if source == "real" or source == "expert_shifted":
        policy, generator, epsilon = expert_policy, "expert", 0.0
        if source == "expert_shifted":
            env_name = shift = config.shift_env or shifted_env_name(config.env)
    elif source == "random":
        policy, generator, epsilon = random_policy, "random", 1.0
    elif source == "sticky":
        policy, generator, epsilon = StickyPolicy(), "sticky", 1.0
    elif source == "corrupt":
        policy, generator, epsilon = CorruptExpert(config.corrupt_prob, config.corruptions), "corrupt", 0.0
    else:
        epsilon = float(_EPS_SOURCE.fullmatch(source).group(1))
        policy, generator = EpsilonExpert(epsilon), "eps_expert"
    env = make_env(env_name, games_dir=config.games_dir)
    try:
        tasks = env.sample_tasks(config.split, count, seed=hash_seed(config.seed, source))
        out = []
        for i, task in enumerate(tqdm(tasks, desc=source, disable=not progress, leave=False)):
            if hasattr(policy, "reset_counts"):
                policy.reset_counts()
            episode = play_episode(env, task, policy, random.Random(f"{config.seed}|{source}|{i}"))
            meta: dict[str, Any] = {"generator": generator, "epsilon": epsilon, "shift": shift}
            if generator == "corrupt":
                meta["corrupt_prob"] = config.corrupt_prob
            meta.update(getattr(policy, "counts", {}))
            out.append(episode.to_trajectory("real" if source == "real" else source, meta))
        return out
    finally:
        env.close()


def hash_seed(seed: int, source: str) -> int:
    """A per-source seed, stable across runs and machines (unlike ``hash()``)."""
    return random.Random(f"{seed}|{source}").randrange(2**31)


def _lm_rollouts(config: GeneratorConfig, count: int, progress: bool) -> list[Trajectory]:
    from boost.rollout.generation import load_model, rollout

    lm = config.lm
    model, tokenizer = load_model(
        lm.model, gguf_file=lm.gguf_file, chat_template=lm.chat_template, device=lm.device
    )
    env = make_env(config.env, games_dir=config.games_dir)
    tasks = env.sample_tasks(config.split, count, seed=hash_seed(config.seed, "lm_rollout"))
    env.close()
    rollout_config = lm.rollout_config(seed=hash_seed(config.seed, "lm_rollout"))
    episodes: list[Episode] = rollout(
        model, tokenizer, config.env, tasks, rollout_config, games_dir=config.games_dir, progress=progress
    )
    meta = {
        "generator": "lm_rollout",
        "epsilon": None,
        "shift": None,
        "model": lm.model,
        "temperature": lm.temperature,
    }
    return [episode.to_trajectory("lm_rollout", meta) for episode in episodes]


def generate(config: GeneratorConfig, progress: bool = True) -> list[Trajectory]:
    """All trajectories of ``config.sources``, source by source in the order given."""
    trajectories: list[Trajectory] = []
    for source, count in config.sources.items():
        if count == 0:
            continue
        if source == "lm_rollout":
            trajectories += _lm_rollouts(config, count, progress)
        else:
            trajectories += _scripted(config, source, count, progress)
    return trajectories


def summarize(trajectories: list[Trajectory]) -> dict[str, dict[str, float]]:
    """Per source: count, success rate, mean return, mean turns, invalid actions per turn, tasks."""
    by_source: dict[str, list[Trajectory]] = defaultdict(list)
    for traj in trajectories:
        by_source[traj.source].append(traj)
    summary = {}
    for source, group in by_source.items():
        turns = sum(t.meta.get("turns", 0) for t in group)
        summary[source] = {
            "count": len(group),
            "success_rate": sum(bool(t.meta.get("success")) for t in group) / len(group),
            "mean_return": math.fsum(t.reward or 0.0 for t in group) / len(group),
            "mean_turns": turns / len(group),
            "invalid_per_turn": sum(t.meta.get("n_invalid", 0) for t in group) / max(turns, 1),
            "distinct_tasks": len({t.task_id for t in group}),
        }
    return summary


def format_summary(summary: dict[str, dict[str, float]]) -> str:
    """The summary as an aligned text table."""
    header = f"{'source':<16}{'count':>7}{'success':>9}{'return':>9}{'turns':>8}{'invalid':>9}{'tasks':>7}"
    lines = [header, "-" * len(header)]
    for source, row in summary.items():
        lines.append(
            f"{source:<16}{row['count']:>7d}{row['success_rate']:>9.3f}{row['mean_return']:>9.3f}"
            f"{row['mean_turns']:>8.2f}{row['invalid_per_turn']:>9.3f}{row['distinct_tasks']:>7d}"
        )
    return "\n".join(lines)
