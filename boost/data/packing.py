"""Pack tokenised trajectories into batches under a token budget.

Every epoch is a partition of all trajectories into batches: each trajectory appears exactly once,
and the same seed and epoch always give the same batches (``numpy.random.default_rng((seed, epoch))``).
Two modes:

- ``"length"``: a seeded permutation is cut into windows of ``window`` trajectories, each window is
  packed best-fit-decreasing (longest first, each into the fullest batch it still fits), and the
  window's batches are shuffled. Tightest fill; but when sources differ in length (expert episodes are
  short, random ones long) a batch tends to hold one source only.
- ``"mixed"`` (the trainer's default): the trajectories are interleaved by source, each source
  spread evenly over the epoch (the k-th of a source's n trajectories, in shuffled order, sits at
  ``(k + u) / n`` with ``u ~ U(0, 1)``), and batches are cut from that stream in order, taking from
  the next ``lookahead`` trajectories the first that still fits. So every batch holds the sources
  roughly in proportion to the data.

``rows > 1`` (mixed mode) lays a batch out as ``rows`` rows of ``token_budget // rows`` tokens, each
trajectory inside one row and every row padded to its length: the model runs on ``[rows, L]`` with a
``[rows, 1, L, L]`` mask instead of one ``[1, T]`` row with a ``[T, T]`` mask (``rows`` times less
attention work and memory on CPU). The flattened tensors keep the single-row layout of the fused loss.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from boost.data.attention import block_causal_mask, has_native_packed_sequences, row_block_causal_mask
from boost.data.tokenize import IGNORE_INDEX, TokenizedTrajectory

log = logging.getLogger(__name__)


@dataclass
class PackingConfig:
    """How batches are packed.

    Attributes:
        token_budget: tokens per batch (T <= token_budget); every trajectory must fit.
        seed: seed of the per-epoch order.
        window: trajectories packed together before the next window starts; larger packs tighter,
            smaller mixes batches across the epoch more evenly.
        pad_to_budget: pad every batch to exactly ``token_budget`` tokens (static shapes); the
            padding is one extra sequence in ``cu_seqlens`` whose tokens never count.
        pad_token_id: the id written into padding.
        mode: ``"length"`` or ``"mixed"`` (see the module docstring).
        rows: rows per batch (``"mixed"`` only); each row holds ``token_budget // rows`` tokens.
        lookahead: ``"mixed"``: how far ahead in the stream a trajectory that fits is looked for.
    """

    token_budget: int = 16384
    seed: int = 0
    window: int = 4096
    pad_to_budget: bool = False
    pad_token_id: int = 0
    mode: Literal["length", "mixed"] = "length"
    rows: int = 1
    lookahead: int = 64

    def __post_init__(self) -> None:
        if self.token_budget < 2:
            raise ValueError(f"token_budget must be at least 2, got {self.token_budget}")
        if self.window < 1:
            raise ValueError(f"window must be positive, got {self.window}")
        if self.mode not in ("length", "mixed"):
            raise ValueError(f"mode must be 'length' or 'mixed', got {self.mode!r}")
        if self.rows < 1 or self.token_budget // self.rows < 2:
            raise ValueError(f"rows must be >= 1 with token_budget // rows >= 2, got rows={self.rows}")
        if self.rows > 1 and self.mode != "mixed":
            raise ValueError("rows > 1 needs mode='mixed' (length mode packs one row per batch)")
        if self.lookahead < 1:
            raise ValueError(f"lookahead must be positive, got {self.lookahead}")

    @property
    def row_length(self) -> int:
        """Tokens per row: the longest trajectory a batch can hold."""
        return self.token_budget // self.rows


@dataclass
class PackedBatch:
    """S trajectories packed into T tokens (the layout of ``boost_kernels.trajectory_cross_entropy``).

    Per token (all ``[T]`` int64):
        input_ids: token ids.
        position_ids: position within its own trajectory (restarts at 0 for each).
        labels: next-token label, already shifted: ``labels[t] = input_ids[t+1]`` when token t+1 is an
            agent token of the same trajectory, else ``-100`` (always at a trajectory's last token and
            on padding).
        segment_ids: the trajectory's index 0..S-1 in this batch where ``labels[t] != -100``, else -1.

    Per sequence:
        cu_seqlens: ``[n+1]`` int32 starts of the sequences (flash-attn varlen layout), ``n = S`` or
            ``S + 1`` when the batch was padded (the padding is the last sequence).
        max_seqlen: the longest sequence (int).

    Per trajectory (``[S]``):
        trajectory_index: int64 ``index`` of each :class:`TokenizedTrajectory` (into the list that was
            tokenised).
        lengths: int64 tokens of each trajectory.
        num_counted: int64 tokens with a label (N_i of the per-trajectory mean loss).
        rewards: float32 episode return, NaN where unknown (see ``has_reward``).
        has_reward: bool.
        is_real: bool, ``source == "real"``.
        truncated: bool, the trajectory was cut to fit ``max_length`` (its reward is the whole
            episode's, not the kept prefix's); None when the batch was built without this flag.
        sources, task_ids: lists of str (task ids may be None).

    token_budget: the budget the batch was packed under.
    rows: 1 (one row of T tokens) or R (R rows of T / R tokens each, every trajectory inside one row,
        every row padded to T / R: see :meth:`model_inputs`).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    segment_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    trajectory_index: torch.Tensor
    lengths: torch.Tensor
    num_counted: torch.Tensor
    rewards: torch.Tensor
    has_reward: torch.Tensor
    is_real: torch.Tensor
    sources: list[str]
    task_ids: list[str | None]
    token_budget: int
    truncated: torch.Tensor | None = None
    rows: int = 1

    @property
    def num_segments(self) -> int:
        """S, the number of trajectories (``num_segments`` of the fused loss)."""
        return len(self.sources)

    @property
    def num_tokens(self) -> int:
        """T, including padding."""
        return len(self.input_ids)

    @property
    def num_padding(self) -> int:
        return self.num_tokens - int(self.lengths.sum())

    @property
    def fill(self) -> float:
        """Trajectory tokens / token budget."""
        return int(self.lengths.sum()) / self.token_budget

    def to(self, device: torch.device | str) -> PackedBatch:
        """A copy with every tensor on ``device``."""
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()}
        return PackedBatch(**moved)

    def model_inputs(
        self,
        attention: Literal["block_mask", "position_ids"] = "block_mask",
        mask_dtype: torch.dtype = torch.bool,
    ) -> dict[str, object]:
        """Keyword arguments for a Hugging Face causal LM: ``[rows, T / rows]`` ids (batch dimension
        ``rows``, 1 unless packed into rows); the model's ``last_hidden_state.flatten(0, 1)`` is [T, D].

        Args:
            attention: ``"block_mask"`` adds an explicit ``[1, 1, T, T]`` block-diagonal causal mask
                (any attention implementation; O(T^2) memory). ``"position_ids"`` passes no mask and
                relies on ``transformers`` detecting the packed sequences from the position ids
                (needs a version that does; raises otherwise). Both set ``use_cache=False``.
            mask_dtype: ``torch.bool`` for ``sdpa``; a float dtype (the model's) for ``eager``.
        """
        inputs: dict[str, object] = {
            "input_ids": self.input_ids.view(self.rows, -1),
            "position_ids": self.position_ids.view(self.rows, -1),
            "use_cache": False,
        }
        if attention == "block_mask":
            if self.rows == 1:
                inputs["attention_mask"] = block_causal_mask(self.cu_seqlens, dtype=mask_dtype)
            else:
                inputs["attention_mask"] = row_block_causal_mask(self.cu_seqlens, self.rows, dtype=mask_dtype)
        elif attention == "position_ids":
            if not has_native_packed_sequences():
                raise RuntimeError(
                    "this transformers version does not derive packed-sequence masks from position_ids; "
                    "attention would cross trajectory borders. Use attention='block_mask' or upgrade transformers"
                )
        else:
            raise ValueError(f"attention must be 'block_mask' or 'position_ids', got {attention!r}")
        return inputs


