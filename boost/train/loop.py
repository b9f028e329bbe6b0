"""The BOOST training loop: inner steps on reweighted packed batches, outer steps on the head.

Per inner step (one packed batch of real training and synthetic trajectories):

    hidden = trunk(batch)                                    [T, D], with grad
    L_i    = trajectory_cross_entropy(hidden, W, ...)         [S] per-trajectory losses
    w      = head(features(hidden, L_i, ...))                 [S] (weights; 1 for real trajectories)
    loss   = Σ_i stopgrad(w_i) L_i / S   -> AdamW step on the model

Every ``outer_every`` steps, an outer step on a batch of held-out *real* validation tasks:

    g      = ∇_W L_out(trunk(val_batch))                     (fused backward, W only)
    dL/dw  = head_hypergradient(the inner batch's hidden states, W, w, g)
    head  <- Adam step on Σ_i w_i(φ) stopgrad(dL/dw_i) + λ_conc/√n_eff + λ_shift·m

With ``block="head"`` (default) the hypergradient is taken over the LM head (DESIGN.md, "Parameter
block"), reusing the inner step's hidden states, so an outer step costs one trunk forward on the
validation batch plus fused head passes. ``block="trainable"`` takes it over every trained
parameter by central finite differences (two forward/backward passes of the inner batch per HVP,
two forwards for the scores). ``reweight=False`` trains with weight 1 everywhere (the baseline).

Writes under ``out_dir``: ``metrics.jsonl`` (one line per logged step), ``checkpoint.pt`` (written
to a temporary file and renamed: a crash never leaves a half-written checkpoint), ``config.yaml``
and, at the end, ``report.md`` with ``training.png``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

import boost_kernels as bk
from boost.atomic import replace_atomic, write_json_atomic, write_text_atomic
from boost.config import to_dict
from boost.data import (
    PackedBatch,
    PackingConfig,
    TokenizeConfig,
    TrajectoryPacker,
    read_trajectories,
    split_by_task,
    tokenize_trajectories,
)
from boost.hypergradient import HeadBatch, head_hypergradient
from boost.hypergradient_trainable import trainable_hypergradient
from boost.reweighting import outer_objective, trajectory_features, weight_summary
from boost.train.baselines import (
    LEARNED,
    awr_factors,
    fixed_weights,
    make_head,
    mean_return,
    select_synthetic,
    weight_analysis,
)
from boost.train.config import DataConfig, TrainConfig
from boost.train.evaluation import append_eval, evaluate_trainer, save_pretrained_atomic
from boost.train.preset import load_trainer_model

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainData:
    train: TrajectoryPacker  # real training tasks + every synthetic trajectory
    validation: TrajectoryPacker  # held-out real tasks: the outer objective
    test: TrajectoryPacker | None  # held-out real tasks for the final numbers
    sources: list[str]  # source names of the training data, sorted ("real" included)
    summary: list[str]  # what was read, split, tokenised and dropped
    train_trajectories: list | None = None  # the records behind `train` (its `index` points here)


def prepare_data(cfg: DataConfig, tokenizer, select=None) -> TrainData:
    """Read, split real data by task, tokenise and pack; every drop is counted in ``summary``.

    ``select(synthetic) -> (kept, note)``: which synthetic trajectories to train on (a baseline's filter).
    """
    trajectories, report = read_trajectories(cfg.path)
    real = [t for t in trajectories if t.source == "real"]
    synthetic = [t for t in trajectories if t.source != "real"]
    select_note = None
    if select is not None:
        synthetic, select_note = select(synthetic)
    if not real:
        raise ValueError(
            f"{cfg.path}: no trajectory has source 'real'; BOOST's outer objective needs real "
            "validation tasks (generate some with --sources real:N)"
        )
    split = split_by_task(real, validation=cfg.validation, test=cfg.test, seed=cfg.seed)
    summary = [report.summary(), f"real tasks: {len(split.train_tasks)} train, "
               f"{len(split.validation_tasks)} validation, {len(split.test_tasks)} test; "
               f"{len(synthetic)} synthetic trajectories"] + ([select_note] if select_note else [])  # fmt: skip
    tok_cfg = TokenizeConfig(max_length=cfg.max_length)
    pack_cfg = PackingConfig(
        token_budget=cfg.token_budget, seed=cfg.seed, pad_token_id=tokenizer.pad_token_id or 0,
        mode=cfg.packing, rows=cfg.rows,
    )  # fmt: skip
    packers = {}
    for name, items in (
        ("train", split.train + synthetic),
        ("validation", split.validation),
        ("test", split.test),
    ):
        if not items:
            packers[name] = None
            continue
        tokenized, tok_report = tokenize_trajectories(items, tokenizer, tok_cfg)
        summary.append(f"{name}: {tok_report.summary()}")
        if not tokenized:
            raise ValueError(
                f"{cfg.path}: no {name} trajectory survived tokenisation; see: {tok_report.summary()}"
            )
        packers[name] = TrajectoryPacker(tokenized, pack_cfg)
    sources = sorted({t.source for t in split.train + synthetic})
    return TrainData(
        packers["train"], packers["validation"], packers["test"], sources, summary, split.train + synthetic
    )


def _cycle(packer: TrajectoryPacker, skip: int = 0) -> Iterator[PackedBatch]:
    """Batches epoch after epoch (a new order each epoch), after skipping ``skip`` of them."""
    epoch = 0
    while True:
        plan = packer.plan(epoch)
        for positions in plan:
            if skip:
                skip -= 1
                continue
            yield packer.collate(positions)
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
        device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.model, self.tokenizer = load_trainer_model(cfg.model, cfg.data.path, self.out, cfg.seed, device)
        self.model.train()
        self.trunk = self.model.get_decoder()
        self.lm_head = self.model.get_output_embeddings()
        impl = getattr(self.model.config, "_attn_implementation", "sdpa")
        self.mask_dtype = self.model.dtype if impl == "eager" else torch.bool
        self.method = "uniform" if not cfg.reweight else cfg.weighting.method
        self.data = prepare_data(cfg.data, self.tokenizer, partial(select_synthetic, cfg=cfg.weighting))
        self.awr_baseline = mean_return(self.data.train_trajectories)
        if cfg.head.num_sources and cfg.head.num_sources < len(self.data.sources):
            raise ValueError(
                f"head.num_sources={cfg.head.num_sources} but the training data has {len(self.data.sources)} "
                f"sources ({', '.join(self.data.sources)}); set head.num_sources >= {len(self.data.sources)} or 0"
            )
        self.head = make_head(self.method, self.model.config.hidden_size, cfg.head).to(self.device)
        self.opt = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=cfg.optim.lr,
            weight_decay=cfg.optim.weight_decay,
        )
        if cfg.weighting.freeze_mass and hasattr(self.head, "log_mass"):
            self.head.log_mass.requires_grad_(False)
        self.head_opt = torch.optim.Adam(
            [p for p in self.head.parameters() if p.requires_grad], lr=cfg.optim.head_lr
        )
        self.step = 0

    # ------------------------------------------------------------------ pieces
    def hidden_states(self, batch: PackedBatch) -> torch.Tensor:
        """[T, D] last hidden states of a packed batch (with grad when grad mode is on)."""
        inputs = batch.model_inputs(self.cfg.model.attention, self.mask_dtype)
        return self.trunk(**inputs).last_hidden_state.flatten(0, 1)  # [rows, T / rows, D] -> [T, D]

    def _bias(self):
        return getattr(self.lm_head, "bias", None)

    def losses(self, hidden: torch.Tensor, batch: PackedBatch, weight: torch.Tensor | None = None, **kwargs):
        weight = self.lm_head.weight if weight is None else weight
        return bk.trajectory_cross_entropy(
            hidden, weight, batch.labels, batch.segment_ids, batch.num_segments, bias=self._bias(), **kwargs
        )

    def _source_index(self, batch: PackedBatch) -> torch.Tensor:
        return torch.tensor([self.data.sources.index(s) for s in batch.sources], device=self.device)

    def inner_step(self, batch: PackedBatch) -> tuple[dict, dict]:
        cfg = self.cfg
        hidden = self.hidden_states(batch)
        # The weights need the per-trajectory losses (a feature), so the step backpropagates through
        # per_trajectory, not through the op's own weighted total.
        out = self.losses(hidden, batch, precompute_grad=False)
        synthetic = ~batch.is_real
        if self.method in LEARNED:
            w = self.head(
                trajectory_features(
                    hidden.detach(), batch.segment_ids, batch.segment_ids >= 0, out.per_trajectory.detach(),
                    out.num_tokens, synthetic, source=self._source_index(batch) if cfg.head.num_sources else None,
                    returns=torch.nan_to_num(batch.rewards) if cfg.head.use_returns else None,
                )
            )  # fmt: skip
        else:
            w = fixed_weights(self.method, out.per_trajectory.detach(), synthetic, cfg.weighting.loss_drop)
        if cfg.weighting.awr_beta:
            w = w * awr_factors(
                batch.rewards, cfg.weighting.awr_beta, self.awr_baseline, cfg.weighting.awr_max
            )
        loss = (w.detach() * out.per_trajectory).sum() / batch.num_segments
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self.opt.step()
        per = out.per_trajectory.detach()
        real_loss = float(per[batch.is_real].mean()) if bool(batch.is_real.any()) else None  # JSON null
        record = {
            "loss": float(loss.detach()),
            "real_train_loss": real_loss,
            "trajectories": batch.num_segments,
        }
        state = {"hidden": hidden.detach(), "w": w, "synthetic": synthetic}
        return record, state

    def _head_block(self, batch: PackedBatch, state: dict, val: PackedBatch):
        """(validation loss, hypergradient) over the LM head, from the fused ops."""
        with torch.no_grad():
            val_hidden = self.hidden_states(val)
        W = self.lm_head.weight.detach()
        Wg = self.lm_head.weight.detach().requires_grad_()  # shares W's storage: no [V, D] copy
        val_out = self.losses(val_hidden, val, Wg)
        (g,) = torch.autograd.grad(val_out.loss, Wg)
        bias = self._bias()
        train = HeadBatch(
            state["hidden"], batch.labels, batch.segment_ids, batch.num_segments,
            bias=None if bias is None else bias.detach(),
        )  # fmt: skip
        return val_out.loss.detach(), head_hypergradient(
            train, W, state["w"].detach().float(), g, self.cfg.solver
        )

    def _trainable_block(self, batch: PackedBatch, state: dict, val: PackedBatch):
        """(validation loss, hypergradient) over every trained parameter, by finite differences."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        val_loss = self.losses(self.hidden_states(val), val).loss
        grads = torch.autograd.grad(val_loss, params, allow_unused=True)
        g = [torch.zeros_like(p) if d is None else d for d, p in zip(grads, params)]
        w = state["w"].detach()
        S = batch.num_segments

        def inner_loss():
            out = self.losses(self.hidden_states(batch), batch, precompute_grad=False)
            return (w * out.per_trajectory).sum() / S

        def per_trajectory():
            return self.losses(self.hidden_states(batch), batch).per_trajectory

        hyper = trainable_hypergradient(
            inner_loss, per_trajectory, params, g, self.cfg.solver, normalizer=S, step=self.cfg.fd_step
        )
        return val_loss.detach(), hyper

    def outer_step(self, batch: PackedBatch, state: dict, val: PackedBatch) -> dict:
        block = self._head_block if self.cfg.block == "head" else self._trainable_block
        val_loss, hyper = block(batch, state, val)
        objective = outer_objective(self.head, state["w"], hyper.traj_weights, state["synthetic"])
        self.head_opt.zero_grad(set_to_none=True)
        objective.loss.backward()
        self.head_opt.step()
        return {
            "val_loss": float(val_loss),
            "n_eff": float(objective.n_eff.detach()),
            "mass": float(objective.mass.detach()),
            "solver_residual": hyper.residual
            if math.isfinite(hyper.residual)
            else None,  # None: not computed
            "weights": weight_summary(state["w"], self._source_index(batch), self.data.sources),
        }

    @torch.no_grad()
    def evaluate(self, packer: TrajectoryPacker | None) -> float | None:
        """Mean per-trajectory loss over every batch of ``packer`` (None without one)."""
        if packer is None:
            return None
        total, count = 0.0, 0
        for batch in packer.batches(0):
            batch = batch.to(self.device)
            out = self.losses(self.hidden_states(batch), batch)
            total += float(out.per_trajectory.sum())
            count += batch.num_segments
        return total / max(count, 1)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        state = {
            "step": self.step,
            "config": to_dict(self.cfg),
            "model": self.model.state_dict(),
            "head": self.head.state_dict(),
            "opt": self.opt.state_dict(),
            "head_opt": self.head_opt.state_dict(),
        }
        path = self.out / CHECKPOINT
        replace_atomic(path, lambda tmp: torch.save(state, tmp))
        return path

    def resume(self) -> bool:
        """Load ``out_dir/checkpoint.pt`` if there is one; it must come from the same config (steps aside)."""
        path = self.out / CHECKPOINT
        if not path.exists():
            return False
        state = torch.load(path, map_location=self.device, weights_only=False)
        ours, theirs = to_dict(self.cfg), dict(state["config"])
        ours.pop("steps"), theirs.pop("steps", None)
        if ours != theirs:
            differing = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
            raise ValueError(
                f"{path}: written with another config (differs in {', '.join(differing)}); "
                "resume with the same config, or use another out_dir"
            )
        self.model.load_state_dict(state["model"])
        self.head.load_state_dict(state["head"])
        self.opt.load_state_dict(state["opt"])
        self.head_opt.load_state_dict(state["head_opt"])
        self.step = int(state["step"])
        return True

    # ------------------------------------------------------------------ the loop
    def takes_outer_step(self) -> bool:
        """After this inner step: a head to train, the outer period, and past the warm-up."""
        cfg = self.cfg
        return (
            self.method in LEARNED
            and self.step % cfg.outer_every == 0
            and self.step > cfg.weighting.outer_start
        )

    def _elapsed(self, started: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - started

    def train(self, resume: bool = False) -> dict:
        cfg = self.cfg
        if resume and self.resume():
            log.info("resumed from %s at step %d", self.out / CHECKPOINT, self.step)
        write_text_atomic(self.out / "config.yaml", yaml.safe_dump(to_dict(cfg)))
        for line in self.data.summary:
            log.info(line)
        batches = _cycle(self.data.train, skip=self.step)
        val_batches = _cycle(self.data.validation, skip=self.step // cfg.outer_every)
        mode = "a" if self.step else "w"
        with open(self.out / "metrics.jsonl", mode, encoding="utf-8") as metrics:
            bar = tqdm(total=cfg.steps, initial=self.step, desc="boost" if cfg.reweight else "uniform",
                       disable=not self.progress)  # fmt: skip
            while self.step < cfg.steps:
                batch = next(batches).to(self.device)
                started = time.perf_counter()
                record, state = self.inner_step(batch)
                record["inner_seconds"] = self._elapsed(started)
                self.step += 1
                if self.takes_outer_step():
                    started = time.perf_counter()
                    record.update(self.outer_step(batch, state, next(val_batches).to(self.device)))
                    record["outer_seconds"] = self._elapsed(started)
                if not math.isfinite(record["loss"]):
                    self.save_checkpoint()
                    raise FloatingPointError(f"step {self.step}: the training loss is {record['loss']}")
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    metrics.write(json.dumps({"step": self.step, **record}) + "\n")
                    metrics.flush()
                    bar.set_postfix({k: f"{record[k]:.3g}" for k in ("loss", "n_eff", "mass") if k in record})
                if cfg.eval.every and self.step % cfg.eval.every == 0:
                    append_eval(self.out, self.step, evaluate_trainer(self))
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                bar.update(1)
            bar.close()
        self.save_checkpoint()
        save_pretrained_atomic(self.model, self.tokenizer, self.out / "model")  # for boost.evaluate
        final = {"step": self.step, "method": self.method, "validation_loss": self.evaluate(self.data.validation),
                 **evaluate_trainer(self), **weight_analysis(self),
                 "packing": {str(e): s.as_dict() for e, s in self.data.train.epoch_stats.items()}}  # fmt: skip
        write_json_atomic(self.out / "final.json", final)
        return final
