"""The on-disk trajectory format and the in-memory :class:`Trajectory` record.

One JSON object per line, compatible with TRL's conversational format::

    {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": str}, ...],
     "source": "real" | <name of a synthetic generator>,
     "reward": float (optional; "return" is accepted as an alias),
     "task_id": str (optional),
     "meta": {...} (optional, free; ground truth for analysis only, never read by the trainer)}

Every validation failure raises :class:`TrajectoryFormatError` whose ``reason`` is a short
machine-readable tag (one of :data:`REASONS`) so that readers can count skipped records per reason.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from boost.atomic import replace_atomic

ROLES = ("system", "user", "assistant", "tool")

# Top-level keys of a record that the format defines; anything else is reported by the readers.
KNOWN_KEYS = frozenset({"messages", "source", "reward", "return", "task_id", "meta"})

# Message keys the trainer reads. Other keys (e.g. "name") are kept and passed to the chat template,
# and the readers count them; the keys below carry agent output that the tokeniser would never train
# on (templates render them outside the content, or drop them), so such a message is refused.
MESSAGE_KEYS = frozenset({"role", "content"})
UNSUPPORTED_MESSAGE_KEYS = frozenset({"tool_calls", "function_call"})

# reason tag -> how to fix it. Readers print the hint next to the file and line.
REASONS: dict[str, str] = {
    "invalid_utf8": "re-encode the file as UTF-8",
    "malformed_json": "write exactly one complete JSON object per line",
    "malformed_parquet": "the file is not a readable Parquet file; rewrite it (e.g. Dataset.to_parquet)",
    "not_an_object": "each line must be a JSON object with a 'messages' list (or an LMRL-Gym step list)",
    "missing_messages": "add a 'messages' list of {role, content} objects",
    "bad_messages": "'messages' must be a non-empty list of {role, content} objects",
    "missing_role": "give every message a 'role'",
    "unknown_role": f"use one of the roles {', '.join(ROLES)}",
    "bad_content": "message content must be a string",
    "empty_content": "remove the empty message or give it text",
    "invalid_unicode": "the text holds a lone surrogate (unpaired \\ud800-\\udfff escape); fix the writer",
    "no_assistant_turn": "a trajectory needs at least one assistant turn to train on; drop it upstream",
    "missing_source": "add 'source' (\"real\" or the generator name), or pass default_source= to the reader",
    "bad_source": "'source' must be a non-empty string (\"real\" exactly for real data)",
    "unsupported_message_key": "write the tool call as the message's text content: the trainer only "
    "trains on 'content'",
    "bad_reward": "'reward' must be a finite number (or absent/null when unknown)",
    "bad_task_id": "'task_id' must be a string or an integer",
    "bad_meta": "'meta' must be a JSON object",
    "empty_file": "the file holds no record: check the path, or the program that wrote it",
    "bad_lmrl_step": "each LMRL-Gym step is {state: str, action: str, reward: finite number, done: bool}",
}


def normalize_source(source: Any) -> Any:
    """A source name as written in a file, normalised: outer whitespace removed, and any spelling of
    ``real`` in another case (``"Real"``, ``" REAL "``) becomes ``"real"``. Non-strings pass through
    (the format check rejects them)."""
    if not isinstance(source, str):
        return source
    source = source.strip()
    return "real" if source.casefold() == "real" else source


class TrajectoryFormatError(ValueError):
    """A record that does not follow the trajectory format; the message says why.

    ``reason`` is a tag from :data:`REASONS` (``"invalid"`` when the raiser gave none).
    """

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


def check_finite_number(value: Any, what: str) -> float:
    """Return ``value`` as a float, or raise ``bad_reward`` if it is not a finite real number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TrajectoryFormatError(f"{what} must be a number, got {type(value).__name__}", "bad_reward")
    try:
        as_float = float(value)
    except OverflowError:
        raise TrajectoryFormatError(f"{what} is too large to be a float: {value}", "bad_reward") from None
    if not math.isfinite(as_float):
        raise TrajectoryFormatError(f"{what} must be finite, got {value}", "bad_reward")
    return as_float


