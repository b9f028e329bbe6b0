"""Launch-time compile report: what the public ops would run on an A100 / H100, checked on the CPU.

For each call (loss forward, loss backward, JVP, HVP) at the given shapes and dtype, the Triton
launchers run on ``meta`` tensors with every kernel launch intercepted
(``boost_kernels.launch_capture``); each launch is compiled with ``triton.compile`` for
``GPUTarget("cuda", 80 | 90, 32)`` with the specialisation the JIT would apply at that launch, and
its cubin is read with the ``cuobjdump`` / ``nvdisasm`` bundled with Triton (``boost_kernels.sass``).

    python -m boost_kernels.aot [--shape T D V ...] [--dtypes bf16] [--arch 80 90] [--variants] [--json]

Per kernel: registers, spills, shared memory, blocks per SM, tensor-core instructions (HMMA /
HGMMA and their shapes, and whether the ones in loops are wgmma), cp.async / TMA copies, global
atomics (fenced ``ATOMG`` vs ``REDG``) and GPU-wide fences, in and out of loops. Per call: kernel
launches, PyTorch device kernels, grids, waves on the card's SMs and the peak of extra memory the
call allocates (everything alive during the call that it does not return). Nothing here is a
measurement of speed.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, field

import torch

from boost_kernels import triton_ops
from boost_kernels.launch_capture import NUM_SMS, LaunchPlan, capture
from boost_kernels.sass import KernelReport, compile_launch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The shapes the targets are stated at: (T, D, V).
TARGET_SHAPES = ((16384, 4096, 128256), (65536, 8192, 256000))


def _inputs(T: int, D: int, V: int, dtype: torch.dtype) -> dict:
    meta = dict(device="meta", dtype=dtype)
    return dict(
        hidden=torch.empty(T, D, **meta),
        weight=torch.empty(V, D, **meta),
        bias=torch.empty(V, **meta),
        labels=torch.empty(T, dtype=torch.long, device="meta"),
        coef=torch.empty(T, dtype=torch.float32, device="meta"),
        lse=torch.empty(T, dtype=torch.float32, device="meta"),
        tangent_weight=torch.empty(V, D, **meta),
        tangent_hidden=torch.empty(T, D, **meta),
        tangent_bias=torch.empty(V, **meta),
    )


def _fwd(x, bias=None, softcap=None, tangents=()):
    return triton_ops.token_losses(x["hidden"], x["weight"], bias, x["labels"], softcap, *tangents)


def _bwd(x, bias=None, softcap=None, **kw):
    return triton_ops.token_loss_grads(
        x["hidden"],
        x["weight"],
        bias,
        x["labels"],
        softcap,
        x["coef"],
        x["lse"],
        need_bias=bias is not None,
        **kw,
    )


def _hvp(x, bias=None, softcap=None, tangents=None, **kw):
    tangents = tangents or (x["tangent_weight"], None, None)
    return triton_ops.token_loss_hvp(
        x["hidden"], x["weight"], bias, x["labels"], softcap, x["coef"], *tangents, **kw
    )


def calls(variants: bool = False) -> dict:
    """name -> fn(inputs) calling a launcher exactly as the public op does.

    The default calls are the ones the targets are about (no bias, no softcap; the JVP and HVP
    along the head, as the hypergradient uses them), plus the backward and HVP with
    ``scratch_bytes=None`` (no memory limit: one pass over the logits, float32 accumulators of
    (T + V)·D·4 bytes, beyond the 64 MiB target by the user's choice). ``variants`` adds bias,
    softcap, every tangent and the deterministic mode, so every kernel specialisation gets
    compiled and checked.
    """
    head_only = dict(need_hidden=False, need_weight=True, need_bias=False)
    out = {
        "loss_fwd": lambda x: _fwd(x)[:2],
        "loss_bwd": _bwd,
        "jvp": lambda x: _fwd(x, tangents=(x["tangent_weight"],)),
        "hvp": lambda x: _hvp(x, **head_only),
        "loss_bwd+unlimited_scratch": lambda x: _bwd(x, scratch_bytes=None),
        "hvp+unlimited_scratch": lambda x: _hvp(x, scratch_bytes=None, **head_only),
    }
    if variants:
        every = ("tangent_weight", "tangent_hidden", "tangent_bias")
        out |= {
            "loss_fwd+bias+softcap": lambda x: _fwd(x, x["bias"], 30.0),
            "loss_bwd+bias+softcap": lambda x: _bwd(x, x["bias"], 30.0),
            "jvp+all_tangents+softcap": lambda x: _fwd(x, x["bias"], 30.0, tuple(x[k] for k in every)),
            "loss_bwd+deterministic": lambda x: _bwd(x, x["bias"], deterministic=True),
            "loss_bwd+grad_filter": lambda x: _bwd(x, grad_filter=True),
            "hvp+deterministic": lambda x: _hvp(x, deterministic=True, **head_only),
            "hvp+all_tangents+softcap": lambda x: _hvp(x, x["bias"], 30.0, tuple(x[k] for k in every)),
        }
    return out


@dataclass
class LaunchLine:
    kernel: str
    grid: tuple[int, int, int]
    blocks: int
    waves: float  # blocks / (SMs · resident blocks per SM)


@dataclass
class CallReport:
    call: str
    shape: tuple[int, int, int]  # (T, D, V)
    dtype: str
    arch: int
    num_sms: int
    triton_launches: int
    torch_kernels: int  # PyTorch device kernels (fills, copies, reductions, elementwise)
    torch_kernel_ops: dict[str, int]
    extra_bytes: int
    launches: list[LaunchLine] = field(default_factory=list)
    kernels: list[KernelReport] = field(default_factory=list)  # one per distinct binary

    def lines(self) -> list[str]:
        T, D, V = self.shape
        distinct = {(lu.kernel, lu.grid) for lu in self.launches}
        grids = ", ".join(
            f"{k}{list(g)} {w:.2f} waves"
            for k, g, w in sorted({(lu.kernel, lu.grid, lu.waves) for lu in self.launches})
        )
        head = (
            f"[{self.call}] T={T} D={D} V={V} {self.dtype} sm_{self.arch} ({self.num_sms} SMs): "
            f"{self.triton_launches} Triton launches + {self.torch_kernels} PyTorch kernels, "
            f"extra memory {self.extra_bytes / 2**20:.1f} MiB"
        )
        more = "" if len(distinct) <= 6 else f" ({len(distinct)} distinct launch shapes)"
        return [head, f"    grids: {grids if len(distinct) <= 6 else grids[:400] + ' ...'}{more}"] + [
            "    " + k.line() for k in self.kernels
        ]


def report_call(name: str, fn, shape, dtype: str, arch: int) -> CallReport:
    x = _inputs(*shape, DTYPES[dtype])
    plan: LaunchPlan
    plan, _ = capture(arch, fn, x)
    kernels: dict[tuple, KernelReport] = {}
    lines = []
    for launch in plan.launches:
        key = launch.key()
        if key not in kernels:
            kernels[key] = compile_launch(launch)
        k = kernels[key]
        resident = NUM_SMS[arch] * max(k.blocks_per_sm, 1)
        lines.append(LaunchLine(launch.name, launch.grid, launch.blocks, launch.blocks / resident))
    return CallReport(
        name, tuple(shape), dtype, arch, NUM_SMS[arch], len(plan.launches), plan.num_torch_kernels,
        plan.torch_kernels, plan.peak_extra_bytes, lines, list(kernels.values()),
    )  # fmt: skip


def config_table() -> list[str]:
    out = []
    for family, table in triton_ops.GPU_CONFIGS.items():
        for (kernel, tangent, fp32), c in table.items():
            mode = ("tangent" if kernel == "stats" else "hvp") if tangent else "plain"
            kernel = kernel.replace("grads_ordered", "grads-deterministic")
            out.append(
                f"config sm_{family}+ {kernel:<19} {mode:<7} {'fp32' if fp32 else '16-bit':<6} "
                f"BLOCK_T={c.block_t} BLOCK_V={c.block_v} BLOCK_D={c.block_d} warps={c.num_warps} stages={c.num_stages}"
            )
    return out


def run(shapes, dtypes, archs, variants=False):
    for shape in shapes:
        for dtype in dtypes:
            for arch in archs:
                for name, fn in calls(variants).items():
                    yield report_call(name, fn, shape, dtype, arch)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description="Launch-time compile report of the Triton kernels (no GPU needed)."
    )
    parser.add_argument("--shape", type=int, nargs=3, action="append", metavar=("T", "D", "V"))
    parser.add_argument("--dtypes", nargs="+", default=["bf16"], choices=sorted(DTYPES))
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(NUM_SMS))
    parser.add_argument("--variants", action="store_true", help="also bias / softcap / every tangent")
    parser.add_argument("--json", action="store_true", help="one JSON object per call instead of text")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the launch-time report needs the real Triton compiler")
    if not args.json:
        print("\n".join(config_table()), flush=True)
    for rep in run(args.shape or TARGET_SHAPES, args.dtypes, args.arch, args.variants):
        print(json.dumps(asdict(rep)) if args.json else "\n".join(rep.lines()), flush=True)


if __name__ == "__main__":
    main()
