"""A short demo of the fused per-trajectory loss: values, gradients, time and memory vs naive.

    python -m boost_kernels.demo [--tokens 2048] [--hidden 576] [--vocab 49152] [--trajectories 16]

Each variant runs in a fresh process so that its peak resident memory (ru_maxrss) is its own;
the table shows the peak above the inputs. On a CUDA machine the fused op runs the Triton kernels
and peak memory comes from torch.cuda.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time

import numpy as np
import torch


def _inputs(T, D, V, S, device):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, D, generator=g).to(device).requires_grad_()
    weight = (torch.randn(V, D, generator=g) / D**0.5).to(device).requires_grad_()
    labels = torch.randint(0, V, (T,), generator=g).to(device)
    segment_ids = (torch.arange(T) * S // T).to(device)
    labels[::7] = -100  # prompt / environment tokens that do not count
    traj_weights = (torch.rand(S, generator=g) * 2).to(device)
    return hidden, weight, labels, segment_ids, traj_weights


def _naive(hidden, weight, labels, segment_ids, traj_weights, S):
    logits = hidden @ weight.T  # the [T, V] buffer the fused op never builds
    tok = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none", ignore_index=-100)
    counted = (labels != -100).float()
    sums = torch.zeros(S, device=hidden.device).index_add(0, segment_ids, tok * counted)
    n = torch.zeros(S, device=hidden.device).index_add(0, segment_ids, counted).clamp(min=1)
    return (traj_weights * sums / n).sum() / S


def _fused(hidden, weight, labels, segment_ids, traj_weights, S):
    from boost_kernels import trajectory_cross_entropy

    return trajectory_cross_entropy(hidden, weight, labels, segment_ids, S, traj_weights=traj_weights).loss


def _worker(name, T, D, V, S, device, queue):
    torch.set_num_threads(torch.get_num_threads())
    inputs = _inputs(T, D, V, S, device)
    fn = _naive if name == "naive" else _fused
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    loss = fn(*inputs, S)
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    # numpy, not torch tensors: torch would share storage through fds that die with this process.
    queue.put((name, loss.item(), seconds, peak, inputs[0].grad.cpu().numpy(), inputs[1].grad.cpu().numpy()))


def run(T: int, D: int, V: int, S: int) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ctx = mp.get_context("spawn")
    results = {}
    for name in ("naive", "fused"):
        queue = ctx.Queue()
        proc = ctx.Process(target=_worker, args=(name, T, D, V, S, device, queue))
        proc.start()
        results[name] = queue.get()
        proc.join()
    _, ln, tn, mn, ghn, gwn = results["naive"]
    _, lf, tf, mf, ghf, gwf = results["fused"]
    rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))  # noqa: E731
    print(f"T={T} D={D} V={V} S={S} trajectories, device={device}, float32")
    print(f"weighted loss: fused {lf:.6f}  naive {ln:.6f}  |diff| {abs(lf - ln):.2e}")
    print(f"grad rel. error vs naive: hidden {rel(ghf, ghn):.2e}  weight {rel(gwf, gwn):.2e}")
    print("| variant | fwd+bwd time (s) | peak memory above inputs (MiB) |")
    print("|---|---|---|")
    print(f"| naive PyTorch | {tn:.3f} | {mn / 2**20:.1f} |")
    print(f"| boost fused   | {tf:.3f} | {mf / 2**20:.1f} |")
    print(f"memory saved: {(mn - mf) / 2**20:.1f} MiB ({mn / max(mf, 1):.1f}x less); the [T, V] logits alone are "
          f"{T * V * 4 / 2**20:.1f} MiB")  # fmt: skip
    if device == "cpu":
        print(cpu_timing_note(V))


def cpu_timing_note(V: int) -> str:
    """Why the fused op's CPU time can exceed naive's in this demo (its point on a CPU is memory)."""
    from boost_kernels.chunked import CHUNK_ELEMENTS

    rows = max(1, CHUNK_ELEMENTS // V)
    return (
        f"time on a CPU: the fused op runs the chunked PyTorch path, naive's matmuls {rows} token rows at a "
        "time so that the [T, V] logits never exist. On one quiet thread it takes naive's time "
        "(benchmarks/RESULTS.md, 'Eager gradients on the CPU path'); here it runs on wall-clock time with "
        f"torch's {torch.get_num_threads()} threads, where many small matmuls use the threads less well than "
        "naive's one large one and a busy CPU stalls every chunk, so it can be slower. On a GPU the Triton "
        "kernels run instead."
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--trajectories", type=int, default=16)
    args = parser.parse_args()
    run(args.tokens, args.hidden, args.vocab, args.trajectories)


if __name__ == "__main__":
    main()
