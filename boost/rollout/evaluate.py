"""Evaluate a causal LM by letting it play held-out tasks of an environment.

    python -m boost.rollout.evaluate --model PATH --env gridnav --split test --episodes 100

Prints the metrics (success rate, mean return, mean turns, invalid actions per turn, how episodes
ended) and a few transcripts, and saves ``metrics.json`` and ``transcripts.jsonl`` (trajectory
format, source ``lm_rollout``) under ``--out`` (default ``eval/<env>-<split>``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path

from boost.atomic import write_json_atomic
from boost.data.format import write_jsonl
from boost.envs import SPLITS, EnvError, Episode, env_names, make_env
from boost.rollout.generation import RolloutConfig, RolloutError, load_model, rollout, summarize_episodes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m boost.rollout.evaluate",
        description="Let a causal LM play tasks of an environment and report success rate, return and turns.",
    )
    parser.add_argument("--model", required=True, help="checkpoint folder (save_pretrained), or 'smollm2'")
    parser.add_argument("--env", required=True, help=f"environment name; one of: {', '.join(env_names())}")
    parser.add_argument("--split", choices=SPLITS, help="task pool (default: test)")
    parser.add_argument("--tasks", help="comma-separated task ids to play instead of sampling a split")
    parser.add_argument("--episodes", type=int, help="tasks sampled from the split (default: 100)")
    parser.add_argument("--seed", type=int, default=0, help="task sampling and decoding seed (default: 0)")
    parser.add_argument(
        "--batch-size", type=int, default=16, help="episodes played side by side (default: 16)"
    )
    parser.add_argument(
        "--max-turns", type=int, help="replies per episode at most (default: the env's limit)"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=32, help="tokens per reply at most (default: 32)"
    )
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tasks and (args.split or args.episodes):
        parser.error("--tasks names the tasks to play; drop --split and --episodes, or drop --tasks")
    args.split = args.split or "test"
    args.episodes = 100 if args.episodes is None else args.episodes
    if args.episodes < 1:
        parser.error(f"--episodes must be >= 1, got {args.episodes}")
    if args.transcripts < 0:
        parser.error(f"--transcripts must be >= 0, got {args.transcripts}")
    try:
        env = make_env(args.env, games_dir=args.games_dir)
        if args.tasks:
            tasks = [env.task(task_id.strip()) for task_id in args.tasks.split(",") if task_id.strip()]
        else:
            tasks = env.sample_tasks(args.split, args.episodes, seed=args.seed)
        env.close()
        config = RolloutConfig(
            max_turns=args.max_turns,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            batch_size=args.batch_size,
            seed=args.seed,
            max_context_tokens=args.max_context_tokens,
            reuse_cache=not args.no_kv_cache,
        )
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

    metrics = {
        "model": args.model,
        "env": args.env,
        "split": "tasks" if args.tasks else args.split,
        **summarize_episodes(episodes),
        "seconds": round(seconds, 3),
        "episodes_per_second": round(len(episodes) / seconds, 3) if seconds > 0 else None,
        "rollout": asdict(config),
    }
    out = Path(args.out or Path("eval") / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', args.env)}-{metrics['split']}")
    shown = episodes[: args.transcripts]
    write_json_atomic(out / "metrics.json", metrics)
    write_jsonl(
        out / "transcripts.jsonl",
        [e.to_trajectory("lm_rollout", {"generator": "lm_rollout", "model": args.model}) for e in shown],
    )
    for episode in shown:
        print(format_transcript(episode))
    print(json.dumps(metrics, indent=2))
    print(f"saved {out / 'metrics.json'} and {len(shown)} transcripts in {out / 'transcripts.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