@dataclass
class PackingStats:
    """Totals over one epoch's batches; ``fill`` is the packing efficiency (target >= 0.95)."""

    num_batches: int
    num_trajectories: int
    tokens: int
    counted_tokens: int
    token_budget: int
    multi_synthetic_batches: int = 0  # batches holding trajectories of >= 2 synthetic sources
    synthetic_trajectories: int = 0

    @property
    def multi_synthetic_share(self) -> float:
        """Share of the batches that hold >= 2 synthetic (non-``real``) sources."""
        return self.multi_synthetic_batches / max(1, self.num_batches)

    @property
    def synthetic_per_batch(self) -> float:
        return self.synthetic_trajectories / max(1, self.num_batches)

    @property
    def fill(self) -> float:
        """Trajectory tokens / (batches x budget)."""
        return self.tokens / max(1, self.num_batches * self.token_budget)

    @property
    def counted_fraction(self) -> float:
        """Tokens with a label / (batches x budget): the share of the budget the loss trains on."""
        return self.counted_tokens / max(1, self.num_batches * self.token_budget)

    def summary(self) -> str:
        return (
            f"{self.num_trajectories} trajectories in {self.num_batches} batches of {self.token_budget} tokens: "
            f"fill {self.fill:.2%}, counted {self.counted_fraction:.2%} of the budget; "
            f"{self.synthetic_per_batch:.1f} synthetic trajectories per batch, "
            f"{self.multi_synthetic_share:.0%} of batches hold >= 2 synthetic sources"
        )

    def as_dict(self) -> dict[str, float]:
        return {
            "batches": self.num_batches,
            "trajectories": self.num_trajectories,
            "fill": round(self.fill, 4),
            "synthetic_per_batch": round(self.synthetic_per_batch, 3),
            "multi_synthetic_share": round(self.multi_synthetic_share, 4),
        }


