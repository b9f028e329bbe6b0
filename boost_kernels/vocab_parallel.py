"""The LM-head primitives with the head's rows split over ranks (vocabulary parallelism).

Rank r holds rows ``[start_r, start_r + V_r)`` of the head W [V, D] (FSDP2's ``Shard(0)`` layout:
contiguous blocks in rank order) and every rank sees the *same* tokens: each rank's counted tokens
are all-gathered once per batch (:class:`ShardedHeadBatch`; T_all · D floats, against V · D for the
head). A token's softmax then needs only two [T] reductions over ranks, its log-sum-exp (max and
sum of the local statistics) and the label's logit (held by one rank), and everything shaped like
W stays a [V_r, D] shard:

    lse_t   = log Σ_r Σ_{v ∈ r} exp z_tv                  (all-reduce max, then sum: once per batch)
    dL/dW_r = Σ_t c_t (p_t − e_{y_t})_r h_tᵀ               (local)
    H u |_r = Σ_t c_t [p_t ⊙ (dz_t − <p_t, dz_t>)]_r h_tᵀ  (<p_t, dz_t>: all-reduce of [chunk] per chunk)
    dL_t    = <p_t, dz_t> − dz_{t, y_t}                    (all-reduce of [T] per JVP)

with z = W h (+ b, then the softcap c·tanh(z/c) if any), p = softmax(z), dz = U h (chained through
the softcap). This is the plain-PyTorch, chunked form of those sums (no [T, V] logits: [chunk, V_r]
blocks), on the CPU and, with the same code, on CUDA tensors; there is no Triton kernel for the
sharded form yet. On one rank it computes what :mod:`boost_kernels.ops` computes (tested to 1e-6).

Shapes: hidden [T, D] float (computed in float32; float64 stays float64), weight shard [V_r, D],
labels [T] global vocabulary ids, segment_ids [T] in [-1, S) of this rank's batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from boost_kernels import chunked
from boost_kernels.ops import _per_trajectory, _Prepared, _token_coef, _token_scale


class Collective:
    """The reductions the sharded primitives need, over the ranks that share the vocabulary.

    This base class is one rank holding the whole vocabulary (every reduction is the identity);
    :class:`ProcessGroup` reduces over a ``torch.distributed`` group."""

    world, rank = 1, 0

    def sum_(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over ranks, in place; returns x."""
        return x

    def max_(self, x: torch.Tensor) -> torch.Tensor:
        """x's elementwise maximum over ranks, in place; returns x."""
        return x

    def gather_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Every rank's ``x`` [n_r, ...] concatenated in rank order, and the counts n_r."""
        return x, [x.shape[0]]

    def broadcast_rows(self, x: torch.Tensor, rows: int, src: int) -> torch.Tensor:
        """Rank ``src``'s ``x`` [rows, ...] on every rank (``x``: this rank's own block, which gives
        the shape and dtype of the others' as well)."""
        return x


class ProcessGroup(Collective):
    """:class:`Collective` over a ``torch.distributed`` process group (default: the world)."""

    def __init__(self, group=None):
        self.group = group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)

    def sum_(self, x):
        dist.all_reduce(x, group=self.group)
        return x

    def max_(self, x):
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.group)
        return x

    def gather_rows(self, x):
        count = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
        counts = [torch.zeros_like(count) for _ in range(self.world)]
        dist.all_gather(counts, count, group=self.group)
        counts = [int(c) for c in counts]
        padded = x.new_zeros(max(counts), *x.shape[1:])
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[:n] for p, n in zip(parts, counts)]), counts

    def broadcast_rows(self, x, rows, src):
        buf = x if src == self.rank else x.new_empty(rows, *x.shape[1:])
        root = src if self.group is None else dist.get_global_rank(self.group, src)
        dist.broadcast(buf, src=root, group=self.group)
        return buf


