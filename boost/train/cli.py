"""The command line of ``python -m boost.train`` (see :mod:`boost.train.__main__` for examples).

With no settings (no ``--config``, ``--preset`` or ``key=value``) it runs the one-command default:
the CPU preset (:mod:`boost.train.preset`), its data generated first when missing, task success on
held-out test tasks next to the random policy's, printed and written into ``report.md``.

Everything that can be checked before the model loads is checked first: the settings, ``out_dir``
(a run there is refused without ``--resume`` or ``--overwrite``), the device, and the data (read,
validated and split). A problem with any of them is one line naming the file or setting and the
fix, with exit status 2 (without argparse's usage banner: :class:`boost.cli.ArgumentParser`); a run
stopped by non-finite steps or a failed write exits with 1, again with one line and no traceback.

The output is quiet by default: transformers' progress bars (loading and writing the model) are off,
and each packing summary is logged for a split's first epoch only; ``--verbose`` brings both back,
``--quiet`` also hides the trainer's own progress bar. A CPU-preset run with fewer steps than any
recorded run that beat the random policy is warned about (:func:`boost.train.preset.budget_warning`).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from boost.atomic import AtomicWriteError
from boost.cli import ArgumentParser
from boost.config import load_config
from boost.data import ChatTemplateError, TrajectoryReadError
from boost.rollout.generation import RolloutError
from boost.train.checkpoint import RunDirError, check_out_dir
from boost.train.config import TrainConfig
from boost.train.evaluation import random_policy_success
from boost.train.guards import DeviceError, NonFiniteStepError, resolve_device
from boost.train.preset import PRESET, SETTINGS, budget_warning, ensure_default_data, preset_overrides
from boost.train.report import success_line, write_report
from boost.train.selection import DataError
from boost.train.settings_help import settings_help
from boost.train.two_stage import build_run, train_run

# Errors in what the user gave (exit 2) and failures of the run itself (exit 1): one line each.
USAGE_ERRORS = (DataError, TrajectoryReadError, RunDirError, DeviceError, ChatTemplateError, RolloutError)
RUN_ERRORS = (NonFiniteStepError, AtomicWriteError)
log = logging.getLogger(__name__)


class FirstEpochOnly(logging.Filter):
    """Lets through a packing summary (``boost.data.packing``) of epoch 0 only: a long run replans its
    splits every epoch, and the same block of lines came back every few steps."""

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "epoch", 0) == 0


@contextmanager
def output_verbosity(verbose: bool) -> Iterator[None]:
    """transformers' progress bars and the packing summaries while the command runs (see the module
    docstring); both are as they were once it returns."""
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    packing, first_epoch_only = logging.getLogger("boost.data.packing"), FirstEpochOnly()
    if verbose:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()  # "Loading weights", "Writing model shards" (GGUF included)
        packing.addFilter(first_epoch_only)
    try:
        yield
    finally:
        packing.removeFilter(first_epoch_only)
        (hf_logging.enable_progress_bar if bars_were_on else hf_logging.disable_progress_bar)()


def build_parser(description: str, examples: str = "") -> ArgumentParser:
    """The parser; ``--help`` ends with ``examples`` and every setting with its default and meaning."""
    epilog = "\n\n".join(filter(None, [examples, settings_help(TrainConfig())]))
    parser = ArgumentParser(
        prog="python -m boost.train",
        description=description.replace("``", ""),
        epilog=epilog.replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--config", help="a YAML file of settings (see boost/train/config.py)")
    start.add_argument(
        "--preset",
        choices=[PRESET],
        help="start from the CPU preset's settings (boost/train/preset.py); what no settings at all run",
    )
    runs = parser.add_mutually_exclusive_group()
    runs.add_argument("--resume", action="store_true", help="continue the run in out_dir from its checkpoint")
    runs.add_argument(
        "--overwrite", action="store_true", help="delete the run files in out_dir and start a new run"
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--quiet", action="store_true", help="no progress bars (also not the trainer's)")
    output.add_argument(
        "--verbose",
        action="store_true",
        help="transformers' progress bars and every epoch's packing summary (off by default)",
    )
    parser.add_argument(
        "overrides", nargs="*", help="key=value settings, e.g. steps=200 solver.method=neumann"
    )
    return parser


def _default_run_note() -> str:
    eval_cfg = SETTINGS["eval"]
    return (
        "no settings given: the one-command default, the CPU preset (a 4-layer width-128 Llama built "
        f"in-process, {SETTINGS['weighting']['method']} weights) for {SETTINGS['steps']} steps on "
        f"{SETTINGS['data']['path']}, then {eval_cfg['episodes']} held-out test episodes; run folder "
        f"{SETTINGS['out_dir']} (--help lists every setting; key=value changes one)"
    )


def final_lines(final: dict, random_policy: dict | None, out: Path, report: Path) -> list[str]:
    """What the run prints at the end: held-out task success (and the random policy's), loss, files."""
    lines = [success_line(final, random_policy)]
    loss, accuracy = final.get("test_loss"), final.get("test_agent_token_accuracy")
    if loss is not None:
        lines.append(f"held-out real trajectories: loss {loss:.4f}, agent-token accuracy {accuracy:.3f}")
    lines.append(
        f"run folder: {out} (report: {report}, numbers: {out / 'final.json'}, model: {out / 'model'})"
    )
    return lines


def main(
    argv: list[str] | None = None, description: str = "Train with BOOST reweighting.", examples: str = ""
) -> int:
    parser = build_parser(description, examples)
    args = parser.parse_intermixed_args(argv)  # options may follow key=value settings
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with output_verbosity(args.verbose):
        return _run(parser, args)


def _run(parser: ArgumentParser, args: argparse.Namespace) -> int:
    default_run = args.config is None and args.preset is None and not args.overrides
    preset = default_run or args.preset == PRESET
    try:
        cfg = load_config(
            TrainConfig, args.config, [*(preset_overrides() if preset else []), *args.overrides]
        )
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    if default_run:
        print(f"{parser.prog}: {_default_run_note()}", flush=True)
    warning = budget_warning(cfg.model.name, cfg.steps)
    if warning:
        log.warning("WARNING: %s (also in report.md)", warning)
    try:
        check_out_dir(Path(cfg.out_dir), resume=args.resume, overwrite=args.overwrite)
        resolve_device(cfg.device)
        if preset:
            ensure_default_data(cfg.data.path, quiet=args.quiet)
        # reads the data before loading the model; two phases with weighting.head_steps (two_stage.py)
        run = build_run(cfg, progress=not args.quiet)
    except USAGE_ERRORS as exc:
        parser.error(str(exc))
    try:
        trainer, final = train_run(run, resume=args.resume, overwrite=args.overwrite)
        if not trainer.parallel.is_main:  # a parallel run: rank 0 writes the report
            trainer.parallel.close()
            return 0
        baseline = (
            random_policy_success(final["env"], final["episodes"], cfg.eval.seed, cfg.eval.split)
            if "env" in final
            else None
        )
        report = write_report(trainer.out, trainer.data.summary, random_policy=baseline)
    except RUN_ERRORS as exc:
        parser.exit(1, f"{parser.prog}: {exc}\n")
    except RunDirError as exc:  # a resume with another config
        parser.error(str(exc))
    trainer.parallel.close()
    print("\n".join(final_lines(final, baseline, trainer.out, report)))
    return 0
