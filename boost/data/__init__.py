"""Multi-turn trajectory data: format, validation, tokenisation and packing.

JSONL / LMRL-Gym / HF files -> :func:`read_trajectories` (validated :class:`Trajectory` records and a
:class:`ReadReport`) -> :func:`split_by_task` -> :func:`tokenize_trajectories` (turn-by-turn ids,
agent mask) -> :class:`TrajectoryPacker` (:class:`PackedBatch` under a token budget).
"""

from boost.data.attention import block_causal_mask
from boost.data.format import REASONS, ROLES, Trajectory, TrajectoryFormatError, write_jsonl
from boost.data.lmrl import trajectory_from_lmrl_steps
from boost.data.packing import PackedBatch, PackingConfig, PackingStats, TrajectoryPacker
from boost.data.reader import ReadReport, TrajectoryReadError, read_records, read_trajectories
from boost.data.split import TaskSplit, split_by_task
from boost.data.tokenize import (
    CHATML_TEMPLATE,
    IGNORE_INDEX,
    ChatTemplateError,
    TokenizeConfig,
    TokenizedTrajectory,
    TokenizeReport,
    TurnTokenizer,
    tokenize_trajectories,
)

__all__ = [
    "CHATML_TEMPLATE",
    "IGNORE_INDEX",
    "REASONS",
    "ROLES",
    "ChatTemplateError",
    "PackedBatch",
    "PackingConfig",
    "PackingStats",
    "ReadReport",
    "TaskSplit",
    "TokenizeConfig",
    "TokenizeReport",
    "TokenizedTrajectory",
    "Trajectory",
    "TrajectoryFormatError",
    "TrajectoryPacker",
    "TrajectoryReadError",
    "TurnTokenizer",
    "block_causal_mask",
    "read_records",
    "read_trajectories",
    "split_by_task",
    "tokenize_trajectories",
    "trajectory_from_lmrl_steps",
    "write_jsonl",
]
