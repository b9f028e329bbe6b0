"""Task success, the headline metric: the trained model plays held-out test tasks of its environment.

The rollouts use tasks of the environment's own ``test`` split (disjoint in content from the ``train``
split every generator draws from, so never in the training data), greedy decoding, and report the
success rate with a 95% Wilson interval, mean return and invalid actions per turn; next to them the
held-out real loss and the agent-token accuracy (greedy next-token = label on counted tokens).

:func:`random_policy_success` plays the same tasks with the uniformly random policy: the bar a model
must clear before any method comparison means anything.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from boost.envs import Episode, make_env, play_episode, random_policy
from boost.rollout.generation import RolloutConfig, rollout, summarize_episodes
from boost.train.attention_backend import attention_for_generation
from boost.train.checkpoint_io import is_peft_model

_KEPT = ("episodes", "success_rate", "success_ci95", "mean_return", "mean_turns", "invalid_per_turn")


def env_of(trajectories, override: str | None = None) -> str:
    """The environment the real trajectories were played in (from their task ids ``<env>/<seed>``).

    ``trajectories``: anything with ``source`` and ``task_id`` (:class:`Trajectory`, tokenised ones).
    """
    if override:
        return override
    names = {t.task_id.rpartition("/")[0] for t in trajectories if t.source == "real" and t.task_id}
    if len(names) != 1:
        raise ValueError(
            f"cannot tell the environment to evaluate in from the real trajectories' task ids "
            f"(found {sorted(names) or 'none'}); set eval.env=NAME"
        )
    return names.pop()


def held_out_tasks(env_name: str, episodes: int, seed: int, split: str = "test"):
    """``episodes`` tasks of the environment's ``split`` ("test" or "validation"), drawn with ``seed``."""
    env = make_env(env_name)
    try:
        return env.sample_tasks(split, episodes, seed=seed)
    finally:
        env.close()


def task_success(
    model,
    tokenizer,
    env_name: str,
    episodes: int,
    seed: int = 0,
    parallel=None,
    split: str = "test",
    **rollout_options,
) -> dict[str, Any]:
    """Greedy rollouts of ``model`` on ``episodes`` tasks of ``split`` (default the test split): the
    metrics of :func:`summarize_episodes` over :func:`play_test_tasks`."""
    summary = summarize_episodes(
        play_test_tasks(model, tokenizer, env_name, episodes, seed, parallel, split, **rollout_options)
    )
    return {k: summary[k] for k in _KEPT}


def play_test_tasks(
    model,
    tokenizer,
    env_name: str,
    episodes: int,
    seed: int = 0,
    parallel=None,
    split: str = "test",
    **rollout_options,
) -> list[Episode]:
    """Greedy rollouts of ``model`` on ``episodes`` test tasks (or tasks of ``split``), in task order.

    ``parallel`` (a run's :class:`boost.train.distributed.SingleProcess` or ``TorchRun``): each process
    plays its share of the tasks (``parallel.share``) and the episodes are gathered in task order, so
    every process returns all ``episodes``. The tasks are the same as for one process; with
    ``batch_size > 1`` the episodes that share a generation batch differ, which can flip a greedy
    token only at a near-tie of two logits (batch_size=1 plays each episode exactly as one process does).
    """
    was_training = model.training
    model.eval()
    tasks = held_out_tasks(env_name, episodes, seed, split)
    mine = list(parallel.share(len(tasks))) if parallel is not None else list(range(len(tasks)))
    try:
        config = RolloutConfig(seed=seed, **rollout_options)
        played = rollout(model, tokenizer, env_name, [tasks[i] for i in mine], config, progress=False)
    finally:
        model.train(was_training)
    if parallel is not None:
        played = [e for _, e in sorted(parallel.gather_objects(list(zip(mine, played))), key=lambda p: p[0])]
    return played


def random_policy_success(env_name: str, episodes: int, seed: int = 0, split: str = "test") -> dict[str, Any]:
    """The uniformly random policy on the same tasks as :func:`task_success` (same seed and split)."""
    return random_policy_on(env_name, held_out_tasks(env_name, episodes, seed, split), seed)


def random_policy_on(env_name: str, tasks, seed: int = 0, games_dir: str | None = None) -> dict[str, Any]:
    """The uniformly random policy on ``tasks``: the metrics of :func:`task_success` (the episode of
    the ``i``-th task seeded by ``seed`` and ``i``, as :func:`random_policy_success` seeds it)."""
    env = make_env(env_name, games_dir=games_dir)
    try:
        played = [
            play_episode(env, task, random_policy, random.Random(f"random|{seed}|{i}"))
            for i, task in enumerate(tasks)
        ]
    finally:
        env.close()
    summary = summarize_episodes(played)
    return {k: summary[k] for k in _KEPT}


