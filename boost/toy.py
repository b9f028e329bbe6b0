"""BOOST on a toy LM head, in seconds on a CPU: does reweighting help when synthetic data is mixed?

    python -m boost.toy --out runs/toy        # report.md, history.json and weights.png

A teacher head W* [V, D] labels random hidden states; that is the task. Each round draws a fresh
batch: a few real trajectories (labels from W*), clean synthetic ones (also from W*) and corrupted
synthetic ones (uniformly random labels: a generator of uneven quality). A student head W is trained
on the weighted batch loss by SGD; every round ends with an outer step. Three arms, same data:

* ``boost``: the weights come from a :class:`boost.reweighting.ReweightingHead` trained by the
  head-block implicit hypergradient of the loss on real validation trajectories;
* ``uniform``: every trajectory has weight 1;
* ``real_only``: the synthetic trajectories have weight 0;
* ``oracle``: clean synthetic trajectories 1, corrupted 0 (perfect filtering at unit mass).

BOOST also learns the synthetic mass m (the mean synthetic weight), which scales the inner step
on synthetic data; the report gives it, so that a gain over ``oracle`` can be read for what it is.

The report compares the students' loss on held-out real trajectories and shows the weights BOOST
gives clean and corrupted trajectories. Only the head is learned (no trunk), so the fused ops,
the hypergradient and the head run exactly as in a real run, on a problem small enough to watch.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import boost_kernels as bk
from boost.atomic import write_json_atomic, write_text_atomic
from boost.hypergradient import HeadBatch, SolverConfig, head_hypergradient
from boost.plotting import pyplot, save_png
from boost.reweighting import HeadConfig, ReweightingHead, outer_objective, trajectory_features

ARMS = ("boost", "uniform", "real_only", "oracle")


@dataclass(frozen=True)
class ToyConfig:
    dim: int = 8  # D
    vocab: int = 12  # V
    tokens_per_trajectory: int = 10
    real: int = 2  # real training trajectories per batch
    clean: int = 8  # clean synthetic trajectories per batch
    corrupted: int = 8  # corrupted synthetic trajectories per batch
    validation: int = 4  # real validation trajectories (fixed)
    test: int = 64  # held-out real trajectories for the report (fixed)
    rounds: int = 40
    inner_steps: int = 3
    inner_lr: float = 0.5
    head_lr: float = 0.05
    solver: SolverConfig = field(default_factory=lambda: SolverConfig("cg", steps=10, damping=1e-2))
    head: HeadConfig = field(default_factory=lambda: HeadConfig(hidden_size=16))
    seed: int = 0


class ToyTask:
    """Draws trajectories of the toy task: hidden states and the teacher's (or random) labels."""

    def __init__(self, cfg: ToyConfig, gen: torch.Generator):
        self.cfg, self.gen = cfg, gen
        self.teacher = 2.0 * torch.randn(cfg.vocab, cfg.dim, generator=gen)

    def draw(self, n: int, corrupted: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden [n·L, D], labels [n·L]) for n trajectories of L tokens."""
        hidden = torch.randn(n * self.cfg.tokens_per_trajectory, self.cfg.dim, generator=self.gen)
        if corrupted:
            labels = torch.randint(0, self.cfg.vocab, (hidden.shape[0],), generator=self.gen)
        else:
            probs = torch.softmax(hidden @ self.teacher.T, dim=1)
            labels = torch.multinomial(probs, 1, generator=self.gen).squeeze(1)
        return hidden, labels

    def batch(self, parts: list[tuple[int, bool]]) -> HeadBatch:
        """A packed batch of trajectories, ``parts`` = [(count, corrupted), ...] in order."""
        drawn = [self.draw(n, corrupted) for n, corrupted in parts if n]
        S = sum(n for n, _ in parts)
        segments = torch.arange(S).repeat_interleave(self.cfg.tokens_per_trajectory)
        return HeadBatch(torch.cat([h for h, _ in drawn]), torch.cat([y for _, y in drawn]), segments, S)


def _loss(batch: HeadBatch, weight: torch.Tensor, traj_weights: torch.Tensor | None = None):
    return bk.trajectory_cross_entropy(
        batch.hidden, weight, batch.labels, batch.segment_ids, batch.num_segments, traj_weights=traj_weights
    )


def run_arm(cfg: ToyConfig, arm: str, progress: bool = False) -> dict:
    """Train one arm; return its history (per round) and final numbers. Same data for every arm."""
    if arm not in ARMS:
        raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
    gen = torch.Generator().manual_seed(cfg.seed)
    task = ToyTask(cfg, gen)
    val = task.batch([(cfg.validation, False)])
    test = task.batch([(cfg.test, False)])
    parts = [(cfg.real, False), (cfg.clean, False), (cfg.corrupted, True)]
    S = cfg.real + cfg.clean + cfg.corrupted
    synthetic = torch.arange(S) >= cfg.real
    corrupted = torch.arange(S) >= cfg.real + cfg.clean
    head = ReweightingHead(cfg.dim, cfg.head)
    opt = torch.optim.Adam(head.parameters(), lr=cfg.head_lr)
    weight = torch.zeros(cfg.vocab, cfg.dim)
    history = []
    for _ in tqdm(range(cfg.rounds), desc=arm, disable=not progress, leave=False):
        batch = task.batch(parts)
        out = _loss(batch, weight)
        counted = torch.ones(batch.hidden.shape[0], dtype=torch.bool)
        features = trajectory_features(
            batch.hidden, batch.segment_ids, counted, out.per_trajectory, out.num_tokens, synthetic
        )
        if arm == "boost":
            w = head(features)
        elif arm == "oracle":
            w = torch.where(corrupted, 0.0, 1.0)
        else:
            w = torch.where(synthetic, 1.0 if arm == "uniform" else 0.0, 1.0)
        for _ in range(cfg.inner_steps):
            W = weight.clone().requires_grad_()
            loss = _loss(batch, W, w.detach()).loss + 0.5 * cfg.solver.damping * (W * W).sum()
            (grad,) = torch.autograd.grad(loss, W)
            weight = weight - cfg.inner_lr * grad
        record = {"test_loss": float(_loss(test, weight).loss)}
        if arm == "boost":
            W = weight.clone().requires_grad_()
            (val_grad,) = torch.autograd.grad(_loss(val, W).loss, W)
            hyper = head_hypergradient(batch, weight, w.detach(), val_grad, cfg.solver)
            objective = outer_objective(head, w, hyper.traj_weights, synthetic)
            opt.zero_grad()
            objective.loss.backward()
            opt.step()
            record.update(
                n_eff=float(objective.n_eff.detach()),
                mass=float(objective.mass.detach()),
                residual=hyper.residual,
            )
        wd = w.detach()
        record.update(
            weight_clean=float(wd[synthetic & ~corrupted].mean()),
            weight_corrupted=float(wd[corrupted].mean()),
        )
        history.append(record)
    return {"arm": arm, "history": history, "test_loss": history[-1]["test_loss"]}


def write_report(cfg: ToyConfig, results: list[dict], out: Path) -> Path:
    """report.md and history.json (and weights.png when matplotlib is installed) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "history.json", {"config": asdict(cfg), "results": results})
    by_arm = {r["arm"]: r for r in results}
    lines = [
        "# BOOST on a toy LM head",
        "",
        f"Teacher head V={cfg.vocab}, D={cfg.dim}; per batch {cfg.real} real, {cfg.clean} clean and "
        f"{cfg.corrupted} corrupted synthetic trajectories of {cfg.tokens_per_trajectory} tokens; "
        f"{cfg.rounds} rounds of {cfg.inner_steps} inner SGD steps; seed {cfg.seed}. "
        f"Test: {cfg.test} held-out real trajectories.",
        "",
        "| arm | test loss (held-out real) |",
        "|---|---|",
    ]
    lines += [f"| {r['arm']} | {r['test_loss']:.4f} |" for r in results]
    if "boost" in by_arm:
        last = by_arm["boost"]["history"][-1]
        lines += [
            "",
            f"BOOST's final weights: clean synthetic {last['weight_clean']:.3f}, corrupted "
            f"{last['weight_corrupted']:.3f} (mean over the batch); n_eff {last['n_eff']:.2f} of "
            f"{cfg.clean + cfg.corrupted}; synthetic mass {last['mass']:.3f} (the other arms: 1, or 0 for "
            "real_only; a mass above 1 also means larger inner steps on synthetic data).",
        ]
    plot = _plot(results, out / "weights.png")
    lines += [
        "",
        f"![weights and test loss per round]({plot.name})" if plot else "(install matplotlib for the plot)",
    ]
    report = out / "report.md"
    write_text_atomic(report, "\n".join(lines) + "\n")
    return report


