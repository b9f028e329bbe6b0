"""python -m boost.train [--config run.yaml] [--resume | --overwrite] [--quiet] [key=value ...]

Train with BOOST reweighting (or ``reweight=false`` for the uniform baseline) and write metrics,
checkpoints and a report under ``out_dir``. Examples:

    python -m boost.data.generate --env gridnav --out data/gridnav.jsonl --sources real:64,eps0.3:128,corrupt:128
    python -m boost.train data.path=data/gridnav.jsonl steps=200 out_dir=runs/boost
    python -m boost.train data.path=data/gridnav.jsonl steps=200 out_dir=runs/uniform reweight=false
"""

from __future__ import annotations

from boost.train.cli import main as _main


def main(argv: list[str] | None = None) -> int:
    _, description, examples = __doc__.split("\n\n", 2)
    return _main(argv, description=description.removesuffix(" Examples:"), examples="examples:\n" + examples)


if __name__ == "__main__":
    raise SystemExit(main())
