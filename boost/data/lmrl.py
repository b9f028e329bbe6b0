"""LMRL-Gym-style trajectories: a list of ``{"state", "action", "reward", "done"}`` steps.

A step's ``state`` is the text the environment showed the agent before it acted (the new
observation, not the whole history), and ``action`` is the agent's reply. A step list becomes the
conversation ``[system?, user(state_0), assistant(action_0), user(state_1), ...]``; a step whose
state is empty or blank adds no user turn (the agent acted again without a new observation).
The trajectory's reward is the sum of the step rewards; the per-step rewards and the final ``done``
flag are kept in ``meta["lmrl"]``.

On disk a line is either the bare step list or an object::

    {"steps": [...], "source": str, "task_id": str | int, "meta": {...}, "system": str}
"""

from __future__ import annotations

from typing import Any

from boost.data.format import Trajectory, TrajectoryFormatError, check_finite_number, normalize_source

LMRL_KEYS = frozenset({"steps", "source", "task_id", "meta", "system"})
STEP_KEYS = ("state", "action", "reward", "done")


def _check_step(step: Any, k: int, last: bool) -> tuple[str, str, float, bool]:
    if not isinstance(step, dict):
        kind = type(step).__name__
        raise TrajectoryFormatError(f"steps[{k}] is {kind}, expected an object", "bad_lmrl_step")
    missing = [key for key in STEP_KEYS if key not in step]
    if missing:
        raise TrajectoryFormatError(f"steps[{k}] lacks {', '.join(missing)}", "bad_lmrl_step")
    state, action, done = step["state"], step["action"], step["done"]
    if not isinstance(state, str):
        kind = type(state).__name__
        raise TrajectoryFormatError(f"steps[{k}].state is {kind}, expected a string", "bad_content")
    if not isinstance(action, str):
        raise TrajectoryFormatError(
            f"steps[{k}].action is {type(action).__name__}, expected a string", "bad_content"
        )
    reward = check_finite_number(step["reward"], f"steps[{k}].reward")
    if not isinstance(done, bool):
        kind = type(done).__name__
        raise TrajectoryFormatError(f"steps[{k}].done is {kind}, expected true/false", "bad_lmrl_step")
    if done and not last:
        raise TrajectoryFormatError(
            f"steps[{k}].done is true but steps follow it: the episode ended early", "bad_lmrl_step"
        )
    return state, action, reward, done


def trajectory_from_lmrl_steps(
    steps: Any,
    *,
    source: str,
    task_id: str | int | None = None,
    meta: dict[str, Any] | None = None,
    system: str | None = None,
) -> Trajectory:
    """Convert a validated LMRL-Gym step list into a :class:`Trajectory` (see the module docstring)."""
    if not isinstance(steps, list) or not steps:
        raise TrajectoryFormatError("'steps' must be a non-empty list of step objects", "bad_lmrl_step")
    if meta is not None and not isinstance(meta, dict):
        raise TrajectoryFormatError(f"'meta' must be an object, got {type(meta).__name__}", "bad_meta")
    messages: list[dict[str, str]] = []
    if system is not None:
        if not isinstance(system, str):
            kind = type(system).__name__
            raise TrajectoryFormatError(f"'system' is {kind}, expected a string", "bad_content")
        messages.append({"role": "system", "content": system})
    step_rewards: list[float] = []
    done = False
    for k, step in enumerate(steps):
        state, action, reward, done = _check_step(step, k, last=k == len(steps) - 1)
        if state.strip():
            messages.append({"role": "user", "content": state})
        messages.append({"role": "assistant", "content": action})
        step_rewards.append(reward)
    full_meta = dict(meta or {})
    full_meta["lmrl"] = {"step_rewards": step_rewards, "done": done}
    return Trajectory(
        messages=messages, source=source, reward=sum(step_rewards), task_id=task_id, meta=full_meta
    )


def parse_lmrl_record(obj: Any, *, default_source: str | None) -> Trajectory:
    """Parse a bare step list or a ``{"steps": [...], ...}`` object (JSON nulls mean absent)."""
    if isinstance(obj, list):
        obj = {"steps": obj}
    if not isinstance(obj, dict):
        kind = type(obj).__name__
        raise TrajectoryFormatError(f"expected a step list or object, got {kind}", "not_an_object")
    for key in ("reward", "return"):
        if obj.get(key) is not None:
            raise TrajectoryFormatError(
                f"an LMRL-Gym record carries per-step rewards; a top-level {key!r} would be ambiguous",
                "bad_reward",
            )
    source = normalize_source(obj.get("source"))
    if source is None:
        if default_source is None:
            raise TrajectoryFormatError("missing 'source'", "missing_source")
        source = default_source
    return trajectory_from_lmrl_steps(
        obj.get("steps"),
        source=source,
        task_id=obj.get("task_id"),
        meta=obj.get("meta"),
        system=obj.get("system"),
    )


def is_lmrl_record(obj: Any) -> bool:
    """True for a bare list (of steps) or an object with ``steps`` and no ``messages``."""
    return isinstance(obj, list) or (isinstance(obj, dict) and "steps" in obj and "messages" not in obj)
