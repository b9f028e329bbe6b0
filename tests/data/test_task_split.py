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
    assert sorted(train) == split.train_tasks and sorted(val) == split.validation_tasks


def test_fractions_hold_in_expectation():
    split = split_by_task(make(4000, per_task=1), validation=0.2, test=0.1, seed=3)
    # binomial counts: 800 +- 25 and 400 +- 19 (one standard deviation)
    assert abs(len(split.validation_tasks) - 800) < 100 and abs(len(split.test_tasks) - 400) < 80


def test_a_lost_task_moves_no_other_task_between_splits():
    data = make(60)
    full = split_by_task(data, validation=0.25, test=0.25, seed=0)
    for lost in ("task-0", "task-17", "task-42"):
        part = split_by_task([t for t in data if t.task_id != lost], validation=0.25, test=0.25, seed=0)
        for name in ("train_tasks", "validation_tasks", "test_tasks"):
            assert getattr(part, name) == [t for t in getattr(full, name) if t != lost], (lost, name)


def test_ids_with_one_key_are_one_task():
    data = make(30)
    same = {f"task-{t}": f"instance-{t // 2}" for t in range(30)}  # pairs of ids build one instance
    split = split_by_task(data, validation=0.3, test=0.3, key=same)
    for part in (split.train_tasks, split.validation_tasks, split.test_tasks):
        assert {same[t] for t in part}.isdisjoint(
            same[t]
            for other in (split.train_tasks, split.validation_tasks, split.test_tasks)
            if other is not part
            for t in other
        )


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
    for seed in range(20):  # whatever the hashes, no split with a positive fraction is empty
        sizes = [len(s) for s in task_sets(split_by_task(make(4), validation=0.5, test=0.0, seed=seed))]
        assert sizes[0] >= 1 and sizes[1] >= 1 and sizes[2] == 0 and sum(sizes) == 4


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
