"""Multi-turn text environments, scripted policies and episodes.

Built in (no dependencies): ``gridnav`` / ``gridnav-large`` (grid navigation) and ``guess`` /
``guess-wide`` (number guessing). Adapters (``pip install boost[envs]``): ``textworld`` /
``textworld-large`` and ``textarena:<game>`` for GuessTheNumber, TowerOfHanoi, Mastermind,
Minesweeper and FrozenLake. See :func:`env_names`.
"""

from boost.envs.base import SPLITS, Env, EnvError, Step, Task, split_of
from boost.envs.episode import END_REASONS, Episode, play_episode
from boost.envs.policies import CorruptExpert, EpsilonExpert, StickyPolicy, expert_policy, random_policy
from boost.envs.registry import BUILTIN_ENVS, describe_env, env_names, make_env, shifted_env_name

__all__ = [
    "BUILTIN_ENVS",
    "END_REASONS",
    "SPLITS",
    "CorruptExpert",
    "Env",
    "EnvError",
    "Episode",
    "EpsilonExpert",
    "StickyPolicy",
    "Step",
    "Task",
    "describe_env",
    "env_names",
    "expert_policy",
    "make_env",
    "play_episode",
    "random_policy",
    "shifted_env_name",
    "split_of",
]
