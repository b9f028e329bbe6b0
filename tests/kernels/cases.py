"""Random packed batches for the kernel tests: fresh inputs every run, seed in the case id on failure."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Shape:
    name: str
    T: int
    D: int
    V: int
    S: int
    bias: bool = True
    softcap: float | None = None
    normalize: str = "mean"
    normalizer: float | None = None
    ignore_frac: float = 0.2
    empty: tuple[int, ...] = ()  # trajectories that get no counted token


SHAPES = [
    Shape("T1", T=1, D=24, V=37, S=1, ignore_frac=0.0),
    Shape("odd_shapes_empty_traj", T=53, D=40, V=161, S=4, empty=(2,)),
    Shape("many_short", T=64, D=16, V=97, S=30, bias=False),
    Shape("one_trajectory", T=40, D=20, V=130, S=1),
    Shape("softcap", T=33, D=24, V=100, S=3, softcap=4.0),
    Shape("sum_normalizer", T=29, D=12, V=70, S=5, normalize="sum", normalizer=7.5),
]


def fresh_seed() -> int:
    """A new random seed per test run (each failure message prints it); BOOST_TEST_SEED=<n>
    replays one: `BOOST_TEST_SEED=2019332473 pytest tests/kernels/test_jvp_hvp.py -k T1`."""
    replay = os.environ.get("BOOST_TEST_SEED")
    return int(replay) if replay else int.from_bytes(os.urandom(4), "little")


@dataclass
class Batch:
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    labels: torch.Tensor
    segment_ids: torch.Tensor
    traj_weights: torch.Tensor
    seed: int


def make_batch(shape: Shape, dtype: torch.dtype, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    T, D, V, S = shape.T, shape.D, shape.V, shape.S
    hidden = torch.randn(T, D, generator=g).to(dtype)
    weight = (torch.randn(V, D, generator=g) / D**0.5).to(dtype)
    bias = (0.1 * torch.randn(V, generator=g)).to(dtype) if shape.bias else None
    labels = torch.randint(0, V, (T,), generator=g)
    # Sorted segment ids like a packed batch, with -1 (not counted) sprinkled in.
    segment_ids = torch.sort(torch.randint(0, S, (T,), generator=g)).values
    if T >= S:  # every trajectory present at least once before masking
        segment_ids[:S] = torch.arange(S)
        segment_ids = torch.sort(segment_ids).values
    drop = torch.rand(T, generator=g) < shape.ignore_frac
    segment_ids[drop & (torch.rand(T, generator=g) < 0.5)] = -1
    labels[drop & (segment_ids >= 0)] = -100
    for i in shape.empty:
        labels[segment_ids == i] = -100
    traj_weights = torch.rand(S, generator=g) * 2
    return Batch(hidden, weight, bias, labels, segment_ids, traj_weights, seed)