def _best_fit_decreasing(items: np.ndarray, lengths: np.ndarray, budget: int) -> list[list[int]]:
    """Bins of item positions, each with total length <= budget."""
    order = items[np.argsort(-lengths[items], kind="stable")]
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin id), sorted
    for item in order.tolist():
        need = int(lengths[item])
        at = bisect.bisect_left(free, (need, -1))
        if at < len(free):
            remaining, b = free.pop(at)
        else:
            remaining, b = budget, len(bins)
            bins.append([])
        bins[b].append(item)
        bisect.insort(free, (remaining - need, b))
    return bins


def _place(free: list[int], need: int) -> int | None:
    """Best-fit row for ``need`` tokens (the fullest row it fits, the first such), or None."""
    best = None
    for r, room in enumerate(free):
        if room >= need and (best is None or room < free[best]):
            best = r
    return best


def assign_rows(lengths: Sequence[int], rows: int, row_length: int) -> list[int]:
    """Row of each item, placed in order by :func:`_place`; raises if one does not fit."""
    free = [row_length] * rows
    out = []
    for need in lengths:
        r = _place(free, int(need))
        if r is None:
            raise ValueError(f"{len(lengths)} trajectories do not fit {rows} rows of {row_length} tokens")
        free[r] -= int(need)
        out.append(r)
    return out


def interleave_by_source(sources: Sequence[str], rng: np.random.Generator) -> np.ndarray:
    """Positions ordered so that each source is spread evenly (see the module docstring)."""
    keys = np.empty(len(sources))
    by_source: dict[str, list[int]] = {}
    for i, s in enumerate(sources):
        by_source.setdefault(s, []).append(i)
    for name in sorted(by_source):
        members = rng.permutation(by_source[name])
        keys[members] = (np.arange(len(members)) + rng.random(len(members))) / len(members)
    return np.argsort(keys, kind="stable")


