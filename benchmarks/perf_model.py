"""A performance MODEL (not a measurement) of fused linear cross-entropy on an H100, per kernel.

Every implementation is run on ``meta`` tensors with its kernel launches captured the same way
(``boost_kernels.launch_capture``: the launch plan a GPU would get, nothing runs). Each captured
Triton launch is turned into work by a formula for that kernel (below: tiles actually launched,
padding included), each PyTorch kernel by its tensor bytes (and 2·M·N·K for matmuls):

* FLOPs: tensor-core work (2 per multiply-add), unfiltered (every tile computed);
* HBM bytes, minimum: every operand read once and every result written once;
* tile bytes: what the tiles stream (what L2 must serve when nothing is reused across programs);
* atomic bytes: global float32 reductions (or lock-protected read-modify-writes);
* lower-bound time = max(FLOPs / 989 TFLOP/s, minimum HBM bytes / 3.35 TB/s) per launch (H100
  SXM, bf16 dense), summed over launches (they run one after another).

The bound ignores launch gaps, waves, L2 misses and atomics; it guides design and never stands in
for a measurement (benchmarks/gpu_suite.py measures, when a GPU is lent).

    python benchmarks/perf_model.py [--shape T D V] [--arch 90]
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

# Cut Cross-Entropy's torch.compile'd helpers must run eagerly on meta tensors; set before torch loads.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch  # noqa: E402

PEAK_FLOPS = 989e12  # H100 SXM bf16 dense tensor-core FLOP/s
PEAK_BYTES = 3.35e12  # H100 SXM HBM3 bytes/s


@dataclass
class Work:
    kernel: str
    launches: int = 0
    flops: float = 0.0
    min_bytes: float = 0.0
    tile_bytes: float = 0.0
    atomic_bytes: float = 0.0
    bound_s: float = 0.0  # sum over launches of max(FLOPs / peak, min bytes / bandwidth)

    def __post_init__(self):
        if self.launches == 1 and not self.bound_s:
            self.bound_s = max(self.flops / PEAK_FLOPS, self.min_bytes / PEAK_BYTES)

    def add(self, other: Work) -> None:
        self.launches += other.launches
        self.flops += other.flops
        self.min_bytes += other.min_bytes
        self.tile_bytes += other.tile_bytes
        self.atomic_bytes += other.atomic_bytes
        self.bound_s += other.bound_s

    @property
    def bound_ms(self) -> float:
        return 1e3 * self.bound_s


def _esize(launch, name: str) -> int:
    return launch.args[name].dtype.itemsize


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _token_stats(x, e) -> Work:
    T, V, D, bt, bv, bd = x["T"], x["V"], x["D"], x["BLOCK_T"], x["BLOCK_V"], x["BLOCK_D"]
    tangent = bool(x["WITH_TANGENT"])
    u, dh = tangent and bool(x["HAS_U"]), tangent and bool(x["HAS_DH"])
    vps = x["V_PER_SPLIT"]
    v_tiles = sum(_cdiv(min(vps, V - s), bv) for s in range(0, V, vps))
    tiles = _cdiv(T, bt) * v_tiles
    d = _cdiv(D, bd) * bd
    flops = tiles * (1 + u + dh) * 2 * bt * bv * d
    tile_bytes = tiles * d * e * (bt * (1 + dh) + bv * (1 + u))
    outputs = _cdiv(V, vps) * T * 4 * (5 if tangent else 3)
    min_bytes = e * D * (T * (1 + dh) + V * (1 + u)) + outputs
    return Work("", 1, flops, min_bytes, tile_bytes, 0.0)


def _token_grads(x, e) -> Work:
    T, V, D, bt, bv, bd = x["T"], x["V"], x["D"], x["BLOCK_T"], x["BLOCK_V"], x["BLOCK_D"]
    hvp = bool(x["HVP"])
    u, dh = hvp and bool(x["HAS_U"]), hvp and bool(x["HAS_DH"])
    need_h, need_w = bool(x["NEED_DH"]), bool(x["NEED_DW"])
    tiles = _cdiv(T, bt) * _cdiv(V, bv)
    d = _cdiv(D, bd) * bd
    dots = (1 + u + dh) + need_h * (1 + u) + need_w * (1 + dh)
    flops = tiles * dots * 2 * bt * bv * d
    logit_bytes = bt * (1 + dh) + bv * (1 + u)
    grad_bytes = need_h * bv * (1 + u) + need_w * bt * (1 + dh)
    tile_bytes = tiles * d * e * (logit_bytes + grad_bytes)
    atomic_bytes = tiles * d * 4 * (need_h * bt + need_w * bv)
    # inputs once, each float32 accumulator read and written once
    min_bytes = e * D * (T * (1 + dh) + V * (1 + u)) + 8 * D * (need_h * T + need_w * V)
    return Work("", 1, flops, min_bytes, tile_bytes, atomic_bytes)


def _token_grads_slab(x, e) -> Work:
    """Both passes of the slab kernel: d_hidden over token slabs, then d_weight over vocabulary slabs;
    each pass recomputes the logit tiles. STAGED (16-bit): a float32 slot per slab, read, zeroed and
    rounded into the 16-bit gradient once by the slab's last program."""
    T, V, D, bt, bv, bd = x["T"], x["V"], x["D"], x["BLOCK_T"], x["BLOCK_V"], x["BLOCK_D"]
    hvp = bool(x["HVP"])
    u, dh = hvp and bool(x["HAS_U"]), hvp and bool(x["HAS_DH"])
    need_h, need_w = bool(x["NEED_DH"]), bool(x["NEED_DW"])
    staged, atomic = bool(x["STAGED"]), x["OWNER"] == 0
    tiles = _cdiv(T, bt) * _cdiv(V, bv)
    d = _cdiv(D, bd) * bd
    logit_dots, logit_bytes = 1 + u + dh, bt * (1 + dh) + bv * (1 + u)
    passes = need_h + need_w
    flops = tiles * 2 * bt * bv * d * (passes * logit_dots + need_h * (1 + u) + need_w * (1 + dh))
    grad_bytes = need_h * bv * (1 + u) + need_w * bt * (1 + dh)
    tile_bytes = tiles * d * e * (passes * logit_bytes + grad_bytes)
    atomic_bytes = atomic * tiles * d * 4 * (need_h * bt + need_w * bv)
    rows = need_h * T + need_w * V
    finish = rows * D * (4 + 4 + e) if staged else 0  # read the slot, zero it, write the gradient
    min_bytes = passes * e * D * (T * (1 + dh) + V * (1 + u)) + 8 * D * rows + finish
    return Work("", 1, flops, min_bytes, tile_bytes, atomic_bytes)


