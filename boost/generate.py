"""Generate real and synthetic trajectories of an environment as JSONL.

    python -m boost.generate --env gridnav --out data/gridnav-train.jsonl \\
        --sources real:32,expert_shifted:256,eps0.1:256,eps0.3:256,random:256,corrupt:256
    python -m boost.generate --env gridnav --split validation --sources real:64 \\
        --out data/gridnav-val.jsonl
    python -m boost.generate --env gridnav --sources lm_rollout:64 --model smollm2 --out data/lm.jsonl

Writes the trajectories (the project's format, atomically) and ``<out stem>.summary.json``, and
prints per source: count, success rate, mean return, mean turns, invalid actions per turn, distinct
tasks. Sources and their ground truth are described in :mod:`boost.generators`.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

from boost.atomic import write_json_atomic
from boost.cli import ArgumentParser
from boost.config import from_attributes
from boost.data.format import write_jsonl
from boost.envs import SPLITS, EnvError, env_names, make_env
from boost.envs.policies import CORRUPTIONS
from boost.generators import (
    GeneratorConfig,
    LMRolloutSettings,
    format_summary,
    generate,
    parse_sources,
    summarize,
)
from boost.rollout.generation import RolloutError

DEFAULT_SOURCES = "real:32,expert_shifted:256,eps0.1:256,eps0.3:256,eps0.6:256,random:256,corrupt:256"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m boost.generate",
        description="Generate real (expert) and synthetic trajectories with known ground truth.",
    )
    parser.add_argument("--env", required=True, help=f"environment name; one of: {', '.join(env_names())}")
    parser.add_argument("--out", required=True, help="output JSONL file")
    parser.add_argument(
        "--sources",
        default=DEFAULT_SOURCES,
        help="NAME:COUNT list; names: real, expert_shifted, eps<E> (0<E<=1), random, sticky, corrupt, lm_rollout "
        f"(default: {DEFAULT_SOURCES})",
    )
    parser.add_argument("--split", default="train", choices=SPLITS, help="task pool (default: train)")
    parser.add_argument(
        "--shift-env", help="environment of expert_shifted (default: the env's shifted variant)"
    )
    parser.add_argument("--corrupt-prob", type=float, default=0.3, help="per-action corruption probability")
    parser.add_argument(
        "--corruptions",
        default=",".join(CORRUPTIONS),
        help=f"corruption kinds (default: {','.join(CORRUPTIONS)})",
    )
    parser.add_argument("--seed", type=int, default=0, help="base seed (default: 0)")
    parser.add_argument("--games-dir", help="where TextWorld games are generated and cached")
    lm = parser.add_argument_group("lm_rollout")
    lm.add_argument("--model", help="checkpoint folder (save_pretrained), or 'smollm2'")
    lm.add_argument("--gguf-file", help="GGUF file name inside the --model folder")
    lm.add_argument("--chat-template", help="Jinja chat template file replacing the tokenizer's")
    lm.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    lm.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    lm.add_argument("--max-new-tokens", type=int, default=32, help="tokens per reply (default: 32)")
    lm.add_argument("--batch-size", type=int, default=16, help="episodes side by side (default: 16)")
    lm.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def config_from_args(args: argparse.Namespace) -> GeneratorConfig:
    """The generator settings of the command line; raises EnvError naming a bad argument."""
    sources = parse_sources(args.sources)
    if args.model and "lm_rollout" not in sources:
        raise EnvError("--model is only used by the lm_rollout source; add lm_rollout:N to --sources")
    if args.shift_env:
        make_env(args.shift_env, games_dir=args.games_dir).close()  # a clear error for an unknown name
    return GeneratorConfig(
        env=args.env,
        sources=sources,
        split=args.split,
        shift_env=args.shift_env,
        corrupt_prob=args.corrupt_prob,
        corruptions=tuple(kind.strip() for kind in args.corruptions.split(",") if kind.strip()),
        seed=args.seed,
        games_dir=args.games_dir,
        lm=from_attributes(LMRolloutSettings, args),  # --model, --temperature, ... --device
    )


def summary_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.summary.json")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        make_env(config.env, games_dir=config.games_dir).close()  # unknown names fail before any work
        start = time.perf_counter()
        trajectories = generate(config, progress=not args.no_progress)
    except (EnvError, RolloutError) as err:
        parser.error(str(err))
    seconds = time.perf_counter() - start
    out = Path(args.out)
    n_written = write_jsonl(out, trajectories)
    summary = summarize(trajectories)
    write_json_atomic(
        summary_path(out),
        {"config": asdict(config), "written": n_written, "seconds": round(seconds, 3), "sources": summary},
    )
    print(format_summary(summary))
    print(f"wrote {n_written} trajectories to {out} in {seconds:.1f}s; summary in {summary_path(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
