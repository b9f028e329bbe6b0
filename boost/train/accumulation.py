"""Gradient accumulation over packed micro-batches: the accumulated step is one step on their union.

With ``grad_accum = k`` an inner step draws k packed batches. The weighted loss of the step is the
one of their union, Σ_i w_i L_i / S with S the trajectories of all k batches, so the weights are
computed once, by the same code as for one batch, on the union's features (the reweighting head's
normaliser and the ``loss_filter`` baseline look at the whole step, not at one micro-batch):

1. a forward of every micro-batch without gradients gives the hidden states, the per-trajectory
   losses and so the features and weights w of the union (:func:`concat_batches`);
2. each micro-batch is then run again with gradients and ``(w[its trajectories] · L_i).sum() / S`` is
   backpropagated: ``.grad`` holds the union's gradient, summed, and only one micro-batch's
   activations are alive at a time;
3. one optimiser step (clipping on the summed gradient); the outer step then sees that accumulated
   step: ``identity``'s response reads the summed ``.grad`` and the optimiser state after the one step,
   and the scores σ_i are taken for every trajectory of every micro-batch, on the union's hidden
   states (``block=head``) or micro-batch by micro-batch (``block=trainable``).

Step 1 costs one extra forward per micro-batch (on the CPU preset an accumulated step of 2 took 1.5-1.8x
the time of one step on the same trajectories, at 0.8x the peak memory: benchmarks/RESULTS.md); with
``grad_accum = 1`` it is skipped and a step is exactly what it was.

Under ``parallel`` each micro-batch is this rank's share of a global batch (a
:class:`~boost.train.distributed.ShardBatch`); their union is the share of the union of the global
batches, in the same order as one process's union, so the weights, the outer step and the summed
gradient are the ones one process computes on the same k global batches. DDP synchronises the
gradient once, after the last micro-batch (``no_sync`` before); FSDP2 reduce-scatters after each
micro-batch into the sharded ``.grad`` (the unsharded gradient is never kept across micro-batches).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from boost.data.packing import PackedBatch, concat_packed, segment_slices
from boost.train.distributed import ShardBatch

__all__ = ["concat_batches", "segment_slices"]


def concat_batches(batches: Sequence[PackedBatch]) -> PackedBatch:
    """One :class:`PackedBatch` holding ``batches`` back to back: tokens concatenated (T = Σ T_k),
    segment ids and ``cu_seqlens`` shifted, per-trajectory tensors concatenated.

    Batches of one row each give one row of T tokens (every sequence still inside it, so the block
    mask and flash's varlen inputs stay exact); batches of R rows of L tokens give Σ R rows of L.
    A single batch is returned as it is.
    """
    if not batches:
        raise ValueError("concat_batches needs at least one batch")
    if len(batches) == 1:
        return batches[0]
    multi = [b.rows > 1 for b in batches]
    if any(multi):
        lengths = {b.num_tokens // b.rows for b in batches}
        if not all(multi) or len(lengths) != 1:
            raise ValueError("concat_batches: batches of rows must all have the same row length")
    rows = sum(b.rows for b in batches) if all(multi) else 1
    union = concat_packed(list(batches), rows=rows, token_budget=sum(b.token_budget for b in batches))
    shards = [isinstance(b, ShardBatch) for b in batches]
    if not any(shards):
        return union
    if not all(shards):
        raise ValueError("concat_batches: every micro-batch of a parallel run must be a rank's share")
    orders, offset = [], 0
    for b in batches:  # each share's plan positions, after the global batches before it
        orders.append(torch.where(b.global_order >= 0, b.global_order + offset, -1))
        offset += b.global_size
    return ShardBatch(**union.__dict__, global_size=offset, global_order=torch.cat(orders))
