"""``eval.split``: the rollouts that choose settings play the environment's validation tasks, never
its test tasks (boost/train/evaluation.py; python -m boost.experiment's tuning uses it)."""

from __future__ import annotations

import pytest

from boost.train.config import EvalConfig
from boost.train.evaluation import held_out_tasks, random_policy_success


def test_the_validation_split_plays_validation_tasks_disjoint_from_test():
    validation = held_out_tasks("gridnav-compact", 20, seed=0, split="validation")
    test = held_out_tasks("gridnav-compact", 20, seed=0)
    assert {t.split for t in validation} == {"validation"} and {t.split for t in test} == {"test"}
    assert not {t.key for t in validation} & {t.key for t in test}
    assert random_policy_success("gridnav-compact", 20, 0, "validation")["episodes"] == 20


def test_a_bad_split_is_refused():
    with pytest.raises(ValueError, match="eval.split must be 'test' or 'validation'"):
        EvalConfig(split="train")
