"""Runs several training runs in one ``torchrun`` launch (one process group), for tests/test_distributed.py.

    torchrun --standalone --nproc-per-node N -m tests.distributed_worker spec.json

``spec.json``: a list of ``{"overrides": [key=value, ...], "resume": bool}``; each run is a
:class:`boost.train.Trainer` built from the overrides and trained to its ``steps`` (starting the
interpreter and the process group once saves most of a small run's time on a CPU). With
``"play": path`` the trainer is built but not trained: its model plays ``eval.episodes`` test tasks
(:func:`boost.train.evaluation.play_test_tasks`, each rank its share) and rank 0 writes every
episode's transcript, return and end reason to ``path`` (JSON, task order). With ``"text_reward":
true`` gridnav's episodes end after one reply, scored by :func:`text_reward_step`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from boost.config import load_config
from boost.envs.base import Step
from boost.envs.gridnav import GridNavEnv
from boost.train import TrainConfig, Trainer
from boost.train.evaluation import env_of, play_test_tasks


def text_reward_step(env: GridNavEnv, action: str) -> Step:
    """A one-reply gridnav scored by the reply's length, (len % 4) / 4: an untrained model's sampled
    episodes then have different returns, so the return objective's gradient is not 0 (tests only)."""
    reward = (len(action) % 4) / 4
    return Step("scored", reward, True, {"invalid": False, "success": reward == 0.75, "truncated": False})


def main(path: str) -> int:
    runs = json.loads(open(path, encoding="utf-8").read())
    trainer = None
    real_step = GridNavEnv.step
    for run in runs:
        GridNavEnv.step = text_reward_step if run.get("text_reward") else real_step
        cfg = load_config(TrainConfig, None, run["overrides"])
        trainer = Trainer(cfg, progress=False)
        if "play" in run:
            play(trainer, run["play"])
        else:
            trainer.train(resume=run.get("resume", False), overwrite=not run.get("resume", False))
    if trainer is not None:
        trainer.parallel.close()
    return 0


def play(trainer: Trainer, path: str) -> None:
    cfg = trainer.cfg.eval
    env = env_of(trainer.data.validation.trajectories, cfg.env)
    with trainer.parallel.generation_model(trainer.model) as model:
        played = play_test_tasks(model, trainer.tokenizer, env, cfg.episodes, cfg.seed, trainer.parallel,
                                 max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)  # fmt: skip
    if trainer.parallel.is_main:
        rows = [
            {"task": e.task.key, "messages": e.messages, "reward": e.reward, "end": e.end_reason}
            for e in played
        ]
        Path(path).write_text(json.dumps(rows), encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
