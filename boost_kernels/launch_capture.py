"""Capture what a call to the Triton launchers would run on a GPU, without a GPU.

The launchers in ``triton_ops.py`` are called on ``meta`` tensors (shapes, dtypes and strides, no
storage). Inside :func:`capture`:

* ``JITFunction.run`` is replaced: instead of compiling for the local device and launching, each
  kernel launch is recorded with the specialisation the JIT would apply at launch for the chosen
  GPU (its own binder: integer arguments equal to 1 become constexprs, pointers and integers
  divisible by 16 get ``tt.divisibility``), the grid and the launch options. Tensor arguments are
  seen through their would-be device addresses: 256-byte aligned allocations plus the view's
  storage offset, as the CUDA caching allocator hands them out.
* a ``TorchDispatchMode`` counts the PyTorch kernels the call runs on the device (every op that
  writes memory: copies, fills, reductions, elementwise; not views or bare allocations) and tracks
  the bytes of the tensors it allocates, so that the peak of live intermediates (everything the
  call allocates that it does not return) can be reported.

``python -m boost_kernels.aot`` compiles the recorded launches (``boost_kernels.sass``).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from boost_kernels import triton_ops

# Streaming multiprocessors of the reference card of each architecture: A100 (sm_80), H100 SXM (sm_90).
NUM_SMS = {80: 108, 90: 132}


class _DevicePointer:
    """What the JIT's specialiser reads of a tensor argument: its dtype and its device address."""

    def __init__(self, tensor: torch.Tensor):
        self.dtype = tensor.dtype
        self._address = 1 << 30  # a 256-byte aligned base, as the caching allocator hands out
        self._address += tensor.storage_offset() * tensor.element_size()

    def data_ptr(self) -> int:
        return self._address