def shard_rows(vocab_size: int, world: int, rank: int) -> slice:
    """The rows of a [V, ...] tensor that rank ``rank`` of ``world`` holds in FSDP2's ``Shard(0)``
    layout (``torch.chunk``): blocks of ceil(V / world) rows in rank order, the last shorter or empty."""
    size = -(-vocab_size // world)
    start = min(rank * size, vocab_size)
    return slice(start, min(start + size, vocab_size))


@dataclass(frozen=True)
class VocabShard:
    """This rank's rows of the LM head: ``weight`` [V_r, D] = W[start : start + V_r] of a [V, D] head
    (``bias`` [V_r] likewise), and the ``collective`` over the ranks holding the other rows."""

    weight: torch.Tensor
    start: int
    vocab_size: int
    collective: Collective
    bias: torch.Tensor | None = None
    softcap: float | None = None

    def __post_init__(self):
        rows = self.weight.shape[0]
        if self.weight.dim() != 2 or not 0 <= self.start <= self.start + rows <= self.vocab_size:
            raise ValueError(
                f"VocabShard: weight [V_r, D] must be rows [start, start + V_r) of a vocabulary of "
                f"{self.vocab_size}; got shape {tuple(self.weight.shape)} at start {self.start}"
            )
        if self.bias is not None and self.bias.shape != (rows,):
            raise ValueError(f"VocabShard: bias must have shape ({rows},), got {tuple(self.bias.shape)}")

    @property
    def chunk_rows(self) -> int:
        """Tokens per [chunk, V_r] block, the same on every rank (the per-chunk reductions pair up)."""
        return chunked.rows_per_chunk(-(-self.vocab_size // self.collective.world))

    def local_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Global label ids -> rows of this shard, -1 where the label is another rank's (or -1)."""
        local = labels - self.start
        return torch.where((labels >= 0) & (local < self.weight.shape[0]) & (local >= 0), local, -1)

    def with_weight(self, weight: torch.Tensor) -> VocabShard:
        return VocabShard(weight, self.start, self.vocab_size, self.collective, self.bias, self.softcap)


def _chunks(T: int, step: int):
    for start in range(0, T, step):
        yield slice(start, min(start + step, T))


def _label_entries(x: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
    """x[t, local_labels[t]] where the label is in this shard, else 0: [n]."""
    inside = local_labels >= 0
    picked = x.gather(1, local_labels.clamp(min=0)[:, None]).squeeze(1) if x.shape[1] else x.new_zeros(len(x))
    return torch.where(inside, picked, 0.0)


def token_statistics(shard: VocabShard, hidden: torch.Tensor, labels: torch.Tensor):
    """(lse [T], label logit [T]) over the whole vocabulary: two reductions of [T] over ranks (a max
    and a sum) and one for the label's logit. ``labels`` global ids, -1 for tokens that do not count."""
    acc = chunked.compute_dtype(hidden.dtype)
    w, b = shard.weight.to(acc), chunked._up(shard.bias, acc)
    local = shard.local_labels(labels)
    T = hidden.shape[0]
    m, s, zy = (hidden.new_zeros(T, dtype=acc) for _ in range(3))
    for sl in _chunks(T, shard.chunk_rows):
        z, _ = chunked._logits(hidden[sl].to(acc), w, b, shard.softcap)
        zy[sl] = _label_entries(z, local[sl])
        if z.shape[1] == 0:  # an empty shard: contributes exp(-inf) = 0
            m[sl], s[sl] = float("-inf"), 0.0
            continue
        m[sl] = z.max(dim=1).values
        s[sl] = torch.exp(z - m[sl, None]).sum(1)
    top = shard.collective.max_(m.clone())
    s = shard.collective.sum_(torch.where(torch.isfinite(m), s * torch.exp(m - top), 0.0))
    return top + torch.log(s), shard.collective.sum_(zy)


def weight_gradient(shard, hidden, labels, coef, lse, out: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_t coef_t ∇_{W_r} loss_t: [V_r, D] float32 (float64 for float64 hidden), added into ``out``
    when given."""
    acc = chunked.compute_dtype(hidden.dtype)
    w, b = shard.weight.to(acc), chunked._up(shard.bias, acc)
    local = shard.local_labels(labels)
    out = torch.zeros_like(w) if out is None else out
    for sl in _chunks(hidden.shape[0], shard.chunk_rows):
        c = coef[sl].to(acc)
        if not bool((c != 0).any()):
            continue
        h = hidden[sl].to(acc)
        z, sp = chunked._logits(h, w, b, shard.softcap)
        g = chunked._minus_onehot(torch.exp(z - lse[sl, None]), local[sl])
        if sp is not None:
            g = g * sp
        out.addmm_((g * c[:, None]).T, h)
    return out


def weight_hvp(
    shard, hidden, labels, coef, lse, u: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """(Σ_t coef_t ∇²_W loss_t) u restricted to this shard's rows: [V_r, D], from u's shard [V_r, D]
    (added into ``out`` when given). One reduction of [chunk] over ranks per chunk of tokens
    (<p_t, dz_t> spans the vocabulary)."""
    acc = chunked.compute_dtype(hidden.dtype)
    w, b, u = shard.weight.to(acc), chunked._up(shard.bias, acc), u.to(acc)
    local, cap = shard.local_labels(labels), shard.softcap
    out = torch.zeros_like(w) if out is None else out
    for sl in _chunks(hidden.shape[0], shard.chunk_rows):
        c = coef[sl].to(acc)
        if not bool((c != 0).any()):  # the same decision on every rank: coef is every rank's
            continue
        h = hidden[sl].to(acc)
        z, sp = chunked._logits(h, w, b, cap)
        dz = h @ u.T
        if sp is not None:
            dz = dz * sp
        p = torch.exp(z - lse[sl, None])
        pdz = shard.collective.sum_((p * dz).sum(1))
        s = p * (dz - pdz[:, None])
        if sp is not None:  # the softcap's curvature, as in chunked.token_loss_hvp
            g = chunked._minus_onehot(p.clone(), local[sl])
            s = s * sp - (2.0 / (cap * cap)) * g * z * dz
        out.addmm_((s * c[:, None]).T, h)
    return out


def token_tangents(shard, hidden, labels, lse, v: torch.Tensor) -> torch.Tensor:
    """dloss_t = <∇_W loss_t, v> over the whole vocabulary, [T] (0 for tokens that do not count),
    from v's shard [V_r, D]; one reduction of [T] over ranks."""
    acc = chunked.compute_dtype(hidden.dtype)
    w, b, v = shard.weight.to(acc), chunked._up(shard.bias, acc), v.to(acc)
    local = shard.local_labels(labels)
    out = hidden.new_zeros(hidden.shape[0], dtype=acc)
    for sl in _chunks(hidden.shape[0], shard.chunk_rows):
        h = hidden[sl].to(acc)
        z, sp = chunked._logits(h, w, b, shard.softcap)
        dz = h @ v.T
        if sp is not None:
            dz = dz * sp
        out[sl] = (torch.exp(z - lse[sl, None]) * dz).sum(1) - _label_entries(dz, local[sl])
    out = shard.collective.sum_(out)
    return torch.where(labels >= 0, out, 0.0)


class ShardedLoss(NamedTuple):
    loss: torch.Tensor  # [] Σ_i w_i L_i / Z over every rank's trajectories (the same on every rank)
    per_trajectory: torch.Tensor  # [S] L_i of this rank's trajectories
    weight_grad: torch.Tensor | None  # [V_r, D] this shard's rows of ∇_W loss
    num_tokens: torch.Tensor  # [S] int64: the counted tokens of this rank's trajectories


class ShardedHeadBatch:
    """A packed batch as the vocabulary-parallel head sees it: this rank's counted tokens (its
    ``hidden`` [T_r, D], global ``labels`` [T_r], ``segment_ids`` [T_r] in [-1, S_r)) against one
    :class:`VocabShard`; every rank's tokens take part in every sum. ``normalize`` / ``ignore_index``
    as in :func:`boost_kernels.trajectory_cross_entropy`.

    ``stream=False``: every rank's hidden states are all-gathered once ([T_all, D] held for the
    batch's life; one gather however many passes). ``stream=True``: only this rank's are held, and each
    pass (a loss, an HVP, a JVP) broadcasts one rank's block at a time ([T_r, D] in flight; T_all · D
    floats sent per pass). Labels, coefficients and log-sum-exps ([T_all] each) are gathered in
    both. The log-sum-exp is computed on first use and kept (the HVPs of a solve all linearise at
    the same head). Both give the same numbers up to the order of the sums over tokens.
    """

    def __init__(self, shard: VocabShard, hidden, labels, segment_ids, num_segments: int,
                 normalize: str = "mean", ignore_index: int = -100, stream: bool = False):  # fmt: skip
        if normalize not in ("mean", "sum"):
            raise ValueError(f"normalize must be 'mean' or 'sum', got {normalize!r}")
        if hidden.shape[1] != shard.weight.shape[1]:
            raise ValueError(
                f"hidden [T, D] has D={hidden.shape[1]}, the head's shard {tuple(shard.weight.shape)}"
            )
        self.shard, self.stream = shard, stream
        labels, segment_ids = labels.long(), segment_ids.long()
        counted = (segment_ids >= 0) & (labels != ignore_index)
        if bool(((labels >= shard.vocab_size) & counted).any()) or bool(((labels < 0) & counted).any()):
            raise ValueError(f"labels of counted tokens must lie in [0, {shard.vocab_size})")
        segments = torch.where(counted, segment_ids, 0)
        self.prep = _Prepared(
            torch.where(counted, labels, -1), segments, counted,
            torch.bincount(segment_ids[counted], minlength=num_segments), chunked,
        )  # fmt: skip
        self.scale = _token_scale(self.prep, normalize, chunked.compute_dtype(hidden.dtype))
        self.labels, counts = shard.collective.gather_rows(self.prep.labels)
        own = hidden.to(self.scale.dtype)
        # stream: this rank's block only; otherwise every rank's, gathered once
        self.hidden = own if stream else shard.collective.gather_rows(own)[0]
        rank = shard.collective.rank
        self.offsets = [sum(counts[:r]) for r in range(len(counts) + 1)]
        self.mine = slice(self.offsets[rank], self.offsets[rank + 1])  # this rank's rows of the gathered
        self._lse = None

    def blocks(self):
        """(slice of the gathered token order, hidden [n, D], labels [n]): every rank's tokens, in one
        block (gathered) or one rank's block at a time (streamed: every rank must iterate them all)."""
        if not self.stream:
            yield slice(0, self.labels.shape[0]), self.hidden, self.labels
            return
        collective = self.shard.collective
        for src in range(len(self.offsets) - 1):
            sl = slice(self.offsets[src], self.offsets[src + 1])
            if sl.stop > sl.start:  # (every rank skips the same empty blocks)
                yield sl, collective.broadcast_rows(self.hidden, sl.stop - sl.start, src), self.labels[sl]

    @property
    def num_segments(self) -> int:
        return int(self.prep.num_tokens.shape[0])

    def lse(self, shard: VocabShard | None = None) -> torch.Tensor:
        """[T_all]: log-sum-exp at ``shard`` (default: the batch's, computed once and kept)."""
        if shard is not None and shard is not self.shard:
            return self._statistics(shard)[0]
        if self._lse is None:
            self._lse = self._statistics(self.shard)[0]
        return self._lse

    def _statistics(self, shard: VocabShard):
        lse = self.labels.new_zeros(self.labels.shape[0], dtype=self.scale.dtype)
        zy = torch.zeros_like(lse)
        for sl, h, labels in self.blocks():
            lse[sl], zy[sl] = token_statistics(shard, h, labels)
        return lse, zy

    def coefficients(self, traj_weights: torch.Tensor | None, normalizer: float) -> torch.Tensor:
        """[T_all]: every rank's a_t = w_{s(t)} scale_t / Z (this rank's from its ``traj_weights``)."""
        w = torch.ones(self.num_segments, device=self.scale.device) if traj_weights is None else traj_weights
        mine = _token_coef(self.prep, self.scale, w.detach(), float(normalizer))
        return self.shard.collective.gather_rows(mine)[0]

    def loss(self, normalizer: float, traj_weights=None, shard: VocabShard | None = None,
             need_grad: bool = True) -> ShardedLoss:  # fmt: skip
        """The weighted loss Σ_i w_i L_i / Z over every rank's trajectories at ``shard`` (default the
        batch's), this rank's L_i, and this shard's gradient rows."""
        shard = shard or self.shard
        coef = self.coefficients(traj_weights, normalizer)
        token_loss = torch.zeros_like(coef, dtype=self.scale.dtype)
        grad = torch.zeros_like(shard.weight, dtype=self.scale.dtype) if need_grad else None
        for sl, h, labels in self.blocks():
            lse, zy = token_statistics(shard, h, labels)
            token_loss[sl] = torch.where(labels >= 0, lse - zy, 0.0)
            if need_grad:
                weight_gradient(shard, h, labels, coef[sl], lse, out=grad)
        total = (coef * token_loss).sum()
        per = _per_trajectory(self.prep, token_loss[self.mine], self.scale)
        return ShardedLoss(total, per, grad, self.prep.num_tokens)

    def hvp(self, coef: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """H u on this shard's rows for H = ∇²_W Σ_i w_i L_i / Z, with ``coef`` =
        :meth:`coefficients` of (w, Z) (computed once for the HVPs of a solve)."""
        lse = self.lse()
        out = torch.zeros_like(self.shard.weight, dtype=self.scale.dtype)
        for sl, h, labels in self.blocks():
            weight_hvp(self.shard, h, labels, coef[sl], lse[sl], u, out=out)
        return out

    def tangents(self, v: torch.Tensor) -> torch.Tensor:
        """[S_r]: dL_i = <∇_W L_i, v> for this rank's trajectories, from v's shard."""
        lse = self.lse()
        d = torch.zeros_like(lse)
        for sl, h, labels in self.blocks():
            d[sl] = token_tangents(self.shard, h, labels, lse[sl], v)
        return _per_trajectory(self.prep, d[self.mine], self.scale)
