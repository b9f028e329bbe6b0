"""Split trajectories into train / validation / test by task id (no task in two splits).

The split is over the sorted set of task ids, shuffled with ``random.Random(seed)``, so it depends
only on the ids present and the seed, never on the input order. Each split gets
``round(fraction * num_tasks)`` tasks (train takes the remainder); every split with a positive
fraction gets at least one task, and too few tasks for that is an error, never an empty split.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from boost.data.format import Trajectory


@dataclass
class TaskSplit:
    """Trajectories per split, each list in input order, and the task ids that went to each split."""

    train: list[Trajectory]
    validation: list[Trajectory]
    test: list[Trajectory]
    train_tasks: list[str]
    validation_tasks: list[str]
    test_tasks: list[str]


def _task_counts(num_tasks: int, validation: float, test: float) -> tuple[int, int]:
    needed = 1 + (validation > 0) + (test > 0)
    if num_tasks < needed:
        raise ValueError(
            f"only {num_tasks} distinct task ids: cannot give train and every split with a positive "
            f"fraction (validation={validation}, test={test}) at least one task; add tasks or set a "
            "fraction to 0"
        )
    num_val = max(round(validation * num_tasks), 1 if validation > 0 else 0)
    num_test = max(round(test * num_tasks), 1 if test > 0 else 0)
    while num_val + num_test >= num_tasks:  # train keeps at least one task
        if num_val > 1 and num_val >= num_test:
            num_val -= 1
        else:
            num_test -= 1
    return num_val, num_test


def split_by_task(
    trajectories: Sequence[Trajectory],
    *,
    validation: float = 0.1,
    test: float = 0.1,
    seed: int = 0,
) -> TaskSplit:
    """Assign whole tasks to train / validation / test.

    Args:
        trajectories: records that all carry a ``task_id``.
        validation, test: fractions of the *tasks* (not trajectories) for those splits; train gets the rest.
        seed: the shuffle seed; the same ids and seed always give the same split.

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
    tasks = sorted({t.task_id for t in trajectories})
    random.Random(seed).shuffle(tasks)
    num_val, num_test = _task_counts(len(tasks), validation, test)
    val_tasks, test_tasks = tasks[:num_val], tasks[num_val : num_val + num_test]
    train_tasks = tasks[num_val + num_test :]
    where = {task: "validation" for task in val_tasks} | {task: "test" for task in test_tasks}
    parts: dict[str, list[Trajectory]] = {"train": [], "validation": [], "test": []}
    for traj in trajectories:
        parts[where.get(traj.task_id, "train")].append(traj)
    return TaskSplit(
        train=parts["train"],
        validation=parts["validation"],
        test=parts["test"],
        train_tasks=sorted(train_tasks),
        validation_tasks=sorted(val_tasks),
        test_tasks=sorted(test_tasks),
    )
