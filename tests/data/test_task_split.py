"""Task-id splits: no task in two splits, deterministic from the seed, independent of input order."""

from __future__ import annotations

import random

import pytest

from boost.data import Trajectory, split_by_task


def make(n_tasks: int, per_task: int = 3) -> list[Trajectory]:
    return [
        Trajectory(messages=[{"role": "assistant", "content": f"a{k}"}], task_id=f"task-{t}")
        for t in range(n_tasks)
        for k in range(per_task)
    ]


def task_sets(split):
    return [{t.task_id for t in part} for part in (split.train, split.validation, split.test)]


def test_no_task_in_two_splits_and_nothing_lost():
    data = make(50)
    split = split_by_task(data, validation=0.2, test=0.1, seed=3)
    train, val, test = task_sets(split)
    assert not (train & val or train & test or val & test)
    assert len(split.train) + len(split.validation) + len(split.test) == len(data)
    assert (len(val), len(test), len(train)) == (10, 5, 35)
    assert sorted(train) == split.train_tasks and sorted(val) == split.validation_tasks


def test_deterministic_from_seed_and_independent_of_order():
    data = make(40)
    shuffled = data[:]
    random.Random(1).shuffle(shuffled)
    a = split_by_task(data, seed=7)
    b = split_by_task(shuffled, seed=7)
    assert a.train_tasks == b.train_tasks and a.validation_tasks == b.validation_tasks
    assert a.test_tasks == b.test_tasks
    c = split_by_task(data, seed=8)
    assert c.validation_tasks != a.validation_tasks


def test_every_positive_fraction_gets_a_task():
    split = split_by_task(make(3), validation=0.01, test=0.01)
    assert [len(s) for s in task_sets(split)] == [1, 1, 1]
    split = split_by_task(make(4), validation=0.5, test=0.0)
    assert [len(s) for s in task_sets(split)] == [2, 2, 0]


def test_too_few_tasks_is_an_error_not_an_empty_split():
    with pytest.raises(ValueError, match="only 2 distinct task ids"):
        split_by_task(make(2), validation=0.1, test=0.1)


def test_missing_task_id_is_an_error():
    data = [*make(5), Trajectory(messages=[{"role": "assistant", "content": "x"}])]
    with pytest.raises(ValueError, match="1 trajectories have no task_id \\(first at index 15\\)"):
        split_by_task(data)


@pytest.mark.parametrize(("validation", "test"), [(-0.1, 0.1), (0.5, 0.5), (1.0, 0.0)])
def test_bad_fractions(validation, test):
    with pytest.raises(ValueError, match="need 0 <= validation"):
        split_by_task(make(10), validation=validation, test=test)
