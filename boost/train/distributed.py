"""Data parallelism for the bilevel trainer under ``torchrun``: ``parallel=ddp`` or ``parallel=fsdp2``.

Launch (one node, N processes; NCCL on CUDA, gloo on CPU)::

    torchrun --standalone --nproc-per-node N -m boost.train parallel=ddp ...
    # ranks that die are restarted (all of them) and continue from the newest complete checkpoint
    torchrun --standalone --nproc-per-node N --max-restarts 3 -m boost.train parallel=fsdp2 ... --resume

Every process is a rank; the trainer talks to this module through one :class:`Parallel` object
(``trainer.parallel``). ``parallel=none`` (the default) is :class:`SingleProcess`, whose hooks are the
identity: a single-process run computes exactly what it computed before this module existed.

What each rank holds and what crosses ranks, per inner step (S trajectories in the global batch):

* **Data.** The packer plans the *global* batches exactly as for one process (the config's token
  budget is the global budget). Rank r collates ``positions[r::N]`` of every global batch: disjoint
  trajectories, about 1/N of the tokens each (with ``data.rows > 1``, the rows its share fills). A
  rank whose share is empty (a global batch of fewer than N trajectories) runs a *phantom*: one
  trajectory with every label removed, whose loss is 0 and which is left out of every global quantity.
* **The model step.** Each rank's loss is Σ_{i local} w_i L_i / S (S global). The gradients are
  summed over ranks, not averaged (DDP with a sum communication hook; FSDP2 with its gradient divide
  factor set to 1 and sum-only reductions), so the step's gradient is Σ_i w_i ∇L_i / S as on one
  process.
* **The head.** The per-trajectory features (pooled hidden state, loss, token count, source, return)
  are all-gathered into the global batch's plan order, so every rank evaluates the reweighting head
  on every trajectory of the global batch: the weights, the normaliser's pool (its FIFO order
  included) and n_eff are the ones one process would compute.
* **The outer step.** The validation batch is sharded the same way; g = ∇_W L_out is all-reduced
  (each rank's loss is normalised by the global trajectory count). For ``block=head`` every
  Hessian-vector product of CG / Neumann (and the residual check) is the all-reduced sum of the
  ranks' local products, one all-reduce of a [V, D] buffer per product; the scores σ_i stay on the
  trajectory's rank; each rank backpropagates Σ_{i local} w_i · dL/dw_i (rank 0 adds the regularisers,
  which are global functions of all weights) into the head, and the head's gradient is all-reduced,
  so every rank takes the same head step. For ``block=trainable`` (DDP only) g and every
  finite-difference HVP are all-reduced; v, hence every perturbation θ ± εv, is identical on every
  rank because it is computed from all-reduced quantities only. ``outer.objective`` other than the
  NLL (:mod:`boost.train.outer_signal`): the ``decision`` term is summed like the NLL (normalised by
  the global count of trajectories with an action); the ``return`` term's rollouts are split like the
  test episodes (each from its own seed) and gathered, and its score function is summed over the
  ranks' shares of every rollout batch.
* **FSDP2 and the fused ops.** ``fully_shard`` wraps every decoder layer and, as the root, a module
  whose forward is the trunk (it holds the whole model, so the embedding, final norm and LM head
  form the root's group). FSDP2 does not reshard the root after its forward, so the fused loss of the
  inner step reads the gathered [V, D] head and its gradient is reduce-scattered with the root's
  group at the end of the backward. The outer step gathers the head explicitly
  (``DTensor.full_tensor``): each rank then holds W, the pre-step copy of W, g and the solver's
  vectors (CG: four, Neumann: three) at full size, i.e. about (3 + 4) · V · D · 4 bytes (SmolLM2-135M,
  V·D = 28.3M: 0.8 GB per rank), against 2 · V · D · 4 bytes for a reduce-scatter scheme that keeps
  the vectors sharded but needs an all-reduce per dot product of CG as well. The trunk (the bulk of
  the parameters, optimiser state and activations) stays sharded. ``solver.method=identity`` also
  gathers the head's AdamW moments and clipped gradient (:meth:`TorchRun.stepped`).

* **Accumulation, refiltering, evaluation.** ``grad_accum=k``: each rank's shares of k global
  batches, stepped as their union (:func:`boost.train.accumulation.concat_batches`). The pool weights
  of a refilter and of the end of the run, the held-out loss and the test episodes are computed on
  each rank's share and gathered (:meth:`TorchRun.share`, :meth:`TorchRun.gather_objects`; FSDP2
  generates with a gathered plain copy, :meth:`TorchRun.generation_model`).

Reductions and agreement with one process: a sum over ranks of per-rank partial sums rounds
differently from one sum, so results agree to float32 rounding (about 1e-7 relative per reduction),
not bit for bit; per-trajectory quantities are computed on the trajectory's own tokens and gathered,
so they differ only by the trunk's rounding on another packing.

Rank 0 writes metrics, TensorBoard, reports and the final model; every rank writes its shard of a
checkpoint through ``torch.distributed.checkpoint`` (:func:`save_distributed_checkpoint`), which loads
on any number of ranks, under DDP or FSDP2. ``parallel_debug=true`` all-gathers a hash of the head,
its normaliser state and its optimiser after every outer step and stops if any rank differs, and
rank 0 appends the global batch's per-trajectory losses, weights and hypergradients to
``parallel_debug.jsonl`` (a resumed run first drops the rows after its checkpoint).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, load_model

from boost.bilevel.hypergradient import _dot
from boost.bilevel.hypergradient_trainable import local_part
from boost.bilevel.reweighting import TrajectoryFeatures
from boost.data import PackedBatch, TrajectoryPacker
from boost.data.packing import _concat_rows, assign_rows
from boost.train.checkpoint_io import (
    HEAD_FILE,
    TENSORS_FILE,
    CheckpointError,
    _set_rng_states,
    is_peft_model,
    load_optimizer_states,
    read_state,
    write_run_state,
    write_step_folder,
)
from boost.train.config import PARALLEL
from boost.train.evaluation import save_pretrained_atomic
from boost_kernels.vocab_parallel import shard_rows

log = logging.getLogger(__name__)

DCP_DIR = "dcp"  # the model and its optimiser, written by torch.distributed.checkpoint
DEBUG_FILE = "parallel_debug.jsonl"


class ParallelError(RuntimeError):
    """A parallel run cannot start or continue (launch, checkpoint layout, ranks that disagree)."""


# ---------------------------------------------------------------------------------------- batches
@dataclass
class ShardBatch(PackedBatch):
    """This rank's share of a global packed batch.

    global_size: S, the trajectories of the global batch.
    global_order [S_local] int64: each local trajectory's position in the global batch's plan order;
        -1 for a phantom (a rank whose share is empty runs one trajectory with no counted token).
    """

    global_size: int = 0
    global_order: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> ShardBatch:
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()}
        return ShardBatch(**moved)


def owned(batch: PackedBatch) -> int:
    """Trajectories of ``batch`` that count (all of them, none for a phantom)."""
    if isinstance(batch, ShardBatch):
        return int((batch.global_order >= 0).sum())
    return batch.num_segments


@dataclass
class BatchView:
    """Per-trajectory values of the *global* batch, in its plan order, identical on every rank.

    size: S. local [S_local] int64 (None for one process): where this rank's trajectories sit among
    the S (-1: phantom). per_trajectory [S] float (detached losses), num_tokens [S], is_real [S] bool,
    rewards [S] float (NaN: unknown), truncated [S] bool or None, source [S] int64 (index into the
    run's source names), index [S] int64 (trajectory index), features: the head's features of the S
    trajectories (None when the method has no learned head).
    """

    size: int
    local: torch.Tensor | None
    per_trajectory: torch.Tensor
    num_tokens: torch.Tensor
    is_real: torch.Tensor
    rewards: torch.Tensor
    truncated: torch.Tensor | None
    source: torch.Tensor
    index: torch.Tensor
    features: TrajectoryFeatures | None

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """[S] -> [S_local]: this rank's entries (0 for a phantom); differentiable."""
        if self.local is None:
            return x
        picked = x[self.local.clamp(min=0)]
        return torch.where(self.local >= 0, picked, torch.zeros_like(picked))

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """[S_local] -> [S]: this rank's entries in place, 0 for the other ranks' trajectories."""
        if self.local is None:
            return x
        out = x.new_zeros(self.size)
        keep = self.local >= 0
        out[self.local[keep]] = x[keep]
        return out


# ---------------------------------------------------------------------------------------- single process
class SingleProcess:
    """``parallel=none``: one process, every hook the identity."""

    enabled = False
    world = 1
    rank = 0
    is_main = True
    kind = "none"

    def device(self, name: str) -> torch.device:
        return torch.device(name)

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        yield

    def barrier(self) -> None:
        pass

    def wrap(self, trainer) -> None:
        """Nothing to wrap: ``trainer.trunk`` stays the decoder."""

    def collate(self, packer: TrajectoryPacker) -> Callable[[Sequence[int]], PackedBatch]:
        return packer.collate

    def batches(self, packer: TrajectoryPacker, epoch: int) -> Iterator[PackedBatch]:
        return packer.batches(epoch)

    def loss_options(self, batch: PackedBatch) -> dict:
        return {}

    def normalizer(self, batch: PackedBatch) -> float | None:
        return None

    def view(self, batch, per_trajectory, num_tokens, source, features=None) -> BatchView:
        return BatchView(
            batch.num_segments, None, per_trajectory, num_tokens, batch.is_real, batch.rewards,
            batch.truncated, source, batch.trajectory_index, features,
        )  # fmt: skip

    def gather(self, batch: PackedBatch, *tensors: torch.Tensor) -> list[torch.Tensor]:
        return list(tensors)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def sum_floats(self, *values: float) -> list[float]:
        return list(values)

    def share(self, n: int) -> range:
        """The items of ``n`` (e.g. test episodes) this process plays: all of them."""
        return range(n)

    def gather_objects(self, items: list) -> list:
        """Every process's ``items`` (picklable), concatenated in rank order: one process's own."""
        return items

    @contextlib.contextmanager
    def generation_model(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """A model that ``generate`` can run on this process alone: the model itself."""
        yield model

    reduce = None  # the solvers' hook for HVPs: None = nothing to reduce

    def agree(self, bad: list[str]) -> list[str]:
        return bad

    def reduce_gradients(self, module: torch.nn.Module) -> None:
        pass

    def full(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def skip_backward(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """A skipped (non-finite) step: nothing to do on one process."""

    def stepped(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor]):
        """(optimizer, params) for :func:`boost.bilevel.step_response.optimizer_response`: as they are."""
        return optimizer, params

    shards_head = False  # the outer step keeps the head's vectors as vocabulary rows (FSDP2 only)

    def no_sync(self):
        return contextlib.nullcontext()

    def after_outer_step(self, trainer, state: dict, hypergradient: torch.Tensor) -> None:
        pass

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------- torchrun
class TorchRun(SingleProcess):
    """``parallel=ddp`` / ``parallel=fsdp2`` under ``torchrun`` (the process group from its env vars)."""

    enabled = True

    def __init__(self, kind: str, device: str, debug: bool = False):
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ParallelError(
                f"parallel={kind} needs the process group of torchrun (RANK / WORLD_SIZE are not set); launch "
                f"with `torchrun --standalone --nproc-per-node N -m boost.train parallel={kind} ...`, or set "
                "parallel=none for one process"
            )
        self.kind, self.debug = kind, debug
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        cuda = device.split(":")[0] == "cuda"
        if cuda:
            torch.cuda.set_device(self.local_rank)
        self._device = torch.device(f"cuda:{self.local_rank}" if cuda else "cpu")
        if not dist.is_initialized():
            _init_process_group("nccl" if cuda else "gloo", timedelta(minutes=30))
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.is_main = self.rank == 0
        self.mesh, self._ddp, self._head_param = None, None, None
        self._debug_files: set[Path] = set()  # parallel_debug.jsonl files written by this process
        if not self.is_main:  # one log per run: the other ranks only warn
            logging.getLogger("boost").setLevel(logging.WARNING)

    # -- set-up
    def device(self, name: str) -> torch.device:
        return self._device

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (it may write files, e.g. the CPU preset), then the others."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def barrier(self) -> None:
        dist.barrier()

    def wrap(self, trainer) -> None:
        """Replace ``trainer.trunk`` by the DDP- or FSDP2-wrapped trunk (before the optimiser exists)."""
        trunk = _Trunk(trainer.model)
        if self.kind == "ddp":
            ids = [self.local_rank] if self._device.type == "cuda" else None
            ddp = torch.nn.parallel.DistributedDataParallel(trunk, device_ids=ids, broadcast_buffers=False)
            ddp.register_comm_hook(None, _sum_hook)  # Σ over ranks: the losses are globally normalised
            trainer.trunk = self._ddp = ddp
            return
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard

        self.mesh = init_device_mesh(self._device.type, (self.world,))
        for layer in trainer.model.get_decoder().layers:
            fully_shard(layer, mesh=self.mesh)
        fully_shard(trunk, mesh=self.mesh)  # the root: embedding, final norm and LM head
        self._head_param = trainer.lm_head.weight  # the sharded DTensor the optimiser will hold
        self.shards_head = trainer.cfg.block == "head" and trainer.cfg.sharded_outer
        for module in trunk.modules():
            if isinstance(module, FSDPModule):  # sum, not mean, and no PREMUL_SUM (gloo lacks it)
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)
        trainer.trunk = trunk

    # -- data
    def collate(self, packer: TrajectoryPacker) -> Callable[[Sequence[int]], ShardBatch]:
        """positions of a global batch -> this rank's :class:`ShardBatch` (``positions[rank::world]``)."""
        index_of = [t.index for t in packer.trajectories]

        def collate(positions: Sequence[int]) -> ShardBatch:
            positions = list(positions)
            mine = positions[self.rank :: self.world]
            batch = _collate_share(packer, mine or positions[:1])
            if not mine:  # a phantom: no token counts, so it adds 0 to every loss and gradient
                batch.labels = torch.full_like(batch.labels, -100)
                batch.segment_ids = torch.full_like(batch.segment_ids, -1)
                batch.num_counted = torch.zeros_like(batch.num_counted)
                order = [-1]
            else:
                where = {index_of[p]: k for k, p in enumerate(positions)}
                order = [where[int(i)] for i in batch.trajectory_index]
            return ShardBatch(**batch.__dict__, global_size=len(positions),
                              global_order=torch.tensor(order, dtype=torch.int64))  # fmt: skip

        return collate

    def batches(self, packer: TrajectoryPacker, epoch: int) -> Iterator[ShardBatch]:
        collate = self.collate(packer)
        for positions in packer.plan(epoch):
            yield collate(positions)

    def loss_options(self, batch: PackedBatch) -> dict:
        """A shard's fused ``loss`` normalised by the global trajectory count (to be summed over ranks);
        a whole batch (evaluation code that runs every batch on every rank) as on one process."""
        return {"normalizer": float(batch.global_size)} if isinstance(batch, ShardBatch) else {}

    def normalizer(self, batch: PackedBatch) -> float:
        return float(batch.global_size)

    # -- collectives
    def gather(self, batch: ShardBatch, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Per-trajectory tensors [S_local, ...] of every rank -> [S, ...] in plan order (phantoms
        dropped), identical on every rank. Integer and bool tensors must hold values below 2^24."""
        wide = any(t.dtype == torch.float64 for t in tensors)
        dtype = torch.float64 if wide else torch.float32
        order = batch.global_order.to(tensors[0].device)
        cols = [order[:, None].to(dtype)] + [t.reshape(t.shape[0], -1).to(dtype) for t in tensors]
        widths = [c.shape[1] for c in cols]
        rows = torch.cat(cols, dim=1)
        counts = torch.tensor([rows.shape[0]], device=rows.device)
        every = [torch.zeros_like(counts) for _ in range(self.world)]
        dist.all_gather(every, counts)
        most = max(int(c) for c in every)
        padded = rows.new_zeros(most, rows.shape[1])
        padded[: rows.shape[0]] = rows
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        table = torch.cat([p[: int(c)] for p, c in zip(parts, every)])
        table = table[table[:, 0] >= 0]
        table = table[torch.argsort(table[:, 0])]
        if table.shape[0] != batch.global_size:
            raise ParallelError(
                f"gathered {table.shape[0]} trajectories, the global batch has {batch.global_size}"
            )
        out, at = [], 1
        for t, width in zip(tensors, widths[1:]):
            out.append(table[:, at : at + width].reshape(-1, *t.shape[1:]).to(t.dtype))
            at += width
        return out

    def view(self, batch, per_trajectory, num_tokens, source, features=None) -> BatchView:
        truncated = batch.truncated if batch.truncated is not None else torch.zeros_like(batch.is_real)
        local = [per_trajectory, num_tokens, batch.is_real, batch.rewards.to(per_trajectory.device), truncated,
                 source, batch.trajectory_index.to(per_trajectory.device)]  # fmt: skip
        if features is not None:
            local.append(features.pooled)
        got = self.gather(batch, *local)
        per, tokens, real, rewards, trunc, src, index = got[:7]
        global_features = None
        if features is not None:
            global_features = TrajectoryFeatures(
                got[7], per.float(), torch.log1p(tokens.float()), ~real,
                None if features.source is None else src,
                None if features.returns is None else torch.nan_to_num(rewards),
            )  # fmt: skip
        order = batch.global_order.to(per_trajectory.device)
        return BatchView(batch.global_size, order, per, tokens, real, rewards,
                         None if batch.truncated is None else trunc, src, index, global_features)  # fmt: skip

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) ``x`` in place and return it."""
        dist.all_reduce(x)
        return x

    def sum_floats(self, *values: float) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self._device)
        dist.all_reduce(t)
        return t.tolist()

    reduce = sum  # the solvers' hook: a local Hessian-vector product -> the sum over ranks

    def share(self, n: int) -> range:
        """Rank r plays items r, r + N, r + 2N, ... of ``n``."""
        return range(self.rank, n, self.world)

    def gather_objects(self, items: list) -> list:
        every: list[list | None] = [None] * self.world
        dist.all_gather_object(every, items)
        return [item for part in every for item in part]

    @contextlib.contextmanager
    def generation_model(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """DDP: the model itself (every rank holds all of it; generating outside the DDP wrapper runs
        no collective). FSDP2: a plain copy built from the gathered full state dict, so each rank can
        generate on its own share of episodes, with a different number of forwards than the others (a
        sharded forward all-gathers every layer, so all ranks would have to run in lockstep). Costs one
        whole model per rank for the duration, as TRL's generation under FSDP does; freed after."""
        if self.kind != "fsdp2":
            yield model
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        plain = plain_copy(model, full).to(self._device).eval()
        del full  # copied into plain: not held a second time while generating
        yield plain

    def agree(self, bad: list[str]) -> list[str]:
        """A step is skipped on every rank when it is non-finite on any (else the collectives hang)."""
        flag = torch.tensor([float(bool(bad))], device=self._device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bad or (["on another rank"] if float(flag) > 0 else [])

    def reduce_gradients(self, module: torch.nn.Module) -> None:
        """Sum the gradients of ``module`` (the reweighting head) over ranks, in one all-reduce."""
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        at = 0
        for g in grads:
            g.copy_(flat[at : at + g.numel()].view_as(g))
            at += g.numel()

    def full(self, tensor: torch.Tensor) -> torch.Tensor:
        """A parameter at full size: FSDP2's sharded DTensor gathered on every rank (a plain tensor as is)."""
        from torch.distributed.tensor import DTensor

        return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor

    def stepped(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor]):
        """FSDP2, ``block=head``: the AdamW state and gradient of the LM head are sharded DTensors of the
        parameter the optimiser holds, not of the gathered ``lm_head.weight``; returns a stand-in AdamW
        over one full-size copy of W with the gathered state (``exp_avg``, ``exp_avg_sq``, the step's
        clipped gradient: three more [V, D] tensors per rank during the outer step)."""
        if self.kind != "fsdp2":
            return optimizer, params
        if len(params) != 1 or self._head_param is None:
            raise ParallelError("parallel=fsdp2 computes the optimiser's response for the LM head only")
        return _stand_in(optimizer, [self._head_param], self.full)

    def head_rows(self, tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
        """FSDP2 (``shards_head``): this rank's rows of the LM head's ``tensor`` (weight [V, D] or bias
        [V]) and the first row's index; the sharded DTensor's local rows, or the same rows of the
        gathered tensor while FSDP2 holds the root unsharded (a view: no copy either way). The rows are
        FSDP2's ``Shard(0)`` blocks: ceil(V / N) each in rank order, the last ones shorter or empty."""
        from torch.distributed.tensor import DTensor, Shard

        V = tensor.shape[0]
        rows = shard_rows(V, self.world, self.rank)
        if isinstance(tensor, DTensor):
            if tuple(tensor.placements) != (Shard(0),):
                raise ParallelError(f"the LM head is sharded as {tensor.placements}, expected (Shard(0),)")
            local = tensor.to_local()
            if local.shape[0] != rows.stop - rows.start:
                raise ParallelError(
                    f"rank {self.rank}: FSDP2 holds {local.shape[0]} rows of the {V}-row LM head, expected "
                    f"{rows.stop - rows.start} (rows {rows.start}..{rows.stop}); set sharded_outer=false"
                )
            return local, rows.start
        return tensor[rows], rows.start

    def vocab_shard(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        """This rank's :class:`boost_kernels.vocab_parallel.VocabShard` of the LM head (``head_rows``)."""
        from boost_kernels.vocab_parallel import ProcessGroup, VocabShard

        rows, start = self.head_rows(weight)
        local_bias = None if bias is None else self.head_rows(bias)[0]
        return VocabShard(rows.detach(), start, weight.shape[0], ProcessGroup(), bias=local_bias)

    def stepped_rows(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor] | None = None):
        """:meth:`stepped` on this rank's shards: a stand-in AdamW over the local parts of ``params``
        (default: the LM head's rows, for the sharded outer step) with their AdamW state and gradient
        (FSDP2's local shards: nothing gathered). Returns (stand-in, its parameters)."""
        return _stand_in(optimizer, [self._head_param] if params is None else params, local_part)

    # -- FSDP2, block=trainable: finite differences on the sharded parameters
    def param_gradients(self, loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """FSDP2: ∇ ``loss`` for each sharded parameter as this rank's local shard, summed over ranks
        (FSDP2's reduce-scatter: ``torch.autograd.grad`` does not reach sharded parameters, whose
        gradients FSDP2 writes into ``.grad``). The parameters' ``.grad`` (the inner step's, which
        the look-ahead reads) is kept aside and put back."""
        kept = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            loss.backward()
            return [torch.zeros_like(local_part(p)) if p.grad is None else local_part(p.grad).clone()
                    for p in params]  # fmt: skip
        finally:
            for p, g in zip(params, kept):
                p.grad = g

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """<a, b> of two flat vectors of local shards, summed over ranks (float64)."""
        return self.sum_floats(_dot(a, b))[0]

    def reshard(self, trainer) -> None:
        """FSDP2: drop every unsharded parameter (the root keeps its own after a forward) so that the
        next forward gathers the shards again: after the parameters' shards were changed in place."""
        from torch.distributed.fsdp import FSDPModule

        for module in trainer.trunk.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def skip_backward(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """A skipped step under DDP: its forward expects a backward (else the next forward fails with
        "Expected to have finished reduction"), so run it and throw the (non-finite) gradients away."""
        if self._ddp is not None:
            loss.backward()
            optimizer.zero_grad(set_to_none=True)

    def no_sync(self):
        """DDP does not synchronise ``torch.autograd.grad``: the outer step reduces by hand."""
        return self._ddp.no_sync() if self._ddp is not None else contextlib.nullcontext()

    # -- checks
    def after_outer_step(self, trainer, state: dict, hypergradient: torch.Tensor) -> None:
        """Debug mode: the head's state must be identical on every rank; rank 0 logs the trajectories."""
        if not self.debug:
            return
        digest = head_digest(trainer.head, trainer.head_opt)
        every = [None] * self.world
        dist.all_gather_object(every, digest)
        if len(set(every)) != 1:
            raise ParallelError(
                f"step {trainer.step}: the reweighting head differs between ranks (hashes {every}); the "
                "head must see the same features and take the same step on every rank"
            )
        view = state["view"]
        h = self.sum(view.scatter(hypergradient.detach().float()))
        if self.is_main:
            path = Path(trainer.out) / DEBUG_FILE
            if path not in self._debug_files:  # a resumed run: drop the rows after its checkpoint
                self._debug_files.add(path)
                kept = [r for r in _read_lines(path) if json.loads(r)["step"] < trainer.step]
                path.write_text("".join(r + "\n" for r in kept), encoding="utf-8")
            row = {"step": trainer.step, "index": view.index.tolist(),
                   "loss": view.per_trajectory.float().tolist(), "weight": state["w"].detach().float().tolist(),
                   "hypergradient": h.tolist(), "head_hash": digest}  # fmt: skip
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def close(self) -> None:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def _stand_in(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], view: Callable):
    """(stand-in optimiser, its parameters) for :func:`boost.bilevel.step_response.optimizer_response`:
    the same class and hyper-parameters as ``optimizer`` over ``view(p)`` of each of its ``params``
    (FSDP2 DTensors: gathered by ``full``, or their local shards), with ``view`` of their gradients
    and state tensors."""
    group = next(g for g in optimizer.param_groups if any(p is params[0] for p in g["params"]))
    parts = []
    for p in params:
        part = torch.nn.Parameter(view(p.detach()), requires_grad=False)
        part.grad = view(p.grad)
        parts.append(part)
    stand_in = type(optimizer).__new__(type(optimizer))
    torch.optim.Optimizer.__init__(stand_in, parts, {k: v for k, v in group.items() if k != "params"})
    for part, p in zip(parts, params):
        stand_in.state[part] = {
            k: view(v) if isinstance(v, torch.Tensor) else v for k, v in optimizer.state[p].items()
        }
    return stand_in, parts


def _init_process_group(backend: str, timeout: timedelta) -> None:
    """``init_process_group`` from torchrun's environment, in a store namespace of its own per restart.

    After ``torchrun --max-restarts`` restarts the ranks, the ranks of the new attempt meet in the same
    store (the agent's, ``TORCHELASTIC_USE_AGENT_STORE``) as the dead ones, and gloo's full-mesh
    connect read the dead ranks' addresses from it and failed ("connectFullMesh failed ... Connection
    refused", measured with torch 2.13 on CPU: every restart failed until --max-restarts ran out). A
    ``PrefixStore`` named after ``TORCHELASTIC_RESTART_COUNT`` gives each attempt fresh keys."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or "MASTER_ADDR" not in os.environ:
        dist.init_process_group(backend, timeout=timeout)
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent_store and rank == 0, timeout=timeout)  # fmt: skip
    store = dist.PrefixStore(f"boost/attempt_{attempt}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


def _collate_share(packer: TrajectoryPacker, positions: list[int]) -> PackedBatch:
    """``packer.collate``, except that with ``data.rows > 1`` the rows a share leaves empty are dropped
    (a share of 1/N of the trajectories fills about 1/N of the rows: the rank computes that many)."""
    cfg = packer.config
    if cfg.rows == 1:
        return packer.collate(positions)
    placed = assign_rows([packer.lengths[p] for p in positions], cfg.rows, cfg.row_length)
    rows = [
        packer._collate_row([packer.trajectories[p] for p, r in zip(positions, placed) if r == row], cfg.row_length)
        for row in sorted(set(placed))
    ]  # fmt: skip
    return _concat_rows(rows, cfg.row_length, cfg.pad_token_id)


def _read_lines(path: Path) -> list[str]:
    return (
        [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if path.exists()
        else []
    )


class _Trunk(torch.nn.Module):
    """The whole causal LM as a module whose forward is the trunk (what DDP / FSDP2 wrap): its
    parameters include the LM head, which the fused loss uses outside the forward."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **inputs):
        return self.model.get_decoder()(**inputs)


def _sum_hook(process_group, bucket):
    """DDP communication hook: all-reduce the bucket as a sum (DDP's default divides by the world size)."""
    group = process_group if process_group is not None else dist.group.WORLD
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def make_parallel(kind: str, device: str, debug: bool = False) -> SingleProcess:
    """The :class:`Parallel` of a run: ``none`` -> :class:`SingleProcess`, else :class:`TorchRun`."""
    if kind not in PARALLEL:
        raise ValueError(f"parallel must be one of {', '.join(PARALLEL)}, got {kind!r}")
    return SingleProcess() if kind == "none" else TorchRun(kind, device, debug)


Parallel = SingleProcess  # the interface: SingleProcess and TorchRun


def head_digest(head: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> str:
    """sha256 over the head's parameters and buffers (the normaliser's pool, μ, the task-shift
    reference) and its optimiser's tensors: equal digests mean bit-identical state."""
    h = hashlib.sha256()
    for name, t in sorted(head.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    if optimizer is not None:
        for key, slot in sorted(optimizer.state_dict()["state"].items()):
            for name, value in sorted(slot.items()):
                h.update(f"{key}.{name}".encode())
                if isinstance(value, torch.Tensor):
                    h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
                else:
                    h.update(repr(value).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------- checkpoints
def _model_and_optimizer_state(trainer):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(trainer.model, trainer.opt)
    return {"model": model_state, "optimizer": optim_state}


# trainer_state.json: {"shape": [V, D], "names": [...]} of head-shaped tensors saved as rows in dcp/
SHARDED_ROWS = "sharded_head_rows"
SHARDED_V = "sharded_last_v"  # the same for the warm start alone (checkpoints written before the above)
ROW_TENSORS = ("last_v", "return_grad")  # head-shaped tensors a vocabulary-sharded head keeps as rows


def _head_rows_dtensor(parallel: TorchRun, rows: torch.Tensor, shape: list[int]):
    """This rank's rows of a [V, D] head-shaped tensor as a ``Shard(0)`` DTensor (FSDP2's layout)."""
    from torch.distributed.tensor import DTensor, Shard

    return DTensor.from_local(rows, parallel.mesh, [Shard(0)], run_check=False, shape=torch.Size(shape),
                              stride=(shape[1], 1))  # fmt: skip


def save_distributed_checkpoint(
    trainer, tensors: dict[str, torch.Tensor | None], info: dict[str, Any]
) -> Path:
    """``out_dir/checkpoints/step-N/`` of a parallel run, written by every rank, renamed by rank 0.

        dcp/                   the model and its AdamW state (torch.distributed.checkpoint: each rank
                               its shard under FSDP2; replicated tensors once under DDP)
        head.safetensors       the reweighting head (identical on every rank: rank 0's)
        optimizer.pt           {"head": Adam state_dict} (weights_only)
        state.safetensors      ``tensors`` (the warm start v: replicated) and rank 0's RNG state
        trainer_state.json     as for one process, plus ``"parallel": {"mode", "world_size"}``

    The folder loads on any number of ranks, under DDP or FSDP2 (:func:`load_distributed_checkpoint`).
    The temporary folder, the renaming and the pruning are :func:`write_step_folder`'s, as for one
    process.
    """
    import torch.distributed.checkpoint as dcp

    parallel: TorchRun = trainer.parallel

    def share(tmp: Path | None) -> Path | None:
        box = [None if tmp is None else str(tmp)]
        dist.broadcast_object_list(box, src=0)
        return None if box[0] is None else Path(box[0])

    state = _model_and_optimizer_state(trainer)
    rows = [k for k in ROW_TENSORS if parallel.shards_head and tensors.get(k) is not None]
    if rows:  # each rank's rows, resharded on load
        tensors = dict(tensors)
        shape = list(trainer.lm_head.weight.shape)
        state["outer"] = {k: _head_rows_dtensor(parallel, tensors.pop(k), shape) for k in rows}
        info = {**info, SHARDED_ROWS: {"shape": shape, "names": rows}}

    def write(tmp: Path) -> None:
        dcp.save(state, checkpoint_id=str(tmp / DCP_DIR))
        if parallel.is_main:
            run_info = {"parallel": {"mode": parallel.kind, "world_size": parallel.world}, **info}
            write_run_state(tmp, trainer.step, head=trainer.head, optimizers={"head": trainer.head_opt},
                            tensors=tensors, info=run_info)  # fmt: skip

    return write_step_folder(trainer.out, trainer.step, trainer.cfg.keep_checkpoints, write,
                             main=parallel.is_main, share=share, barrier=parallel.barrier)  # fmt: skip


def is_distributed_checkpoint(path: Path) -> bool:
    return (Path(path) / DCP_DIR).is_dir()


def load_distributed_checkpoint(trainer, path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Load a folder of :func:`save_distributed_checkpoint` (any world size, DDP or FSDP2) on every rank.

    Returns ``(trainer_state.json, the named extra tensors on the trainer's device)``.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    path = Path(path)
    if not is_distributed_checkpoint(path):
        raise CheckpointError(
            f"{path}: written by a single-process run (safetensors, no {DCP_DIR}/ folder); resume it with "
            "parallel=none, or start the parallel run afresh"
        )
    state = read_state(path)
    target = _model_and_optimizer_state(trainer)
    dcp.load(target, checkpoint_id=str(path / DCP_DIR))
    set_state_dict(trainer.model, trainer.opt, model_state_dict=target["model"],
                   optim_state_dict=target["optimizer"])  # fmt: skip
    load_model(trainer.head, str(path / HEAD_FILE), strict=True, device=str(trainer.device))
    trainer.head_opt.load_state_dict(load_optimizer_states(path, trainer.device)["head"])
    tensors = load_file(str(path / TENSORS_FILE), device="cpu")
    _set_rng_states(tensors)
    tensors = {k: v.to(trainer.device) for k, v in tensors.items() if not k.startswith("rng.")}
    parallel: TorchRun = trainer.parallel
    sharded = state.get(SHARDED_ROWS) or (
        {"shape": state[SHARDED_V], "names": ["last_v"]} if SHARDED_V in state else None
    )
    if sharded:  # written as every rank's rows (sharded_outer): this run's rows, or all of them
        shape = sharded["shape"]
        targets = {}
        for name in sharded["names"]:
            if parallel.shards_head:
                rows = parallel.head_rows(torch.empty(shape, device="meta"))[0]
                targets[name] = _head_rows_dtensor(
                    parallel, torch.empty(rows.shape, device=trainer.device), shape
                )
            else:
                targets[name] = torch.empty(shape, device=trainer.device)
        dcp.load({"outer": targets}, checkpoint_id=str(path / DCP_DIR))
        for name, target in targets.items():
            tensors[name] = target.to_local() if parallel.shards_head else target
    for name in ROW_TENSORS:  # a replicated [V, D] tensor (DDP, or sharded_outer=false): this run's rows
        if (
            parallel.shards_head
            and not (sharded and name in sharded["names"])
            and tensors.get(name) is not None
        ):
            tensors[name] = parallel.head_rows(tensors[name])[0].clone()
    return state, tensors


def plain_copy(model: torch.nn.Module, full: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain (unsharded) copy of ``model``'s architecture holding the weights ``full`` (its full
    state dict, e.g. FSDP2's shards gathered), on the device of ``full``'s tensors. A peft (LoRA)
    model's copy has its adapters merged (a plain causal LM, as ``out_dir/model`` is saved)."""
    from transformers import AutoModelForCausalLM

    dtype = model.get_input_embeddings().weight.dtype
    plain = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), torch_dtype=dtype)
    peft = is_peft_model(model)
    if peft:
        from peft import get_peft_model

        plain = get_peft_model(plain, copy.deepcopy(model.peft_config[model.active_adapter]))
    plain.load_state_dict(full, strict=True)
    if peft:
        plain = plain.merge_and_unload()
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain


def save_full_model(trainer, folder: Path) -> None:
    """``save_pretrained`` of the whole model by rank 0 (FSDP2: the shards gathered first, on rank 0's
    CPU; with LoRA a plain copy with the adapters merged); one process: :func:`save_pretrained_atomic`
    as it is."""
    full, model = None, trainer.model
    if trainer.parallel.kind == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if is_peft_model(model) and trainer.parallel.is_main:  # a sharded peft model cannot be deep-copied
            model, full = plain_copy(model, full), None
    if trainer.parallel.is_main:
        save_pretrained_atomic(model, trainer.tokenizer, Path(folder), state_dict=full)
    trainer.parallel.barrier()


class NullLog:
    """The metrics / TensorBoard log of ranks other than 0: writes nothing."""

    def write(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> NullLog:
        return self

    def __exit__(self, *exc: object) -> None:
        pass
