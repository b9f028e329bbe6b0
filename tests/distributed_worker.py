"""Runs several training runs in one ``torchrun`` launch (one process group), for tests/test_distributed.py.

    torchrun --standalone --nproc-per-node N -m tests.distributed_worker spec.json

``spec.json``: a list of ``{"overrides": [key=value, ...], "resume": bool}``; each run is a
:class:`boost.train.Trainer` built from the overrides and trained to its ``steps`` (starting the
interpreter and the process group once saves most of a small run's time on a CPU).
"""

from __future__ import annotations

import json
import sys

from boost.config import load_config
from boost.train import TrainConfig, Trainer


def main(path: str) -> int:
    runs = json.loads(open(path, encoding="utf-8").read())
    trainer = None
    for run in runs:
        cfg = load_config(TrainConfig, None, run["overrides"])
        trainer = Trainer(cfg, progress=False)
        trainer.train(resume=run.get("resume", False), overwrite=not run.get("resume", False))
    if trainer is not None:
        trainer.parallel.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