def _mixed_batches(
    order: np.ndarray, lengths: np.ndarray, rows: int, row_length: int, lookahead: int
) -> list[list[int]]:
    """Cut ``order`` into batches: each takes, from the next ``lookahead`` items, the first that fits."""
    pending = order.tolist()
    batches: list[list[int]] = []
    while pending:
        free, batch = [row_length] * rows, []
        at = 0
        while at < min(lookahead, len(pending)):
            item = pending[at]
            r = _place(free, int(lengths[item]))
            if r is None:
                at += 1
                continue
            free[r] -= int(lengths[item])
            batch.append(pending.pop(at))
        batches.append(batch)
    return batches


class TrajectoryPacker:
    """Plans and builds packed batches over a fixed list of tokenised trajectories.

    Raises:
        ValueError: a trajectory is longer than the budget (tokenise with ``max_length <= token_budget``).
    """

    def __init__(
        self,
        trajectories: Sequence[TokenizedTrajectory],
        config: PackingConfig | None = None,
        name: str = "batches",
    ) -> None:
        self.name = name  # what the per-epoch log line calls these batches (e.g. "train", "validation")
        self.trajectories = trajectories
        self.config = config or PackingConfig()
        self.lengths = np.array([t.length for t in trajectories], dtype=np.int64)
        self.counted = np.array([t.num_counted for t in trajectories], dtype=np.int64)
        self.sources = [t.source for t in trajectories]
        self.epoch_stats: dict[int, PackingStats] = {}  # filled by plan(): what each epoch's batches hold
        limit = self.config.row_length
        too_long = np.flatnonzero(self.lengths > limit)
        if len(too_long):
            first = int(too_long[0])
            what = (
                f"token_budget={limit}"
                if self.config.rows == 1
                else f"the row length {limit} (budget / rows)"
            )
            raise ValueError(
                f"{len(too_long)} trajectories are longer than {what} "
                f"(first: position {first}, {self.lengths[first]} tokens); tokenise with "
                f"TokenizeConfig(max_length <= {limit}) or raise the budget"
            )

    def plan(self, epoch: int) -> list[list[int]]:
        """The batches of ``epoch`` as lists of positions into ``trajectories``; a partition of all."""
        cfg = self.config
        rng = np.random.default_rng((cfg.seed, epoch))
        if cfg.mode == "mixed":
            order = interleave_by_source(self.sources, rng)
            plan = _mixed_batches(order, self.lengths, cfg.rows, cfg.row_length, cfg.lookahead)
        else:
            order = rng.permutation(len(self.trajectories))
            plan = []
            for start in range(0, len(order), cfg.window):
                bins = _best_fit_decreasing(order[start : start + cfg.window], self.lengths, cfg.token_budget)
                plan += [bins[i] for i in rng.permutation(len(bins))]
        first = epoch not in self.epoch_stats  # evaluation replans epoch 0: log each epoch once
        stats = self.epoch_stats[epoch] = self.stats(plan)
        if first:
            # a small split cycled every few steps (validation) repeats one summary for hundreds of
            # epochs: a summary equal to the previous epoch's goes to DEBUG
            summary = stats.summary()
            previous = self.epoch_stats.get(epoch - 1)
            repeat = previous is not None and previous.summary() == summary
            level = logging.DEBUG if repeat else logging.INFO
            log.log(level, "%s, epoch %d: %s", self.name, epoch, summary, extra={"epoch": epoch})
        return plan

    def stats(self, plan: Sequence[Sequence[int]]) -> PackingStats:
        positions = [p for batch in plan for p in batch]
        synthetic = [{self.sources[p] for p in batch} - {"real"} for batch in plan]
        return PackingStats(
            num_batches=len(plan),
            num_trajectories=len(positions),
            tokens=int(self.lengths[positions].sum()) if positions else 0,
            counted_tokens=int(self.counted[positions].sum()) if positions else 0,
            token_budget=self.config.token_budget,
            multi_synthetic_batches=sum(len(s) >= 2 for s in synthetic),
            synthetic_trajectories=sum(self.sources[p] != "real" for p in positions),
        )

    def batches(self, epoch: int) -> Iterator[PackedBatch]:
        """Build the batches of ``epoch`` one at a time."""
        for positions in self.plan(epoch):
            yield self.collate(positions)

    def collate(self, positions: Sequence[int]) -> PackedBatch:
        """Pack the given trajectories (in that order) into one :class:`PackedBatch`.

        With ``rows > 1`` the trajectories are placed in rows by :func:`assign_rows` (the placement the
        plan made) and come out row by row (segment ids follow that order).
        """
        if not positions:
            raise ValueError("cannot pack an empty batch")
        if self.config.rows > 1:
            return self._collate_rows(positions)
        return self._collate_row([self.trajectories[p] for p in positions], pad_to=self.config.token_budget
                                 if self.config.pad_to_budget else None)  # fmt: skip

    def _collate_rows(self, positions: Sequence[int]) -> PackedBatch:
        cfg = self.config
        placed = assign_rows([self.lengths[p] for p in positions], cfg.rows, cfg.row_length)
        rows = [
            self._collate_row([self.trajectories[p] for p, r in zip(positions, placed) if r == row], cfg.row_length)
            for row in range(cfg.rows)
        ]  # fmt: skip
        return _concat_rows(rows, cfg.row_length, cfg.pad_token_id)

    def _collate_row(self, items: list[TokenizedTrajectory], pad_to: int | None) -> PackedBatch | None:
        """One row of ``items`` (None for no items), padded to ``pad_to`` tokens when given."""
        if not items:
            return None
        lengths = np.array([t.length for t in items], dtype=np.int64)
        total = int(lengths.sum())
        limit = self.config.token_budget if pad_to is None else pad_to
        if total > limit:
            raise ValueError(f"{total} tokens do not fit the budget of {limit}")
        starts = np.concatenate([[0], np.cumsum(lengths)])
        ids = np.concatenate([t.input_ids for t in items]).astype(np.int64)
        agent = np.concatenate([t.agent_mask for t in items])
        # Token t is labelled with token t+1 when that one is an agent token of the same trajectory.
        labelled = np.zeros(total, dtype=bool)
        labelled[:-1] = agent[1:]
        labelled[starts[1:] - 1] = False
        next_ids = np.roll(ids, -1)  # next_ids[t] = ids[t+1]; the wrapped last entry is never labelled
        labels = np.where(labelled, next_ids, IGNORE_INDEX)
        segment_ids = np.where(labelled, np.repeat(np.arange(len(items)), lengths), -1)
        positions_in_seq = np.arange(total) - np.repeat(starts[:-1], lengths)
        cu_seqlens = starts
        pad = pad_to - total if pad_to is not None else 0
        if pad:
            ids = np.concatenate([ids, np.full(pad, self.config.pad_token_id, dtype=np.int64)])
            labels = np.concatenate([labels, np.full(pad, IGNORE_INDEX, dtype=np.int64)])
            segment_ids = np.concatenate([segment_ids, np.full(pad, -1, dtype=np.int64)])
            positions_in_seq = np.concatenate([positions_in_seq, np.arange(pad)])
            cu_seqlens = np.concatenate([starts, [total + pad]])
        rewards = np.array([np.nan if t.reward is None else t.reward for t in items], dtype=np.float32)
        return PackedBatch(
            input_ids=torch.from_numpy(ids),
            position_ids=torch.from_numpy(positions_in_seq.astype(np.int64)),
            labels=torch.from_numpy(labels),
            segment_ids=torch.from_numpy(segment_ids.astype(np.int64)),
            cu_seqlens=torch.from_numpy(cu_seqlens.astype(np.int32)),
            max_seqlen=int(max(lengths.max(), pad)),
            trajectory_index=torch.tensor([t.index for t in items], dtype=torch.int64),
            lengths=torch.from_numpy(lengths),
            num_counted=torch.from_numpy(np.bincount(segment_ids[segment_ids >= 0], minlength=len(items))),
            rewards=torch.from_numpy(rewards),
            has_reward=torch.tensor([t.reward is not None for t in items], dtype=torch.bool),
            is_real=torch.tensor([t.source == "real" for t in items], dtype=torch.bool),
            sources=[t.source for t in items],
            task_ids=[t.task_id for t in items],
            token_budget=self.config.token_budget,
            truncated=torch.tensor([t.truncated for t in items], dtype=torch.bool),
        )


