"""Evaluate a causal LM by letting it play held-out tasks of an environment.

    python -m boost.rollout.evaluate --model PATH --env gridnav --split test --episodes 100

Prints the metrics (success rate, mean return, mean turns, invalid actions per turn, how episodes
ended), the random policy's success on the same tasks beside the model's, and a few transcripts, and
saves ``metrics.json`` and ``transcripts.jsonl`` (trajectory format, source ``lm_rollout``) under
``--out`` (default ``eval/<env>-<split>``); an earlier evaluation there is kept unless ``--overwrite``.

The episodes, tokens per reply, batch size and seed default to the trainer's evaluation settings
(the defaults of :class:`boost.train.config.EvalConfig`, the one place they are set); the random
policy plays the tasks as the trainer's baseline does (:func:`boost.train.evaluation.random_policy_on`).
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path

from boost.atomic import write_json_atomic
from boost.cli import ArgumentParser
from boost.config import from_attributes
from boost.data.format import write_jsonl
from boost.envs import SPLITS, EnvError, Episode, env_names, make_env
from boost.rollout.generation import RolloutConfig, RolloutError, load_model, rollout, summarize_episodes
from boost.train.config import EvalConfig
from boost.train.evaluation import random_policy_on

DEFAULTS = EvalConfig()  # the trainer's evaluation: one source for both


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m boost.rollout.evaluate",
        description="Let a causal LM play tasks of an environment and report success rate, return and turns.",
    )
    parser.add_argument("--model", required=True, help="checkpoint folder (save_pretrained), or 'smollm2'")
    parser.add_argument("--env", required=True, help=f"environment name; one of: {', '.join(env_names())}")
    parser.add_argument("--split", choices=SPLITS, help="task pool (default: test)")
    parser.add_argument("--tasks", help="comma-separated task ids to play instead of sampling a split")
    parser.add_argument(
        "--episodes", type=int, help=f"tasks sampled from the split (default: {DEFAULTS.episodes})"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=DEFAULTS.seed,
        help=f"task sampling and decoding seed (default: {DEFAULTS.seed})",
    )
    parser.add_argument(
        "--batch-size", type=int, default=DEFAULTS.batch_size,
        help=f"episodes played side by side (default: {DEFAULTS.batch_size})",
    )  # fmt: skip
    parser.add_argument(
        "--max-turns", type=int, help="replies per episode at most (default: the env's limit)"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=DEFAULTS.max_new_tokens,
        help=f"tokens per reply at most (default: {DEFAULTS.max_new_tokens})",
    )  # fmt: skip
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), > 0 samples")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    parser.add_argument(
        "--max-context-tokens", type=int, help="prompt+reply token cap (default: the model's)"
    )
    parser.add_argument(
        "--no-kv-cache", action="store_true", help="re-encode every prompt instead of keeping the KV cache"
    )
    parser.add_argument("--gguf-file", help="GGUF file name inside the --model folder")
    parser.add_argument("--chat-template", help="Jinja chat template file replacing the tokenizer's")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--games-dir", help="where TextWorld games are generated and cached")
    parser.add_argument("--out", help="output folder (default: eval/<env>-<split>)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier evaluation's files in --out"
    )
    parser.add_argument(
        "--transcripts", type=int, default=3, help="transcripts to print and save (default: 3)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def format_transcript(episode: Episode) -> str:
    head = (
        f"--- {episode.task.task_id}: {episode.end_reason}, return {episode.reward:.3f}, "
        f"{episode.turns} turns, {episode.n_invalid} invalid ---"
    )
    return "\n".join([head] + [f"[{m['role']}] {m['content']}" for m in episode.messages])


def success_line(metrics: dict) -> str:
    """The model's task success with its 95% Wilson interval, and the random policy's on the same tasks."""

    def rate(m: dict) -> str:
        lo, hi = m["success_ci95"]
        return f"{m['success_rate']:.2f} [{lo:.2f}, {hi:.2f}]"

    where = "named tasks" if metrics["split"] == "tasks" else f"{metrics['split']} tasks"
    return (
        f"task success: {rate(metrics)} (95% Wilson) on {metrics['episodes']} {where} of {metrics['env']}; "
        f"the random policy on the same tasks: {rate(metrics['random_policy'])}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tasks and (args.split or args.episodes):
        parser.error("--tasks names the tasks to play; drop --split and --episodes, or drop --tasks")
    args.split = args.split or "test"
    args.episodes = DEFAULTS.episodes if args.episodes is None else args.episodes
    if args.episodes < 1:
        parser.error(f"--episodes must be >= 1, got {args.episodes}")
    if args.transcripts < 0:
        parser.error(f"--transcripts must be >= 0, got {args.transcripts}")
    split = "tasks" if args.tasks else args.split
    out = Path(args.out or Path("eval") / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', args.env)}-{split}")
    if (out / "metrics.json").exists() and not args.overwrite:
        parser.error(
            f"{out / 'metrics.json'} holds an earlier evaluation; pass --overwrite to replace it, "
            "or --out another folder"
        )
    try:
        env = make_env(args.env, games_dir=args.games_dir)
        if args.tasks:
            tasks = [env.task(task_id.strip()) for task_id in args.tasks.split(",") if task_id.strip()]
        else:
            tasks = env.sample_tasks(args.split, args.episodes, seed=args.seed)
        env.close()
        config = from_attributes(RolloutConfig, args, reuse_cache=not args.no_kv_cache)
        model, tokenizer = load_model(
            args.model, gguf_file=args.gguf_file, chat_template=args.chat_template, device=args.device
        )
    except (EnvError, RolloutError) as err:
        parser.error(str(err))

    start = time.perf_counter()
    episodes = rollout(
        model, tokenizer, args.env, tasks, config, games_dir=args.games_dir, progress=not args.no_progress
    )
    seconds = time.perf_counter() - start
    baseline = random_policy_on(args.env, tasks, args.seed, games_dir=args.games_dir)

    metrics = {
        "model": args.model,
        "env": args.env,
        "split": split,
        **summarize_episodes(episodes),
        "seconds": round(seconds, 3),
        "episodes_per_second": round(len(episodes) / seconds, 3) if seconds > 0 else None,
        "rollout": asdict(config),
        "random_policy": baseline,  # the same tasks played by the uniformly random policy
    }
    shown = episodes[: args.transcripts]
    write_json_atomic(out / "metrics.json", metrics)
    write_jsonl(
        out / "transcripts.jsonl",
        [e.to_trajectory("lm_rollout", {"generator": "lm_rollout", "model": args.model}) for e in shown],
    )
    for episode in shown:
        print(format_transcript(episode))
    print(json.dumps(metrics, indent=2))
    print(success_line(metrics))
    print(f"saved {out / 'metrics.json'} and {len(shown)} transcripts in {out / 'transcripts.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
