"""Correctness of our ops against a float64 reference on materialised logits (for ``gpu_suite.py``).

One batch with everything the trainer produces: S trajectories of random length, prompt tokens
(segment -1), ignored labels, an empty trajectory, trajectory weights. Our results, in the input
dtype on the device, are compared by ‖ours − ref‖ / ‖ref‖ with the reference computed in float64
from the same (rounded) inputs:

* loss and per-trajectory losses; gradients of hidden, weight and traj_weights (upstream:
  loss + Σ_i r_i L_i for a random r, so the per-trajectory path is exercised too);
* JVP along (U for W, δh for hidden): ``trajectory_jvp`` and ``torch.func.jvp`` through our loss;
* HVP along the same direction, both blocks: ``trajectory_hvp`` and double backward through our loss.

Tolerances: bfloat16 1.6e-2 (what ``tests/kernels`` allow: bf16 outputs and inputs); float32 1e-4,
which passes float32 arithmetic and fails TF32 (≈1e-3), the silent precision loss to catch on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import boost_kernels as bk
from benchmarks._common import random_segments
from benchmarks._variants import naive_per_trajectory

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
IGNORE = -100


@dataclass(frozen=True)
class CheckShape:
    T: int
    D: int
    V: int
    S: int


@dataclass
class Check:
    dtype: str
    quantity: str
    rel_err: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.rel_err <= self.tolerance  # False for NaN

    def to_dict(self) -> dict:
        return {**self.__dict__, "passed": self.passed}


def _batch(shape: CheckShape, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    T, D, V, S = shape.T, shape.D, shape.V, shape.S
    gen = torch.Generator().manual_seed(seed)

    def normal(*size, std=1.0):
        return (torch.randn(*size, generator=gen) * std).to(dtype).to(device)

    segments = random_segments(T, S - 1, gen)  # trajectory S-1 stays empty
    segments[torch.rand(T, generator=gen) < 0.1] = -1  # prompt / environment tokens
    labels = torch.randint(0, V, (T,), generator=gen)
    labels[torch.rand(T, generator=gen) < 0.05] = IGNORE
    return {
        "hidden": normal(T, D),
        "weight": normal(V, D, std=D**-0.5),
        "labels": labels.to(device),
        "segment_ids": segments.to(device),
        "traj_weights": (torch.rand(S, generator=gen) + 0.5).to(device),
        "upstream": torch.randn(S, generator=gen).to(device),
        "tangent_weight": normal(V, D, std=D**-0.5),
        "tangent_hidden": normal(T, D),
    }


def _ours(b: dict, S: int, backend: str) -> dict:
    h = b["hidden"].clone().requires_grad_()
    w = b["weight"].clone().requires_grad_()
    tw = b["traj_weights"].clone().requires_grad_()
    common = dict(labels=b["labels"], segment_ids=b["segment_ids"], num_segments=S, backend=backend)
    out = bk.trajectory_cross_entropy(h, w, traj_weights=tw, **common)
    (out.loss + (b["upstream"] * out.per_trajectory).sum()).backward()
    u, dh = b["tangent_weight"], b["tangent_hidden"]
    jvp = bk.trajectory_jvp(b["hidden"], b["weight"], tangent_weight=u, tangent_hidden=dh, **common)
    per_fn = lambda h_, w_: bk.trajectory_cross_entropy(h_, w_, **common).per_trajectory
    jvp_autograd = torch.func.jvp(per_fn, (b["hidden"], b["weight"]), (dh, u))[1]
    hvp = bk.trajectory_hvp(
        b["hidden"],
        b["weight"],
        tangent_weight=u,
        tangent_hidden=dh,
        traj_weights=b["traj_weights"],
        **common,
    )
    h2, w2 = b["hidden"].clone().requires_grad_(), b["weight"].clone().requires_grad_()
    loss = bk.trajectory_cross_entropy(h2, w2, traj_weights=b["traj_weights"], **common).loss
    grads = torch.autograd.grad(loss, (h2, w2), create_graph=True)
    dd_h, dd_w = torch.autograd.grad(grads, (h2, w2), grad_outputs=(dh, u))
    return {
        "loss": out.loss, "per_trajectory": out.per_trajectory,
        "grad hidden": h.grad, "grad weight": w.grad, "grad traj_weights": tw.grad,
        "jvp (trajectory_jvp)": jvp.tangent, "jvp (torch.func.jvp)": jvp_autograd,
        "hvp weight (trajectory_hvp)": hvp.weight, "hvp hidden (trajectory_hvp)": hvp.hidden,
        "hvp weight (double backward)": dd_w, "hvp hidden (double backward)": dd_h,
    }  # fmt: skip


def _reference(b: dict, S: int) -> dict:
    f64 = {k: (v.double() if v.is_floating_point() else v) for k, v in b.items()}
    y, seg = f64["labels"], f64["segment_ids"]
    per_fn = lambda h_, w_: naive_per_trajectory(h_, w_, y, seg, S, IGNORE)
    loss_fn = lambda h_, w_, tw_: (tw_ * per_fn(h_, w_)).sum() / S
    h, w, tw = (f64[k].clone().requires_grad_() for k in ("hidden", "weight", "traj_weights"))
    per = per_fn(h, w)
    loss = (tw * per).sum() / S
    (loss + (f64["upstream"] * per).sum()).backward()
    primals, tangents = (f64["hidden"], f64["weight"]), (f64["tangent_hidden"], f64["tangent_weight"])
    jvp = torch.func.jvp(per_fn, primals, tangents)[1]
    grad_fn = torch.func.grad(lambda h_, w_: loss_fn(h_, w_, f64["traj_weights"]), argnums=(0, 1))
    dd_h, dd_w = torch.func.jvp(grad_fn, primals, tangents)[1]
    return {
        "loss": loss, "per_trajectory": per,
        "grad hidden": h.grad, "grad weight": w.grad, "grad traj_weights": tw.grad,
        "jvp (trajectory_jvp)": jvp, "jvp (torch.func.jvp)": jvp,
        "hvp weight (trajectory_hvp)": dd_w, "hvp hidden (trajectory_hvp)": dd_h,
        "hvp weight (double backward)": dd_w, "hvp hidden (double backward)": dd_h,
    }  # fmt: skip


def rel_err(x: torch.Tensor | None, ref: torch.Tensor) -> float:
    if x is None:
        return float("nan")
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))


def check_ops(shape: CheckShape, dtype: torch.dtype, device: str, backend: str) -> list[Check]:
    """Every quantity of our ops vs the float64 reference, in ``dtype`` on ``device``."""
    batch = _batch(shape, dtype, device)
    ours, ref = _ours(batch, shape.S, backend), _reference(batch, shape.S)
    name = str(dtype).removeprefix("torch.")
    return [Check(name, key, rel_err(ours[key], ref[key]), TOLERANCE[dtype]) for key in ref]
