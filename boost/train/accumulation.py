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
"""

from __future__ import annotations

from collections.abc import Sequence

from boost.data.packing import PackedBatch, concat_packed, segment_slices

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
    return concat_packed(list(batches), rows=rows, token_budget=sum(b.token_budget for b in batches))
