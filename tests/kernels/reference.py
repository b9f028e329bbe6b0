"""Naive float64 references: materialise the logits, no tricks. The oracle for every kernel test."""

from __future__ import annotations

import torch


def token_losses(hidden, weight, bias, labels, softcap=None):
    """loss_t for labels in [0, V); 0 where labels < 0. All float64."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lse = torch.logsumexp(z, dim=1)
    safe = labels.clamp(min=0)
    zy = z.gather(1, safe[:, None]).squeeze(1)
    return torch.where(labels >= 0, lse - zy, torch.zeros_like(lse))


def trajectory_losses(
    hidden, weight, labels, segment_ids, num_segments, traj_weights=None, bias=None,
    normalize="mean", normalizer=None, ignore_index=-100, softcap=None,
):  # fmt: skip
    """(total, per_trajectory [S]) in float64, with a Python loop over trajectories."""
    counted = (segment_ids >= 0) & (labels != ignore_index)
    safe = torch.where(counted, labels, torch.full_like(labels, -1))
    tok = token_losses(hidden, weight, bias, safe, softcap)
    per = []
    for i in range(num_segments):
        mask = counted & (segment_ids == i)
        n = int(mask.sum())
        total_i = tok[mask].sum() if n else tok.sum() * 0
        per.append(total_i / n if (normalize == "mean" and n) else total_i)
    per = torch.stack(per)
    w = torch.ones(num_segments, dtype=torch.float64) if traj_weights is None else traj_weights.double()
    z = normalizer if normalizer is not None else num_segments
    return (w * per).sum() / z, per


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    denom = ref.norm()
    if denom == 0:
        return float(out.norm())
    return float((out - ref).norm() / denom)