@torch.no_grad()
def agent_token_accuracy(
    hidden: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor, chunk: int = 1024
):
    """(correct, counted) over the tokens with a label: argmax of the LM head's logits == label.

    hidden [T, D], labels [T] int64 (-100: not counted). Logits are formed ``chunk`` tokens at a time,
    never all [T, V] at once.
    """
    keep = labels >= 0
    h, y = hidden[keep], labels[keep]
    correct = 0
    for start in range(0, len(y), chunk):
        correct += int((lm_head(h[start : start + chunk]).argmax(-1) == y[start : start + chunk]).sum())
    return correct, len(y)


def save_pretrained_atomic(model, tokenizer, folder: Path, state_dict: dict | None = None) -> Path:
    """``save_pretrained`` model and tokenizer to ``folder``, replacing it only once both are written.

    ``state_dict``: the weights to write instead of the model's own (FSDP2: the gathered shards).

    A peft (LoRA) model is saved merged (a copy with the adapters folded into the base weights), so
    ``boost.rollout.evaluate`` loads it like any checkpoint; the adapters themselves are in the run's
    checkpoints, in peft's format.
    """
    folder = Path(folder)
    if is_peft_model(model):
        model = copy.deepcopy(model).merge_and_unload()
    tmp = folder.with_name(f".{folder.name}.tmp")
    old = folder.with_name(f".{folder.name}.old")
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


@torch.no_grad()
def held_out_real(trainer, packer) -> dict[str, float | None]:
    """Mean per-trajectory loss and agent-token accuracy over every batch of ``packer`` (real tasks).
    A parallel run computes each process's share of every batch and sums over processes."""
    from boost.train.distributed import owned  # (distributed imports this module)

    if packer is None:
        return {"loss": None, "agent_token_accuracy": None}
    total, count, correct, counted = 0.0, 0, 0, 0
    for batch in trainer.parallel.batches(packer, 0):
        batch = batch.to(trainer.device)
        hidden = trainer.hidden_states(batch)
        out = trainer.losses(hidden, batch)
        total += float(out.per_trajectory.sum())
        count += owned(batch)  # a phantom (an empty share) counts nothing
        c, n = agent_token_accuracy(hidden, trainer.lm_head, batch.labels)
        correct, counted = correct + c, counted + n
    total, count, correct, counted = trainer.parallel.sum_floats(total, count, correct, counted)
    return {"loss": total / max(count, 1), "agent_token_accuracy": correct / max(counted, 1)}


def evaluate_trainer(trainer, rollouts: bool = True) -> dict[str, Any]:
    """Held-out real loss and accuracy (test tasks of the data), and task success on the env's test split.

    Keys: ``test_loss``, ``test_agent_token_accuracy`` and, when ``rollouts`` and ``eval.episodes > 0``,
    ``env``, ``eval_split`` and ``success_rate``, ``success_ci95``, ``mean_return``, ``mean_turns``,
    ``invalid_per_turn`` (on the tasks of ``eval.split``: the test split unless set to validation).
    """
    cfg = trainer.cfg.eval
    was_training = trainer.model.training
    trainer.model.eval()
    try:
        held = held_out_real(trainer, trainer.data.test)
    finally:
        trainer.model.train(was_training)
    out: dict[str, Any] = {
        "test_loss": held["loss"],
        "test_agent_token_accuracy": held["agent_token_accuracy"],
    }
    if rollouts and cfg.episodes:
        env_name = env_of(trainer.data.validation.trajectories, cfg.env)
        out["env"], out["eval_split"] = env_name, cfg.split
        with (
            trainer.parallel.generation_model(trainer.model) as model,  # FSDP2: a gathered plain copy
            attention_for_generation(model, trainer.attention),  # flash-attn trains, sdpa generates
        ):
            out.update(
                task_success(
                    model, trainer.tokenizer, env_name, cfg.episodes, cfg.seed, parallel=trainer.parallel,
                    split=cfg.split, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                )
            )  # fmt: skip
    return out


def append_eval(out_dir: Path, step: int, metrics: dict[str, Any]) -> None:
    """One line of ``out_dir/eval.jsonl``: the in-training evaluation at ``step`` (``eval.every``)."""
    with open(Path(out_dir) / "eval.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\n")
