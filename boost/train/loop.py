"""The BOOST training loop: inner steps on reweighted packed batches, outer steps on the head.

Per inner step (one packed batch of real training and synthetic trajectories):

    hidden = trunk(batch)                                    [T, D], with grad
    L_i    = trajectory_cross_entropy(hidden, W, ...)         [S] per-trajectory losses
    w      = head(features(hidden, L_i, ...))                 [S] (weights; 1 for real trajectories)
    loss   = Σ_i stopgrad(w_i) L_i / S   -> AdamW step on the model

Every ``outer_every`` steps, an outer step on a batch of held-out *real* validation tasks, right
after that inner step (θ_t before it, θ_{t+1} after it; :mod:`boost.bilevel.outer`, which holds it):

    g      = ∇ L_out(trunk(val_batch)) at θ_{t+1}             (``outer.objective``: NLL by default)
    v      = identity: the AdamW step's response to g; neumann / cg: ≈ (H + λI)⁻¹ g at θ_t
    dL/dw  = −<∇L_i(θ_t), v> / S
    head  <- Adam step on Σ_i w_i(φ) stopgrad(dL/dw_i) + λ_conc/√n_eff + λ_shift·Σ_syn w_i d_i / S

θ_t is kept for the outer step: the pre-step head (a [V, D] copy) for ``block="head"``, every
trained parameter for ``block="trainable"`` (a copy of them), only on steps an outer step follows.
``block="head"`` (default) takes the hypergradient over the LM head, reusing the inner step's hidden
states; ``block="trainable"`` over every trained parameter, by finite differences (docs/design.md,
"Parameter block"). ``weighting.method=uniform`` trains with weight 1 everywhere (the baseline), and
``weighting.refilter_every`` lets the head choose the training batches instead
(:mod:`boost.train.refilter`).

This module holds the loop around them: the data (:func:`prepare_data`), the inner step and
:meth:`Trainer.losses` (the trainer's one call of the fused trajectory loss), the learning-rate
schedule, refiltering, checkpoints and evaluation.

Writes under ``out_dir``: ``metrics.jsonl`` (one line per logged step), ``checkpoints/step-N/``
(safetensors, no pickle, written to a temporary folder and renamed: a crash never leaves a half
checkpoint; the newest ``keep_checkpoints`` stay, :mod:`boost.train.checkpoint_io`), ``config.yaml``
and, at the end, ``report.md`` with ``training.png``. An ``out_dir`` that holds a run is refused
unless resumed or overwritten, and a step with a non-finite number is skipped, logged and counted
(:mod:`boost.train.checkpoint`, :mod:`boost.train.guards`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

import boost_kernels as bk
from boost.atomic import write_json_atomic, write_text_atomic
from boost.bilevel.hypergradient import HeadBatch
from boost.bilevel.outer import OuterStep
from boost.bilevel.reweighting import trajectory_features
from boost.bilevel.step_response import ClipRecord
from boost.config import to_dict
from boost.data import PackedBatch, PackingConfig, TokenizeConfig, TrajectoryPacker, tokenize_trajectories
from boost.train.accumulation import concat_batches, segment_slices
from boost.train.attention_backend import model_inputs, prepare_model, resolve_attention
from boost.train.baselines import (
    LEARNED,
    awr_factors,
    fixed_weights,
    left_out,
    make_head,
    mean_return,
    pool_weight_lines,
    pool_weights,
    select_synthetic,
    weight_analysis,
)
from boost.train.checkpoint import (
    LEGACY_CHECKPOINT,
    MetricsLog,
    RunDirError,
    config_differences,
    prepare_out_dir,
)
from boost.train.checkpoint_io import latest_checkpoint, load_checkpoint, read_state, save_checkpoint
from boost.train.config import DataConfig, TrainConfig
from boost.train.discriminator import discriminator_scores
from boost.train.distributed import (
    NullLog,
    is_distributed_checkpoint,
    load_distributed_checkpoint,
    make_parallel,
    owned,
    save_distributed_checkpoint,
    save_full_model,
)
from boost.train.evaluation import append_eval, evaluate_trainer, held_out_real
from boost.train.guards import BadStepCounter, gradient_norm, json_safe, nonfinite, resolve_device
from boost.train.influence import influence_scores, is_selection_step, random_scores, return_scores
from boost.train.lora import apply_lora, output_head
from boost.train.outer_signal import OuterSignal
from boost.train.precision import autocast, resolve_precision
from boost.train.preset import load_trainer_model
from boost.train.refilter import Refiltered, choose, is_refilter_step, packer_for
from boost.train.schedule import horizon, lr_factor, set_lr
from boost.train.selection import DataError, Selection, select_trajectories
from boost.train.tensorboard_log import TensorBoardLog, tokens_per_second

log = logging.getLogger(__name__)


@dataclass
class TrainData:
    train: TrajectoryPacker  # real training tasks + every synthetic trajectory
    validation: TrajectoryPacker  # held-out real tasks: the outer objective
    test: TrajectoryPacker | None  # held-out real tasks for the final numbers
    sources: list[str]  # source names of the training data, sorted ("real" included)
    summary: list[str]  # what was read, split, tokenised and dropped
    train_trajectories: list | None = None  # the records behind `train` (its `index` points here)
    # synthetic trajectories the method's filter left out (baselines.DATA_FILTERS): weight 0 in the
    # pool analysis, so a filter's choice shows next to a learned head's
    filtered_out: list = field(default_factory=list)


def prepare_data(cfg: DataConfig, tokenizer, selection: Selection | None = None, select=None) -> TrainData:
    """Read, split real data by task, tokenise and pack; every drop is counted in ``summary``.

    ``selection``: the trajectories already read and split (:func:`select_trajectories`), if any.
    ``select(synthetic) -> (kept, note)``: which synthetic trajectories to train on (a baseline's filter).
    """
    selection = selection or select_trajectories(cfg)
    summary = list(selection.summary)
    train = selection.train
    filtered_out = []
    if select is not None:
        real = [t for t in train if t.is_real]
        pool = [t for t in train if not t.is_real]
        synthetic, note = select(pool, real=real)
        filtered_out = left_out(pool, synthetic)
        train = real + synthetic
        summary.append(note)
        log.info(note)
    tok_cfg = TokenizeConfig(max_length=cfg.max_length)
    pack_cfg = PackingConfig(
        token_budget=cfg.token_budget, seed=cfg.seed, pad_token_id=tokenizer.pad_token_id or 0,
        mode=cfg.packing, rows=cfg.rows,
    )  # fmt: skip
    val_budget, val_rows = cfg.validation_packing()
    packing = {"validation": replace(pack_cfg, token_budget=val_budget, rows=val_rows)}
    packers = {}
    for name, items in (
        ("train", train),
        ("validation", selection.validation),
        ("test", selection.test),
    ):
        if not items:
            packers[name] = None
            continue
        tokenized, tok_report = tokenize_trajectories(items, tokenizer, tok_cfg, name=name)
        summary.append(f"{name}: {tok_report.summary()}")
        if not tokenized:
            raise DataError(
                f"{cfg.path}: no {name} trajectory survived tokenisation; see: {tok_report.summary()}"
            )
        packers[name] = TrajectoryPacker(tokenized, packing.get(name, pack_cfg), name=name)
    sources = sorted({t.source for t in train})
    return TrainData(
        packers["train"], packers["validation"], packers["test"], sources, summary, train, filtered_out
    )


def _cycle(packer: TrajectoryPacker, skip: int = 0, collate=None) -> Iterator[PackedBatch]:
    """Batches epoch after epoch (a new order each epoch), after skipping ``skip`` of them.

    ``collate(positions)``: how a planned batch is built (default ``packer.collate``; a parallel run
    collates this rank's share, :mod:`boost.train.distributed`)."""
    collate = collate or packer.collate
    epoch = 0
    while True:
        plan = packer.plan(epoch)
        for positions in plan:
            if skip:
                skip -= 1
                continue
            yield collate(positions)
        epoch += 1


class Trainer:
    """One run: the model, the reweighting head, their optimisers and the packed data.

    ``Trainer(cfg).train(resume=False)`` runs ``cfg.steps`` inner steps and returns the final
    validation and test losses; :func:`boost.train.report.write_report` then writes the report.
    """

    def __init__(self, cfg: TrainConfig, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        torch.manual_seed(cfg.seed)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        device = resolve_device(cfg.device)
        # parallel=ddp / fsdp2 under torchrun (boost/train/distributed.py); none: every hook is the identity
        self.parallel = make_parallel(cfg.parallel, device, cfg.parallel_debug)
        self.device = self.parallel.device(device)
        device = str(self.device)
        self.out = Path(cfg.out_dir)
        selection = select_trajectories(cfg.data)  # bad data fails here, before the model loads
        self.out.mkdir(parents=True, exist_ok=True)
        with self.parallel.main_first():  # the CPU preset is built into out_dir once
            self.model, self.tokenizer = load_trainer_model(
                cfg.model, cfg.data.path, self.out, cfg.seed, device
            )
        # precision and attention (boost/train/precision.py, attention_backend.py): chosen and printed once
        self.precision, why_precision = resolve_precision(cfg.precision, self.device)
        self.attention, why_attention = resolve_attention(
            cfg.model.attention, self.device, self.precision, fp32_forwards=cfg.block == "trainable"
        )
        prepare_model(self.model, self.attention)
        log.info("precision: %s (%s); attention: %s (%s)", self.precision, why_precision, self.attention,
                 why_attention)  # fmt: skip
        self.model = apply_lora(self.model, cfg.lora)  # unchanged when LoRA is off
        self.model.train()
        self.trunk = self.model.get_decoder()
        self.lm_head = output_head(self.model)
        impl = getattr(self.model.config, "_attn_implementation", "sdpa")
        self.mask_dtype = self.model.dtype if impl == "eager" else torch.bool
        self.method = cfg.weighting.method
        self.data = prepare_data(
            cfg.data, self.tokenizer, selection, partial(select_synthetic, cfg=cfg.weighting)
        )
        self.awr_baseline = mean_return(self.data.train_trajectories)
        if cfg.head.num_sources == -1:  # "auto": one source embedding per training source
            cfg = self.cfg = replace(cfg, head=replace(cfg.head, num_sources=len(self.data.sources)))
        if cfg.head.num_sources and cfg.head.num_sources < len(self.data.sources):
            raise ValueError(
                f"head.num_sources={cfg.head.num_sources} but the training data has {len(self.data.sources)} "
                f"sources ({', '.join(self.data.sources)}); set head.num_sources >= {len(self.data.sources)} or 0"
            )
        self.head = make_head(self.method, self.model.config.hidden_size, cfg.head).to(self.device)
        self.parallel.wrap(self)  # DDP / FSDP2 around the trunk, before the optimiser sees the parameters
        self.opt = torch.optim.AdamW(self._trained(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        if cfg.weighting.freeze_mass:  # every head (the baselines' too) is a ReweightingHead
            self.head.log_mass.requires_grad_(False)
        self.head_opt = torch.optim.Adam(
            [p for p in self.head.parameters() if p.requires_grad], lr=cfg.optim.head_lr
        )
        # the outer objective's validation gradient (boost/train/outer_signal.py); None: the NLL's
        self.signal = (
            OuterSignal(self) if cfg.outer.terms != {"nll": 1.0} and self.method in LEARNED else None
        )
        self.outer = OuterStep(self, nonfinite)  # the outer step (boost/bilevel/outer.py)
        self.step = 0
        self.last_v = None  # the previous outer step's v: warm start of Neumann / CG (checkpointed)
        # weighting.refilter_every (boost/train/refilter.py): the batches come from train_packer, the
        # pool (data.train) or its latest refiltered subset; refilters: what each one kept
        self.train_packer, self.refiltered = self.data.train, None
        self.refilters: list[dict] = []
        if self.method == "influence" and cfg.weighting.warmup_on == "real":  # until select_at: real only
            real = [p for p, t in enumerate(self.data.train.trajectories) if t.source == "real"]
            if not real:
                raise ValueError("weighting.warmup_on=real: the training data has no real trajectory; use "
                                 "warmup_on=pool")  # fmt: skip
            self._use_refiltered(Refiltered(0, real, {}), log_it=False)
            log.info("influence: training on the %d real trajectories until step %d", len(real),
                     cfg.weighting.select_at)  # fmt: skip

    # ------------------------------------------------------------------ pieces
    def hidden_states(self, batch: PackedBatch, precision: str | None = None) -> torch.Tensor:
        """[T, D] float32 last hidden states of a packed batch (with grad when grad mode is on); the trunk
        runs under ``precision`` (default: the run's; bf16 autocast or float32)."""
        inputs = model_inputs(batch, self.attention, self.mask_dtype)
        with autocast(precision or self.precision, self.device):
            hidden = self.trunk(**inputs).last_hidden_state
        return hidden.flatten(0, 1).float()  # [rows, T / rows, D] -> [T, D]

    def _bias(self):
        return getattr(self.lm_head, "bias", None)

    def losses(self, hidden: torch.Tensor, batch: PackedBatch, weight: torch.Tensor | None = None,
               counted: HeadBatch | None = None, **kwargs):  # fmt: skip
        """The fused per-trajectory losses of ``batch`` from ``hidden`` [T, D] (the LM head's ``weight``
        unless given). ``counted``: the batch's counted tokens only
        (:meth:`boost.bilevel.outer.OuterStep.counted`; ``hidden`` is then theirs) with the same
        trajectories, count and normaliser as ``batch``."""
        weight = self.lm_head.weight if weight is None else weight
        labels, segment_ids = (batch.labels, batch.segment_ids) if counted is None else (
            counted.labels, counted.segment_ids)  # fmt: skip
        # parallel: normalised by the global S; kernels: the fused ops' CUDA options
        kwargs = {**self.cfg.kernels.loss_options(), **self.parallel.loss_options(batch), **kwargs}
        return bk.trajectory_cross_entropy(
            hidden, weight, labels, segment_ids, batch.num_segments, bias=self._bias(), **kwargs
        )

    def _source_index(self, batch: PackedBatch) -> torch.Tensor:
        return torch.tensor([self.data.sources.index(s) for s in batch.sources], device=self.device)

    def inner_step(self, batch: PackedBatch, micro: list[PackedBatch] | None = None) -> tuple[dict, dict]:
        """One inner step on ``batch``; with ``micro`` (``grad_accum`` > 1) ``batch`` is their union
        (:func:`boost.train.accumulation.concat_batches`) and the gradient is accumulated over them."""
        cfg = self.cfg
        micro = micro or [batch]
        if len(micro) > 1:  # the union's weights need every micro-batch's features before any backward
            with torch.no_grad():
                hidden = torch.cat([self.hidden_states(m) for m in micro])
        else:
            hidden = self.hidden_states(batch)
        # The weights need the per-trajectory losses (a feature), so the step backpropagates through
        # per_trajectory, not through the op's own weighted total.
        out = self.losses(hidden, batch, precompute_grad=False)
        features = None
        if self.method in LEARNED:
            features = trajectory_features(
                hidden.detach(), batch.segment_ids, batch.segment_ids >= 0, out.per_trajectory.detach(),
                out.num_tokens, ~batch.is_real, source=self._source_index(batch) if cfg.head.num_sources else None,
                returns=torch.nan_to_num(batch.rewards) if cfg.head.use_returns else None,
            )  # fmt: skip
        # the global batch's trajectories (a parallel run gathers every rank's; one process: this batch)
        view = self.parallel.view(batch, out.per_trajectory.detach(), out.num_tokens, self._source_index(batch),
                                  features)  # fmt: skip
        synthetic = ~view.is_real
        if self.method in LEARNED:
            w = self.head(view.features)
        else:
            w = fixed_weights(self.method, view.per_trajectory, synthetic, cfg.weighting.loss_drop)
        # refilter_every: the head's weights choose the batches instead (boost/train/refilter.py); the
        # loss weighs every trajectory 1, and the outer step differentiates the head's w against that
        applied = torch.ones_like(w.detach()) if cfg.weighting.refilter_every else w
        if cfg.weighting.awr_beta:
            factors = awr_factors(
                view.rewards,
                cfg.weighting.awr_beta,
                self.awr_baseline,
                cfg.weighting.awr_max,
                truncated=view.truncated,
            )
            w, applied = w * factors, applied * factors
        w_local = view.take(applied)  # this rank's trajectories (all of them on one process)
        loss = (w_local.detach() * out.per_trajectory).sum() / view.size
        loss_total = self.parallel.sum(loss.detach().clone())  # over ranks (one process: the loss)
        self.opt.zero_grad(set_to_none=True)
        clip = pre_step = None
        bad = nonfinite(loss=loss_total, head_weights=w)  # a bad step is skipped: no optimiser step
        if bad:
            if len(micro) == 1:  # (an accumulated step's forwards ran without gradients: none pending)
                self.parallel.skip_backward(loss, self.opt)  # DDP: the forward's reduction must still finish
        else:
            if len(micro) > 1:  # grad_accum > 1
                loss_total = self._accumulate(micro, w_local.detach(), view.size)
            else:
                loss.backward()
            params = self._trained()
            total = self.parallel.full(gradient_norm(params, cfg.optim.grad_clip))
            bad = nonfinite(gradient=total)
            if bad:
                self.opt.zero_grad(set_to_none=True)
            else:
                if cfg.optim.grad_clip:
                    clip = ClipRecord(cfg.optim.grad_clip, float(total))
                # θ_t for the outer step: the hidden states above were computed with it (the
                # look-ahead linearises there), so keep the head / the trained parameters it had
                # before the step
                if self.takes_outer_step(self.step + 1):
                    if self.parallel.shards_head:  # FSDP2, sharded_outer: this rank's rows only
                        kept = [self.parallel.head_rows(self.lm_head.weight)[0]]
                    else:
                        kept = [self.parallel.full(self.lm_head.weight)] if cfg.block == "head" else params
                    pre_step = [p.detach().clone() for p in kept]
                self.opt.step()
        per = view.per_trajectory
        real_loss = float(per[view.is_real].mean()) if bool(view.is_real.any()) else None  # JSON null
        record = {
            "loss": float(loss_total),
            "real_train_loss": real_loss,
            "trajectories": view.size,
            **({"skipped": bad} if bad else {}),
        }
        state = {"hidden": hidden.detach(), "w": w, "w_local": w_local, "view": view, "synthetic": synthetic,
                 "clip": clip, "pre_step": pre_step, "micro": micro,
                 "pooled": None if features is None else view.features.pooled}  # fmt: skip
        return record, state

    def _accumulate(self, micro: list[PackedBatch], w: torch.Tensor, S: int) -> torch.Tensor:
        """Backpropagate Σ_i w_i L_i / S (the union's loss) one micro-batch at a time; ``.grad`` sums
        them. Returns the loss (detached)."""
        total = torch.zeros((), device=self.device)
        last = len(micro) - 1
        for k, (m, part) in enumerate(zip(micro, segment_slices(micro))):
            # DDP: gradients stay local until the last micro-batch's backward, which sums .grad over ranks
            with self.parallel.no_sync() if k < last else contextlib.nullcontext():
                out = self.losses(self.hidden_states(m), m, precompute_grad=False)
                loss = (w[part] * out.per_trajectory).sum() / S
                loss.backward()
            total += loss.detach()
        return self.parallel.sum(total)  # over ranks (one process: the loss)

    def _trained(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def outer_step(self, batch: PackedBatch, state: dict, val: PackedBatch) -> dict:
        """The outer step after the inner step on ``batch`` (``state``: what it returned), on the
        validation batch ``val``: :class:`boost.bilevel.outer.OuterStep`. Returns its record."""
        return self.outer(batch, state, val)

    @torch.no_grad()
    def evaluate(self, packer: TrajectoryPacker | None) -> float | None:
        """Mean per-trajectory loss over every batch of ``packer`` (None without one; parallel: each
        rank's share of every batch, summed): :func:`held_out_real`'s loss."""
        return held_out_real(self, packer)["loss"]

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_parts(self) -> dict:
        return {
            "model": self.model,
            "head": self.head,
            "optimizers": {"model": self.opt, "head": self.head_opt},
        }

    def save_checkpoint(self) -> Path:
        """``out_dir/checkpoints/step-<step>/`` (:mod:`boost.train.checkpoint_io`: safetensors, no pickle)."""
        position = {"train_batches": self.step * self.cfg.grad_accum,
                    "validation_batches": self.step // self.cfg.outer_every}  # fmt: skip
        # the warm start of Neumann / CG: without it a resumed run would solve cold and differ;
        # the refiltered training set: the head that chose it has moved on since
        tensors = {
            "last_v": self.last_v,
            **self._refilter_tensors(),
            **(self.signal.state() if self.signal else {}),
        }
        info = {"config": json_safe(to_dict(self.cfg)), "data_position": position,
                "refilters": json_safe(self.refilters)}  # fmt: skip
        if self.parallel.enabled:  # torch.distributed.checkpoint, every rank its shard
            return save_distributed_checkpoint(self, tensors, info)
        return save_checkpoint(self.out, self.step, **self._checkpoint_parts(), keep=self.cfg.keep_checkpoints,
                               tensors=tensors, info=info)  # fmt: skip

    def _check_schedule_horizon(self, path: Path, theirs: dict) -> None:
        """A schedule's horizon must stay what it was (``steps`` may change if ``schedule_steps`` fixes it)."""
        optim = self.cfg.optim
        was = horizon(theirs.get("optim", {}).get("schedule_steps", 0), theirs.get("steps", 0))
        if optim.scheduled and horizon(optim.schedule_steps, self.cfg.steps) != was:
            raise RunDirError(
                f"{path}: optim.schedule={optim.schedule} had a horizon of {was} steps and would have "
                f"{horizon(optim.schedule_steps, self.cfg.steps)} now; resume with optim.schedule_steps={was} "
                "to continue the same schedule"
            )

    def resume(self) -> bool:
        """Load the newest checkpoint folder, if any; it must come from the same config (steps aside)."""
        if (self.out / LEGACY_CHECKPOINT).exists() and latest_checkpoint(self.out) is None:
            raise RunDirError(
                f"{self.out / LEGACY_CHECKPOINT}: a pickled checkpoint of an older boost, which is never "
                "loaded (unsafe); start the run again (--overwrite)"
            )
        path = latest_checkpoint(self.out)
        if path is None:
            return False
        theirs = dict(read_state(path)["config"])
        differing = config_differences(self.cfg, theirs)
        if differing:
            raise RunDirError(
                f"{path}: written with another config ({'; '.join(differing)}); resume with the same "
                "config, or start another run (another out_dir, or --overwrite)"
            )
        self._check_schedule_horizon(path, theirs)
        if self.parallel.enabled:  # any number of ranks, DDP or FSDP2
            state, tensors = load_distributed_checkpoint(self, path)
        elif is_distributed_checkpoint(path):
            raise RunDirError(f"{path}: written by a parallel run (torch.distributed.checkpoint); resume it "
                              "with torchrun and parallel=ddp or parallel=fsdp2")  # fmt: skip
        else:
            state, tensors = load_checkpoint(path, **self._checkpoint_parts(), device=self.device)
        self.last_v = tensors.get("last_v")
        if self.signal is not None:
            self.signal.load(tensors)
        self.step = int(state["step"])
        self.refilters = list(state.get("refilters", []))
        if "refilter_positions" in tensors:
            self._use_refiltered(
                Refiltered(int(tensors["refilter_step"]), tensors["refilter_positions"].tolist(), {}),
                log_it=False,
            )
        return True

    # ------------------------------------------------------------------ refiltering
    def _refilter_tensors(self) -> dict[str, torch.Tensor]:
        if self.refiltered is None:
            return {}
        return {"refilter_step": torch.tensor(self.refiltered.step, dtype=torch.int64),
                "refilter_positions": torch.tensor(self.refiltered.positions, dtype=torch.int64)}  # fmt: skip

    def _use_refiltered(self, chosen: Refiltered, log_it: bool = True) -> None:
        self.refiltered = chosen
        self.train_packer = packer_for(self.data.train, chosen.positions, chosen.step)
        if log_it:
            log.info(chosen.note())

    def refilter(self, weights: dict[int, float] | None = None, info: dict | None = None) -> dict:
        """Train on the real trajectories plus the pool's top share by ``weights`` (trajectory index ->
        score; default the current model and head's, :func:`pool_weights`) from now on
        (:mod:`boost.train.refilter`). ``info``: more keys for the record. Returns the record."""
        started = time.perf_counter()
        weights = pool_weights(self) if weights is None else weights
        chosen = choose(self.data.train, weights, self.cfg.weighting.top_fraction, self.step)
        self._use_refiltered(chosen)
        self.train_packer.plan(0)  # records its stats (the loop's first batches replan it)
        stats = self.train_packer.epoch_stats[0]
        record = {"step": chosen.step, "kept": chosen.kept, "seconds": self._elapsed(started),
                  "fill": stats.fill, "synthetic_per_batch": stats.synthetic_per_batch, **(info or {})}  # fmt: skip
        self.refilters.append(record)
        return record

    def select_by_influence(self) -> dict:
        """``weighting.method=influence``: score the pool by ``weighting.select_by`` (influence:
        :mod:`boost.train.influence`; discriminator: :mod:`boost.train.discriminator`; random; return)
        and train on
        the real trajectories plus its top share by score from now on; writes ``influence_scores.jsonl``
        (the scores of this selection, in :func:`pool_weight_lines`' format). Returns the record, whose
        seconds include the scoring."""
        started = time.perf_counter()
        if self.cfg.weighting.select_by == "random":
            scores, info = random_scores(self, self.step), {"select_by": "random"}
        elif self.cfg.weighting.select_by == "discriminator":
            scores, info = discriminator_scores(self)
        elif self.cfg.weighting.select_by == "return":
            scores, info = return_scores(self), {"select_by": "return"}
        else:
            scores, info = influence_scores(self)
        record = self.refilter(scores, info)
        record["seconds"] = self._elapsed(started)
        trajectories = self.data.train_trajectories
        rows = [(s, trajectories[i]) for i, s in scores.items()]
        write_text_atomic(self.out / "influence_scores.jsonl", pool_weight_lines(rows))
        return record

    # ------------------------------------------------------------------ the loop
    def takes_outer_step(self, step: int | None = None) -> bool:
        """After inner step ``step`` (default: the current one): a head to train, the outer period, and
        past the warm-up."""
        cfg, step = self.cfg, self.step if step is None else step
        return self.method in LEARNED and step % cfg.outer_every == 0 and step > cfg.weighting.outer_start

    def _scheduled_lr(self) -> float | None:
        """Set the model's rate for the coming inner step (:mod:`boost.train.schedule`); None: constant."""
        optim = self.cfg.optim
        if not optim.scheduled:
            return None
        total = horizon(optim.schedule_steps, self.cfg.steps)
        factor = lr_factor(self.step, schedule=optim.schedule, warmup=optim.warmup_steps, total=total,
                           min_ratio=optim.min_lr_ratio)  # fmt: skip
        set_lr(self.opt, optim.lr * factor)
        if optim.schedule_head:
            set_lr(self.head_opt, optim.head_lr * factor)
        return optim.lr * factor

    def _elapsed(self, started: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - started

    def train(self, resume: bool = False, overwrite: bool = False) -> dict:
        """Run to ``cfg.steps``. ``resume``: continue from ``out_dir``'s checkpoint if there is one;
        ``overwrite``: replace the run in ``out_dir``. Without either, a folder holding a run is refused.

        Raises:
            RunDirError: see :func:`boost.train.checkpoint.prepare_out_dir`, or a resume with another config.
            NonFiniteStepError: ``max_bad_steps`` steps in a row were non-finite (the last good
                checkpoint is kept).
        """
        cfg = self.cfg
        # parallel: rank 0 writes the run's files, every rank its checkpoint shard
        main = self.parallel.is_main
        if main:
            prepare_out_dir(self.out, resume=resume, overwrite=overwrite)
        self.parallel.barrier()
        if resume and self.resume():
            log.info("resumed from %s at step %d", latest_checkpoint(self.out), self.step)
        if main:
            write_text_atomic(self.out / "config.yaml", yaml.safe_dump(to_dict(cfg)))
        since = self.refiltered.step if self.refiltered else 0  # the training set's first step
        batches = _cycle(self.train_packer, skip=(self.step - since) * cfg.grad_accum,
                         collate=self.parallel.collate(self.train_packer))  # fmt: skip
        val_batches = _cycle(  # one validation batch per outer step taken so far
            self.data.validation, skip=sum(self.takes_outer_step(s) for s in range(1, self.step + 1)),
            collate=self.parallel.collate(self.data.validation),
        )  # fmt: skip
        guard, saved = BadStepCounter(cfg.max_bad_steps, start=self.step), self.step
        with (
            MetricsLog(self.out, resume_step=self.step) if main else NullLog() as metrics,
            TensorBoardLog(self.out, self.step) if main else NullLog() as board,
        ):
            bar = tqdm(total=cfg.steps, initial=self.step, desc=self.method,
                       disable=not self.progress or not main)  # fmt: skip
            while self.step < cfg.steps:
                micro = [next(batches).to(self.device) for _ in range(cfg.grad_accum)]
                batch = concat_batches(micro)  # grad_accum = 1: the batch itself
                lr = self._scheduled_lr()
                started = time.perf_counter()
                record, state = self.inner_step(batch, micro)
                record["inner_seconds"] = self._elapsed(started)
                (tokens,) = self.parallel.sum_floats(float(batch.lengths.sum()) if owned(batch) else 0.0)
                record["tokens"] = int(tokens)  # of the global batch
                if lr is not None:
                    record["lr"] = lr
                self.step += 1
                if self.takes_outer_step():
                    val = next(val_batches).to(self.device)  # drawn even when skipped: resume stays exact
                    if "skipped" not in record:  # the head weights may be NaN: no outer step on them
                        started = time.perf_counter()
                        record.update(self.outer_step(batch, state, val))
                        record["outer_seconds"] = self._elapsed(started)
                weighting = cfg.weighting
                if self.method == "influence":
                    if is_selection_step(self.step, weighting.select_at, weighting.refilter_every, cfg.steps):
                        record["refilter"] = self.select_by_influence()
                        batches = _cycle(self.train_packer, collate=self.parallel.collate(self.train_packer))
                elif is_refilter_step(self.step, weighting.refilter_every, weighting.outer_start, cfg.steps):
                    record["refilter"] = self.refilter()
                    batches = _cycle(self.train_packer, collate=self.parallel.collate(self.train_packer))
                bad = record.get("skipped", [])
                # refilters and fresh validation rollouts (outer.objective=return) are always logged
                fresh = "refilter" in record or "return_mean" in record
                if bad or self.step % cfg.log_every == 0 or self.step == cfg.steps or fresh:
                    metrics.write({"step": self.step, **record})
                    board.write(self.step, record)
                    shown = {**record, "tok/s": tokens_per_second(record)}
                    bar.set_postfix(
                        {
                            k: f"{shown[k]:.3g}"
                            for k in ("loss", "n_eff", "mass", "tok/s")
                            if shown.get(k) is not None
                        }
                    )
                if cfg.eval.every and self.step % cfg.eval.every == 0:
                    evaluated = json_safe(evaluate_trainer(self))
                    if main:
                        append_eval(self.out, self.step, evaluated)
                kept = (
                    f"the checkpoint {latest_checkpoint(self.out)} of step {saved} is intact (--resume continues from it)"
                    if saved
                    else "no checkpoint was saved yet"
                )
                guard.update(self.step, bad, kept)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and not guard.streak:
                    self.save_checkpoint()
                    saved = self.step
                bar.update(1)
            bar.close()
        self.save_checkpoint()
        # for boost.rollout.evaluate; rank 0 writes it (FSDP2: gathered from the shards)
        save_full_model(self, self.out / "model")
        final = {"step": self.step, "method": self.method, "validation_loss": self.evaluate(self.data.validation),
                 **evaluate_trainer(self), **weight_analysis(self),
                 "packing": {str(e): s.as_dict() for e, s in self.data.train.epoch_stats.items()},
                 **({"refilters": self.refilters} if self.refilters else {})}  # fmt: skip
        if main:
            write_json_atomic(self.out / "final.json", json_safe(final))
        return final
