"""Pack tokenised trajectories into batches under a token budget.

Every epoch is a partition of all trajectories into batches: each trajectory appears exactly once.
The order is a seeded permutation (``numpy.random.default_rng((seed, epoch))``); the permutation is
cut into windows of ``window`` trajectories, each window is packed best-fit-decreasing (longest
first, each into the fullest batch it still fits), and the window's batches are shuffled. So the
same seed and epoch always give the same batches, epochs differ, and the batches are nearly full.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from boost.data.attention import block_causal_mask, has_native_packed_sequences
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
    """

    token_budget: int = 16384
    seed: int = 0
    window: int = 4096
    pad_to_budget: bool = False
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if self.token_budget < 2:
            raise ValueError(f"token_budget must be at least 2, got {self.token_budget}")
        if self.window < 1:
            raise ValueError(f"window must be positive, got {self.window}")


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
        """Keyword arguments for a Hugging Face causal LM, batch dimension 1.

        Args:
            attention: ``"block_mask"`` adds an explicit ``[1, 1, T, T]`` block-diagonal causal mask
                (any attention implementation; O(T^2) memory). ``"position_ids"`` passes no mask and
                relies on ``transformers`` detecting the packed sequences from the position ids
                (needs a version that does; raises otherwise). Both set ``use_cache=False``.
            mask_dtype: ``torch.bool`` for ``sdpa``; a float dtype (the model's) for ``eager``.
        """
        inputs: dict[str, object] = {
            "input_ids": self.input_ids[None],
            "position_ids": self.position_ids[None],
            "use_cache": False,
        }
        if attention == "block_mask":
            inputs["attention_mask"] = block_causal_mask(self.cu_seqlens, dtype=mask_dtype)
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
            f"fill {self.fill:.2%}, counted {self.counted_fraction:.2%} of the budget"
        )


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


class TrajectoryPacker:
    """Plans and builds packed batches over a fixed list of tokenised trajectories.

    Raises:
        ValueError: a trajectory is longer than the budget (tokenise with ``max_length <= token_budget``).
    """

    def __init__(
        self, trajectories: Sequence[TokenizedTrajectory], config: PackingConfig | None = None
    ) -> None:
        self.trajectories = trajectories
        self.config = config or PackingConfig()
        self.lengths = np.array([t.length for t in trajectories], dtype=np.int64)
        self.counted = np.array([t.num_counted for t in trajectories], dtype=np.int64)
        too_long = np.flatnonzero(self.lengths > self.config.token_budget)
        if len(too_long):
            first = int(too_long[0])
            raise ValueError(
                f"{len(too_long)} trajectories are longer than token_budget={self.config.token_budget} "
                f"(first: position {first}, {self.lengths[first]} tokens); tokenise with "
                f"TokenizeConfig(max_length <= {self.config.token_budget}) or raise the budget"
            )

    def plan(self, epoch: int) -> list[list[int]]:
        """The batches of ``epoch`` as lists of positions into ``trajectories``; a partition of all."""
        rng = np.random.default_rng((self.config.seed, epoch))
        order = rng.permutation(len(self.trajectories))
        plan: list[list[int]] = []
        for start in range(0, len(order), self.config.window):
            bins = _best_fit_decreasing(
                order[start : start + self.config.window], self.lengths, self.config.token_budget
            )
            plan += [bins[i] for i in rng.permutation(len(bins))]
        log.info("epoch %d: %s", epoch, self.stats(plan).summary())
        return plan

    def stats(self, plan: Sequence[Sequence[int]]) -> PackingStats:
        positions = [p for batch in plan for p in batch]
        return PackingStats(
            num_batches=len(plan),
            num_trajectories=len(positions),
            tokens=int(self.lengths[positions].sum()) if positions else 0,
            counted_tokens=int(self.counted[positions].sum()) if positions else 0,
            token_budget=self.config.token_budget,
        )

    def batches(self, epoch: int) -> Iterator[PackedBatch]:
        """Build the batches of ``epoch`` one at a time."""
        for positions in self.plan(epoch):
            yield self.collate(positions)

    def collate(self, positions: Sequence[int]) -> PackedBatch:
        """Pack the given trajectories (in that order) into one :class:`PackedBatch`."""
        items = [self.trajectories[p] for p in positions]
        if not items:
            raise ValueError("cannot pack an empty batch")
        lengths = np.array([t.length for t in items], dtype=np.int64)
        total = int(lengths.sum())
        if total > self.config.token_budget:
            raise ValueError(f"{total} tokens do not fit the budget of {self.config.token_budget}")
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
        pad = self.config.token_budget - total if self.config.pad_to_budget else 0
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
