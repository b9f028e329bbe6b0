"""Measured per-rank peak memory of the outer step's head block on N gloo ranks: gathered head against
vocabulary rows (``sharded_outer``), and the two hypergradients compared.

    python benchmarks/sharded_outer_memory.py                    # V=32768, D=512, ranks 1 2 4
    python benchmarks/sharded_outer_memory.py --ranks 1 2 4 8 --vocab 65536

Each rank holds, as FSDP2 would, its ``Shard(0)`` rows of the head before the inner step (θ_t) and
after it (θ_{t+1}) and its share of an inner and a validation batch (``--tokens`` counted tokens
each, split over the ranks), then computes the outer step's hypergradient (CG, ``--steps``
products, residual and scores) in one of two ways:

- ``gathered`` (``sharded_outer=false``): both heads all-gathered to [V, D], g from the local
  validation tokens all-reduced, the fused ops on the full head, each HVP all-reduced (what the
  trainer did before the sharded step);
- ``sharded``: :func:`boost.bilevel.hypergradient.sharded_head_hypergradient` on the rows, every rank's
  counted tokens gathered (``sharded_tokens=gathered``, the default);
- ``streamed``: the same with ``sharded_tokens=streamed`` (each pass broadcasts one rank's tokens at a
  time): memory T_r · D instead of T_all · D, which matters once the tokens outweigh the rows
  (``--tokens`` large against ``--vocab``).

Peak memory is the process's resident-set high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs`` just before the step) minus its resident set at that moment, with glibc's
mmap threshold fixed at 1 MiB so that freed tensors leave the resident set. It counts every byte the
step allocates (vectors, gathered tokens, [chunk, V_r] blocks, communication buffers). Results:
``benchmarks/results/sharded_outer_memory.json`` and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from pathlib import Path

MIB = 2**20


def _status(key: str) -> int:
    """A ``/proc/self/status`` field in bytes (VmHWM, VmRSS)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _rank_main(rank: int, world: int, port: int, args: dict, queue) -> None:
    import torch
    import torch.distributed as dist

    from boost.bilevel.hypergradient import SolverConfig
    from boost_kernels.vocab_parallel import ProcessGroup, shard_rows

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    V, D, T, S, mode = args["vocab"], args["hidden"], args["tokens"], args["trajectories"], args["mode"]
    size = -(-V // world)
    rows = shard_rows(V, world, rank)
    gen = torch.Generator().manual_seed(0)
    # each rank makes only its rows of the heads (one row block at a time: no [V, D] here)
    pre, post = [], []
    for r in range(world):
        block = shard_rows(V, world, r)
        a = 0.02 * torch.randn(block.stop - block.start, D, generator=gen)
        b = a + 1e-3 * torch.randn(block.stop - block.start, D, generator=gen)
        if r == rank:
            pre, post = a, b
        del a, b
    tokens = [torch.randn(T, D, generator=gen) for _ in range(2)]
    labels = [torch.randint(0, V, (T,), generator=gen) for _ in range(2)]
    segments = [torch.randint(0, S, (T,), generator=gen).sort().values for _ in range(2)]
    weights = torch.rand(S, generator=gen)
    mine = torch.arange(S) % world == rank  # this rank's trajectories, renumbered
    local_id = torch.cumsum(mine.long(), 0) - 1

    def share(k):
        keep = mine[segments[k]]
        return tokens[k][keep], labels[k][keep], local_id[segments[k][keep]]

    (th, ty, ts), (vh, vy, vs) = share(0), share(1)
    w_local = weights[mine]
    cfg = SolverConfig(method="cg", steps=args["steps"], damping=1e-3, warm_start=False)
    group = ProcessGroup()
    for _ in range(2):  # a warm-up, then the measured pass (the first also pays one-time allocations)
        dist.barrier()
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # reset the high-water mark to the current resident set
        before = _status("VmRSS")
        start = time.perf_counter()
        hyper = _outer_step(mode, V, D, S, size, rows, pre, post, (th, ty, ts), (vh, vy, vs), mine, w_local,
                            cfg, group)  # fmt: skip
        seconds = time.perf_counter() - start
        peak = _status("VmHWM") - before
    queue.put({"rank": rank, "peak_bytes": peak, "seconds": seconds,
               "hypergradient": {int(i): float(x) for i, x in zip(torch.nonzero(mine).squeeze(1),
                                                                   hyper.traj_weights)}})  # fmt: skip
    dist.destroy_process_group()


def _outer_step(mode, V, D, S, size, rows, pre, post, train, val, mine, w_local, cfg, group):
    """One outer step's hypergradient on this rank (see the module docstring)."""
    import torch
    import torch.distributed as dist

    from boost.bilevel.hypergradient import HeadBatch, head_hypergradient, sharded_head_hypergradient
    from boost_kernels import trajectory_cross_entropy
    from boost_kernels.vocab_parallel import ShardedHeadBatch, VocabShard

    (th, ty, ts), (vh, vy, vs) = train, val
    world = dist.get_world_size()
    if mode == "gathered":

        def gather(x):  # into one [N·ceil(V/N), D] buffer, as FSDP2's full_tensor
            full = torch.empty(world * size, D)
            dist.all_gather(list(full.chunk(world)), torch.cat([x, x.new_zeros(size - x.shape[0], D)]))
            return full[:V]

        W_post = gather(post).requires_grad_()
        out = trajectory_cross_entropy(vh, W_post, vy, vs, int(mine.sum()), normalizer=float(S))
        (g,) = torch.autograd.grad(out.loss, W_post)
        dist.all_reduce(g)
        W_pre = gather(pre)
        return head_hypergradient(HeadBatch(th, ty, ts, int(mine.sum())), W_pre, w_local, g, cfg,
                                  normalizer=float(S), reduce=group.sum_)  # fmt: skip
    shard, stream = VocabShard(post, rows.start, V, group), mode == "streamed"
    val = ShardedHeadBatch(shard, vh, vy, vs, int(mine.sum()), stream=stream).loss(float(S))
    train = ShardedHeadBatch(shard.with_weight(pre), th, ty, ts, int(mine.sum()), stream=stream)
    return sharded_head_hypergradient(train, w_local, val.weight_grad, cfg, float(S))


def measure(world: int, mode: str, args: argparse.Namespace) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MIB)  # read by the children's glibc at start
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    spec = {**vars(args), "mode": mode}
    mp.spawn(_rank_main, args=(world, port, spec, queue), nprocs=world, join=True)
    ranks = sorted((queue.get() for _ in range(world)), key=lambda r: r["rank"])
    hyper = {}
    for r in ranks:
        hyper.update(r["hypergradient"])
    return {"ranks": world, "mode": mode, "peak_bytes_per_rank": [r["peak_bytes"] for r in ranks],
            "seconds": max(r["seconds"] for r in ranks),
            "hypergradient": [hyper[i] for i in sorted(hyper)]}  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=512, help="counted tokens per batch (all ranks)")
    parser.add_argument("--trajectories", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="CG products")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--modes", nargs="+", default=["gathered", "sharded", "streamed"],
                        choices=["gathered", "sharded", "streamed"], help="the first is the reference")  # fmt: skip
    parser.add_argument("--out", default="benchmarks/results/sharded_outer_memory.json")
    args = parser.parse_args(argv)
    vector, tokens = args.vocab * args.hidden * 4, args.tokens * args.hidden * 4
    rows = []
    for world in args.ranks:
        for mode in args.modes:
            rows.append(measure(world, mode, args))
            print(f"ranks {world} {mode}: {max(rows[-1]['peak_bytes_per_rank']) / MIB:.0f} MiB", flush=True)
    print(f"\nV={args.vocab} D={args.hidden} (one [V, D] fp32 vector: {vector / MIB:.0f} MiB), "
          f"{args.tokens} counted tokens per batch ([T, D] fp32: {tokens / MIB:.0f} MiB), CG {args.steps} "
          "products; peak MiB per rank (in [V, D] vectors), and the hypergradients' max relative "
          f"difference from {args.modes[0]}\n")  # fmt: skip
    print("| ranks | " + " | ".join(args.modes) + " |")
    print("|---|" + "---|" * len(args.modes))
    for world in args.ranks:
        ref, cells = None, []
        for mode in args.modes:
            r = next(r for r in rows if r["ranks"] == world and r["mode"] == mode)
            peak = max(r["peak_bytes_per_rank"])
            if ref is None:
                ref, scale = r["hypergradient"], max(abs(x) for x in r["hypergradient"])
                cells.append(f"{peak / MIB:.0f} ({peak / vector:.2f})")
                continue
            diff = max(abs(a - b) for a, b in zip(r["hypergradient"], ref)) / scale
            cells.append(f"{peak / MIB:.0f} ({peak / vector:.2f}), {diff:.1e}")
        print(f"| {world} | " + " | ".join(cells) + " |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(args), "vector_bytes": vector, "runs": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