PER_TRAJECTORY = ("trajectory_index", "lengths", "num_counted", "rewards", "has_reward", "is_real")


def padding_row(row_length: int, pad_token_id: int) -> PackedBatch:
    """A row of ``row_length`` padding tokens holding no trajectory (one sequence in ``cu_seqlens``)."""
    empty = {k: torch.zeros(0, dtype=d) for k, d in zip(PER_TRAJECTORY, (
        torch.int64, torch.int64, torch.int64, torch.float32, torch.bool, torch.bool))}  # fmt: skip
    return PackedBatch(
        input_ids=torch.full((row_length,), pad_token_id, dtype=torch.int64),
        position_ids=torch.arange(row_length),
        labels=torch.full((row_length,), IGNORE_INDEX, dtype=torch.int64),
        segment_ids=torch.full((row_length,), -1, dtype=torch.int64),
        cu_seqlens=torch.tensor([0, row_length], dtype=torch.int32),
        max_seqlen=row_length,
        **empty,
        sources=[],
        task_ids=[],
        token_budget=row_length,
        truncated=torch.zeros(0, dtype=torch.bool),
    )


def segment_slices(batches: Sequence[PackedBatch]) -> list[slice]:
    """Where each batch's trajectories sit among the union's S = Σ S_k (in order) of
    :func:`concat_packed`."""
    out, start = [], 0
    for b in batches:
        out.append(slice(start, start + b.num_segments))
        start += b.num_segments
    return out


