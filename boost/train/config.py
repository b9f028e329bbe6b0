"""Configuration of a BOOST training run (YAML + ``key=value`` overrides, see :mod:`boost.config`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from boost.bilevel.hypergradient import SolverConfig
from boost.bilevel.objectives import OuterConfig
from boost.bilevel.reweighting import HeadConfig
from boost.train.attention_backend import ATTENTION
from boost.train.lora import LoraSettings, check_block
from boost.train.precision import PRECISIONS
from boost.train.schedule import SCHEDULES

PARALLEL = ("none", "ddp", "fsdp2")


def check_parallel(cfg) -> None:
    """What ``parallel`` supports (boost/train/distributed.py); the message names the way out."""
    if cfg.parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {', '.join(PARALLEL)}, got {cfg.parallel!r}")
    if cfg.parallel_debug and cfg.parallel == "none":
        raise ValueError("parallel_debug checks the ranks of a parallel run: set parallel=ddp or fsdp2")
    if cfg.parallel != "none" and cfg.weighting.head_steps:
        raise ValueError(
            f"weighting.head_steps is not supported with parallel={cfg.parallel} yet; run the two phases as two "
            "commands (weighting.method=boost steps=K, then weighting.method=weight_filter "
            "weighting.weights_path=<that run>/pool_weights.jsonl), or set parallel=none"
        )


@dataclass(frozen=True)
class DataConfig:
    path: str = "data/gridnav.jsonl"  # real + synthetic trajectories (JSONL / JSON / Parquet)
    validation: float = 0.25  # fraction of the real *tasks* held out: the outer objective's data
    test: float = 0.25  # fraction of the real tasks held out for the final report
    token_budget: int = 2048  # tokens per packed batch
    max_length: int = 1024  # longer trajectories are dropped (counted in the tokenise report)
    seed: int = 0  # seed of the task split (a hash of each task, see boost/data/split.py) and of packing
    strict: bool = False  # stop at the first bad record (file:line and the fix) instead of skipping it
    format: str = "auto"  # "auto" (by extension), "jsonl", "json" or "parquet"
    default_source: str | None = None  # source of records without one (e.g. bare LMRL-Gym step lists)
    # Synthetic trajectories of a validation or test task (same task id, or the same content key in
    # its environment) are left out of training and counted; true keeps them, with a warning: the
    # outer objective and the test loss then measure tasks the model has trained on.
    keep_held_out_synthetic: bool = False
    # "mixed": every batch holds the sources roughly in proportion to the data (boost.data.packing);
    # "length": tightest packing, but batches then tend to hold one source each.
    packing: str = "mixed"
    rows: int = 1  # > 1: each batch is `rows` padded rows of token_budget / rows tokens (cheaper attention)
    # tokens per *validation* batch (the outer step's trunk forward), in rows as long as the
    # training batches' (token_budget / rows); must be a multiple of that row length. 0: a quarter of
    # token_budget, rounded up to whole rows (measured on the CPU preset: benchmarks/RESULTS.md, "Why
    # the head does not learn quality on gridnav"). Only the outer step's batches; evaluation too.
    validation_token_budget: int = 0

    def __post_init__(self):
        if self.format not in ("auto", "jsonl", "json", "parquet"):
            raise ValueError(f"data.format must be auto, jsonl, json or parquet; got {self.format!r}")
        if not (0 < self.validation < 1 and 0 <= self.test < 1 and self.validation + self.test < 1):
            raise ValueError(
                f"data.validation must be in (0, 1), data.test in [0, 1) and their sum < 1; "
                f"got {self.validation} and {self.test}"
            )
        if self.packing not in ("mixed", "length"):
            raise ValueError(f"data.packing must be 'mixed' or 'length', got {self.packing!r}")
        if self.rows < 1 or (self.rows > 1 and self.packing != "mixed"):
            raise ValueError(f"data.rows must be >= 1, and 1 unless data.packing=mixed; got {self.rows}")
        if self.max_length > self.token_budget // self.rows:
            raise ValueError(
                f"data.max_length ({self.max_length}) must be <= data.token_budget / data.rows "
                f"({self.token_budget // self.rows})"
            )
        row = self.token_budget // self.rows
        if self.validation_token_budget < 0 or self.validation_token_budget % row:
            raise ValueError(
                f"data.validation_token_budget must be 0 (auto) or a positive multiple of the row length "
                f"data.token_budget / data.rows = {row}; got {self.validation_token_budget}"
            )

    def validation_packing(self) -> tuple[int, int]:
        """(token budget, rows) of a validation batch: whole rows of the training row length."""
        row = self.token_budget // self.rows
        budget = self.validation_token_budget or -(-self.token_budget // 4 // row) * row
        return budget, budget // row


@dataclass(frozen=True)
class ModelConfig:
    # a local checkpoint folder (save_pretrained), "smollm2" (packaged GGUF), or "cpu": the CPU preset,
    # a small Llama and a word-level tokenizer built in-process from the training data (boost/train/preset.py)
    name: str = "smollm2"
    # "auto": flash-attn's varlen kernel on CUDA in bf16 if installed, else "block_mask" (SDPA). Or force
    # "flash_varlen", "block_mask" (a block-diagonal mask) or "position_ids"; the choice is printed at
    # start (boost/train/attention_backend.py).
    attention: str = "auto"
    hidden_size: int = 128  # the CPU preset's width (other models ignore it)
    layers: int = 4  # the CPU preset's decoder layers (other models ignore it)
    heads: int = 4  # the CPU preset's attention heads (other models ignore it)


@dataclass(frozen=True)
class EvalConfig:
    """Task success on the environment's held-out test (or validation) tasks (boost/train/evaluation.py)."""

    env: str | None = None  # None: the environment named by the real trajectories' task ids
    episodes: int = 100  # test tasks played after training (0: no rollouts; slow for SmolLM2 on a CPU)
    every: int = 0  # also every this many steps (0: only after training)
    max_new_tokens: int = 8  # tokens generated per agent turn in the rollouts
    batch_size: int = 50  # episodes played in parallel
    seed: int = 0  # seed that picks the test tasks played and the rollouts' sampling
    # the environment's split the tasks are drawn from: "test" (the reported success), or "validation"
    # (to choose settings by success without looking at test: python -m boost.experiment's tuning)
    split: str = "test"

    def __post_init__(self):
        if self.episodes < 0 or self.every < 0 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError(
                "eval.episodes and eval.every must be >= 0, eval.max_new_tokens and batch_size >= 1"
            )
        if self.split not in ("test", "validation"):
            raise ValueError(f"eval.split must be 'test' or 'validation', got {self.split!r}")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4  # AdamW on every trained model parameter (all of them, or LoRA's)
    weight_decay: float = 0.0  # AdamW's decoupled weight decay of the model
    grad_clip: float = 1.0  # 0: off
    head_lr: float = 1e-2  # Adam on the reweighting head
    schedule: str = "constant"  # the model's rate after warm-up: "constant", "cosine" or "linear" decay
    warmup_steps: int = 0  # linear warm-up of the model's rate over this many inner steps
    min_lr_ratio: float = 0.0  # cosine / linear: the rate decays to lr * this at the horizon
    schedule_steps: int = 0  # the schedule's horizon in inner steps; 0: the run's steps
    schedule_head: bool = False  # true: the head's rate (head_lr) follows the same warm-up and decay

    def __post_init__(self):
        if not (self.lr > 0 and self.head_lr > 0 and self.weight_decay >= 0 and self.grad_clip >= 0):
            raise ValueError("optim.lr and optim.head_lr must be > 0, weight_decay and grad_clip >= 0")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}")
        if not (self.warmup_steps >= 0 and self.schedule_steps >= 0 and 0 <= self.min_lr_ratio <= 1):
            raise ValueError(
                "optim.warmup_steps and optim.schedule_steps must be >= 0 and optim.min_lr_ratio in [0, 1]; "
                f"got {self.warmup_steps}, {self.schedule_steps}, {self.min_lr_ratio}"
            )

    @property
    def scheduled(self) -> bool:
        """Whether the model's rate changes over the run (else it is left as the optimiser holds it)."""
        return self.schedule != "constant" or self.warmup_steps > 0