def _cce_lse_forward(x, e) -> Work:
    B, V, D, bb, bv = x["B"], x["V"], x["D"], x["BLOCK_B"], x["BLOCK_V"]
    tiles = _cdiv(B, bb) * _cdiv(V, bv)
    return Work("", 1, tiles * 2 * bb * bv * D, e * D * (B + V) + 8 * B, tiles * D * e * (bb + bv), 0.0)


def _cce_indexed_dot(x, e) -> Work:
    B, D = x["B"], x["D"]
    return Work("", 1, 2 * B * D, 2 * e * B * D, 2 * e * B * D, 0.0)


def _cce_backward(x, e) -> Work:
    B, V, D, bb, bv = x["B"], x["V"], x["D"], x["BLOCK_B"], x["BLOCK_V"]
    tiles = _cdiv(B, bb) * _cdiv(V, bv)
    flops = tiles * 3 * 2 * bb * bv * D  # recompute + dE + dC, no tile filtered
    tile_bytes = tiles * D * e * 2 * (bb + bv)
    atomic_bytes = tiles * D * e * 2 * (bb + bv)  # lock-protected read-modify-write in the input dtype
    return Work("", 1, flops, 2 * e * D * (B + V), tile_bytes, atomic_bytes)


def _liger_cross_entropy(x, e) -> Work:
    rows, V = x["_grid_blocks"], x["n_cols"]
    return Work("", 1, 0.0, 2 * e * rows * V, 3 * e * rows * V, 0.0)  # read logits, write grads in place


KERNELS = {
    "token_stats_kernel": _token_stats,
    "token_grads_kernel": _token_grads,
    "token_grads_slab_kernel": _token_grads_slab,
    "_cce_lse_forward_kernel": _cce_lse_forward,
    "_indexed_neg_dot_forward_kernel": _cce_indexed_dot,
    "_cce_backward_kernel": _cce_backward,
    "liger_cross_entropy_kernel": _liger_cross_entropy,
}


def model(plan) -> dict[str, Work]:
    """kernel name (or 'torch:<op>') -> summed Work of its launches in the plan."""
    out: dict[str, Work] = {}
    for launch in plan.launches:
        if launch.name not in KERNELS:
            raise KeyError(f"no cost formula for kernel {launch.name}; add one to benchmarks/perf_model.py")
        x = dict(launch.args)
        x["_grid_blocks"] = launch.blocks
        first_tensor = next(n for n, v in launch.args.items() if hasattr(v, "shape"))
        w = KERNELS[launch.name](x, _esize(launch, first_tensor))
        out.setdefault(launch.name, Work(launch.name)).add(w)
    for op in plan.torch_ops:
        key = f"torch:{op.name}"
        out.setdefault(key, Work(key)).add(
            Work(key, 1, op.flops, op.read_bytes + op.write_bytes, op.read_bytes + op.write_bytes, 0.0)
        )
    return out