def concat_packed(batches: list[PackedBatch], *, rows: int, token_budget: int) -> PackedBatch:
    """``batches`` back to back as one :class:`PackedBatch` of ``rows`` rows: tokens concatenated,
    segment ids and ``cu_seqlens`` shifted, per-trajectory tensors and lists concatenated. The
    callers say what the result's rows and budget are (:func:`_concat_rows`,
    :func:`boost.train.accumulation.concat_batches`). ``truncated`` is None if any batch holding a
    trajectory has none."""
    segment_ids, cu, offset, segments = [], [torch.zeros(1, dtype=torch.int32)], 0, 0
    for b in batches:
        segment_ids.append(torch.where(b.segment_ids >= 0, b.segment_ids + segments, -1))
        cu.append(b.cu_seqlens[1:] + offset)
        offset += b.num_tokens
        segments += b.num_segments
    full = [b for b in batches if b.num_segments]
    cat = torch.cat
    return PackedBatch(
        input_ids=cat([b.input_ids for b in batches]),
        position_ids=cat([b.position_ids for b in batches]),
        labels=cat([b.labels for b in batches]),
        segment_ids=cat(segment_ids),
        cu_seqlens=cat(cu),
        max_seqlen=max(b.max_seqlen for b in batches),
        **{k: cat([getattr(b, k) for b in batches]) for k in PER_TRAJECTORY},
        sources=[s for b in batches for s in b.sources],
        task_ids=[t for b in batches for t in b.task_ids],
        token_budget=token_budget,
        truncated=None if any(b.truncated is None for b in full) else cat([b.truncated for b in batches]),
        rows=rows,
    )


def _concat_rows(rows: list[PackedBatch | None], row_length: int, pad_token_id: int) -> PackedBatch:
    """One batch of ``len(rows)`` rows of ``row_length`` tokens each (None: a row of padding only)."""
    filled = [padding_row(row_length, pad_token_id) if r is None else r for r in rows]
    return concat_packed(filled, rows=len(rows), token_budget=row_length * len(rows))