@dataclass
class TensorArg:
    """A tensor argument of a launch: enough to size memory traffic in a model."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class Launch:
    """One recorded kernel launch, as the JIT would specialise it for ``arch``."""

    kernel: JITFunction
    grid: tuple[int, int, int]
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict  # backend options (num_warps, num_stages, arch, ...)
    args: dict  # argument name -> TensorArg or the Python value passed

    @property
    def name(self) -> str:
        return self.kernel.__name__

    @property
    def blocks(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def key(self) -> tuple:
        """Identifies the compiled binary: launches with equal keys run the same cubin."""
        return (
            self.name,
            tuple(sorted(self.signature.items())),
            tuple(sorted((k, repr(v)) for k, v in self.constexprs.items())),
            tuple(sorted((k, repr(v)) for k, v in self.attrs.items())),
            tuple(sorted((k, repr(v)) for k, v in self.options.items())),
        )


@dataclass
class TorchOp:
    """One PyTorch device kernel: bytes of its tensor inputs and outputs, FLOPs of a matmul."""

    name: str
    read_bytes: int
    write_bytes: int
    flops: int


@dataclass
class LaunchPlan:
    """Everything one call runs on the device."""

    arch: int
    launches: list[Launch] = field(default_factory=list)
    torch_kernels: dict[str, int] = field(default_factory=dict)  # aten op -> count
    torch_ops: list[TorchOp] = field(default_factory=list)
    peak_extra_bytes: int = 0  # peak of live tensors allocated by the call and not returned

    @property
    def num_torch_kernels(self) -> int:
        return sum(self.torch_kernels.values())


def _grid(grid, bound_args) -> tuple[int, int, int]:
    if callable(grid):
        grid = grid(bound_args)
    grid = tuple(int(g) for g in grid)
    return (grid + (1, 1))[:3]


class _Recorder:
    def __init__(self, arch: int):
        self.arch = arch
        self.backend = make_backend(GPUTarget("cuda", arch, 32))
        self.binders: dict[int, object] = {}
        self.packed: dict[tuple, tuple] = {}
        self.launches: list[Launch] = []

    def run(self, fn: JITFunction, args, grid, kwargs) -> None:
        binder = self.binders.get(id(fn))
        if binder is None:
            binder = self.binders[id(fn)] = create_function_from_signature(
                fn.signature, fn.params, self.backend
            )
        seen = [_DevicePointer(a) if isinstance(a, torch.Tensor) else a for a in args]
        seen_kw = {k: _DevicePointer(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        bound, specialization, options = binder(*seen, **seen_kw)
        key = (id(fn), repr(specialization), repr(sorted(options.items())))
        if key not in self.packed:  # _pack_args is slow; a slab loop launches one binary thousands of times
            self.packed[key] = fn._pack_args(self.backend, seen_kw, bound, specialization, options)
        options, signature, constexprs, attrs = self.packed[key]
        names = fn.arg_names
        values = list(args) + [kwargs[n] for n in names[len(args) :] if n in kwargs]
        described = {
            n: TensorArg(tuple(v.shape), tuple(v.stride()), v.dtype) if isinstance(v, torch.Tensor) else v
            for n, v in zip(names, values)
        }
        self.launches.append(
            Launch(fn, _grid(grid, bound), signature, constexprs, attrs, dict(options.__dict__), described)
        )


# Ops that launch no device kernel: allocations without initialisation, views, metadata.
_NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias"}


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (tuple, list)):
        return sum(_nbytes(y) for y in x)
    return 0


def _matmul_flops(name: str, args) -> int:
    if name in ("mm", "addmm", "bmm", "baddbmm"):
        a, b = (args[0], args[1]) if name in ("mm", "bmm") else (args[1], args[2])
        return 2 * a.numel() * b.shape[-1]
    return 0


class _DeviceWork(TorchDispatchMode):
    """Counts PyTorch device kernels and tracks the bytes of the tensors the call allocates.

    ``scalar``: what ``.item()`` on a meta tensor returns (meta tensors hold no values), and then
    ``torch.equal`` answers True; None makes both an error. Only other libraries' host logic needs
    it (a count of valid tokens, a check that the incoming gradient is 1).
    """

    def __init__(self, scalar=None):
        super().__init__()
        self.scalar = scalar
        self.ops: list[TorchOp] = []
        self.kernels: dict[str, int] = {}
        self.live: dict[int, int] = {}  # allocation -> bytes
        self.events: list[tuple[int, int]] = []  # (+bytes or -bytes, allocation) in order
        # StorageImpl address (shared by every view) -> the number of the latest allocation made
        # there. Allocations are not keyed by the address itself: a freed StorageImpl's address is
        # reused by a later one. Entries are not dropped when a tensor object dies: its storage may
        # live on in another tensor object (a .grad), and an address cannot be reused before then.
        self.allocations: dict[int, int] = {}

    def _allocated(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        cdata, nbytes = storage._cdata, storage.nbytes()
        key = len(self.events)  # unique: every allocation appends an event
        self.allocations[cdata] = key
        self.live[key] = nbytes
        self.events.append((nbytes, key))

        def freed(key=key, nbytes=nbytes):
            self.live.pop(key, None)
            self.events.append((-nbytes, key))

        weakref.finalize(t, freed)  # views keep their base tensor (and so t) alive

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and self.scalar is not None:
            return self.scalar
        if func is torch.ops.aten.equal.default and self.scalar is not None:
            return True
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        schema = func._schema
        is_view = any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)
        writes = any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
        if not is_view and name not in _NO_KERNEL:
            self.kernels[name] = self.kernels.get(name, 0) + 1
            read = _nbytes(list(args)) + _nbytes(list((kwargs or {}).values()))
            self.ops.append(TorchOp(name, read, _nbytes(out), _matmul_flops(name, args)))
        if not is_view and not writes:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self._allocated(t)
        return out

    def allocation_of(self, t: torch.Tensor) -> int | None:
        """The allocation number of a live tensor the call allocated (None if it allocated nothing
        at that address)."""
        return self.allocations.get(t.untyped_storage()._cdata)

    def peak_excluding(self, kept: set[int]) -> int:
        """Peak of live allocated bytes over the call, not counting the tensors in ``kept``."""
        live = peak = 0
        for delta, key in self.events:
            if key in kept:
                continue
            live += delta
            peak = max(peak, live)
        return peak


@contextlib.contextmanager
def _forced_device(arch: int):
    saved = triton_ops.FORCED_DEVICE
    triton_ops.FORCED_DEVICE = triton_ops.DeviceInfo(arch=arch, num_sms=NUM_SMS[arch])
    try:
        yield
    finally:
        triton_ops.FORCED_DEVICE = saved


def capture(arch: int, fn, *args, scalar=None, **kwargs) -> tuple[LaunchPlan, object]:
    """Run ``fn(*args, **kwargs)`` (a launcher on meta tensors) recording what it would run on ``arch``.

    Returns the plan and fn's result (meta tensors); tensors fn returns do not count as extra
    memory. Nothing is compiled or launched here. ``scalar``: see ``_DeviceWork``.
    """
    recorder = _Recorder(arch)
    original = JITFunction.run

    def run(self, *a, grid, warmup, **kw):
        if warmup:
            raise RuntimeError("capture() records launches; it cannot warm up kernels")
        recorder.run(self, a, grid, kw)
        return None

    work = _DeviceWork(scalar)
    JITFunction.run = run
    try:
        with _forced_device(arch), work:
            result = fn(*args, **kwargs)
    finally:
        JITFunction.run = original
    returned = result if isinstance(result, (tuple, list)) else (result,)
    kept = {work.allocation_of(t) for t in returned if isinstance(t, torch.Tensor)} - {None}
    plan = LaunchPlan(arch, recorder.launches, dict(work.kernels), work.ops, work.peak_excluding(kept))
    return plan, result