def forward_in_flight(launch, num_sms: int) -> tuple[int, int, float]:
    """(splits, token blocks in flight, MiB of their hidden rows) of a token_stats_kernel launch,
    one program per SM in launch order (the splits of a token block adjacent). A fact of the launch
    plan, not part of the bound: the model has no L2, and an L2 effect is unmeasured."""
    x = launch.args
    splits, bt, D = x["NUM_SPLITS"], x["BLOCK_T"], x["D"]
    blocks = min(_cdiv(x["T"], bt), _cdiv(num_sms, splits))
    rows = (1 + bool(x["WITH_TANGENT"] and x["HAS_DH"])) * bt * D * _esize(launch, "H")
    return splits, blocks, blocks * rows / 2**20


def _meta(T, D, V, dtype):
    h = torch.empty(T, D, device="meta", dtype=dtype)
    w = torch.empty(V, D, device="meta", dtype=dtype)
    y = torch.empty(T, device="meta", dtype=torch.long)
    return h, w, y


def boost_fwd_bwd(h, w, y, scratch_bytes=56 * 2**20):
    """``scratch_bytes``: as in boost_kernels.trajectory_cross_entropy (None: no limit, one pass)."""
    from boost_kernels import triton_ops

    coef = torch.empty(h.shape[0], device="meta", dtype=torch.float32)
    loss, lse, _, _ = triton_ops.token_losses(h, w, None, y, None)
    d_h, d_w, _ = triton_ops.token_loss_grads(
        h, w, None, y, None, coef, lse, need_bias=False, scratch_bytes=scratch_bytes
    )
    return loss, d_h, d_w


def cce_fwd_bwd(h, w, y, filter_eps="auto"):
    from cut_cross_entropy import linear_cross_entropy

    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    loss = linear_cross_entropy(h, w, y, impl="cce", filter_eps=filter_eps)
    loss.backward()
    return loss, h.grad, w.grad


def liger_fwd_bwd(h, w, y):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    loss = liger_fused_linear_cross_entropy(h, w, y)
    loss.backward()
    return loss, h.grad, w.grad


IMPLEMENTATIONS = {
    "boost": boost_fwd_bwd,
    "boost (scratch_bytes=None)": lambda h, w, y: boost_fwd_bwd(h, w, y, scratch_bytes=None),
    "cce (default filter)": cce_fwd_bwd,
    "cce (exact, no filter)": lambda h, w, y: cce_fwd_bwd(h, w, y, filter_eps=None),
    "liger": liger_fwd_bwd,
}


def report(shape, arch: int = 90) -> list[str]:
    # Other libraries' host code needs values meta tensors lack: every label counts (nonzero
    # assumes all valid, .item() of a count returns T); CCE's torch.compile'd helpers run eagerly.
    import torch.fx.experimental._config as fx_config

    from boost_kernels.launch_capture import NUM_SMS, capture

    fx_config.meta_nonzero_assume_all_nonzero = True
    T, D, V = shape
    notes = []
    lines = [
        f"MODEL (not measured): fused linear cross-entropy forward+backward, T={T} D={D} V={V} bf16, "
        f"launches as captured for sm_{arch}; bound = sum over launches of max(FLOPs/989 TFLOP/s, "
        "min HBM bytes/3.35 TB/s)",
        "",
        "| implementation | kernel | launches | TFLOP | min HBM GB | tile GB | atomic GB | bound ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, fn in IMPLEMENTATIONS.items():
        plan, _ = capture(arch, fn, *_meta(T, D, V, torch.bfloat16), scalar=T)
        works = model(plan)
        total = Work("total")
        for w in works.values():
            total.add(w)
        for w in sorted(works.values(), key=lambda w: -w.flops - w.min_bytes)[:6] + [total]:
            lines.append(
                f"| {name} | {w.kernel} | {w.launches} | {w.flops / 1e12:.1f} | {w.min_bytes / 1e9:.1f} | "
                f"{w.tile_bytes / 1e9:.0f} | {w.atomic_bytes / 1e9:.0f} | {w.bound_ms:.1f} |"
            )
        lines.append(f"| {name} | extra memory (peak, MiB) | | | | | | {plan.peak_extra_bytes / 2**20:.0f} |")
        for launch in plan.launches:
            if launch.name == "token_stats_kernel":
                splits, blocks, mib = forward_in_flight(launch, NUM_SMS[arch])
                notes.append(
                    f"{name}: forward {splits} vocabulary splits, {blocks} token blocks in flight on "
                    f"{NUM_SMS[arch]} SMs, their hidden rows {mib:.0f} MiB (re-read once per vocabulary "
                    "tile; L2 is not in the model)"
                )
    ideal = 8 * T * D * V
    lines += [""] + notes
    lines.append("")
    lines.append(f"8·T·D·V = {ideal / 1e12:.1f} TFLOP -> {1e3 * ideal / PEAK_FLOPS:.1f} ms at 989 TFLOP/s.")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[16384, 4096, 128256], metavar=("T", "D", "V"))
    parser.add_argument("--arch", type=int, default=90, choices=[80, 90])
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("unset TRITON_INTERPRET: capturing launches needs the real Triton JIT")
    print("\n".join(report(tuple(args.shape), args.arch)))


if __name__ == "__main__":
    main()
