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


_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)(.*);")
_LABEL = re.compile(r"^([.$\w]+):$")
_TARGET = re.compile(r"`\(?([.$\w]+)\)?")


def _sccs(succ: list[list[int]]) -> list[int]:
    """Strongly connected component id of every node (iterative Tarjan)."""
    n = len(succ)
    index, low, comp = [-1] * n, [0] * n, [-1] * n
    stack, on_stack, counter, ncomp = [], [False] * n, 0, 0
    for root in range(n):
        if index[root] != -1:
            continue
        work = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = counter
                counter += 1
                stack.append(v)
                on_stack[v] = True
            if i < len(succ[v]):
                work.append((v, i + 1))
                w = succ[v][i]
                if index[w] == -1:
                    work.append((w, 0))
                elif on_stack[w]:
                    low[v] = min(low[v], index[w])
                continue
            for w in succ[v]:
                if on_stack[w] or comp[w] == -1 and index[w] > index[v]:
                    low[v] = min(low[v], low[w])
            if low[v] == index[v]:
                while True:
                    w = stack.pop()
                    on_stack[w] = False
                    comp[w] = ncomp
                    if w == v:
                        break
                ncomp += 1
    return comp


def parse_sass(sass: str) -> list[tuple[int, str, str, bool]]:
    """[(address, opcode, operands, inside_a_loop)] of every instruction of the kernel.

    Inside a loop = on a cycle of the control-flow graph (an instruction a thread can run more than
    once): the edges are fall-through, branch targets (a predicated or conditional branch has
    both) and nothing after an unpredicated EXIT / RET. A CALL to a label of the kernel's own code
    (``.L_x_``: ptxas uses ``CALL.REL.NOINC`` without a return to leave loops) is a branch; a CALL
    to a helper function falls through, and the helper's instructions count as inside a loop when
    any of its call sites is (leaf helpers, as Triton's shuffles).
    """
    labels: dict[str, int] = {}  # label -> index of the instruction it names
    instrs: list[tuple[int, str, str, bool]] = []  # (address, opcode, operands, predicated)
    for line in sass.splitlines():
        m = _LABEL.match(line.strip())
        if m:
            labels[m.group(1)] = len(instrs)
            continue
        m = _INSTR.match(line)
        if m:
            instrs.append((int(m.group(1), 16), m.group(3), m.group(4), m.group(2) is not None))
    n = len(instrs)
    succ: list[list[int]] = [[] for _ in range(n)]
    calls: list[tuple[int, int]] = []  # (call site, callee entry)
    for k, (_, op, rest, predicated) in enumerate(instrs):
        base = op.split(".")[0]
        target = _TARGET.search(rest)
        falls = k + 1 < n
        if base in ("BRX", "JMX"):
            raise RuntimeError(f"indirect branch {op} in the SASS: loops cannot be found")
        if base in ("BRA", "JMP"):
            if target is None or target.group(1) not in labels:
                raise RuntimeError(f"branch without a known target: {op}{rest}")
            succ[k].append(labels[target.group(1)])
            conditional = predicated or op != base or rest.strip().split("`")[0].strip(" ,")
            if falls and conditional:
                succ[k].append(k + 1)
        elif base in ("EXIT", "RET"):
            if falls and predicated:
                succ[k].append(k + 1)
        else:
            if base == "CALL" and target is not None and target.group(1) in labels:
                if target.group(1).startswith(".L_x_"):
                    # ptxas' loop exit: a call to a label of the kernel itself that never returns.
                    succ[k].append(labels[target.group(1)])
                else:
                    calls.append((k, labels[target.group(1)]))
            if falls:
                succ[k].append(k + 1)
    comp = _sccs(succ)
    size: dict[int, int] = {}
    for c in comp:
        size[c] = size.get(c, 0) + 1
    in_loop = [size[comp[k]] > 1 or k in succ[k] for k in range(n)]
    for site, entry in calls:
        if in_loop[site]:  # every instruction the callee can reach runs again on each iteration
            seen, todo = set(), [entry]
            while todo:
                v = todo.pop()
                if v not in seen:
                    seen.add(v)
                    todo.extend(succ[v])
            for v in seen:
                in_loop[v] = True
    return [(a, op, rest, in_loop[k]) for k, (a, op, rest, _) in enumerate(instrs)]


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