def _check_encodable(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise TrajectoryFormatError(
            f"{where} holds a character that is not valid Unicode at index {err.start}", "invalid_unicode"
        ) from None


def _without_null_extras(message: dict[str, Any]) -> dict[str, Any]:
    """Copy a message without extra keys whose value is null.

    Columnar files (Parquet, or JSON written by HF ``datasets``) give every message every key seen in
    any message, null where absent; those nulls carry nothing and would confuse chat templates that
    test ``message.name is defined``. ``role`` and ``content`` are kept so their checks still fire.
    """
    return {k: v for k, v in message.items() if v is not None or k in ("role", "content")}


@dataclass
class Trajectory:
    """One multi-turn episode.

    Attributes:
        messages: list of ``{"role": str, "content": str}`` in turn order; roles from :data:`ROLES`.
            Extra keys of a message (e.g. ``"name"``) are kept and passed to the chat template.
        source: ``"real"`` or the name of the synthetic generator that produced it.
        reward: the episode return, a finite float, or ``None`` when unknown.
        task_id: identifies the task instance; splits never put one task id in two splits.
        meta: free-form metadata (ground truth for analysis; the trainer never reads it).
        origin: where it was read (``"path:line"``), for messages about it; not part of the data.
    """

    messages: list[dict[str, str]]
    source: str = "real"
    reward: float | None = None
    task_id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    origin: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def is_real(self) -> bool:
        return self.source == "real"

    def validate(self) -> None:
        """Raise :class:`TrajectoryFormatError` naming the first problem found."""
        if not isinstance(self.messages, list) or not self.messages:
            raise TrajectoryFormatError(
                "'messages' must be a non-empty list of {role, content} objects", "bad_messages"
            )
        for k, m in enumerate(self.messages):
            if not isinstance(m, dict):
                raise TrajectoryFormatError(
                    f"messages[{k}] is {type(m).__name__}, expected an object", "bad_messages"
                )
            if "role" not in m or m["role"] is None:
                raise TrajectoryFormatError(f"messages[{k}] has no 'role'", "missing_role")
            unsupported = sorted(UNSUPPORTED_MESSAGE_KEYS & m.keys())
            if unsupported:
                raise TrajectoryFormatError(
                    f"messages[{k}] carries {unsupported[0]!r}, which the chat template would render outside "
                    "the trained content or drop",
                    "unsupported_message_key",
                )
            if m["role"] not in ROLES:
                raise TrajectoryFormatError(
                    f"messages[{k}] has unknown role {m['role']!r}; expected one of {', '.join(ROLES)}",
                    "unknown_role",
                )
            content = m.get("content")
            if not isinstance(content, str):
                raise TrajectoryFormatError(
                    f"messages[{k}] content is {type(content).__name__}, expected a string", "bad_content"
                )
            if not content.strip():
                raise TrajectoryFormatError(f"messages[{k}] ({m['role']}) has empty content", "empty_content")
            _check_encodable(content, f"messages[{k}] content")
        if not any(m["role"] == "assistant" for m in self.messages):
            raise TrajectoryFormatError(
                "trajectory has no assistant turn: nothing to train on", "no_assistant_turn"
            )
        if not isinstance(self.source, str) or not self.source.strip():
            raise TrajectoryFormatError("'source' must be a non-empty string", "bad_source")
        if normalize_source(self.source) != self.source:
            raise TrajectoryFormatError(
                f"'source' {self.source!r} differs from {normalize_source(self.source)!r} only in case or "
                "outer whitespace; write the normalised name (the readers normalise it for you)",
                "bad_source",
            )
        _check_encodable(self.source, "'source'")
        if self.reward is not None:
            self.reward = check_finite_number(self.reward, "'reward'")
        if self.task_id is not None:
            if isinstance(self.task_id, bool) or not isinstance(self.task_id, (str, int)):
                raise TrajectoryFormatError(
                    f"'task_id' must be a string or an integer, got {type(self.task_id).__name__}",
                    "bad_task_id",
                )
            self.task_id = str(self.task_id)
            _check_encodable(self.task_id, "'task_id'")
        if not isinstance(self.meta, dict):
            kind = type(self.meta).__name__
            raise TrajectoryFormatError(f"'meta' must be an object, got {kind}", "bad_meta")

    @classmethod
    def from_dict(cls, obj: Any, *, default_source: str | None = "real") -> Trajectory:
        """Parse one decoded JSON object (see the module docstring for the schema).

        A JSON ``null`` for ``source``, ``reward``, ``return``, ``task_id`` or ``meta`` means absent.
        A missing ``source`` becomes ``default_source``; with ``default_source=None`` it is an error
        (the readers do that, so that unlabeled synthetic data is never mistaken for real data).
        """
        if not isinstance(obj, dict):
            raise TrajectoryFormatError(f"expected a JSON object, got {type(obj).__name__}", "not_an_object")
        if "messages" not in obj:
            raise TrajectoryFormatError("missing 'messages'", "missing_messages")
        reward, ret = obj.get("reward"), obj.get("return")
        if reward is not None and ret is not None and reward != ret:
            raise TrajectoryFormatError(
                f"'reward' ({reward!r}) and its alias 'return' ({ret!r}) disagree; give one", "bad_reward"
            )
        source = normalize_source(obj.get("source"))
        if source is None:
            if default_source is None:
                raise TrajectoryFormatError("missing 'source'", "missing_source")
            source = default_source
        messages = obj["messages"]
        if isinstance(messages, list):
            messages = [_without_null_extras(m) if isinstance(m, dict) else m for m in messages]
        meta = obj.get("meta")
        return cls(
            messages=messages,
            source=source,
            reward=reward if reward is not None else ret,
            task_id=obj.get("task_id"),
            meta={} if meta is None else meta,
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
    written = 0

    def write(tmp: str) -> None:
        nonlocal written
        with open(tmp, "w", encoding="utf-8") as f:
            for traj in trajectories:
                f.write(json.dumps(traj.to_dict(), ensure_ascii=False) + "\n")
                written += 1

    replace_atomic(path, write)
    return written
