"""BOOST on a toy LM head, in seconds on a CPU: does reweighting help when synthetic data is mixed?

    python -m boost.toy --out runs/toy        # one seed, every arm: report.md, history.json, weights.png
    python -m boost.toy_study --out docs/toy  # >= 5 seeds, learning rates tuned per arm, λ sweep

The task: a teacher head W* [V, D] labels hidden states x ~ N(0, I) (labels sampled from
softmax(W* x), a soft teacher: ~1.7 nats of label entropy). Each round draws a fresh packed batch from four sources:

* ``real``: the task itself (a few per batch);
* ``clean``: synthetic, from the task's own distribution;
* ``shifted``: synthetic from a related task: x ~ N(μ, I) with |μ| = ``shift``, labels from a
  perturbed teacher W* + E: the kind of data the task-shift term is for;
* ``corrupt``: synthetic with plausible but wrong labels: every token labelled with the teacher's
  *second* most likely class. Under the teacher itself their loss (~1.8 nats) is about the clean
  labels' (~1.7): a loss threshold cannot flag them (the ``loss_filter`` arm measures how well it
  does), but a model trained on them is systematically wrong.

A student head W takes one SGD step per round on the weighted batch loss Σ_i w_i L_i / S. Arms (the
same data for each):

* ``boost``: weights from a :class:`boost.bilevel.reweighting.ReweightingHead` (features: pooled state,
  loss, length, source embedding), trained after every inner step on the hypergradient of the loss
  on real validation trajectories (``identity``: the SGD step's look-ahead at the pre-step head;
  or ``cg``/``neumann``), with its learned synthetic mass;
* ``boost_frozen``: the same with the mass frozen at 1 (the mass acts like a step-size multiplier);
* ``oracle_matched``: clean trajectories share BOOST's total synthetic weight of that round, the
  rest 0: perfect filtering at BOOST's learned mass (needs BOOST's run, ``mass_schedule``);
* ``oracle``: clean 1, the rest 0; ``uniform``: every trajectory 1; ``real_only``: synthetic 0;
* ``loss_filter``: the synthetic half with the lower loss under the current student gets weight 2,
  the rest 0 (a judge-free filter on the loss alone, unit mass).

Only the head is learned (no trunk), so the fused ops, the hypergradient and the head run exactly as
in a real run, on a problem small enough to watch. Every arm's inner learning rate is an argument:
:mod:`boost.toy_study` tunes it per arm on a held-out ``tuning`` split (never on ``test``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

import boost_kernels as bk
from boost.atomic import write_json_atomic, write_text_atomic
from boost.bilevel.hypergradient import HeadBatch, SolverConfig, head_hypergradient
from boost.bilevel.reweighting import HeadConfig, ReweightingHead, outer_objective, trajectory_features
from boost.bilevel.step_response import optimizer_response
from boost.cli import ArgumentParser
from boost.plotting import pyplot, save_png

ARMS = ("boost", "boost_frozen", "oracle_matched", "oracle", "loss_filter", "uniform", "real_only")
SOURCES = ("real", "clean", "shifted", "corrupt")


@dataclass(frozen=True)
class ToyConfig:
    dim: int = 8  # D
    vocab: int = 12  # V
    tokens_per_trajectory: int = 10
    real: int = 2  # per batch, in SOURCES order
    clean: int = 4
    shifted: int = 4
    corrupt: int = 8
    shift: float = 2.0  # |μ| of the shifted source's hidden states
    teacher_scale: float = 0.75  # W* ~ teacher_scale · N(0, 1)
    shift_teacher: float = 0.75  # E ~ shift_teacher · N(0, 1): the shifted source's teacher is W* + E
    validation: int = 16  # real trajectories of the outer objective (fixed)
    tuning: int = 64  # real trajectories for choosing learning rates and λ (fixed, never the test)
    test: int = 256  # held-out real trajectories for the reported numbers (fixed)
    rounds: int = 150  # one inner step (and, for BOOST, one outer step) per round
    inner_lr: float = 1.0  # BOOST's tuned rate in the toy study (each arm's own: boost.toy_study)
    head_lr: float = 0.05
    solver: SolverConfig = field(default_factory=lambda: SolverConfig("identity"))
    head: HeadConfig = field(default_factory=lambda: HeadConfig(hidden_size=16, num_sources=len(SOURCES)))
    seed: int = 0

    @property
    def per_batch(self) -> tuple[int, ...]:
        return (self.real, self.clean, self.shifted, self.corrupt)


class ToyTask:
    """Draws trajectories of the toy sources (see the module docstring)."""

    def __init__(self, cfg: ToyConfig, gen: torch.Generator):
        self.cfg, self.gen = cfg, gen
        self.teacher = cfg.teacher_scale * torch.randn(cfg.vocab, cfg.dim, generator=gen)
        self.shifted_teacher = self.teacher + cfg.shift_teacher * torch.randn(
            cfg.vocab, cfg.dim, generator=gen
        )
        direction = torch.randn(cfg.dim, generator=gen)
        self.shift = cfg.shift * direction / direction.norm()

    def draw(self, n: int, source: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden [n·L, D], labels [n·L]) for n trajectories of L tokens from ``source``."""
        hidden = torch.randn(n * self.cfg.tokens_per_trajectory, self.cfg.dim, generator=self.gen)
        teacher = self.teacher
        if source == "shifted":
            hidden = hidden + self.shift
            teacher = self.shifted_teacher
        logits = hidden @ teacher.T
        if source == "corrupt":
            return hidden, logits.topk(2, dim=1).indices[:, 1]  # the runner-up class: plausible, wrong
        return hidden, torch.multinomial(torch.softmax(logits, dim=1), 1, generator=self.gen).squeeze(1)

    def batch(self, counts: tuple[int, ...]) -> tuple[HeadBatch, torch.Tensor]:
        """A packed batch with ``counts[k]`` trajectories of ``SOURCES[k]``; also their source index [S]."""
        drawn = [self.draw(n, name) for n, name in zip(counts, SOURCES) if n]
        S = sum(counts)
        segments = torch.arange(S).repeat_interleave(self.cfg.tokens_per_trajectory)
        source = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])
        hidden = torch.cat([h for h, _ in drawn])
        return HeadBatch(hidden, torch.cat([y for _, y in drawn]), segments, S), source