def _plot(results: list[dict], path: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, (ax_loss, ax_w) = plt.subplots(1, 2, figsize=(10, 3.6))
    for r in results:
        ax_loss.plot([h["test_loss"] for h in r["history"]], label=r["arm"])
    ax_loss.set(title="loss on held-out real trajectories", xlabel="round", ylabel="loss")
    ax_loss.legend()
    boost_history = next((r["history"] for r in results if r["arm"] == "boost"), None)
    if boost_history:
        ax_w.plot([h["weight_clean"] for h in boost_history], label="clean synthetic")
        ax_w.plot([h["weight_corrupted"] for h in boost_history], label="corrupted synthetic")
        ax_w.set(title="BOOST: mean weight per kind", xlabel="round", ylabel="weight")
        ax_w.legend()
    fig.tight_layout()
    return save_png(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path("runs/toy"), help="folder for report.md, history.json, weights.png"
    )
    parser.add_argument("--rounds", type=int, default=ToyConfig.rounds)
    parser.add_argument("--seed", type=int, default=ToyConfig.seed)
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    cfg = ToyConfig(rounds=args.rounds, seed=args.seed)
    results = [run_arm(cfg, arm, progress=True) for arm in args.arms]
    report = write_report(cfg, results, args.out)
    for r in results:
        print(f"{r['arm']:10s} test loss {r['test_loss']:.4f}")
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
