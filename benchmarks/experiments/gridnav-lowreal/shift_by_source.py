"""Task-shift distance d_i and head weight per source under a finished BOOST run's last checkpoint.

    python benchmarks/experiments/gridnav-lowreal/shift_by_source.py runs/glow/boost/seed4

d_i is what ``head.task_shift`` penalises (:meth:`ReweightingHead.shift_distance`: distance of the
trajectory's mean pooled hidden state to the real validation reference, in units of the reference's
own spread). Prints, per source, the mean and the 10%/90% quantiles of d_i, the mean weight
(score x mass) and the mean trajectory loss over the training pool.
"""

from __future__ import annotations

import collections
import sys

import torch

from boost.config import load_config
from boost.train.baselines import pool_batches
from boost.train.config import TrainConfig
from boost.train.loop import Trainer


@torch.no_grad()
def main(run: str) -> None:
    trainer = Trainer(load_config(TrainConfig, f"{run}/config.yaml"), progress=False)
    if not trainer.resume():
        raise SystemExit(f"{run}: no checkpoint to load (checkpoints/ is empty)")
    print(f"step {trainer.step}, reference scale {float(trainer.head.reference_scale):.3f}")
    rows = collections.defaultdict(list)
    for batch, _, f in pool_batches(trainer, features=True):
        d = trainer.head.shift_distance(f.pooled)
        w = trainer.head.scores(f) * trainer.head.mass
        sources = [trainer.data.train_trajectories[i].source for i in batch.trajectory_index.tolist()]
        for row in zip(sources, d.tolist(), w.tolist(), f.loss.tolist()):
            rows[row[0]].append(row[1:])
    for source, values in sorted(rows.items()):
        t = torch.tensor(values)
        print(f"{source:15s} n={len(values):4d}  d mean {t[:, 0].mean():.3f} (10% {t[:, 0].quantile(0.1):.3f}, "
              f"90% {t[:, 0].quantile(0.9):.3f})  weight {t[:, 1].mean():.3f}  loss {t[:, 2].mean():.3f}")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1])
