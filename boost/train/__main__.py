"""python -m boost.train [--config run.yaml | --preset cpu] [--resume | --overwrite] [--quiet] [key=value ...]

Train with BOOST reweighting (or ``weighting.method=uniform`` for the uniform baseline) and write metrics,
checkpoints and a report under ``out_dir``. With no settings at all: the one-command default, the
CPU preset on generated gridnav-compact data (generated first if missing), then task success on
held-out test tasks, in runs/cpu_preset (minutes on a CPU). Examples:

    python -m boost.train
    python -m boost.train --preset cpu weighting.method=boost out_dir=runs/cpu_preset_boost
    python -m boost.generate --env gridnav --out data/gridnav.jsonl --sources real:64,eps0.3:128,corrupt:128
    python -m boost.train data.path=data/gridnav.jsonl steps=200 out_dir=runs/boost
    python -m boost.train data.path=data/gridnav.jsonl steps=200 out_dir=runs/uniform weighting.method=uniform
"""

from __future__ import annotations

from boost.train.cli import main as _main


def main(argv: list[str] | None = None) -> int:
    _, description, examples = __doc__.split("\n\n", 2)
    return _main(argv, description=description.removesuffix(" Examples:"), examples="examples:\n" + examples)


if __name__ == "__main__":
    raise SystemExit(main())
