"""Multi-turn trajectory data: format, validation, tokenisation and packing.

JSONL / LMRL-Gym / HF files -> :func:`read_trajectories` (validated :class:`Trajectory` records and a
:class:`ReadReport`) -> :func:`split_by_task`.
"""

from boost.data.format import REASONS, ROLES, Trajectory, TrajectoryFormatError, write_jsonl
from boost.data.lmrl import trajectory_from_lmrl_steps
from boost.data.reader import ReadReport, TrajectoryReadError, read_records, read_trajectories
from boost.data.split import TaskSplit, split_by_task

__all__ = [
    "REASONS",
    "ROLES",
    "ReadReport",
    "TaskSplit",
    "Trajectory",
    "TrajectoryFormatError",
    "TrajectoryReadError",
    "read_records",
    "read_trajectories",
    "split_by_task",
    "trajectory_from_lmrl_steps",
    "write_jsonl",
]
