"""Multi-turn trajectory data: format, validation, tokenisation and packing."""

from boost.data.format import ROLES, Trajectory, TrajectoryFormatError, write_jsonl

__all__ = ["ROLES", "Trajectory", "TrajectoryFormatError", "write_jsonl"]
