"""Split trajectories into train / validation / test by task (no task in two splits).

Each task goes to a split by a hash of its key and the seed alone: ``u = sha256(f"{seed}|{key}")``
read as a number in [0, 1); ``u < validation`` is validation, ``u < validation + test`` is test, and
the rest is train. So the split of a task never depends on which other tasks are present: losing a
record (a bad line) or adding data never moves another task between splits. The fractions hold in
expectation, not exactly. Only when a split with a positive fraction would be empty does the split
look at the other tasks: the train task whose hash is closest moves there (and train keeps at least
one task); too few tasks for that is an error, never an empty split.

A task's key is its ``task_id`` unless ``key`` maps it to something else: the trainer uses
:func:`environment_task_keys`, the content key of the environment that built the task (the grid,
the secret number), so that two ids of the same instance count as one task.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from boost.data.format import Trajectory

log = logging.getLogger(__name__)


@dataclass
class TaskSplit:
    """Trajectories per split, each list in input order, and the task ids that went to each split."""

    train: list[Trajectory]
    validation: list[Trajectory]
    test: list[Trajectory]
    train_tasks: list[str]
    validation_tasks: list[str]
    test_tasks: list[str]


def task_hash(key: str, seed: int) -> float:
    """The task's place in [0, 1): a stable hash of its key and the seed (the same on every machine)."""
    digest = hashlib.sha256(f"{seed}|{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _check_enough(num_keys: int, validation: float, test: float) -> None:
    needed = 1 + (validation > 0) + (test > 0)
    if num_keys < needed:
        raise ValueError(
            f"only {num_keys} distinct task ids: cannot give train and every split with a positive "
            f"fraction (validation={validation}, test={test}) at least one task; add tasks or set a "
            "fraction to 0"
        )


def _assign(keys: Sequence[str], validation: float, test: float, seed: int) -> dict[str, str]:
    """Task key -> split name, by hash thresholds, with the empty-split repair of the module docstring."""
    place = {key: task_hash(key, seed) for key in keys}
    where = {
        key: "validation" if u < validation else "test" if u < validation + test else "train"
        for key, u in place.items()
    }

    def members(name: str) -> list[str]:
        return sorted((k for k in keys if where[k] == name), key=lambda k: place[k])

    def largest_of_a_crowded_split(names: Sequence[str]) -> str:  # never empties a split
        return max((k for k in keys if where[k] in names and len(members(where[k])) > 1), key=place.get)

    for name, fraction in (("validation", validation), ("test", test)):
        if fraction > 0 and not members(name):
            donors = members("train")  # the smallest hash of train: the nearest to the split's range
            where[donors[0] if len(donors) > 1 else largest_of_a_crowded_split(("validation", "test"))] = name
    if not members("train"):
        where[largest_of_a_crowded_split(("validation", "test"))] = "train"
    return where


def split_by_task(
    trajectories: Sequence[Trajectory],
    *,
    validation: float = 0.1,
    test: float = 0.1,
    seed: int = 0,
    key: Mapping[str, str] | Callable[[str], str] | None = None,
) -> TaskSplit:
    """Assign whole tasks to train / validation / test by a hash of each task's key.

    Args:
        trajectories: records that all carry a ``task_id``.
        validation, test: expected fractions of the *tasks* (not trajectories) for those splits;
            train gets the rest.
        seed: the hash seed; the same task and seed always land in the same split.
        key: task id -> the key that is hashed (a mapping or a function); ids with one key are one
            task. Default: the task id itself.

    Raises:
        ValueError: a trajectory has no ``task_id`` (its task could land in two splits), or the
            fractions are not in [0, 1) with ``validation + test < 1``, or there are too few tasks to
            give every split with a positive fraction one task.
    """
    if not (0 <= validation < 1 and 0 <= test < 1 and validation + test < 1):
        raise ValueError(f"need 0 <= validation, test and validation + test < 1; got {validation}, {test}")
    missing = [i for i, t in enumerate(trajectories) if t.task_id is None]
    if missing:
        raise ValueError(
            f"{len(missing)} trajectories have no task_id (first at index {missing[0]}); a split by task "
            "needs one on every trajectory: set task_id when generating or converting the data"
        )
    key_of = _key_function(key)
    ids = sorted({t.task_id for t in trajectories})
    keys = sorted({key_of(task) for task in ids})
    _check_enough(len(keys), validation, test)
    where = _assign(keys, validation, test, seed)
    parts: dict[str, list[Trajectory]] = {"train": [], "validation": [], "test": []}
    for traj in trajectories:
        parts[where[key_of(traj.task_id)]].append(traj)
    tasks = {name: sorted(task for task in ids if where[key_of(task)] == name) for name in parts}
    return TaskSplit(
        train=parts["train"],
        validation=parts["validation"],
        test=parts["test"],
        train_tasks=tasks["train"],
        validation_tasks=tasks["validation"],
        test_tasks=tasks["test"],
    )


def _key_function(key: Mapping[str, str] | Callable[[str], str] | None) -> Callable[[str], str]:
    if key is None:
        return lambda task: task
    if isinstance(key, Mapping):
        return lambda task: key.get(task, task)
    return key


def environment_task_keys(task_ids: Iterable[str]) -> dict[str, str]:
    """Task id -> the content key of the task, for ids of a registered environment (``"<env>/<seed>"``).

    The key says what the task *is* (gridnav's grid, the secret number of a guessing game), so two
    seeds that build the same instance get one key. Ids that no registered environment can rebuild
    (other data, or an environment whose optional package is missing) map to themselves; a warning
    counts the latter. Each environment is built once and closed afterwards.
    """
    from boost.envs import EnvError, make_env
    from boost.envs.registry import REGISTRY

    by_env: dict[str, list[str]] = {}
    keys: dict[str, str] = {}
    for task in set(task_ids):
        name = task.rpartition("/")[0]
        if name in REGISTRY:
            by_env.setdefault(name, []).append(task)
        else:
            keys[task] = task
    for name, tasks in sorted(by_env.items()):
        try:
            env = make_env(name)
        except (EnvError, ImportError) as err:
            log.warning("%d task ids of %r are split by id, not content: %s", len(tasks), name, err)
            keys.update((task, task) for task in tasks)
            continue
        try:
            for task in tasks:
                try:
                    keys[task] = env.task(task).key
                except EnvError:  # e.g. "<env>/abc": not a seed, so not one of the environment's tasks
                    keys[task] = task
        finally:
            env.close()
    return keys
