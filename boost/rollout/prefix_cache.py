"""Batched decoding that keeps each chat's KV cache from one turn to the next.

A multi-turn rollout re-sends the whole chat every turn, so without a cache the prompt work grows
with the square of the number of turns. :class:`PrefixCachedDecoder` keeps one KV cache for a batch
of rows (one row per running episode). Each turn, a row's new prompt is compared with the tokens its
cache already holds: the common prefix is reused, cached tokens past it (a reply the chat template
re-tokenised differently, or a finished episode's chat when the slot takes a new task) are masked
out, and only the rest is fed. Rows grow by different amounts, so the cache has holes; an explicit
4-D attention mask lets every token attend exactly to the valid tokens before it, and position ids
count valid tokens only, so each row computes what a fresh forward pass over its prompt would.

Masked columns stay in the cache; when they outnumber the valid ones the cache is rebuilt.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PrefixCachedDecoder:
    """Greedy or sampled decoding for ``n_rows`` growing chats, reusing their KV cache.

    Args:
        model: a Hugging Face causal LM that accepts ``past_key_values`` and a 4-D attention mask.
        n_rows: the number of chats decoded side by side (rows keep their cache between calls).
        pad_id: the token fed where a row has nothing to feed (always masked out).
        eos_ids: tokens that end a reply (not included in it).
    """

    def __init__(self, model: Any, n_rows: int, pad_id: int, eos_ids: set[int]) -> None:
        self.model = model
        self.n_rows = n_rows
        self.pad_id = pad_id
        self.eos_ids = set(eos_ids)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        # transformers 5 renamed ``past_key_values`` to ``cache`` (the old name is deprecated).
        parameters = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in parameters else "past_key_values"
        # Only the last position's logits are needed (older transformers call it num_logits_to_keep).
        keep = next((name for name in ("logits_to_keep", "num_logits_to_keep") if name in parameters), None)
        self.keep_last = {keep: 1} if keep else {}
        self.reset()

    def reset(self) -> None:
        """Forget every cached token."""
        self.cache: Any = None
        self.valid = torch.zeros((self.n_rows, 0), dtype=torch.bool, device=self.device)
        self.tokens: list[list[int]] = [[] for _ in range(self.n_rows)]  # each row's valid tokens
        self.columns: list[list[int]] = [[] for _ in range(self.n_rows)]  # and their cache columns

    # ---- one forward pass over a chunk of new columns ------------------------------------------
    def _forward(self, chunk: list[list[int | None]]) -> torch.Tensor:
        """Feed ``chunk`` (``None`` = nothing to feed) as new columns; returns the last logits."""
        width = len(chunk[0])
        start = self.valid.shape[1]
        fed = torch.tensor([[t is not None for t in row] for row in chunk], device=self.device)
        ids = torch.tensor(
            [[self.pad_id if t is None else t for t in row] for row in chunk], device=self.device
        )
        counts = self.valid.sum(dim=1, keepdim=True)
        positions = (counts + fed.long().cumsum(dim=1) - 1).clamp(min=0)
        self.valid = torch.cat([self.valid, fed], dim=1)
        total = start + width
        causal = (
            torch.arange(total, device=self.device)[None, :]
            <= torch.arange(start, total, device=self.device)[:, None]
        )
        allowed = causal[None] & self.valid[:, None, :]
        # Every query also sees itself, so no row of the mask is empty (empty rows give NaN).
        diagonal = torch.zeros(width, total, dtype=torch.bool, device=self.device)
        diagonal[torch.arange(width), torch.arange(start, total)] = True
        allowed = allowed | diagonal[None]
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        out = self.model(
            input_ids=ids,
            attention_mask=mask[:, None],
            position_ids=positions,
            use_cache=True,
            **{self.cache_arg: self.cache},
            **self.keep_last,
        )
        self.cache = out[self.cache_arg]
        for row in range(self.n_rows):
            for offset, token in enumerate(chunk[row]):
                if token is not None:
                    self.tokens[row].append(token)
                    self.columns[row].append(start + offset)
        return out.logits[:, -1, :].float()

    def _prepare(self, prompts: dict[int, list[int]]) -> list[list[int | None]]:
        """Mask out what each row's cache holds past its prompt; the uncached rest, right-aligned."""
        if self.valid.shape[1] > 2 * max(len(p) for p in prompts.values()) + 64:
            self.reset()  # mostly holes: rebuilding is cheaper than attending over them
        rest = {}
        for row, prompt in prompts.items():
            keep = min(_common_prefix(self.tokens[row], prompt), len(prompt) - 1)  # feed >= 1 token
            stale = self.columns[row][keep:]
            if stale:
                self.valid[row, stale] = False
            del self.tokens[row][keep:], self.columns[row][keep:]
            rest[row] = prompt[keep:]
        width = max(len(r) for r in rest.values())
        return [[None] * (width - len(rest.get(row, []))) + rest.get(row, []) for row in range(self.n_rows)]

    @staticmethod
    def _pick(logits: torch.Tensor, temperature: float, top_p: float,
              generators: dict[int, torch.Generator] | None = None, rows=()) -> torch.Tensor:  # fmt: skip
        """[rows] token ids: greedy, or sampled (from the global RNG, or for each of ``rows`` from its own
        generator in ``generators``; the other rows then take the argmax, which nobody reads)."""
        if temperature == 0.0:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p  # keep the smallest set >= top_p
            sorted_probs = sorted_probs.masked_fill(outside, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        if generators is None:
            return torch.multinomial(probs, 1).squeeze(-1)
        picked = logits.argmax(dim=-1)
        for row in sorted(rows):  # one draw per sampled row from its own stream: batch-independent
            picked[row] = torch.multinomial(probs[row], 1, generator=generators[row]).squeeze(-1)
        return picked

    @torch.inference_mode()
    def generate(
        self,
        prompts: dict[int, list[int]],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        generators: dict[int, torch.Generator] | None = None,
    ) -> dict[int, list[int]]:
        """Reply tokens (EOS excluded) for each ``row: prompt ids``; other rows are left as they are.

        ``generators`` (sampling only): one ``torch.Generator`` per row of ``prompts``; each row then
        samples from its own stream, so its tokens do not depend on which other rows run beside it."""
        if generators is not None and temperature > 0.0 and set(prompts) - set(generators):
            raise ValueError(f"generators has no generator for rows {sorted(set(prompts) - set(generators))}")
        logits = self._forward(self._prepare(prompts))
        replies: dict[int, list[int]] = {row: [] for row in prompts}
        running = set(prompts)
        for step in range(max_new_tokens):
            picked = self._pick(logits, temperature, top_p, generators, running).tolist()
            for row in list(running):
                if picked[row] in self.eos_ids:
                    running.discard(row)
                else:
                    replies[row].append(picked[row])
            if not running or step == max_new_tokens - 1:
                break
            logits = self._forward(
                [[picked[row]] if row in running else [None] for row in range(self.n_rows)]
            )
        return replies
