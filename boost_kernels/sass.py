"""Compile a captured launch for its GPU on the CPU, and read what the binary does.

``triton.compile`` lowers the kernel exactly as the JIT would at that launch (same signature,
constexprs, divisibility attributes and options) for ``GPUTarget("cuda", arch, 32)``; the
``cuobjdump`` and ``nvdisasm`` bundled with Triton report resources and the SASS:

* registers, local memory (spills: LOCAL + STACK), shared memory, and resident blocks per SM;
* tensor-core instructions: ``HMMA`` (mma.sync, sm_80 style) and ``HGMMA`` (wgmma, sm_90) with
  their shapes (``N`` = columns of one instruction);
* asynchronous copies: ``LDGSTS`` (cp.async) and TMA (``UTMALDG`` / ``UBLKCP``);
* atomics: ``ATOMG`` (an atomic with a return or ordering; Triton's default ``acq_rel`` wraps each
  in ``MEMBAR.ALL.GPU`` … ``CCTL.IVALL``) vs ``REDG`` (a fire-and-forget reduction, ``relaxed``);
  and every ``MEMBAR``;
* which of these sit inside a loop (a backward branch): the hot loops.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from boost_kernels.launch_capture import Launch

_TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")

# Per-SM limits used for occupancy: registers, shared memory usable by blocks, resident warps/blocks.
SM_LIMITS = {
    80: dict(regs=65536, smem=167936, smem_per_block=166912, warps=64, blocks=32),
    90: dict(regs=65536, smem=233472, smem_per_block=232448, warps=64, blocks=32),
}
_RESERVED_SMEM = 1024  # the driver reserves 1 KiB of shared memory per block on sm_80+


@dataclass
class KernelReport:
    """What one compiled binary does; counts are static SASS instructions."""

    kernel: str
    arch: int
    config: str  # block sizes, warps, stages
    registers: int
    spill_bytes: int  # LOCAL + STACK from cuobjdump; 0 means no spills
    shared_bytes: int
    blocks_per_sm: int
    mma: dict[str, int] = field(default_factory=dict)  # e.g. {"HGMMA.64x128x16": 8, "HMMA.16816": 0}
    mma_in_loops: dict[str, int] = field(default_factory=dict)
    async_copies: dict[str, int] = field(default_factory=dict)  # LDGSTS / UTMALDG / UBLKCP
    atomics: dict[str, int] = field(default_factory=dict)  # full opcode -> count
    atomics_in_loops: dict[str, int] = field(default_factory=dict)
    gpu_fences: int = 0  # MEMBAR.*.GPU / MEMBAR.SC.* anywhere
    gpu_fences_in_loops: int = 0

    @property
    def loop_mma_kinds(self) -> set[str]:
        return {k.split(".")[0] for k, n in self.mma_in_loops.items() if n}

    def line(self) -> str:
        mma = ",".join(f"{k}x{n}" for k, n in sorted(self.mma.items())) or "none"
        loop = ",".join(sorted(self.loop_mma_kinds)) or "none"
        copies = ",".join(f"{k}x{n}" for k, n in sorted(self.async_copies.items())) or "none"
        atom = ",".join(f"{k}x{n}" for k, n in sorted(self.atomics.items())) or "none"
        return (
            f"sm_{self.arch} {self.kernel:<19} {self.config:<28} regs={self.registers:<3} spill={self.spill_bytes:<4} "
            f"smem={self.shared_bytes // 1024}K blocks/SM={self.blocks_per_sm} mma[{mma}] loop-mma={loop} "
            f"async[{copies}] atomics[{atom}] gpu-fences={self.gpu_fences} (in loops {self.gpu_fences_in_loops})"
        )


def _tool(name: str, *args: str) -> str:
    return subprocess.run(
        [os.path.join(_TOOLS, name), *args], capture_output=True, text=True, check=True
    ).stdout


_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)(.*);")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"BRA\s+`?\(?(\.L_x_\d+)\)?")


def parse_sass(sass: str) -> list[tuple[int, str, str, bool]]:
    """[(address, opcode, operands, inside_a_loop)] of every instruction of the kernel."""
    labels: dict[str, int] = {}
    instrs: list[tuple[int, str, str]] = []
    pending: list[str] = []
    for line in sass.splitlines():
        m = _LABEL.match(line.strip())
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR.match(line)
        if m:
            addr = int(m.group(1), 16)
            for name in pending:
                labels[name] = addr
            pending = []
            instrs.append((addr, m.group(2), m.group(3)))
    loops = []  # [start, end] of every backward branch's body
    for addr, op, rest in instrs:
        if op.startswith("BRA"):
            b = _BRANCH.search(op + rest)
            if b and b.group(1) in labels and labels[b.group(1)] <= addr:
                loops.append((labels[b.group(1)], addr))
    return [(a, op, rest, any(s <= a <= e for s, e in loops)) for a, op, rest in instrs]


def _mma_name(op: str) -> str | None:
    if op.startswith("HGMMA"):
        shape = re.match(r"HGMMA\.(\d+x\d+x\d+)", op)
        return f"HGMMA.{shape.group(1)}" if shape else "HGMMA"
    if op.startswith("HMMA"):
        shape = re.match(r"HMMA\.(\d+)", op)
        return f"HMMA.{shape.group(1)}" if shape else "HMMA"
    return None


def _atomic_name(op: str) -> str | None:
    if op.startswith(("ATOMG", "REDG", "ATOM.", "RED.", "ATOMS", "REDUX")) or op in ("ATOM", "RED"):
        if op.startswith(("ATOMS", "REDUX")):
            return None  # shared-memory atomics and warp reductions are not global traffic
        return op
    return None


def blocks_per_sm(arch: int, registers: int, shared: int, num_warps: int) -> int:
    lim = SM_LIMITS[arch]
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = (lim["regs"] // regs_per_warp) // num_warps
    by_smem = lim["smem"] // (shared + _RESERVED_SMEM) if shared else lim["blocks"]
    by_warps = lim["warps"] // num_warps
    if shared > lim["smem_per_block"]:
        return 0
    return max(0, min(by_regs, by_smem, by_warps, lim["blocks"]))


def describe_config(launch: Launch) -> str:
    c = {launch.kernel.arg_names[k[0]]: v for k, v in launch.constexprs.items()}
    blocks = "x".join(str(c[k]) for k in ("BLOCK_T", "BLOCK_V", "BLOCK_D") if k in c)
    return f"{blocks} w{launch.options['num_warps']} s{launch.options['num_stages']}"


def analyse(launch: Launch, cubin: bytes, shared: int) -> KernelReport:
    arch = int(str(launch.options["arch"]).removeprefix("sm").rstrip("a"))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = _tool("cuobjdump", "-res-usage", path)
        sass = _tool("nvdisasm", "-c", path)
    m = re.search(r"REG:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", res)
    if m is None:
        raise RuntimeError(f"could not parse cuobjdump -res-usage output:\n{res}")
    regs, static_shared, local = (int(x) for x in m.groups())
    stack = re.search(r"STACK:(\d+)", res)
    spills = local + (int(stack.group(1)) if stack else 0)
    shared = max(shared, static_shared)
    rep = KernelReport(
        launch.name, arch, describe_config(launch), regs, spills, shared,
        blocks_per_sm(arch, regs, shared, launch.options["num_warps"]),
    )  # fmt: skip
    for _, op, _operands, in_loop in parse_sass(sass):
        name = _mma_name(op)
        if name:
            rep.mma[name] = rep.mma.get(name, 0) + 1
            rep.mma_in_loops[name] = rep.mma_in_loops.get(name, 0) + int(in_loop)
        if op.startswith("LDGSTS") or op.startswith(("UTMALDG", "UBLKCP")):
            key = op.split(".")[0]
            rep.async_copies[key] = rep.async_copies.get(key, 0) + 1
        name = _atomic_name(op)
        if name:
            rep.atomics[name] = rep.atomics.get(name, 0) + 1
            rep.atomics_in_loops[name] = rep.atomics_in_loops.get(name, 0) + int(in_loop)
        if op.startswith("MEMBAR") and (".GPU" in op or ".SYS" in op or ".SC" in op):
            rep.gpu_fences += 1
            rep.gpu_fences_in_loops += int(in_loop)
    return rep


_CACHE: dict[tuple, KernelReport] = {}


def compile_launch(launch: Launch) -> KernelReport:
    """Compile ``launch`` as the JIT would for its target and analyse the binary (memoised)."""
    key = launch.key()
    if key not in _CACHE:
        arch = int(str(launch.options["arch"]).removeprefix("sm").rstrip("a"))
        src = ASTSource(launch.kernel, launch.signature, launch.constexprs, launch.attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=launch.options)
        _CACHE[key] = analyse(launch, compiled.asm["cubin"], compiled.metadata.shared)
    return _CACHE[key]
