"""The files of a run under ``out_dir``: refusing to overwrite, resuming, and the metrics log.

- :func:`prepare_out_dir` runs before anything is written: it removes temporary files a killed
  writer left, and refuses a folder that already holds a run unless ``resume`` (continue it) or
  ``overwrite`` (delete its files first) is given.
- :func:`config_differences` compares a checkpoint's config with the run's, key by key, leaving out
  the settings that do not change what is computed (``out_dir``, so a moved run resumes).
- :class:`MetricsLog` appends one JSON line per step; on resume it first drops the rows written
  after the checkpoint (a killed run logged steps it never saved) and any half-written line.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, TextIO

from boost.atomic import remove_stale_temporaries, write_text_atomic
from boost.config import from_dict, to_dict
from boost.train.checkpoint_io import CHECKPOINTS, remove_stale_checkpoint_folders
from boost.train.guards import json_safe
from boost.train.tensorboard_log import TENSORBOARD

log = logging.getLogger(__name__)

LEGACY_CHECKPOINT = "checkpoint.pt"  # the pickled format before safetensors: detected, never loaded
METRICS = "metrics.jsonl"
RUN_FILES = (
    CHECKPOINTS,
    LEGACY_CHECKPOINT,
    METRICS,
    "final.json",
    "report.md",
    "training.png",
    "config.yaml",
    TENSORBOARD,
)
# Settings a resumed run may change: where the run lives, how long it runs, how often it saves, and
# when it gives up on non-finite steps. Everything else must match the checkpoint.
# optim.schedule_steps may change as long as the schedule's horizon does not (checked by the trainer).
# parallel / parallel_debug: a parallel run's checkpoint loads under DDP or FSDP2 on any number of ranks
# (boost/train/distributed.py); a single-process checkpoint is refused by a parallel run and vice versa.
RESUMABLE_CHANGES = frozenset(
    {"out_dir", "steps", "checkpoint_every", "keep_checkpoints", "max_bad_steps", "optim.schedule_steps",
     "parallel", "parallel_debug", "kernels.deterministic"}
)  # fmt: skip


class RunDirError(ValueError):
    """``out_dir`` holds a run that would be overwritten, or cannot be resumed; the message says how."""


def check_out_dir(out: Path, *, resume: bool, overwrite: bool) -> list[str]:
    """The run files in ``out``; raises :class:`RunDirError` where :func:`prepare_out_dir` would."""
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other: continue the run or replace it")
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if existing and not resume and not overwrite:
        raise RunDirError(
            f"{out} already holds a run ({', '.join(existing)}); pass --resume to continue it, "
            "--overwrite to replace it, or choose another out_dir"
        )
    return existing


def prepare_out_dir(out: Path, *, resume: bool, overwrite: bool) -> list[str]:
    """Make ``out`` ready for a run; returns the stale temporary files it removed.

    Raises:
        RunDirError: ``out`` holds run files and neither ``resume`` nor ``overwrite`` is set, or both are.
    """
    existing = check_out_dir(out, resume=resume, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    removed = remove_stale_temporaries(out, RUN_FILES) + remove_stale_checkpoint_folders(out)
    if removed:
        log.warning("removed %d temporary files a killed run left in %s", len(removed), out)
    if existing and not resume:
        for name in existing:
            if (out / name).is_dir():
                shutil.rmtree(out / name)
            else:
                (out / name).unlink()
        log.warning("--overwrite: deleted %s from %s", ", ".join(existing), out)
    return removed


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(ours: Any, theirs: dict[str, Any]) -> list[str]:
    """``"key: <checkpoint> in the checkpoint, <ours> now"`` for every setting that differs.

    ``theirs`` (a checkpoint's config) is read back through the config class first, so settings
    added since it was written count as their defaults. :data:`RESUMABLE_CHANGES` are left out.
    """
    try:
        theirs = to_dict(from_dict(type(ours), theirs, "checkpoint"))
    except ValueError:  # a setting that no longer exists: compare as written, it shows up below
        pass
    mine, old = _flatten(to_dict(ours)), _flatten(theirs)
    differing = sorted(
        k
        for k in mine.keys() | old.keys()
        if k.split(".")[0] not in RESUMABLE_CHANGES
        and k not in RESUMABLE_CHANGES
        and mine.get(k) != old.get(k)
    )
    return [
        f"{k}: {old.get(k, '(absent)')!r} in the checkpoint, {mine.get(k, '(absent)')!r} now"
        for k in differing
    ]


class MetricsLog:
    """``out/metrics.jsonl``: one JSON object per logged step, written and flushed line by line.

    Args:
        out: the run folder.
        resume_step: the checkpoint's step when resuming (rows after it are dropped first), or 0 for
            a fresh run (the file starts empty).
    """

    def __init__(self, out: Path, resume_step: int = 0):
        self.path = out / METRICS
        kept, dropped = self._rows_up_to(resume_step) if resume_step else ([], 0)
        if dropped:
            log.warning("%s: dropped %d rows logged after the checkpoint of step %d (or half-written)",
                        self.path, dropped, resume_step)  # fmt: skip
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        self._file: TextIO = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())

    def _rows_up_to(self, step: int) -> tuple[list[str], int]:
        if not self.path.exists():
            return [], 0
        kept, dropped = [], 0
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                kept.append(line)
            elif line.strip():
                dropped += 1
        return kept, dropped

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` (non-finite numbers become null) and flush."""
        self._file.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
