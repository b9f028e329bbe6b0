"""The on-disk trajectory format and the in-memory :class:`Trajectory` record.

One JSON object per line, compatible with TRL's conversational format::

    {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": str}, ...],
     "source": "real" | <name of a synthetic generator>,
     "reward": float (optional; "return" is accepted as an alias),
     "task_id": str (optional),
     "meta": {...} (optional, free; ground truth for analysis only, never read by the trainer)}
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "tool")


class TrajectoryFormatError(ValueError):
    """A record that does not follow the trajectory format; the message says why."""


@dataclass
class Trajectory:
    """One multi-turn episode.

    Attributes:
        messages: list of ``{"role": str, "content": str}`` in turn order; roles from :data:`ROLES`.
        source: ``"real"`` or the name of the synthetic generator that produced it.
        reward: the episode return, a finite float, or ``None`` when unknown.
        task_id: identifies the task instance; splits never put one task id in two splits.
        meta: free-form metadata (ground truth for analysis; the trainer never reads it).
    """

    messages: list[dict[str, str]]
    source: str = "real"
    reward: float | None = None
    task_id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def is_real(self) -> bool:
        return self.source == "real"

    def validate(self) -> None:
        """Raise :class:`TrajectoryFormatError` naming the first problem found."""
        if not isinstance(self.messages, list) or not self.messages:
            raise TrajectoryFormatError("'messages' must be a non-empty list of {role, content} objects")
        for k, m in enumerate(self.messages):
            if not isinstance(m, dict):
                raise TrajectoryFormatError(f"messages[{k}] is {type(m).__name__}, expected an object")
            if "role" not in m:
                raise TrajectoryFormatError(f"messages[{k}] has no 'role'")
            if m["role"] not in ROLES:
                raise TrajectoryFormatError(
                    f"messages[{k}] has unknown role {m['role']!r}; expected one of {', '.join(ROLES)}"
                )
            content = m.get("content")
            if not isinstance(content, str):
                raise TrajectoryFormatError(
                    f"messages[{k}] content is {type(content).__name__}, expected a string"
                )
            if not content.strip():
                raise TrajectoryFormatError(f"messages[{k}] ({m['role']}) has empty content")
        if not any(m["role"] == "assistant" for m in self.messages):
            raise TrajectoryFormatError("trajectory has no assistant turn: nothing to train on")
        if not isinstance(self.source, str) or not self.source:
            raise TrajectoryFormatError("'source' must be a non-empty string")
        if self.reward is not None:
            if isinstance(self.reward, bool) or not isinstance(self.reward, (int, float)):
                raise TrajectoryFormatError(f"'reward' must be a number, got {type(self.reward).__name__}")
            if not math.isfinite(self.reward):
                raise TrajectoryFormatError(f"'reward' must be finite, got {self.reward}")
            self.reward = float(self.reward)
        if self.task_id is not None and not isinstance(self.task_id, str):
            self.task_id = str(self.task_id)
        if not isinstance(self.meta, dict):
            raise TrajectoryFormatError(f"'meta' must be an object, got {type(self.meta).__name__}")

    @classmethod
    def from_dict(cls, obj: Any) -> Trajectory:
        """Parse one decoded JSON object (see the module docstring for the schema)."""
        if not isinstance(obj, dict):
            raise TrajectoryFormatError(f"expected a JSON object, got {type(obj).__name__}")
        if "messages" not in obj:
            raise TrajectoryFormatError("missing 'messages'")
        reward = obj.get("reward", obj.get("return"))
        return cls(
            messages=[dict(m) if isinstance(m, dict) else m for m in obj["messages"]],
            source=obj.get("source", "real"),
            reward=reward,
            task_id=obj.get("task_id"),
            meta=obj.get("meta") or {},
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"messages": self.messages, "source": self.source}
        if self.reward is not None:
            out["reward"] = self.reward
        if self.task_id is not None:
            out["task_id"] = self.task_id
        if self.meta:
            out["meta"] = self.meta
        return out


def write_jsonl(path: str | os.PathLike, trajectories: Iterable[Trajectory]) -> int:
    """Write trajectories as JSONL atomically (temp file, then rename). Returns the count written."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    n = 0
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".jsonl", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for traj in trajectories:
                f.write(json.dumps(traj.to_dict(), ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return n
