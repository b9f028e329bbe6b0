"""Ahead-of-time compilation of every kernel variant for sm_80 / sm_90, without a GPU.

``triton.compile`` with a ``GPUTarget`` lowers a kernel through PTX to a cubin on the CPU; the
``cuobjdump`` bundled with Triton then reports registers, local memory (spills) and shared
memory, and ``nvdisasm`` shows whether tensor-core instructions (HMMA / HGMMA) were emitted.
This catches what the interpreter forgives: illegal lowering, register spills, smem overflow.

    python -m boost_kernels.aot [--arch 80 90] [--dtypes bf16 fp32] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from boost_kernels.triton_kernels import token_grads_kernel, token_stats_kernel
from boost_kernels.triton_ops import GPU_CONFIGS

_TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_DTYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


@dataclass
class CompileReport:
    kernel: str
    variant: str
    arch: int
    registers: int
    local_bytes: int  # spills (LOCAL/STACK); must be 0
    shared_bytes: int
    mma: str  # tensor-core instruction family seen in SASS, or "none"

    def line(self) -> str:
        return (
            f"sm_{self.arch} {self.kernel:<19} {self.variant:<40} regs={self.registers:<4} "
            f"local={self.local_bytes:<5} smem={self.shared_bytes:<7} mma={self.mma}"
        )


def _signature(kernel, dtype: str, constexprs: dict) -> dict:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("Y",):
            sig[name] = "*i64"
        elif name.endswith("_OUT") or name in ("COEF", "LSE", "PDZ"):
            sig[name] = "*fp32"
        elif name in ("H", "W", "B", "U", "DH", "BETA"):
            sig[name] = _DTYPES[dtype]
        elif name == "softcap":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def variants(dtypes=("bf16", "fp16", "fp32")):
    """(kernel, name, dtype, constexprs, num_warps, num_stages) for every variant the launchers use."""
    out = []
    for dtype in dtypes:
        precision = "ieee" if dtype == "fp32" else "tf32"
        for tangent in (False, True):
            cfg = GPU_CONFIGS[("stats", tangent, dtype == "fp32")]
            for softcap in (False, True):
                c = dict(
                    HAS_BIAS=True, HAS_SOFTCAP=softcap, HAS_U=tangent, HAS_DH=tangent, HAS_BETA=tangent,
                    WITH_TANGENT=tangent, UPCAST=False, DOT_PRECISION=precision,
                    BLOCK_T=cfg.block_t, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
                )  # fmt: skip
                name = f"{dtype} tangent={int(tangent)} softcap={int(softcap)}"
                out.append((token_stats_kernel, name, dtype, c, cfg.num_warps, cfg.num_stages))
        for hvp in (False, True):
            cfg = GPU_CONFIGS[("grads", hvp, dtype == "fp32")]
            for softcap in (False, True):
                c = dict(
                    HAS_BIAS=True, HAS_SOFTCAP=softcap, HVP=hvp, HAS_U=hvp, HAS_DH=hvp, HAS_BETA=hvp,
                    NEED_DH=True, NEED_DW=True, NEED_DB=True, UPCAST=False, DOT_PRECISION=precision,
                    BLOCK_T=cfg.block_t, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
                )  # fmt: skip
                name = f"{dtype} hvp={int(hvp)} softcap={int(softcap)}"
                out.append((token_grads_kernel, name, dtype, c, cfg.num_warps, cfg.num_stages))
    return out


def _run(tool: str, *args: str) -> str:
    return subprocess.run(
        [os.path.join(_TOOLS, tool), *args], capture_output=True, text=True, check=True
    ).stdout


def compile_variant(kernel, name, dtype, constexprs, num_warps, num_stages, arch: int) -> CompileReport:
    src = ASTSource(kernel, _signature(kernel, dtype, constexprs), constexprs)
    compiled = triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps, num_stages=num_stages)
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        res = _run("cuobjdump", "-res-usage", path)
        sass = _run("nvdisasm", path)
    m = re.search(r"REG:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", res)
    if m is None:
        raise RuntimeError(f"could not parse cuobjdump -res-usage output:\n{res}")
    regs, shared, local = (int(x) for x in m.groups())
    stack = re.search(r"STACK:(\d+)", res)
    local += int(stack.group(1)) if stack else 0
    shared = max(shared, compiled.metadata.shared)
    mma = "HGMMA" if "HGMMA" in sass else "HMMA" if "HMMA" in sass else "none"
    return CompileReport(kernel.__name__, name, arch, regs, local, shared, mma)


def compile_all(archs=(80, 90), dtypes=("bf16", "fp16", "fp32")):
    for arch in archs:
        for v in variants(dtypes):
            yield compile_variant(*v, arch=arch)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Compile every kernel variant for sm_80/sm_90 on the CPU.")
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp16", "fp32"], choices=sorted(_DTYPES))
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("unset TRITON_INTERPRET: ahead-of-time compilation needs the real Triton compiler")
    for report in compile_all(tuple(args.arch), tuple(args.dtypes)):
        print(json.dumps(asdict(report)) if args.json else report.line(), flush=True)


if __name__ == "__main__":
    main()
