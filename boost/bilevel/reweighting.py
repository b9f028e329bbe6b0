"""The reweighting head: per-trajectory features -> weights w_i, and its outer objective.

docs/design.md, "Reweighting head"; the bound the regularisers come from is written out in
``docs/method.md``. Features per trajectory, all detached from the model θ:

    pooled [S, D]   mean of the last hidden states over the trajectory's counted tokens
    loss [S]        its loss L_i (an MLP input; with ``monotone_loss`` also c · L_i on the logit)
    log_tokens [S]  log(1 + N_i)
    source [S]      (optional) index of its source name, through a learned embedding
    returns [S]     (optional) its return

A small MLP maps them to positive scores s_i. A synthetic trajectory's weight is m · s_i / μ with m
a learned synthetic mass and μ the normaliser (``normalizer``):

* ``"pool"`` (default): μ(φ) = the mean score, under the current head, of a pool of the last
  ``pool_size`` synthetic trajectories' features from *earlier* batches (a FIFO table; the current
  batch joins it after its weights are computed). μ is differentiable, so the mean synthetic weight
  over the pool is exactly m (a frozen m really freezes the synthetic mass) and the head learns
  contrasts against the pool, whatever the batch holds: a batch whose synthetic trajectories all
  come from one source, or hold one trajectory, still gives the scores a gradient.
* ``"running"``: μ = a running, detached mean of past batches' mean synthetic score. Also
  independent of batch-mates, but a trend in the scores moves the mean weight away from m until μ
  catches up (measured on the toy: a frozen m then does not freeze the mass).
* ``"batch"``: μ = this batch's mean (weights only compare batch-mates; nothing to learn from a
  single-source batch). The first batch of ``"pool"`` uses it too (the pool is empty).

Real trajectories keep ``real_weight`` (1).

The outer objective for the head's parameters φ, given the hypergradient h_i = dL_out/dw_i of the
batch (:mod:`boost.bilevel.hypergradient`), is

    Σ_i w_i(φ) · stopgrad(h_i)  +  λ_conc / √n_eff  +  λ_shift · Σ_{i synthetic} w_i d_i / S,

the implicit hypergradient of L_out through w plus the two other terms of the PAC-Bayes bound:
n_eff = (Σ w)² / Σ w² over *all* weighted trajectories of the batch (real included), so synthetic
mass raises it (diversity) and concentrating weight on a few trajectories lowers it; d_i is the
trajectory's discrepancy from the real validation trajectories, the distance of its pooled hidden
state to their mean, in units of their own mean distance to it (a linear-kernel MMD; see
:meth:`ReweightingHead.shift_distance`), so synthetic weight costs more the farther from the real
distribution it sits. S normalises like the inner loss (Z = S), so with d_i = 1 the term is λ_shift
times the mean synthetic weight.
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
    # > 0: a learned embedding of the source index is a feature; 0: none; -1 ("auto"): as many as the
    # training data has sources, resolved by the trainer (its default: on gridnav the per-trajectory
    # hypergradient is noisy and the source explains much of it; benchmarks/RESULTS.md, "Why the head
    # does not learn quality on gridnav")
    num_sources: int = 0
    source_dim: int = 8  # width of the source embedding (num_sources > 0)
    use_returns: bool = False  # the episode return is a feature of the head
    # the score's logit also gets c · L_i with a learned scalar c (starting at 0): a path from the
    # per-trajectory loss that is monotone whatever the MLP does (a loss-only Meta-Weight-Net head
    # ranked trajectories inside a source better than the MLP over all features: RESULTS-log.md,
    # "how the heads rank the pool")
    monotone_loss: bool = False
    init_mass: float = 1.0  # m at initialisation: synthetic weights start at mean m
    real_weight: float = 1.0  # weight of every real training trajectory
    # λ_conc on 1/√n_eff and λ_shift on Σ_syn w_i d_i / S, in units of the outer surrogate (the
    # first-order change of the validation loss per outer step). Defaults: the toy study's choice on
    # its tuning split of real data (benchmarks/RESULTS.md, "Toy: honest arms"; docs/toy/sweep.md);
    # not tuned for an LLM run, whose surrogate has another scale: sweep them on its validation tasks
    concentration: float = 1e-3
    task_shift: float = 1e-2  # λ_shift (see concentration)
    # "pool", "running" or "batch": what μ in w_i = m · s_i / μ is (see the module docstring)
    normalizer: str = "pool"
    pool_size: int = 256  # "pool": synthetic trajectories of earlier batches whose mean score is μ
    normalizer_momentum: float = 0.9  # "running": μ ← momentum·μ + (1 − momentum)·(batch mean score)

    def __post_init__(self):
        if self.hidden_size < 1:
            raise ValueError(f"HeadConfig.hidden_size must be >= 1, got {self.hidden_size}")
        if self.num_sources < -1:
            raise ValueError(f"HeadConfig.num_sources must be >= 0 (or -1: auto), got {self.num_sources}")
        if not self.init_mass > 0:
            raise ValueError(f"HeadConfig.init_mass must be > 0, got {self.init_mass}")
        for name in ("real_weight", "concentration", "task_shift"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"HeadConfig.{name} must be finite and >= 0, got {value}")
        if self.normalizer not in ("pool", "running", "batch"):
            raise ValueError(
                f"HeadConfig.normalizer must be 'pool', 'running' or 'batch', got {self.normalizer!r}"
            )
        if self.pool_size < 1:
            raise ValueError(f"HeadConfig.pool_size must be >= 1, got {self.pool_size}")
        if not 0 <= self.normalizer_momentum < 1:
            raise ValueError(
                f"HeadConfig.normalizer_momentum must be in [0, 1), got {self.normalizer_momentum}"
            )


_INITIAL_SCORE = math.log(2.0) + 1e-6  # softplus(0) + 1e-6: every score at initialisation


class ReweightingHead(nn.Module):
    """features -> weights [S] (float32): synthetic ones m · s_i / μ, real ones real_weight.

    Buffers (saved with the state dict): the pool of the ``"pool"`` normaliser (``pool_pooled`` [K, D],
    ``pool_loss``, ``pool_log_tokens``, ``pool_source``, ``pool_returns`` [K], ``pool_count``,
    ``pool_next``), ``score_mean`` (μ of ``"running"``) and the real validation reference of the
    task-shift term, ``reference_mean`` [D] and ``reference_scale``.
    """

    def __init__(self, hidden_dim: int, cfg: HeadConfig = HeadConfig()):
        super().__init__()
        if cfg.num_sources < 0:
            raise ValueError(
                "HeadConfig.num_sources=-1 (auto) must be set to the number of sources before the head is built "
                "(the trainer does it from its training data)"
            )
        self.cfg = cfg
        self.pooled_norm = nn.LayerNorm(hidden_dim)
        width = hidden_dim + 2 + (cfg.source_dim if cfg.num_sources else 0) + int(cfg.use_returns)
        self.source = nn.Embedding(cfg.num_sources, cfg.source_dim) if cfg.num_sources else None
        # No bias on the score layer: while the scores are (nearly) equal, as at the start, a shift of
        # every score leaves the normalised weights unchanged, so that bias's gradient is float noise
        # alone, and Adam turns noise into full-size steps (measured: 1 vs 2 data-parallel ranks then
        # differed by 0.01 in that bias after two outer steps). The first layer's bias remains.
        self.mlp = nn.Sequential(
            nn.Linear(width, cfg.hidden_size), nn.SiLU(), nn.Linear(cfg.hidden_size, 1, bias=False)
        )
        nn.init.zeros_(self.mlp[-1].weight)  # every score starts equal: uniform weights
        self.loss_slope = nn.Parameter(torch.zeros(())) if cfg.monotone_loss else None
        self.log_mass = nn.Parameter(torch.tensor(math.log(cfg.init_mass)))
        self.register_buffer("score_mean", torch.tensor(_INITIAL_SCORE))  # exact for the initial head
        K = cfg.pool_size if cfg.normalizer == "pool" else 0
        self.register_buffer("pool_pooled", torch.zeros(K, hidden_dim))
        self.register_buffer("pool_loss", torch.zeros(K))
        self.register_buffer("pool_log_tokens", torch.zeros(K))
        self.register_buffer("pool_source", torch.zeros(K, dtype=torch.long))
        self.register_buffer("pool_returns", torch.zeros(K))
        self.register_buffer("pool_count", torch.tensor(0))
        self.register_buffer("pool_next", torch.tensor(0))
        self.register_buffer("reference_mean", torch.zeros(hidden_dim))
        self.register_buffer("reference_scale", torch.tensor(0.0))  # 0: no reference yet

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
        logit = self.mlp(torch.cat(parts, dim=1)).squeeze(1)
        if self.loss_slope is not None:
            logit = logit + self.loss_slope * f.loss
        return nn.functional.softplus(logit) + 1e-6

    def forward(self, f: TrajectoryFeatures, update: bool | None = None) -> torch.Tensor:
        """Weights [S]. ``update`` (default: ``self.training``) adds this batch's synthetic trajectories to
        the pool (or its mean score to the running μ) *after* using it: a batch's weights never
        depend on its batch-mates (the pool's first batch aside)."""
        real = torch.full_like(f.loss, self.cfg.real_weight)
        if not bool(f.synthetic.any()):
            return real
        s = self.scores(f)
        update = self.training if update is None else update
        mode = self.cfg.normalizer
        if mode == "batch" or (mode == "pool" and int(self.pool_count) == 0):
            mu = s[f.synthetic].mean()
        elif mode == "pool":
            mu = self.scores(self._pool()).mean()
        else:
            mu = self.score_mean.detach().clone()
        if update and mode == "pool":
            self._push(f)
        elif update and mode == "running":
            momentum = self.cfg.normalizer_momentum
            self.score_mean.mul_(momentum).add_((1 - momentum) * s[f.synthetic].detach().mean())
        return torch.where(f.synthetic, self.mass * s / mu, real)

    def _pool(self) -> TrajectoryFeatures:
        """The pool's features (copies: the pool may change before a backward through them)."""
        n = int(self.pool_count)
        return TrajectoryFeatures(
            self.pool_pooled[:n].clone(), self.pool_loss[:n].clone(), self.pool_log_tokens[:n].clone(),
            torch.ones(n, dtype=torch.bool, device=self.pool_loss.device),
            self.pool_source[:n].clone() if self.cfg.num_sources else None,
            self.pool_returns[:n].clone() if self.cfg.use_returns else None,
        )  # fmt: skip

    @torch.no_grad()
    def _push(self, f: TrajectoryFeatures) -> None:
        """Add the batch's synthetic trajectories to the FIFO pool (the oldest go first)."""
        sel = f.synthetic
        rows = [f.pooled[sel], f.loss[sel], f.log_tokens[sel]]
        rows.append(
            f.source[sel] if f.source is not None else torch.zeros_like(f.loss[sel], dtype=torch.long)
        )
        rows.append(f.returns[sel] if f.returns is not None else torch.zeros_like(f.loss[sel]))
        K = self.pool_loss.shape[0]
        n = rows[0].shape[0]
        idx = (int(self.pool_next) + torch.arange(n, device=self.pool_loss.device)) % K
        if n > K:  # more than the pool holds: keep the last K
            idx, rows = idx[-K:], [r[-K:] for r in rows]
        buffers = (
            self.pool_pooled,
            self.pool_loss,
            self.pool_log_tokens,
            self.pool_source,
            self.pool_returns,
        )
        for buf, r in zip(buffers, rows):
            buf[idx] = r.to(buf.dtype)
        self.pool_next.fill_((int(self.pool_next) + n) % K)
        self.pool_count.fill_(min(K, int(self.pool_count) + n))

    @torch.no_grad()
    def update_reference(self, pooled: torch.Tensor, momentum: float = 0.9) -> None:
        """Fold real validation trajectories' pooled states [n, D] into the task-shift reference: their
        mean and their mean distance to it (a running average over outer steps; the first call with >= 2
        trajectories sets it: one trajectory has no spread, so it moves only the mean of a set reference)."""
        if pooled.ndim != 2 or pooled.shape[1] != self.reference_mean.shape[0] or pooled.shape[0] < 1:
            raise ValueError(
                f"pooled must be [n >= 1, {self.reference_mean.shape[0]}] (validation trajectories), "
                f"got {tuple(pooled.shape)}"
            )
        pooled = pooled.float()
        mean = pooled.mean(0)
        scale = (pooled - mean).norm(dim=1).mean()
        if float(self.reference_scale) == 0.0:
            if pooled.shape[0] < 2:  # one trajectory has no spread: wait for a batch that has one
                return
            self.reference_mean.copy_(mean)
            self.reference_scale.copy_(scale)
        else:
            self.reference_mean.lerp_(mean, 1 - momentum)
            if pooled.shape[0] >= 2:  # a single trajectory says nothing about the spread
                self.reference_scale.lerp_(scale, 1 - momentum)

    def shift_distance(self, pooled: torch.Tensor) -> torch.Tensor:
        """d_i = |pooled_i − μ_val| / r_val [S] (detached): distance to the real validation trajectories'
        mean pooled state in units of their own mean distance to it (≈ 1 for real-like trajectories)."""
        if float(self.reference_scale) <= 0.0:
            raise ValueError(
                "the task-shift term needs the real validation reference: call head.update_reference(pooled "
                "states of validation trajectories) first, or set head.task_shift=0"
            )
        return ((pooled.float() - self.reference_mean).norm(dim=1) / self.reference_scale).detach()


def effective_sample_size(weights: torch.Tensor) -> torch.Tensor:
    """n_eff = (Σ w)² / Σ w² (differentiable); 0 for no weights."""
    if weights.numel() == 0:
        return weights.new_zeros(())
    return weights.sum() ** 2 / (weights * weights).sum().clamp_min(torch.finfo(weights.dtype).tiny)


class OuterObjective(NamedTuple):
    loss: torch.Tensor  # [] what to backpropagate into the head
    surrogate: torch.Tensor  # [] Σ_i w_i stopgrad(dL_out/dw_i)
    concentration: torch.Tensor  # [] λ_conc / √n_eff
    task_shift: torch.Tensor  # [] λ_shift · Σ_syn w_i d_i / S
    n_eff: torch.Tensor  # [] over all weighted trajectories of the batch (real included)
    mass: torch.Tensor  # [] m, the learned synthetic mass
    synthetic_weight: torch.Tensor  # [] mean weight of the batch's synthetic trajectories (m · mean s/μ)
    shift: torch.Tensor  # [] mean d_i over the batch's synthetic trajectories (nan without the term)


def outer_objective(
    head: ReweightingHead,
    weights: torch.Tensor,
    hypergradient: torch.Tensor,
    synthetic: torch.Tensor,
    pooled: torch.Tensor | None = None,
    regularize: bool = True,
) -> OuterObjective:
    """The head's loss for one outer step (see the module docstring).

    Args:
        weights [S]: ``head(features)`` (differentiable in the head's parameters).
        hypergradient [S]: dL_out/dw_i, e.g. ``head_hypergradient(...).traj_weights`` (detached here).
        synthetic [S] bool.
        pooled [S, D]: the trajectories' pooled hidden states (``features.pooled``); needed when
            ``head.cfg.task_shift > 0``. Until the head's validation reference is set
            (:meth:`ReweightingHead.update_reference` with >= 2 trajectories) the term is 0.
        regularize: add the regularisers to ``loss`` (they are still computed and returned). Data
            parallelism sums the ranks' head gradients: one rank adds them, the others pass False.
    """
    if weights.shape != hypergradient.shape or weights.shape != synthetic.shape:
        raise ValueError(
            f"weights, hypergradient and synthetic must have the same shape [S], got {tuple(weights.shape)}, "
            f"{tuple(hypergradient.shape)}, {tuple(synthetic.shape)}"
        )
    cfg = head.cfg
    zero = weights.new_zeros(())
    surrogate = (weights * hypergradient.detach().to(weights.dtype)).sum()
    n_eff = effective_sample_size(weights)
    concentration = cfg.concentration / n_eff.clamp_min(1e-12).sqrt() if cfg.concentration else zero
    task_shift, shift = zero, weights.new_tensor(float("nan"))
    # the term waits for the validation reference (a validation batch of >= 2 trajectories)
    if cfg.task_shift and bool(synthetic.any()) and (pooled is None or float(head.reference_scale) > 0):
        if pooled is None or pooled.shape[0] != weights.shape[0]:
            raise ValueError("head.task_shift > 0: pass pooled [S, D] (the features' pooled hidden states)")
        d = head.shift_distance(pooled).to(weights.dtype)
        task_shift = cfg.task_shift * (weights * d)[synthetic].sum() / weights.shape[0]
        shift = d[synthetic].mean()
    syn_weight = weights[synthetic].mean() if bool(synthetic.any()) else zero
    loss = surrogate + concentration + task_shift if regularize else surrogate
    return OuterObjective(
        loss, surrogate, concentration, task_shift, n_eff, head.mass,
        syn_weight, shift,
    )  # fmt: skip


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
