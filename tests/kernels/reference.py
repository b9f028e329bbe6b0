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


def per_trajectory(tok, counted, segment_ids, num_segments, normalize="mean"):
    """[S]: each trajectory's sum of ``tok`` [T] over its counted tokens, divided by their number with
    normalize="mean" (0 for a trajectory with none), with a Python loop over trajectories."""
    per = []
    for i in range(num_segments):
        mask = counted & (segment_ids == i)
        n = int(mask.sum())
        total_i = tok[mask].sum() if n else tok.sum() * 0
        per.append(total_i / n if (normalize == "mean" and n) else total_i)
    return torch.stack(per)


def trajectory_losses(
    hidden, weight, labels, segment_ids, num_segments, traj_weights=None, bias=None,
    normalize="mean", normalizer=None, ignore_index=-100, softcap=None,
):  # fmt: skip
    """(total, per_trajectory [S]) in float64, with a Python loop over trajectories."""
    counted = (segment_ids >= 0) & (labels != ignore_index)
    safe = torch.where(counted, labels, torch.full_like(labels, -1))
    tok = token_losses(hidden, weight, bias, safe, softcap)
    per = per_trajectory(tok, counted, segment_ids, num_segments, normalize)
    w = torch.ones(num_segments, dtype=torch.float64) if traj_weights is None else traj_weights.double()
    z = normalizer if normalizer is not None else num_segments
    return (w * per).sum() / z, per


def jvp_term_scale(
    hidden, weight, labels, segment_ids, num_segments, tangent_weight, tangent_hidden=None, bias=None,
    tangent_bias=None, normalize="mean", ignore_index=-100, softcap=None,
):  # fmt: skip
    """[S] float64: the size of the terms a per-trajectory loss tangent sums, before they cancel.

    The tangent of loss_t = lse(z_t) - z_t[y] is sum_v p_v dz_v - dz_y; when those terms cancel
    the exact tangent is small while any floating-point evaluation of it carries an error of
    order eps * (sum_v p_v |dz_v| + |dz_y|). A relative error against the tangent alone then
    measures the cancellation, not the kernel, so tests compare against max(|tangent|, scale).
    """
    h, w = hidden.double(), weight.double()
    z = h @ w.T
    dz = h @ tangent_weight.double().T
    if tangent_hidden is not None:
        dz = dz + tangent_hidden.double() @ w.T
    if bias is not None:
        z = z + bias.double()
        if tangent_bias is not None:
            dz = dz + tangent_bias.double()
    if softcap is not None:
        th = torch.tanh(z / softcap)
        z, dz = softcap * th, dz * (1 - th * th)
    counted = (segment_ids >= 0) & (labels != ignore_index) & (labels >= 0)
    p = torch.softmax(z, dim=1)
    dz_y = dz.gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
    tok = torch.where(counted, (p * dz.abs()).sum(1) + dz_y.abs(), torch.zeros_like(dz_y))
    return per_trajectory(tok, counted, segment_ids, num_segments, normalize)


def cancellation_rel_err(out: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor) -> float:
    """||out - ref|| / max(||ref||, ||scale||): rel_err that does not blow up where the exact
    value is a near-cancellation of terms of size `scale` (see jvp_term_scale)."""
    out, ref, scale = out.detach().double(), ref.detach().double(), scale.detach().double()
    denom = max(float(ref.norm()), float(scale.norm()))
    if denom == 0:
        return float(out.norm())
    return float((out - ref).norm() / denom)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    denom = ref.norm()
    if denom == 0:
        return float(out.norm())
    return float((out - ref).norm() / denom)
