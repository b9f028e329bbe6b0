"""The reweighting head: per-trajectory features -> weights w_i, and its outer objective.

DESIGN.md, "Reweighting head". Features per trajectory, all detached from the model θ:

    pooled [S, D]   mean of the last hidden states over the trajectory's counted tokens
    loss [S]        its loss L_i
    log_tokens [S]  log(1 + N_i)
    source [S]      (optional) index of its source name, through a learned embedding
    returns [S]     (optional) its return

A small MLP maps them to a positive score; the scores of the batch's synthetic trajectories are
normalised to mean 1 and multiplied by a learned synthetic mass m. Real trajectories keep
``real_weight`` (1).

The outer objective for the head's parameters φ, given the hypergradient h_i = dL_out/dw_i of the
batch (:mod:`boost.hypergradient`), is

    Σ_i w_i(φ) · stopgrad(h_i)  +  λ_conc / √n_eff  +  λ_shift · m,

whose gradient is the implicit hypergradient of L_out through w, plus the two knobs of the
PAC-Bayes trade-off: concentrating weight on few trajectories shrinks the effective sample size
n_eff = (Σ w)² / Σ w² over the synthetic trajectories (the √(1/n_eff) complexity term), and mass on
synthetic data risks task shift (a term growing with m). n_eff does not depend on m, so the two
knobs act on different parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn


class TrajectoryFeatures(NamedTuple):
    pooled: torch.Tensor  # [S, D] float32
    loss: torch.Tensor  # [S] float32
    log_tokens: torch.Tensor  # [S] float32
    synthetic: torch.Tensor  # [S] bool
    source: torch.Tensor | None = None  # [S] int64 in [0, num_sources)
    returns: torch.Tensor | None = None  # [S] float32


def trajectory_features(
    hidden: torch.Tensor,
    segment_ids: torch.Tensor,
    counted: torch.Tensor,
    per_trajectory: torch.Tensor,
    num_tokens: torch.Tensor,
    synthetic: torch.Tensor,
    source: torch.Tensor | None = None,
    returns: torch.Tensor | None = None,
) -> TrajectoryFeatures:
    """Features of the S trajectories of a packed batch, detached, float32.

    Args:
        hidden [T, D]: last hidden states; segment_ids [T] in [-1, S); counted [T] bool (the tokens
            that count: segment >= 0 and label != ignore_index).
        per_trajectory [S], num_tokens [S]: L_i and N_i, as ``trajectory_cross_entropy`` returns them.
        synthetic [S] bool; source [S] int or None; returns [S] float or None.
    """
    S = per_trajectory.shape[0]
    for name, t in (
        ("synthetic", synthetic),
        ("num_tokens", num_tokens),
        ("source", source),
        ("returns", returns),
    ):
        if t is not None and t.shape != (S,):
            raise ValueError(
                f"{name} must have shape ({S},) (one entry per trajectory), got {tuple(t.shape)}"
            )
    if counted.shape != segment_ids.shape or hidden.shape[0] != segment_ids.shape[0]:
        raise ValueError(
            f"hidden [T, D], segment_ids [T] and counted [T] must share T, got {tuple(hidden.shape)}, "
            f"{tuple(segment_ids.shape)}, {tuple(counted.shape)}"
        )
    with torch.no_grad():
        keep = counted & (segment_ids >= 0)
        sums = hidden.new_zeros(S, hidden.shape[1], dtype=torch.float32)
        sums.index_add_(0, segment_ids[keep].long(), hidden[keep].float())
        pooled = sums / num_tokens.clamp(min=1).to(torch.float32)[:, None]
        return TrajectoryFeatures(
            pooled,
            per_trajectory.detach().float(),
            torch.log1p(num_tokens.float()),
            synthetic.bool(),
            None if source is None else source.long(),
            None if returns is None else returns.detach().float(),
        )


@dataclass(frozen=True)
class HeadConfig:
    hidden_size: int = 64  # width of the MLP
    num_sources: int = 0  # > 0: a learned embedding of the source index is a feature
    source_dim: int = 8
    use_returns: bool = False
    init_mass: float = 1.0  # m at initialisation: synthetic weights start at mean m
    real_weight: float = 1.0  # weight of every real training trajectory
    concentration: float = 0.0  # λ_conc, on 1 / √n_eff
    task_shift: float = 0.0  # λ_shift, on the synthetic mass m

    def __post_init__(self):
        if self.hidden_size < 1:
            raise ValueError(f"HeadConfig.hidden_size must be >= 1, got {self.hidden_size}")
        if self.num_sources < 0:
            raise ValueError(f"HeadConfig.num_sources must be >= 0, got {self.num_sources}")
        if not self.init_mass > 0:
            raise ValueError(f"HeadConfig.init_mass must be > 0, got {self.init_mass}")
        for name in ("real_weight", "concentration", "task_shift"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"HeadConfig.{name} must be finite and >= 0, got {value}")


class ReweightingHead(nn.Module):
    """features -> weights [S] (float32): synthetic ones positive with mean m, real ones real_weight."""

    def __init__(self, hidden_dim: int, cfg: HeadConfig = HeadConfig()):
        super().__init__()
        self.cfg = cfg
        self.pooled_norm = nn.LayerNorm(hidden_dim)
        width = hidden_dim + 2 + (cfg.source_dim if cfg.num_sources else 0) + int(cfg.use_returns)
        self.source = nn.Embedding(cfg.num_sources, cfg.source_dim) if cfg.num_sources else None
        self.mlp = nn.Sequential(nn.Linear(width, cfg.hidden_size), nn.SiLU(), nn.Linear(cfg.hidden_size, 1))
        nn.init.zeros_(self.mlp[-1].weight)  # every score starts equal: uniform weights
        nn.init.zeros_(self.mlp[-1].bias)
        self.log_mass = nn.Parameter(torch.tensor(math.log(cfg.init_mass)))

    @property
    def mass(self) -> torch.Tensor:
        return self.log_mass.exp()

    def scores(self, f: TrajectoryFeatures) -> torch.Tensor:
        """Positive, unnormalised scores [S]."""
        parts = [self.pooled_norm(f.pooled), f.loss[:, None], f.log_tokens[:, None]]
        if self.source is not None:
            if f.source is None:
                raise ValueError("HeadConfig.num_sources > 0 but the features carry no source indices")
            if f.source.numel() and (int(f.source.min()) < 0 or int(f.source.max()) >= self.cfg.num_sources):
                raise ValueError(
                    f"source indices must lie in [0, {self.cfg.num_sources}) (HeadConfig.num_sources)"
                )
            parts.append(self.source(f.source))
        if self.cfg.use_returns:
            if f.returns is None:
                raise ValueError("HeadConfig.use_returns is set but the features carry no returns")
            parts.append(f.returns[:, None])
        return nn.functional.softplus(self.mlp(torch.cat(parts, dim=1)).squeeze(1)) + 1e-6

    def forward(self, f: TrajectoryFeatures) -> torch.Tensor:
        real = torch.full_like(f.loss, self.cfg.real_weight)
        if not bool(f.synthetic.any()):
            return real
        s = self.scores(f)
        normalised = s / s[f.synthetic].mean()
        return torch.where(f.synthetic, self.mass * normalised, real)


def effective_sample_size(weights: torch.Tensor) -> torch.Tensor:
    """n_eff = (Σ w)² / Σ w² (differentiable); 0 for no weights."""
    if weights.numel() == 0:
        return weights.new_zeros(())
    return weights.sum() ** 2 / (weights * weights).sum().clamp_min(torch.finfo(weights.dtype).tiny)


class OuterObjective(NamedTuple):
    loss: torch.Tensor  # [] what to backpropagate into the head
    surrogate: torch.Tensor  # [] Σ_i w_i stopgrad(dL_out/dw_i)
    concentration: torch.Tensor  # [] λ_conc / √n_eff
    task_shift: torch.Tensor  # [] λ_shift · m
    n_eff: torch.Tensor  # [] over the synthetic trajectories of the batch
    mass: torch.Tensor  # [] m


def outer_objective(
    head: ReweightingHead, weights: torch.Tensor, hypergradient: torch.Tensor, synthetic: torch.Tensor
) -> OuterObjective:
    """The head's loss for one outer step (see the module docstring).

    Args:
        weights [S]: ``head(features)`` (differentiable in the head's parameters).
        hypergradient [S]: dL_out/dw_i, e.g. ``head_hypergradient(...).traj_weights`` (detached here).
        synthetic [S] bool.
    """
    if weights.shape != hypergradient.shape or weights.shape != synthetic.shape:
        raise ValueError(
            f"weights, hypergradient and synthetic must have the same shape [S], got {tuple(weights.shape)}, "
            f"{tuple(hypergradient.shape)}, {tuple(synthetic.shape)}"
        )
    cfg = head.cfg
    surrogate = (weights * hypergradient.detach().to(weights.dtype)).sum()
    n_eff = effective_sample_size(weights[synthetic])
    concentration = (
        cfg.concentration / n_eff.clamp_min(1e-12).sqrt() if synthetic.any() else weights.new_zeros(())
    )
    mass = head.mass
    task_shift = cfg.task_shift * mass
    return OuterObjective(
        surrogate + concentration + task_shift, surrogate, concentration, task_shift, n_eff, mass
    )


def weight_summary(
    weights: torch.Tensor, source: torch.Tensor, names: list[str]
) -> dict[str, dict[str, float]]:
    """Per source name: count, mean, min and max weight of its trajectories in the batch (for logs)."""
    out = {}
    w = weights.detach().float()
    for k, name in enumerate(names):
        sel = w[source == k]
        if sel.numel():
            out[name] = {
                "count": int(sel.numel()),
                "mean": float(sel.mean()),
                "min": float(sel.min()),
                "max": float(sel.max()),
            }
    return out
