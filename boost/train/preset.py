"""The CPU preset: a small causal LM and a word-level tokenizer, both built in-process.

``model.name=cpu`` makes the trainer build, instead of loading a checkpoint:

- a word-level tokenizer trained on the training file's own text (every message of every
  trajectory): whitespace and punctuation split words, each word seen at least ``min_count`` times
  is one token, anything else is ``<unk>``; ChatML template, ``<|im_end|>`` ends a turn. Compact
  observations (``gridnav-compact``, ``guess-compact``) put one grid cell or one number in a word,
  so the model sees the grid cell by cell and numbers whole;
- a randomly initialised Llama (``model.layers`` x ``model.hidden_size``, ``model.heads``, SwiGLU
  of 4 x width, untied LM head) of ``transformers``' own ``LlamaConfig``.

Both are saved with ``save_pretrained`` to ``<out_dir>/init`` and loaded from there like any other
checkpoint, so what the trainer saves later is a folder :mod:`boost.rollout.evaluate` loads.

:data:`SETTINGS` is the whole preset run (``configs/cpu_preset.yaml``'s settings with the one-command
default's paths): ``python -m boost.train`` with no arguments (or ``--preset cpu``) starts from it and
:func:`ensure_default_data` generates :data:`DEFAULT_DATA` with :data:`GENERATE_ARGS` when it is missing.
"""

from __future__ import annotations

import json
import logging
import shlex
from collections import Counter
from pathlib import Path

import torch

from boost.data.format import Trajectory

PRESET = "cpu"
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ("<|im_start|>", "<|im_end|>", "<unk>", "<pad>")
ROLES = ("system", "user", "assistant")

# The one-command default (``python -m boost.train``): its data, how they are generated, its run folder.
DEFAULT_DATA = "runs/data/gridnav-compact.jsonl"
GENERATE_ARGS = ("--env", "gridnav-compact", "--sources", "real:400,eps0.1:800", "--out", DEFAULT_DATA)
DEFAULT_OUT = "runs/cpu_preset"
# The preset run: configs/cpu_preset.yaml's settings (tests/test_one_command.py checks they agree)
# with the paths above. Behaviour cloning (uniform weights): it passes the gate on this data
# (benchmarks/RESULTS.md); weighting.method=boost turns BOOST's reweighting on.
SETTINGS = {
    "model": {"name": PRESET, "hidden_size": 128, "layers": 4, "heads": 4},
    "data": {"path": DEFAULT_DATA, "token_budget": 6144, "rows": 8, "max_length": 768, "packing": "mixed"},
    "optim": {"lr": 0.001, "weight_decay": 0.0, "grad_clip": 1.0},
    "weighting": {"method": "uniform"},
    "steps": 300,
    "log_every": 10,
    "checkpoint_every": 0,
    "eval": {"episodes": 100, "max_new_tokens": 4, "batch_size": 50},
    "out_dir": DEFAULT_OUT,
    "device": "cpu",
    "threads": 1,
}


# The fewest inner steps with which any recorded CPU-preset run beat the random policy: 300. Recorded:
# 300 steps of the preset on gridnav-compact (real:400,eps0.1:800) score 0.48 [0.38, 0.58] against
# the random policy's 0.14 [0.09, 0.22] (README, "Measured on fresh clones"; benchmarks/RESULTS.md,
# "One-command default"), and 0.51 on gridnav-compact, 0.64 against 0.27 on guess-compact
# (RESULTS.md, "The gate"). No shorter run on record beats it: 120 steps (uniform, on a pool with
# 1500 synthetic trajectories of mixed quality) scored 0.01 to 0.03 against 0.14 (RESULTS.md, "Quick
# experiment grid on gridnav"), and issue 26's 60-step default run scored 0.00.
MIN_PRESET_STEPS = 300


def budget_warning(model_name: str, steps: int) -> str | None:
    """A warning when a CPU-preset run has fewer steps than any recorded run that beat the random
    policy (:data:`MIN_PRESET_STEPS`); None otherwise, and for any other model (no record to go by)."""
    if model_name != PRESET or steps >= MIN_PRESET_STEPS:
        return None
    return (
        f"steps={steps} is fewer than the {MIN_PRESET_STEPS} of the shortest CPU-preset run on record that "
        'beat the random policy (benchmarks/RESULTS.md, "The gate"): expect task success at or below '
        f"the random policy's; use steps={MIN_PRESET_STEPS} or more"
    )


