"""python -m boost.train [--config run.yaml] [--resume] [key=value ...]

Train with BOOST reweighting (or ``reweight=false`` for the uniform baseline) and write metrics,
checkpoints and a report under ``out_dir``. Examples:

    python -m boost.data.generate --env gridnav --out data/gridnav.jsonl --sources real:64,eps0.3:128,corrupt:128
    python -m boost.train data.path=data/gridnav.jsonl steps=200 out_dir=runs/boost
    python -m boost.train data.path=data/gridnav.jsonl steps=200 out_dir=runs/uniform reweight=false
"""

from __future__ import annotations

import argparse
import logging

from boost.config import load_config
from boost.train.config import TrainConfig
from boost.train.loop import Trainer
from boost.train.report import write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m boost.train", description=__doc__.split("\n\n")[1])
    parser.add_argument("--config", help="a YAML file of settings (see boost/train/config.py)")
    parser.add_argument(
        "--resume", action="store_true", help="continue from out_dir/checkpoint.pt if it exists"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "overrides", nargs="*", help="key=value settings, e.g. steps=200 solver.method=neumann"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    trainer = Trainer(cfg, progress=not args.quiet)
    final = trainer.train(resume=args.resume)
    report = write_report(trainer.out, trainer.data.summary)
    print(f"final: {final}; report: {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
