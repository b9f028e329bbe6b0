"""The vocabulary-parallel head (boost_kernels.vocab_parallel) against the whole head.

On 2 and 4 gloo ranks (FSDP2's Shard(0) rows, an empty shard included), each rank holding its share of
the trajectories: the loss, its gradient rows, HVPs, per-trajectory tangents and the hypergradient
(cg, neumann, identity; with and without a softcap) equal the single-process fused ops'. float64: to
1e-10; float32: to 1e-6 relative (the issue's bound).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import boost_kernels as bk
from boost.bilevel.hypergradient import (
    HeadBatch,
    SolverConfig,
    head_hypergradient,
    sharded_head_hypergradient,
)
from boost_kernels.vocab_parallel import Collective, ProcessGroup, ShardedHeadBatch, VocabShard, shard_rows


def problem(T=60, D=8, V=37, S=6, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, D, generator=gen, dtype=torch.float64).to(dtype)
    weight = (0.5 * torch.randn(V, D, generator=gen, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, V, (T,), generator=gen)
    segments = torch.randint(-1, S, (T,), generator=gen)
    weights = torch.rand(S, generator=gen, dtype=torch.float64).to(dtype)
    g = torch.randn(V, D, generator=gen, dtype=torch.float64).to(dtype)
    return hidden, weight, labels, segments, weights, g


def share(rank: int, world: int, labels, segments, S: int, empty_last: bool = False):
    """This rank's trajectories (i % world == rank; ``empty_last``: i % (world - 1), so that the last
    rank holds no token): a token mask and the local segment ids."""
    mine = torch.arange(S) % (world - 1 if empty_last else world) == rank
    local = torch.full((S,), -1, dtype=torch.int64)
    local[mine] = torch.arange(int(mine.sum()))
    keep = (segments >= 0) & mine[segments.clamp(min=0)]
    return keep, local[segments[keep]], mine


def check(rank: int, world: int, dtype: torch.dtype, softcap, V: int, stream: bool = False,
          empty_last: bool = False) -> list[str]:  # fmt: skip
    """Every comparison of one configuration on this rank (``stream``: the tokens broadcast one rank's
    block at a time instead of gathered; ``empty_last``: the last rank has no token); returns the
    failures."""
    tol = 1e-10 if dtype == torch.float64 else 1e-6
    S, Z = 6, 9.0
    hidden, weight, labels, segments, w, g = problem(V=V, dtype=dtype)
    rows = shard_rows(V, world, rank)
    keep, local_segments, mine = share(rank, world, labels, segments, S, empty_last)
    collective = ProcessGroup() if world > 1 else Collective()
    shard = VocabShard(weight[rows], rows.start, V, collective, softcap=softcap)
    batch = ShardedHeadBatch(
        shard, hidden[keep], labels[keep], local_segments, int(mine.sum()), stream=stream
    )
    full = HeadBatch(hidden, labels, segments, S, softcap=softcap)
    failures = []

    def expect(name, got, want):
        # relative over the whole quantity: every rank's rows or trajectories (a rank's share may be one
        # trajectory, whose float32 value alone can cancel)
        parts = torch.tensor([float((got.double() - want.double()).pow(2).sum()), float(want.double().pow(2).sum())],
                             dtype=torch.float64)  # fmt: skip
        if got.dim() == 0:  # a replicated scalar: the same on every rank
            parts /= world
        err_sq, norm_sq = collective.sum_(parts).tolist()
        err = (err_sq / max(norm_sq, 1e-300)) ** 0.5
        if not err <= tol:
            failures.append(
                f"rank {rank}/{world} {dtype} softcap={softcap} V={V} stream={stream} empty_last={empty_last} {name}: "
                f"relative error {err:.3g}"
            )

    weight_ = weight.clone().requires_grad_()
    ref = bk.trajectory_cross_entropy(hidden, weight_, labels, segments, S, traj_weights=w, normalizer=Z,
                                      softcap=softcap)  # fmt: skip
    (ref_grad,) = torch.autograd.grad(ref.loss, weight_)
    out = batch.loss(Z, w[mine])
    expect("loss", out.loss, ref.loss.detach())
    expect("per-trajectory losses", out.per_trajectory, ref.per_trajectory.detach()[mine])
    expect("gradient rows", out.weight_grad, ref_grad[rows])
    u = g.clone()
    ref_hvp = bk.trajectory_hvp(hidden, weight, labels, segments, S, tangent_weight=u, traj_weights=w,
                                normalizer=Z, softcap=softcap).weight  # fmt: skip
    expect("HVP rows", batch.hvp(batch.coefficients(w[mine], Z), u[rows]), ref_hvp[rows])
    ref_jvp = bk.trajectory_jvp(
        hidden, weight, labels, segments, S, tangent_weight=u, softcap=softcap
    ).tangent
    expect("tangents", batch.tangents(u[rows]), ref_jvp[mine])
    methods = (
        [("cg", {}), ("neumann", {"alpha": 0.2}), ("identity", {})]
        if softcap is None
        else [("neumann", {"alpha": 0.2})]
    )  # fmt: skip (a softcap makes H indefinite: no CG)
    for method, extra in methods:
        cfg = SolverConfig(method=method, steps=4, damping=0.1, **extra)
        precondition = (lambda x: 0.3 * x) if method == "identity" else None
        want = head_hypergradient(full, weight, w, g, cfg, normalizer=Z, precondition=precondition)
        got = sharded_head_hypergradient(batch, w[mine], g[rows], cfg, Z, precondition=precondition)
        expect(f"{method} hypergradient", got.traj_weights, want.traj_weights[mine])
        expect(f"{method} v rows", got.v, want.v[rows])
        if method != "identity":
            if not abs(got.residual - want.residual) <= 10 * tol * max(1.0, want.residual):
                failures.append(f"rank {rank}/{world} {method} residual {got.residual} vs {want.residual}")
            warm = sharded_head_hypergradient(batch, w[mine], g[rows], cfg, Z, init=want.v[rows])
            want_warm = head_hypergradient(full, weight, w, g, cfg, normalizer=Z, init=want.v)
            expect(f"{method} warm-started hypergradient", warm.traj_weights, want_warm.traj_weights[mine])
    return failures


def worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        failures = []
        for dtype in (torch.float64, torch.float32):
            for softcap in (None, 4.0):
                for V in (37, 5):  # 5 rows on 4 ranks: 2, 2, 1 and an empty shard
                    for stream in (False, True) if dtype == torch.float64 else (False,):
                        failures += check(rank, world, dtype, softcap, V, stream)
        for stream in (False, True):  # a rank without tokens (a phantom share in the trainer)
            failures += check(rank, world, torch.float64, None, 37, stream, empty_last=True)
        queue.put((rank, failures))
    except Exception as exc:  # report it instead of hanging the other ranks' test
        queue.put((rank, [f"rank {rank}: {type(exc).__name__}: {exc}"]))
        raise
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_head_equals_gathered_head_on_gloo_ranks(world):
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(worker, args=(world, free_port(), queue), nprocs=world, join=True)
    failures = [f for _ in range(world) for f in queue.get()[1]]
    assert not failures, "\n".join(failures)


def test_one_rank_is_the_fused_ops():
    assert check(0, 1, torch.float64, None, 37) == []
    assert check(0, 1, torch.float32, 4.0, 37) == []
    assert check(0, 1, torch.float64, 4.0, 37, stream=True) == []


def test_shard_rows_are_torch_chunk_s_blocks():
    for V, world in ((37, 4), (5, 4), (8, 2), (3, 1)):
        chunks = torch.arange(V).chunk(world)
        rows = [shard_rows(V, world, r) for r in range(world)]
        assert [torch.arange(V)[sl].tolist() for sl in rows[: len(chunks)]] == [c.tolist() for c in chunks]
        assert all(
            sl.stop == sl.start for sl in rows[len(chunks) :]
        )  # ranks past torch.chunk's blocks: empty


def test_bad_shard_and_labels_are_refused():
    weight = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="rows"):
        VocabShard(weight, 8, 10, Collective())
    shard = VocabShard(weight, 0, 4, Collective())
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        ShardedHeadBatch(shard, torch.zeros(2, 3), torch.tensor([1, 9]), torch.tensor([0, 0]), 1)
    batch = ShardedHeadBatch(shard, torch.zeros(2, 3), torch.tensor([1, 2]), torch.tensor([0, 0]), 1)
    with pytest.raises(ValueError, match="shaped like the shard"):
        sharded_head_hypergradient(batch, torch.ones(1), torch.zeros(5, 3), SolverConfig(), 1.0)
