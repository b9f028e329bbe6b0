"""Named environments: the built-in games, their shifted variants, and the adapters.

Each built-in game also has a ``-compact`` view (``gridnav-compact``, ...): the same rules in short
observations for small models (the CPU preset's default; see :mod:`boost.envs.gridnav`), and so does
textarena's FrozenLake (``textarena:FrozenLake-v0-compact``; see :mod:`boost.envs.textarena_env`).

Every name has a *shifted* partner (other sizes or rules) used to generate task-shifted synthetic
data: ``shifted_env_name("gridnav") == "gridnav-large"``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from boost.envs.base import COMPACT_SUFFIX, Env, EnvError
from boost.envs.gridnav import GridNavConfig, GridNavEnv
from boost.envs.guess import GuessConfig, GuessEnv
from boost.envs.textarena_env import COMPACT_GAMES as TEXTARENA_COMPACT_GAMES
from boost.envs.textarena_env import GAMES as TEXTARENA_GAMES
from boost.envs.textarena_env import PREFIX as TEXTARENA_PREFIX


@dataclass(frozen=True)
class EnvSpec:
    name: str
    build: Callable[[Path | None], Env]  # games_dir -> env
    shift: str
    description: str


def _builtin(name: str, shift: str, description: str, env_class: type, config: object) -> EnvSpec:
    return EnvSpec(name, lambda games_dir: env_class(name=name, config=config), shift, description)


def _compact(spec_args: tuple[str, str, str, type, object]) -> tuple[EnvSpec, EnvSpec]:
    """A built-in game and its ``-compact`` view (the same tasks in short observations)."""
    name, shift, description, env_class, config = spec_args
    return (
        _builtin(name, shift, description, env_class, config),
        _builtin(
            name + COMPACT_SUFFIX,
            shift + COMPACT_SUFFIX,
            description + ", compact observations",
            env_class,
            replace(config, compact=True),
        ),
    )


def _textworld(name: str, shift: str, description: str, **options: int) -> EnvSpec:
    def build(games_dir: Path | None) -> Env:
        from boost.envs.textworld_env import TextWorldConfig, TextWorldEnv

        return TextWorldEnv(name=name, config=TextWorldConfig(**options), games_dir=games_dir)

    return EnvSpec(name, build, shift, description)


def _textarena(game_id: str, compact: bool = False) -> EnvSpec:
    def build(games_dir: Path | None) -> Env:
        from boost.envs.textarena_env import TextArenaEnv

        return TextArenaEnv(game_id, compact=compact)

    suffix = COMPACT_SUFFIX if compact else ""
    name = TEXTARENA_PREFIX + game_id + suffix
    description = f"textarena's {game_id}" + (", compact observations" if compact else "")
    return EnvSpec(name, build, TEXTARENA_PREFIX + TEXTARENA_GAMES[game_id] + suffix, description)


_SPECS = [
    *_compact(("gridnav", "gridnav-large", "5x5 grid navigation, 5 walls", GridNavEnv, GridNavConfig())),
    *_compact(
        (
            "gridnav-large",
            "gridnav",
            "7x7 grid navigation, 12 walls",
            GridNavEnv,
            GridNavConfig(size=7, n_walls=12, min_distance=4, max_turns=28),
        )
    ),
    *_compact(("guess", "guess-wide", "guess a number in a range of 16-64", GuessEnv, GuessConfig())),
    *_compact(
        (
            "guess-wide",
            "guess",
            "guess a number in a range of 100-500",
            GuessEnv,
            GuessConfig(min_width=100, max_width=500, max_low=1000),
        )
    ),
    _textworld("textworld", "textworld-large", "TextWorld: 3 rooms, 4 objects, quest length 3"),
    _textworld(
        "textworld-large",
        "textworld",
        "TextWorld: 6 rooms, 8 objects, quest length 5",
        nb_rooms=6,
        nb_objects=8,
        quest_length=5,
        max_turns=40,
    ),
    *(_textarena(game_id) for game_id in TEXTARENA_GAMES),
    *(_textarena(game_id, compact=True) for game_id in TEXTARENA_COMPACT_GAMES),
]
REGISTRY: dict[str, EnvSpec] = {spec.name: spec for spec in _SPECS}
BUILTIN_ENVS = ("gridnav", "gridnav-large", "guess", "guess-wide")
COMPACT_ENVS = tuple(name + COMPACT_SUFFIX for name in BUILTIN_ENVS)


def compact_env_name(name: str) -> str:
    """The ``-compact`` view of a built-in environment (``name`` itself if it is one already)."""
    if name in COMPACT_ENVS:
        return name
    if name not in BUILTIN_ENVS:
        raise EnvError(
            f"environment {name!r} has no compact view; compact observations exist for {', '.join(BUILTIN_ENVS)}"
        )
    return name + COMPACT_SUFFIX


def env_names() -> list[str]:
    return list(REGISTRY)


def _spec(name: str) -> EnvSpec:
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise EnvError(f"unknown environment {name!r}{hint}; known environments: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def make_env(name: str, games_dir: str | Path | None = None) -> Env:
    """A fresh environment by registered name. ``games_dir``: where TextWorld games are cached."""
    return _spec(name).build(Path(games_dir) if games_dir is not None else None)


def shifted_env_name(name: str) -> str:
    """The registered variant of ``name`` with other sizes or rules (for task-shifted data)."""
    return _spec(name).shift


def describe_env(name: str) -> str:
    return _spec(name).description