# what an influence-schedule run ranks the pool by at its selection steps (boost/train/influence.py)
SELECT_BY = ("influence", "random", "discriminator", "return")


@dataclass(frozen=True)
class WeightingConfig:
    """Which weighting the trainer uses: BOOST or a baseline (boost/train/baselines.py)."""

    # boost, uniform, real_only, return_filter, loss_filter, per_source, mwn, weight_filter,
    # random_filter (a control), influence (BOOST's hypergradient taken once over the pool: see
    # boost/train/influence.py), oracle (analysis only)
    method: str = "boost"
    return_threshold: float | None = None  # return_filter: keep synthetic with return >= this ...
    top_fraction: float = 0.5  # ... or, without a threshold, this top share by return
    loss_drop: float = 0.2  # loss_filter: share of each batch's synthetic trajectories dropped (highest loss)
    oracle_threshold: float = 0.9  # oracle: keep synthetic with ground-truth quality >= this
    # weight_filter: a finished learned-weight run's pool_weights.jsonl; keeps its top_fraction by weight
    weights_path: str | None = None
    # random_filter: the seed of its random top_fraction of the synthetic pool
    subset_seed: int = 0
    # data filters (return_filter, weight_filter, random_filter): before ranking, leave out every synthetic trajectory
    # whose return is below this: a number, or "real_min" = the lowest return among the real training
    # trajectories ("no worse than the worst demonstration"; reads returns). top_fraction then applies
    # to the trajectories that pass. None: no gate
    return_gate: float | str | None = None
    awr_beta: float = 0.0  # > 0: AWR, weights times min(exp(beta * (R - mean R)), awr_max)
    awr_max: float = 20.0  # AWR: upper clip of the exp(beta * advantage) factor
    outer_start: int = 0  # no outer step before this inner step (behaviour-cloning warm-up)
    # keep the head's synthetic mass at head.init_mass (the mass acts like a step-size multiplier)
    freeze_mass: bool = False
    # > 0 (learned methods): apply the head's weights by selection, not by multiplying the losses.
    # Every this many inner steps the head scores the whole synthetic pool and training continues on
    # the real trajectories plus its top_fraction by weight, each with weight 1: batches stay full
    # (boost/train/refilter.py). Until the first refilter every trajectory is trained on.
    refilter_every: int = 0
    # > 0 (learned methods): two-stage in one command (boost/train/two_stage.py). The head first learns
    # for this many inner steps in a run of its own (out_dir/head, no test episodes); then a fresh model
    # from the same initialisation trains for `steps` steps on the real trajectories plus the
    # top_fraction of the synthetic pool by the head's final weights, each with weight 1 (weight_filter),
    # behind return_gate when it is set. Costs head_steps learned-head steps + `steps` plain steps
    head_steps: int = 0
    # influence: after this inner step (training so far on the real trajectories and every synthetic one
    # past return_gate) score the pool once by σ_i = <∇_W L_i, v>, v ≈ H⁻¹ g by `solver`, and train on
    # from there on the real ones plus the top_fraction by σ; refilter_every > 0 scores it again every
    # that many steps (boost/train/influence.py)
    select_at: int = 100
    influence_batches: int = 4  # influence: training batches whose head Hessian H is (solver cg/neumann)
    # influence: "influence", "random" (the same schedule, random scores: a control), "discriminator"
    # (scored by a real-vs-synthetic classifier: boost/train/discriminator.py) or "return" (by the
    # trajectory's return: the return filter on the same schedule; reads returns)
    select_by: str = "influence"
    # influence: what the first select_at steps train on (the model the pool is scored at): "pool" (the
    # real trajectories and every synthetic one past return_gate) or "real" (the real ones only)
    warmup_on: str = "pool"
    # influence: "none" ranks by σ_i; "gradient" by σ_i / |∇_W L_i|_F, the cosine between the
    # trajectory's head gradient and v up to |v| (as LESS normalises): a trajectory the model fits
    # badly (a large gradient, e.g. an unfamiliar task) no longer outranks others by its norm alone
    influence_norm: str = "none"

    def __post_init__(self):
        from boost.train.baselines import GATED_FILTERS, LEARNED, METHODS

        if self.method not in METHODS:
            raise ValueError(f"weighting.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not (0 < self.top_fraction <= 1 and 0 <= self.loss_drop < 1):
            raise ValueError("weighting.top_fraction must be in (0, 1] and weighting.loss_drop in [0, 1)")
        if (self.method == "weight_filter") != (self.weights_path is not None):
            raise ValueError(
                "weighting.weights_path=<run>/pool_weights.jsonl goes with weighting.method=weight_filter "
                "and only with it (the weights of a finished boost, per_source or mwn run on the same data)"
            )
        if self.head_steps < 0:
            raise ValueError(f"weighting.head_steps must be >= 0 (0: off), got {self.head_steps}")
        if self.head_steps and (self.method not in LEARNED or self.refilter_every):
            raise ValueError(
                f"weighting.head_steps={self.head_steps} first learns a head, then filters by its weights: it "
                f"goes with weighting.method={' or '.join(LEARNED)} and refilter_every=0 (got method="
                f"{self.method}, refilter_every={self.refilter_every})"
            )
        if self.return_gate is not None:
            if self.method not in GATED_FILTERS and not self.head_steps:
                *others, last = GATED_FILTERS
                raise ValueError(
                    f"weighting.return_gate filters before a ranking; it goes with weighting.method="
                    f"{', '.join(others)} or {last}, or with weighting.head_steps > 0, not {self.method} alone"
                )
            if isinstance(self.return_gate, str) and self.return_gate != "real_min":
                raise ValueError(
                    f"weighting.return_gate must be a number or 'real_min' (the lowest real training "
                    f"return), got {self.return_gate!r}"
                )
        if self.awr_beta < 0 or self.awr_max <= 0 or self.outer_start < 0:
            raise ValueError("weighting.awr_beta and outer_start must be >= 0, awr_max > 0")
        if self.refilter_every < 0:
            raise ValueError(f"weighting.refilter_every must be >= 0 (0: off), got {self.refilter_every}")
        if self.refilter_every and self.method not in (*LEARNED, "influence"):
            raise ValueError(
                f"weighting.refilter_every selects by a learned head's weights or by influence; weighting.method="
                f"{self.method} has neither (use one of {', '.join(LEARNED)} or influence, or refilter_every=0)"
            )
        if not (self.select_at >= 1 and self.influence_batches >= 1):
            raise ValueError(
                f"weighting.select_at and weighting.influence_batches must be >= 1, got {self.select_at} and "
                f"{self.influence_batches} (influence scores a model that has taken an AdamW step)"
            )
        if self.select_by not in SELECT_BY:
            raise ValueError(
                f"weighting.select_by must be one of {', '.join(SELECT_BY)}, got {self.select_by!r}"
            )
        if self.warmup_on not in ("pool", "real"):
            raise ValueError(f"weighting.warmup_on must be 'pool' or 'real', got {self.warmup_on!r}")
        if self.influence_norm not in ("none", "gradient"):
            raise ValueError(
                f"weighting.influence_norm must be 'none' or 'gradient', got {self.influence_norm!r}"
            )
        if self.influence_norm != "none" and (self.method != "influence" or self.select_by != "influence"):
            raise ValueError(
                f"weighting.influence_norm={self.influence_norm} normalises influence scores; it goes with "
                f"weighting.method=influence and select_by=influence (got {self.method}, {self.select_by})"
            )
        if self.warmup_on != "pool" and self.method != "influence":
            raise ValueError(
                f"weighting.warmup_on={self.warmup_on} sets what an influence run trains on before select_at; "
                f"weighting.method={self.method} has no such phase (use method=influence, or drop it)"
            )


@dataclass(frozen=True)
class KernelSettings:
    """Options of the fused LM-head ops (``boost_kernels``) on CUDA; the CPU path ignores them.

    The trainer hands the fused ops float32 hidden states in every precision mode, so the 16-bit
    scratch budget of the ops (``scratch_bytes``) does not apply here: float32 gradients accumulate
    in place, in one pass over the logits."""

    deterministic: bool = False  # bitwise-reproducible Triton gradients and HVPs (no float atomics; slower)
    # skip the gradient tiles of negligible probability (Cut Cross-Entropy's threshold) in first-order
    # gradients: the inner step's and the validation gradient g; HVPs and JVPs stay exact
    grad_filter: bool = False

    def loss_options(self) -> dict:
        """Keyword options of ``boost_kernels.trajectory_cross_entropy``."""
        return {"deterministic": self.deterministic, "grad_filter": self.grad_filter}


def _reweight_is_gone(value: Any) -> str:
    """The message for the retired ``reweight`` setting (``weighting.method`` said the same thing)."""
    fix = "weighting.method=uniform" if value is False else "weighting.method=boost (the default), or drop it"
    return (
        f"reweight={json.dumps(value)} is gone: use {fix} (weighting.method is the one weighting setting; "
        "see boost/train/baselines.py for its values)"
    )


@dataclass(frozen=True)
class TrainConfig:
    # retired settings: the error names what replaced them (boost.config.from_dict)
    REMOVED: ClassVar[dict[str, Any]] = {"reweight": _reweight_is_gone}

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # cg / neumann: an approximate IFT solve, warm-started, its residual logged every outer step;
    # identity: the inner AdamW step's own response (lr·P, clipping included): no solver.alpha
    solver: SolverConfig = field(default_factory=lambda: SolverConfig("cg", steps=5, damping=1e-3))
    # head.num_sources=-1: the head sees each trajectory's source (one embedding per source of
    # the training data); 0 turns the feature off
    head: HeadConfig = field(default_factory=lambda: HeadConfig(num_sources=-1))
    eval: EvalConfig = field(default_factory=EvalConfig)
    # what the outer step optimises on held-out real validation data: nll, decision, return or a
    # mixture (boost/bilevel/objectives.py, docs/method.md)
    outer: OuterConfig = field(default_factory=OuterConfig)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)  # off: every model weight is trained
    kernels: KernelSettings = field(default_factory=KernelSettings)  # the fused ops' options on CUDA
    # The parameters the hypergradient is taken over: "head" (the LM head, exact fused HVP/JVP on
    # the inner step's hidden states) or "trainable" (every trained parameter, central finite
    # differences of plain forward/backward passes: no double backward, any attention kernel). The
    # trunk makes H indefinite: with "trainable" use solver.method "identity" or "neumann" (CG stops
    # with an error at a direction of negative curvature unless the damping outweighs it).
    block: str = "head"
    fd_step: float = 1e-2  # block="trainable": norm of each finite-difference perturbation
    steps: int = 100  # inner steps (packed batches)
    outer_every: int = 1  # an outer step after every this many inner steps
    log_every: int = 1  # a metrics.jsonl / TensorBoard row every this many steps (and bad ones)
    checkpoint_every: int = 50  # 0: only at the end
    keep_checkpoints: int = 3  # the newest this many checkpoint folders stay under out_dir/checkpoints
    # A step with a non-finite loss, validation loss, hypergradient, head weight or gradient is
    # skipped (model and head untouched) and logged; this many in a row stop the run, keeping the
    # last good checkpoint.
    max_bad_steps: int = 5
    out_dir: str = "runs/boost"  # the run folder: metrics, checkpoints, report
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda"
    # > 0: torch.set_num_threads(threads) for the run. On a CPU shared with other jobs, 1 thread can be
    # many times faster than 2 (benchmarks/RESULTS.md, "CPU preset"); 0 keeps torch's default.
    threads: int = 0
    seed: int = 0  # seed of the model's RNG (head initialisation, dropout)
    # "auto": bf16 autocast (float32 master weights) on CUDA, float32 on the CPU; or "fp32", "bf16" (the
    # CPU too, when asked for). Printed at start (boost/train/precision.py).
    precision: str = "auto"
    # packed micro-batches per inner step, stepped as their union. The gradients are summed and the outer
    # step is taken on the accumulated step; > 1 costs one extra forward per micro-batch
    # (boost/train/accumulation.py).
    grad_accum: int = 1
    # Data parallelism under torchrun (boost/train/distributed.py): "none" (one process), "ddp" or
    # "fsdp2" (fully_shard per decoder layer); NCCL on CUDA, gloo on CPU. README, "Several processes".
    parallel: str = "none"
    # parallel: after every outer step, check that the head is bit-identical on every rank (a hash,
    # all-gathered) and write the global batch's per-trajectory numbers to parallel_debug.jsonl
    parallel_debug: bool = False
    # parallel=fsdp2, block=head: the outer step keeps the head and its solver's vectors as this rank's
    # vocabulary rows (boost_kernels/vocab_parallel.py: memory V·D/N per vector); false: gathers the
    # [V, D] head and holds every vector at full size on every rank (the same numbers, to 1e-6)
    sharded_outer: bool = True
    # the sharded outer step's tokens: "gathered" (every rank holds every rank's counted tokens, [T_all, D],
    # for the whole solve) or "streamed" (only its own; each pass broadcasts one rank's block at a time:
    # memory T_r·D instead of T_all·D, for T_all·D floats sent per HVP). The same numbers (to 1e-10 in float64)
    sharded_tokens: str = "gathered"

    def __post_init__(self):
        for name in ("steps", "outer_every", "log_every", "max_bad_steps", "keep_checkpoints", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0: torch's default), got {self.threads}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.block not in ("head", "trainable"):
            raise ValueError(f"block must be 'head' or 'trainable', got {self.block!r}")
        check_block(self.lora, self.block)
        if self.sharded_tokens not in ("gathered", "streamed"):
            raise ValueError(f"sharded_tokens must be 'gathered' or 'streamed', got {self.sharded_tokens!r}")
        if self.block != "head" and self.outer.terms != {"nll": 1.0}:
            raise ValueError(
                f"outer.objective={self.outer.objective} is built for block=head (its gradients come from the "
                "fused LM-head ops); use block=head, or outer.objective=nll"
            )
        if self.weighting.method == "influence":
            if self.block != "head":
                raise ValueError(
                    f"weighting.method=influence scores over the LM head: it does not read block={self.block}; "
                    "drop it (block=head)"
                )
            if self.outer.terms != {"nll": 1.0} and self.weighting.select_by != "influence":
                raise ValueError(
                    f"outer.objective={self.outer.objective} sets what influence scores by; weighting.select_by="
                    f"{self.weighting.select_by} does not read it: drop it"
                )
            if self.parallel != "none":
                raise ValueError("weighting.method=influence runs on one process; set parallel=none")
        if self.solver.method == "identity" and self.solver.alpha is not None:
            raise ValueError(
                "solver.alpha is not used with solver.method=identity: the inner AdamW step defines the "
                "response (lr·P); remove solver.alpha (it is Neumann's step size)"
            )
        if not self.solver.residual:
            raise ValueError(
                "solver.residual=false: the trainer always reports the solver's residual; remove it"
            )
        if not self.fd_step > 0:
            raise ValueError(f"fd_step must be > 0, got {self.fd_step}")
        check_parallel(self)
        if self.model.attention not in ATTENTION:
            raise ValueError(
                f"model.attention must be one of {', '.join(ATTENTION)}; got {self.model.attention!r}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")
