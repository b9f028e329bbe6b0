"""The command line of ``python -m boost.train`` (see :mod:`boost.train.__main__` for examples).

Everything that can be checked before the model loads is checked first: the settings, ``out_dir``
(a run there is refused without ``--resume`` or ``--overwrite``), the device, and the data (read,
validated and split). A problem with any of them is one line naming the file or setting and the
fix, with exit status 2; a run stopped by non-finite steps or a failed write exits with 1, again
with one line and no traceback.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from boost.atomic import AtomicWriteError
from boost.config import load_config
from boost.data import ChatTemplateError, TrajectoryReadError
from boost.rollout import RolloutError
from boost.train.checkpoint import RunDirError, check_out_dir
from boost.train.config import TrainConfig
from boost.train.guards import DeviceError, NonFiniteStepError, resolve_device
from boost.train.loop import Trainer
from boost.train.report import write_report
from boost.train.selection import DataError
from boost.train.settings_help import settings_help

# Errors in what the user gave (exit 2) and failures of the run itself (exit 1): one line each.
USAGE_ERRORS = (DataError, TrajectoryReadError, RunDirError, DeviceError, ChatTemplateError, RolloutError)
RUN_ERRORS = (NonFiniteStepError, AtomicWriteError)


def build_parser(description: str, examples: str = "") -> argparse.ArgumentParser:
    """The parser; ``--help`` ends with ``examples`` and every setting with its default and meaning."""
    epilog = "\n\n".join(filter(None, [examples, settings_help(TrainConfig())]))
    parser = argparse.ArgumentParser(
        prog="python -m boost.train",
        description=description.replace("``", ""),
        epilog=epilog.replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="a YAML file of settings (see boost/train/config.py)")
    runs = parser.add_mutually_exclusive_group()
    runs.add_argument("--resume", action="store_true", help="continue the run in out_dir from its checkpoint")
    runs.add_argument(
        "--overwrite", action="store_true", help="delete the run files in out_dir and start a new run"
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bars (the trainer's and transformers')"
    )
    parser.add_argument(
        "overrides", nargs="*", help="key=value settings, e.g. steps=200 solver.method=neumann"
    )
    return parser


def main(
    argv: list[str] | None = None, description: str = "Train with BOOST reweighting.", examples: str = ""
) -> int:
    parser = build_parser(description, examples)
    args = parser.parse_intermixed_args(argv)  # options may follow key=value settings
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.quiet:  # also the model loading / saving bars of transformers (GGUF included)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    try:
        check_out_dir(Path(cfg.out_dir), resume=args.resume, overwrite=args.overwrite)
        resolve_device(cfg.device)
        trainer = Trainer(cfg, progress=not args.quiet)  # reads the data before loading the model
    except USAGE_ERRORS as exc:
        parser.error(str(exc))
    try:
        final = trainer.train(resume=args.resume, overwrite=args.overwrite)
        if not trainer.parallel.is_main:  # a parallel run: rank 0 writes the report
            trainer.parallel.close()
            return 0
        report = write_report(trainer.out, trainer.data.summary)
    except RUN_ERRORS as exc:
        parser.exit(1, f"{parser.prog}: {exc}\n")
    except RunDirError as exc:  # a resume with another config
        parser.error(str(exc))
    trainer.parallel.close()
    print(f"final: {final}; report: {report}")
    return 0