def _loss(batch: HeadBatch, weight: torch.Tensor, traj_weights: torch.Tensor | None = None):
    return bk.trajectory_cross_entropy(
        batch.hidden, weight, batch.labels, batch.segment_ids, batch.num_segments, traj_weights=traj_weights
    )


def _features(batch: HeadBatch, out, source: torch.Tensor):
    counted = torch.ones(batch.hidden.shape[0], dtype=torch.bool)
    return trajectory_features(
        batch.hidden,
        batch.segment_ids,
        counted,
        out.per_trajectory,
        out.num_tokens,
        source > 0,
        source=source,
    )


def _fixed_weights(arm: str, source: torch.Tensor, out, total: float | None) -> torch.Tensor:
    synthetic, clean = source > 0, source == 1
    if arm == "uniform":
        return torch.ones(source.shape[0])
    if arm == "real_only":
        return (~synthetic).float()
    if arm == "oracle":
        return (~synthetic | clean).float()
    if arm == "oracle_matched":
        return torch.where(clean, total / int(clean.sum()), (~synthetic).float())
    if arm == "loss_filter":
        loss = out.per_trajectory.detach()
        keep = torch.zeros_like(synthetic)
        idx = synthetic.nonzero().squeeze(1)
        keep[idx[loss[idx].argsort()[: idx.numel() // 2]]] = True
        return torch.where(synthetic, 2.0 * keep.float(), 1.0)
    raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")


def run_arm(
    cfg: ToyConfig,
    arm: str,
    lr: float | None = None,
    mass_schedule: list[float] | None = None,
    progress: bool = False,
) -> dict:
    """Train one arm with inner learning rate ``lr`` (default ``cfg.inner_lr``); same data for every arm.

    ``mass_schedule``: for ``oracle_matched``, BOOST's total synthetic weight per round (the
    ``synthetic_total`` of a BOOST run's history). Returns the per-round history and the final
    losses on the validation, tuning and test splits.
    """
    if arm not in ARMS:
        raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
    if arm == "oracle_matched" and (mass_schedule is None or len(mass_schedule) < cfg.rounds):
        raise ValueError("oracle_matched needs mass_schedule: BOOST's synthetic_total for every round")
    lr = cfg.inner_lr if lr is None else lr
    gen = torch.Generator().manual_seed(cfg.seed)
    task = ToyTask(cfg, gen)
    val, _ = task.batch((cfg.validation, 0, 0, 0))
    tuning, _ = task.batch((cfg.tuning, 0, 0, 0))
    test, _ = task.batch((cfg.test, 0, 0, 0))
    torch.manual_seed(cfg.seed)
    learned = arm in ("boost", "boost_frozen")
    head = ReweightingHead(cfg.dim, cfg.head)
    if learned:
        if cfg.head.task_shift:  # the real validation trajectories' pooled states (fixed here)
            real = torch.zeros(cfg.validation, dtype=torch.long)
            head.update_reference(_features(val, _loss(val, torch.zeros(cfg.vocab, cfg.dim)), real).pooled)
        head.log_mass.requires_grad_(arm == "boost")
        head_opt = torch.optim.Adam([p for p in head.parameters() if p.requires_grad], lr=cfg.head_lr)
    weight = torch.nn.Parameter(torch.zeros(cfg.vocab, cfg.dim))
    opt = torch.optim.SGD([weight], lr=lr)
    last_v, history = None, []
    for r in tqdm(range(cfg.rounds), desc=arm, disable=not progress, leave=False):
        batch, source = task.batch(cfg.per_batch)
        out = _loss(batch, weight.detach())
        features = _features(batch, out, source)
        if learned:
            w = head(features)
        else:
            w = _fixed_weights(arm, source, out, mass_schedule[r] if mass_schedule else None)
        pre_step = weight.detach().clone()  # θ_t: where the look-ahead linearises
        opt.zero_grad(set_to_none=True)
        _loss(batch, weight, w.detach()).loss.backward()
        opt.step()
        synthetic = source > 0
        wd = w.detach()
        record = {"synthetic_total": float(wd[synthetic].sum())}
        if learned:
            W = weight.detach().requires_grad_()
            (g,) = torch.autograd.grad(_loss(val, W).loss, W)
            hyper = head_hypergradient(
                batch, pre_step, wd, g, cfg.solver, init=last_v,
                precondition=lambda u: optimizer_response(opt, [weight], [u])[0],
            )  # fmt: skip
            last_v = hyper.v
            objective = outer_objective(head, w, hyper.traj_weights, synthetic, pooled=features.pooled)
            head_opt.zero_grad()
            objective.loss.backward()
            head_opt.step()
            record.update(n_eff=float(objective.n_eff.detach()), mass=float(objective.mass.detach()),
                          residual=hyper.residual)  # fmt: skip
        else:
            record["n_eff"] = float(wd.sum() ** 2 / (wd * wd).sum())
        record.update(
            {f"weight_{name}": float(wd[source == k].mean()) for k, name in enumerate(SOURCES) if k}
        )
        history.append(record)
    with torch.no_grad():
        final = {name: float(_loss(split, weight).loss) for name, split in
                 (("validation", val), ("tuning", tuning), ("test", test))}  # fmt: skip
    return {"arm": arm, "lr": lr, "history": history, **{f"{k}_loss": v for k, v in final.items()}}


def run_all(
    cfg: ToyConfig, arms=ARMS, lrs: dict[str, float] | None = None, progress: bool = False
) -> list[dict]:
    """Every arm of ``arms`` on ``cfg`` (``oracle_matched`` after BOOST, at BOOST's learned mass)."""
    lrs = lrs or {}
    results, boost_run = [], None
    for arm in sorted(arms, key=lambda a: a != "boost"):  # BOOST first: oracle_matched needs its mass
        schedule = None
        if arm == "oracle_matched":
            boost_run = boost_run or run_arm(cfg, "boost", lrs.get("boost"))
            schedule = [h["synthetic_total"] for h in boost_run["history"]]
        result = run_arm(cfg, arm, lrs.get(arm), schedule, progress)
        boost_run = result if arm == "boost" else boost_run
        results.append(result)
    order = {a: i for i, a in enumerate(ARMS)}
    return sorted(results, key=lambda r: order[r["arm"]])


def write_report(cfg: ToyConfig, results: list[dict], out: Path) -> Path:
    """report.md and history.json (and weights.png when matplotlib is installed) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "history.json", {"config": asdict(cfg), "results": results})
    lines = [
        "# BOOST on a toy LM head",
        "",
        f"Teacher head V={cfg.vocab}, D={cfg.dim}; per batch {cfg.real} real, {cfg.clean} clean, {cfg.shifted} "
        f"shifted and {cfg.corrupt} corrupt (runner-up label) synthetic trajectories of "
        f"{cfg.tokens_per_trajectory} tokens; {cfg.rounds} rounds of one inner SGD step; seed {cfg.seed}; "
        f"solver {cfg.solver.method}. One seed, learning rates as given (tuned ones: python -m boost.toy_study).",
        "",
        "| arm | inner lr | test loss (held-out real) | mean synthetic weight (last 20 rounds) |",
        "|---|---|---|---|",
    ]
    for r in results:
        tail = r["history"][-20:]
        n_syn = cfg.clean + cfg.shifted + cfg.corrupt
        mass = sum(h["synthetic_total"] for h in tail) / len(tail) / n_syn
        lines.append(f"| {r['arm']} | {r['lr']:g} | {r['test_loss']:.4f} | {mass:.3f} |")
    boost = next((r for r in results if r["arm"] == "boost"), None)
    if boost:
        last = boost["history"][-1]
        lines += [
            "",
            f"BOOST's last batch: mean weight clean {last['weight_clean']:.3f}, shifted {last['weight_shifted']:.3f}, "
            f"corrupt {last['weight_corrupt']:.3f}; n_eff {last['n_eff']:.2f} of {sum(cfg.per_batch)} "
            f"(all trajectories); learned mass {last['mass']:.3f}.",
        ]
    plot = _plot(results, out / "weights.png")
    lines += ["", f"![weights and test loss]({plot.name})" if plot else "(install matplotlib for the plot)"]
    report = out / "report.md"
    write_text_atomic(report, "\n".join(lines) + "\n")
    return report


def _plot(results: list[dict], path: Path) -> Path | None:
    plt = pyplot()
    boost = next((r for r in results if r["arm"] == "boost"), None)
    if plt is None or boost is None:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name in SOURCES[1:]:
        ax.plot([h[f"weight_{name}"] for h in boost["history"]], label=name)
    ax.set(title="BOOST: mean weight per synthetic source", xlabel="round", ylabel="weight")
    ax.legend()
    fig.tight_layout()
    return save_png(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path("runs/toy"), help="folder for report.md, history.json"
    )
    parser.add_argument("--rounds", type=int, default=ToyConfig.rounds)
    parser.add_argument("--seed", type=int, default=ToyConfig.seed)
    parser.add_argument("--solver", choices=("identity", "cg"), default="identity")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead (7 ms vs 30 ms a round, measured)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    cfg = ToyConfig(rounds=args.rounds, seed=args.seed)
    if args.solver == "cg":
        cfg = replace(cfg, solver=SolverConfig("cg", steps=5, damping=1e-2))
    results = run_all(cfg, args.arms, progress=True)
    report = write_report(cfg, results, args.out)
    for r in results:
        print(f"{r['arm']:15s} test loss {r['test_loss']:.4f}")
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
