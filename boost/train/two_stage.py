"""Two-stage BOOST in one command (``weighting.head_steps > 0``).

A learned head's weights help most as a data filter (two-stage BOOST: a second model trained on the
real trajectories plus the head's top share of the synthetic pool), not multiplied into the loss in the
loop (benchmarks/RESULTS.md). Done by hand that is two full runs; here the head learns in a shorter run
of its own and the filtered run follows it:

1. **head phase**: ``weighting.method`` (boost, mwn or per_source) for ``weighting.head_steps`` inner
   steps into ``out_dir/head/``, with its own learning-rate horizon and no test episodes; it writes
   ``out_dir/head/pool_weights.jsonl``, the head's final weight of every synthetic trajectory.
2. **filtered phase**: ``weighting.method=weight_filter`` on those weights (``top_fraction``, behind
   ``return_gate`` when set) for ``steps`` inner steps into ``out_dir``, from the same initial model
   (the model is built from ``seed`` in both phases).

The filtered run's ``final.json`` carries ``head_phase`` (its steps, seconds, validation loss and where
its weights are), so the compute of both phases is counted. ``--resume`` skips a finished head phase
(``out_dir/head/final.json``) and resumes whichever phase was cut off; ``--overwrite`` deletes both.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

from boost.atomic import write_json_atomic
from boost.train.config import TrainConfig
from boost.train.guards import json_safe
from boost.train.loop import Trainer

log = logging.getLogger(__name__)

HEAD_FOLDER = "head"


def head_phase_config(cfg: TrainConfig) -> TrainConfig:
    """The head phase's settings: the learned method for ``head_steps`` steps in ``out_dir/head``,
    no test episodes, no gate (the gate applies to the filtered phase)."""
    w = cfg.weighting
    return replace(
        cfg,
        out_dir=str(Path(cfg.out_dir) / HEAD_FOLDER),
        steps=w.head_steps,
        eval=replace(cfg.eval, episodes=0, every=0),
        weighting=replace(w, head_steps=0, return_gate=None),
    )


def filtered_phase_config(cfg: TrainConfig) -> TrainConfig:
    """The filtered phase's settings: ``weight_filter`` on the head phase's pool weights."""
    weights = Path(cfg.out_dir) / HEAD_FOLDER / "pool_weights.jsonl"
    return replace(
        cfg, weighting=replace(cfg.weighting, method="weight_filter", weights_path=str(weights), head_steps=0)
    )


class TwoStageRun:
    """Both phases of one ``weighting.head_steps > 0`` run (see the module docstring).

    Building it builds the head phase's trainer, which reads and checks the data and loads the model,
    so bad settings or data fail before anything trains; :meth:`train` runs the phases, dropping the
    head phase's trainer before the filtered phase's model is built (one model in memory at a time).
    """

    def __init__(self, cfg: TrainConfig, progress: bool = True):
        if cfg.weighting.head_steps <= 0:
            raise ValueError("TwoStageRun needs weighting.head_steps > 0")
        self.cfg, self.progress = cfg, progress
        self.head: Trainer | None = Trainer(head_phase_config(cfg), progress=progress)

    def train(self, resume: bool = False, overwrite: bool = False) -> tuple[Trainer, dict]:
        """Run both phases; returns the filtered phase's trainer and its final metrics (with
        ``head_phase``). ``resume`` skips a finished head phase and resumes a cut-off one;
        ``overwrite`` replaces both."""
        cfg = self.cfg
        out = Path(cfg.out_dir)
        head_out = out / HEAD_FOLDER
        head_final_path = head_out / "final.json"
        if resume and head_final_path.exists():
            log.info("head phase: finished in %s; its weights are reused", head_out)
            head_final = json.loads(head_final_path.read_text(encoding="utf-8"))
            head_seconds = head_final.get("head_phase_seconds")
        else:
            log.info(
                "head phase: %s for %d steps into %s",
                cfg.weighting.method,
                cfg.weighting.head_steps,
                head_out,
            )
            started = time.perf_counter()
            head_final = self.head.train(resume=resume, overwrite=overwrite)
            head_seconds = round(time.perf_counter() - started, 1)
            head_final["head_phase_seconds"] = head_seconds
            write_json_atomic(head_final_path, json_safe(head_final))
        self.head = None  # one model in memory at a time
        second = Trainer(filtered_phase_config(cfg), progress=self.progress)
        gate = cfg.weighting.return_gate
        log.info(
            "filtered phase: a fresh model for %d steps on the real trajectories and the top %.0f%% of the "
            "synthetic pool by the head's weights%s", cfg.steps, 100 * cfg.weighting.top_fraction,
            f", behind the return gate {gate}" if gate is not None else "",
        )  # fmt: skip
        final = second.train(resume=resume, overwrite=overwrite)
        final["head_phase"] = {
            "method": cfg.weighting.method,
            "steps": cfg.weighting.head_steps,
            "seconds": head_seconds,
            "validation_loss": head_final.get("validation_loss"),
            "weights_path": str(head_out / "pool_weights.jsonl"),
        }
        write_json_atomic(out / "final.json", json_safe(final))
        return second, final


def build_run(cfg: TrainConfig, progress: bool = True) -> Trainer | TwoStageRun:
    """The run ``cfg`` asks for: a :class:`TwoStageRun` with ``weighting.head_steps > 0``, else a
    :class:`~boost.train.loop.Trainer`. Building reads and checks the data and loads the model."""
    return TwoStageRun(cfg, progress) if cfg.weighting.head_steps else Trainer(cfg, progress=progress)


def train_run(
    run: Trainer | TwoStageRun, resume: bool = False, overwrite: bool = False
) -> tuple[Trainer, dict]:
    """Train a run from :func:`build_run`; returns the trainer of its last phase and its final metrics."""
    if isinstance(run, TwoStageRun):
        return run.train(resume=resume, overwrite=overwrite)
    return run, run.train(resume=resume, overwrite=overwrite)