def preset_overrides(settings: dict | None = None, prefix: str = "") -> list[str]:
    """:data:`SETTINGS` (or ``settings``) as ``key=value`` overrides for :func:`boost.config.load_config`."""
    out = []
    for key, value in (SETTINGS if settings is None else settings).items():
        if isinstance(value, dict):
            out += preset_overrides(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={json.dumps(value)}")  # JSON scalars are YAML scalars
    return out


def generate_command(quiet: bool = False) -> list[str]:
    """The arguments of ``python -m boost.generate`` that write the default data."""
    return [*GENERATE_ARGS, *(["--no-progress"] if quiet else [])]


def ensure_default_data(path: str, quiet: bool = False) -> bool:
    """Generate the default data when ``path`` is :data:`DEFAULT_DATA` and missing; True if it ran.

    Prints the command it runs (in this process, as ``python -m boost.generate`` would) first.
    Any other missing path is left to the trainer's own error, which names the file.
    """
    if path != DEFAULT_DATA or Path(path).exists():
        return False
    from boost.generate import main as generate

    argv = generate_command(quiet)
    print(
        f"{DEFAULT_DATA} is missing; generating it: python -m boost.generate {shlex.join(argv)}",
        flush=True,
    )
    generate(argv)  # a failure exits with generate's own message
    return True


def corpus(trajectories: list[Trajectory]) -> list[str]:
    """Every message of every trajectory (the text the tokenizer is trained on)."""
    return [m["content"] for t in trajectories for m in t.messages]


def build_word_tokenizer(texts: list[str], min_count: int = 1):
    """A ``PreTrainedTokenizerFast`` with one token per word of ``texts`` (see the module docstring).

    Args:
        texts: the training text.
        min_count: words seen fewer times become ``<unk>``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    splitter = pre_tokenizers.Whitespace()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in splitter.pre_tokenize_str(text))
    counts.update(ROLES * min_count)  # the template's role names
    words = sorted(w for w, c in counts.items() if c >= min_count)
    vocab = {token: i for i, token in enumerate((*SPECIAL, *words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = splitter
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHATML
    return fast


def build_model(tokenizer, hidden_size: int, layers: int, heads: int, seed: int, max_positions: int = 2048):
    """A randomly initialised ``LlamaForCausalLM`` sized for ``tokenizer`` (float32, sdpa attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden_size % heads:
        raise ValueError(f"model.hidden_size ({hidden_size}) must be a multiple of model.heads ({heads})")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def write_preset_checkpoint(
    folder: Path, trajectories: list[Trajectory], hidden_size: int, layers: int, heads: int, seed: int,
    max_positions: int = 2048,
) -> Path:  # fmt: skip
    """Build the preset's tokenizer and model for ``trajectories`` and ``save_pretrained`` both to ``folder``."""
    if not trajectories:
        raise ValueError("the CPU preset trains its tokenizer on the training data, and there is none")
    tokenizer = build_word_tokenizer(corpus(trajectories))
    model = build_model(tokenizer, hidden_size, layers, heads, seed, max_positions)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load_trainer_model(model_cfg, data_path: str, out_dir: Path, seed: int, device: str):
    """(model, tokenizer) for the trainer: the CPU preset (built once into ``out_dir/init``) or a checkpoint."""
    from boost.data import read_trajectories
    from boost.rollout.generation import load_model

    if model_cfg.name != PRESET:
        return load_model(model_cfg.name, device=device)
    folder = Path(out_dir) / "init"
    if not (folder / "config.json").exists():
        # The trainer has read and reported this file already: this second read stays silent.
        reader_log = logging.getLogger(read_trajectories.__module__)
        level = reader_log.level
        reader_log.setLevel(logging.ERROR)
        try:
            trajectories, _ = read_trajectories(data_path)
        finally:
            reader_log.setLevel(level)
        write_preset_checkpoint(
            folder, trajectories, model_cfg.hidden_size, model_cfg.layers, model_cfg.heads, seed
        )
    return load_model(str(folder), device=device)
