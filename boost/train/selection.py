"""Which trajectories a run trains and validates on, decided before any model is loaded.

Read the data file (``data.strict``, ``data.format``, ``data.default_source``), split the real
trajectories by task (a hash of each task's content key, see :mod:`boost.data.split`), and leave out
of training every synthetic trajectory that plays a validation or test task: the same task id, or
the same content key in its environment (GuessTheNumber has few secrets, so generated episodes
replay held-out tasks). Everything left out is counted in the summary. Bad data raises
:class:`DataError` with one line naming the file and the fix.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass

from boost.data import ReadReport, Trajectory, read_trajectories, split_by_task
from boost.data.split import environment_task_keys
from boost.train.config import DataConfig

log = logging.getLogger(__name__)


class DataError(ValueError):
    """The training data cannot be used; the message names the file and the fix."""


@dataclass
class Selection:
    """The trajectories of each split and what was decided on the way.

    Attributes:
        train: real training tasks, then the synthetic trajectories kept (file order in each).
        validation, test: real trajectories of the held-out tasks.
        excluded: synthetic trajectories of held-out tasks left out of ``train``.
        summary: human-readable lines (read report, split, exclusions).
    """

    train: list[Trajectory]
    validation: list[Trajectory]
    test: list[Trajectory]
    excluded: list[Trajectory]
    summary: list[str]


def _read(cfg: DataConfig) -> tuple[list[Trajectory], ReadReport]:
    path = cfg.path
    if not os.path.isfile(path):
        raise DataError(f"data.path={path}: no such file; generate one with python -m boost.generate")
    trajectories, report = read_trajectories(
        path, strict=cfg.strict, default_source=cfg.default_source, format=cfg.format
    )
    if not report.records:
        raise DataError(
            f"{path}: the file is empty (no record in it); point data.path at the data or regenerate it"
        )
    if not trajectories:
        first = report.examples[0] if report.examples else ""
        raise DataError(f"{path}: none of the {report.records} records could be read; first error: {first}")
    return trajectories, report


def select_trajectories(cfg: DataConfig) -> Selection:
    """Read ``cfg.path``, split the real tasks and exclude synthetic trajectories of held-out tasks."""
    trajectories, report = _read(cfg)
    real = [t for t in trajectories if t.is_real]
    synthetic = [t for t in trajectories if not t.is_real]
    if not real:
        raise DataError(
            f"{cfg.path}: none of the {len(trajectories)} trajectories has source 'real'; BOOST's outer "
            "objective needs real validation tasks (generate some with --sources real:N)"
        )
    keys = environment_task_keys(t.task_id for t in trajectories if t.task_id is not None)
    try:
        split = split_by_task(real, validation=cfg.validation, test=cfg.test, seed=cfg.seed, key=keys)
    except ValueError as err:
        raise DataError(f"{cfg.path}: real trajectories: {err}") from None
    held_out_ids = set(split.validation_tasks) | set(split.test_tasks)
    held_out_keys = {keys[task] for task in held_out_ids}
    kept, excluded, by_id, unchecked = [], [], 0, 0
    for traj in synthetic:
        if traj.task_id is None:
            unchecked += 1
            kept.append(traj)
        elif traj.task_id in held_out_ids or keys[traj.task_id] in held_out_keys:
            by_id += traj.task_id in held_out_ids
            excluded.append(traj)
        else:
            kept.append(traj)
    real_ids = {t.task_id for t in real}
    content_keyed = sum(keys[task] != task for task in real_ids)
    summary = [
        report.summary(),
        f"real tasks: {len(split.train_tasks)} train, {len(split.validation_tasks)} validation, "
        f"{len(split.test_tasks)} test (by a hash of each task's key: the environment's content key "
        f"for {content_keyed} of {len(real_ids)} ids, else the id); "
        f"{len(synthetic)} synthetic trajectories",
    ]
    if excluded:
        per_source = ", ".join(f"{s} {n}" for s, n in sorted(Counter(t.source for t in excluded).items()))
        what = (
            f"{len(excluded)} synthetic trajectories play a validation or test task ({by_id} by task id, "
            f"{len(excluded) - by_id} by content only; per source: {per_source})"
        )
        if cfg.keep_held_out_synthetic:
            summary.append(
                f"WARNING: {what}; trained on them (data.keep_held_out_synthetic=true), so the validation "
                "objective and the test loss measure tasks the model has trained on"
            )
            kept, excluded = synthetic, []
        else:
            summary.append(f"excluded {what}; data.keep_held_out_synthetic=true keeps them")
    else:
        summary.append("excluded 0 synthetic trajectories: none plays a validation or test task")
    if unchecked:
        summary.append(
            f"{unchecked} synthetic trajectories have no task_id: not checked against held-out tasks"
        )
    for line in summary[1:]:  # the read report (summary[0]) is logged by the reader itself
        (log.warning if line.startswith("WARNING") else log.info)(line)
    return Selection(split.train + kept, split.validation, split.test, excluded, summary)
