"""The toy study behind the README table: every arm over several seeds with its own tuned learning
rate, and the λ_conc × λ_shift sweep of BOOST's trade-off.

    python -m boost.toy_study --out docs/toy      # results.json, table.md, sweep.md, sweep.png

Protocol (all choices on the ``tuning`` split of real trajectories, never on ``test``):

1. BOOST: for every (λ_conc, λ_shift) of the grid and every inner learning rate of ``--lrs``, run
   every seed; a pair's learning rate is the one with the lowest mean tuning loss, and the pair
   with the lowest mean tuning loss (at its learning rate) is BOOST's setting.
2. Every other arm: its learning rate is the one with the lowest mean tuning loss over the seeds.
   ``boost_frozen`` runs at BOOST's λ; ``oracle_matched`` at, per seed, the total synthetic weight
   of each round of BOOST's chosen run.
3. Report the test loss at the chosen settings: mean ± standard deviation over the seeds, and the
   per-seed wins of BOOST over each other arm.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from itertools import product
from pathlib import Path

import torch

from boost.atomic import write_json_atomic, write_text_atomic
from boost.bilevel.hypergradient import SolverConfig
from boost.cli import ArgumentParser
from boost.plotting import pyplot, save_png
from boost.toy import ARMS, ToyConfig, run_arm

LRS = (0.25, 0.5, 1.0, 2.0, 4.0)
LAMBDAS_CONC = (0.0, 1e-3, 1e-2, 1e-1)
LAMBDAS_SHIFT = (0.0, 1e-3, 1e-2, 1e-1)
TAIL = 20  # rounds averaged for n_eff and the synthetic mass


def _summary(run: dict, cfg: ToyConfig) -> dict:
    """The numbers of one run the study keeps (the per-round history is dropped)."""
    tail = run["history"][-TAIL:]
    n_syn = cfg.clean + cfg.shifted + cfg.corrupt
    out = {k: run[k] for k in ("arm", "lr", "validation_loss", "tuning_loss", "test_loss")}
    out["n_eff"] = statistics.fmean(h["n_eff"] for h in tail)
    out["synthetic_mass"] = statistics.fmean(h["synthetic_total"] for h in tail) / n_syn
    for name in ("clean", "shifted", "corrupt"):
        out[f"weight_{name}"] = statistics.fmean(h[f"weight_{name}"] for h in tail)
    return out


def _mean(runs: list[dict], key: str) -> float:
    return statistics.fmean(r[key] for r in runs)


def _best(by_lr: dict[float, list[dict]]) -> tuple[float, list[dict]]:
    lr = min(by_lr, key=lambda x: _mean(by_lr[x], "tuning_loss"))
    return lr, by_lr[lr]


def run_study(
    base: ToyConfig, seeds: list[int], lrs=LRS, conc=LAMBDAS_CONC, shift=LAMBDAS_SHIFT, log=print
) -> dict:
    cfgs = {s: replace(base, seed=s) for s in seeds}

    def with_lambdas(cfg, lc, ls):
        return replace(cfg, head=replace(cfg.head, concentration=lc, task_shift=ls))

    started = time.perf_counter()
    sweep, full_boost = [], {}
    for lc, ls in product(conc, shift):
        by_lr = {}
        for lr in lrs:
            runs = [run_arm(with_lambdas(cfgs[s], lc, ls), "boost", lr) for s in seeds]
            full_boost[(lc, ls, lr)] = runs
            by_lr[lr] = [_summary(r, cfgs[s]) for r, s in zip(runs, seeds)]
        lr, best = _best(by_lr)
        sweep.append({"concentration": lc, "task_shift": ls, "lr": lr, "runs": best})
        log(f"λ_conc={lc:g} λ_shift={ls:g}: lr {lr:g}, tuning {_mean(best, 'tuning_loss'):.4f}, "
            f"test {_mean(best, 'test_loss'):.4f} ({time.perf_counter() - started:.0f} s)")  # fmt: skip
    chosen = min(sweep, key=lambda p: _mean(p["runs"], "tuning_loss"))
    lc, ls, boost_lr = chosen["concentration"], chosen["task_shift"], chosen["lr"]
    arms = {"boost": {"lr": boost_lr, "runs": chosen["runs"]}}
    schedules = {
        s: [h["synthetic_total"] for h in r["history"]] for s, r in zip(seeds, full_boost[(lc, ls, boost_lr)])
    }
    for arm in ARMS[1:]:
        by_lr = {}
        for lr in lrs:
            by_lr[lr] = [
                _summary(run_arm(with_lambdas(cfgs[s], lc, ls), arm, lr, schedules[s]), cfgs[s])
                for s in seeds
            ]
        lr, best = _best(by_lr)
        arms[arm] = {"lr": lr, "runs": best}
        log(f"{arm}: lr {lr:g}, test {_mean(best, 'test_loss'):.4f} ({time.perf_counter() - started:.0f} s)")
    if base.solver.method == "identity":  # BOOST with the CG solver as well, at the chosen λ
        cg = replace(base.solver, method="cg", steps=5, damping=1e-2, alpha=None)
        by_lr = {
            lr: [_summary(run_arm(replace(with_lambdas(cfgs[s], lc, ls), solver=cg), "boost", lr), cfgs[s])
                 for s in seeds]
            for lr in lrs
        }  # fmt: skip
        lr, best = _best(by_lr)
        arms["boost_cg"] = {"lr": lr, "runs": [dict(r, arm="boost_cg") for r in best]}
        log(
            f"boost_cg: lr {lr:g}, test {_mean(best, 'test_loss'):.4f} ({time.perf_counter() - started:.0f} s)"
        )
    return {
        "seeds": seeds, "lrs": list(lrs), "chosen": {"concentration": lc, "task_shift": ls, "lr": boost_lr},
        "arms": arms, "sweep": sweep, "seconds": time.perf_counter() - started,
    }  # fmt: skip


def _mean_std(values: list[float]) -> str:
    return f"{statistics.fmean(values):+.4f} ± {statistics.stdev(values):.4f}".lstrip("+")


def _paired(runs: list[dict], reference: list[dict]) -> list[float]:
    """Per-seed test-loss differences run − reference (the seeds are in the same order)."""
    return [r["test_loss"] - b["test_loss"] for r, b in zip(runs, reference)]


def table(study: dict) -> str:
    boost = study["arms"]["boost"]["runs"]
    lines = [
        "| arm | inner lr (tuned) | test loss, mean ± std | minus BOOST's, same seed: mean ± std | BOOST better in | "
        "synthetic mass | weight clean / shifted / corrupt | n_eff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, entry in study["arms"].items():
        runs = entry["runs"]
        diff = _paired(runs, boost)
        paired = "–" if arm == "boost" else f"{_mean_std(diff)}"
        wins = "–" if arm == "boost" else f"{sum(d > 0 for d in diff)}/{len(diff)} seeds"
        weights = " / ".join(f"{_mean(runs, f'weight_{k}'):.2f}" for k in ("clean", "shifted", "corrupt"))
        lines.append(
            f"| {arm} | {entry['lr']:g} | {_mean_std([r['test_loss'] for r in runs])} | {paired} | {wins} | "
            f"{_mean(runs, 'synthetic_mass'):.3f} | {weights} | {_mean(runs, 'n_eff'):.1f} |"
        )
    return "\n".join(lines)


def sweep_table(study: dict) -> str:
    real_only = study["arms"]["real_only"]["runs"]
    lines = ["| λ_conc | λ_shift | lr | tuning loss | test loss | minus real-only's, same seed | n_eff | "
             "synthetic mass | weight clean / shifted / corrupt |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for p in study["sweep"]:
        runs = p["runs"]
        weights = " / ".join(f"{_mean(runs, f'weight_{k}'):.2f}" for k in ("clean", "shifted", "corrupt"))
        lines.append(
            f"| {p['concentration']:g} | {p['task_shift']:g} | {p['lr']:g} | {_mean(runs, 'tuning_loss'):.4f} | "
            f"{_mean_std([r['test_loss'] for r in runs])} | {_mean_std(_paired(runs, real_only))} | "
            f"{_mean(runs, 'n_eff'):.1f} | {_mean(runs, 'synthetic_mass'):.3f} | {weights} |"
        )
    return "\n".join(lines)


def plot_sweep(study: dict, path: Path) -> Path | None:
    """Held-out loss (paired with real-only's, same seed) against n_eff and the synthetic mass."""
    plt = pyplot()
    if plt is None:
        return None
    real_only = study["arms"]["real_only"]["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    shifts = sorted({p["task_shift"] for p in study["sweep"]})
    concs = sorted({p["concentration"] for p in study["sweep"]})
    colors = plt.cm.viridis([i / max(1, len(shifts) - 1) for i in range(len(shifts))])
    markers = "osD^v<>"
    for p in study["sweep"]:
        runs = p["runs"]
        diff = _paired(runs, real_only)
        err = statistics.stdev(diff) / len(diff) ** 0.5
        c = colors[shifts.index(p["task_shift"])]
        m = markers[concs.index(p["concentration"]) % len(markers)]
        for ax, key in zip(axes, ("n_eff", "synthetic_mass")):
            ax.errorbar(_mean(runs, key), statistics.fmean(diff), yerr=err, fmt=m, color=c, ms=7, capsize=2)
    for name, style in (("uniform", "--"), ("oracle", ":")):
        level = statistics.fmean(_paired(study["arms"][name]["runs"], real_only))
        for ax in axes:
            ax.axhline(level, color="gray", ls=style, lw=1)
        axes[0].text(axes[0].get_xlim()[1], level, f" {name} (tuned)", va="center", ha="right", fontsize=7)
    for ax in axes:
        ax.axhline(0.0, color="black", lw=0.8)
    axes[0].set_xlabel("n_eff over all trajectories of a batch (mean of the last 20 rounds, of 18)")
    axes[1].set_xlabel("synthetic mass (mean synthetic weight, last 20 rounds)")
    axes[0].set_ylabel("held-out loss − real-only's (same seed)\nmean ± s.e. over seeds; < 0: better")
    for i, s in enumerate(shifts):
        axes[1].plot([], [], "s", color=colors[i], label=f"λ_shift={s:g}")
    for i, c in enumerate(concs):
        axes[1].plot([], [], markers[i % len(markers)], color="gray", label=f"λ_conc={c:g}")
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle("BOOST on the toy: the λ_conc × λ_shift sweep (each point at its tuned inner lr)")
    fig.tight_layout()
    return save_png(fig, path, dpi=110)


def write_outputs(study: dict, out: Path, header: str) -> Path | None:
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", study)
    write_text_atomic(out / "table.md", header + "\n\n" + table(study) + "\n")
    write_text_atomic(out / "sweep.md", sweep_table(study) + "\n")
    return plot_sweep(study, out / "sweep.png")


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/toy"))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=ToyConfig.rounds)
    parser.add_argument("--lrs", type=float, nargs="+", default=list(LRS))
    parser.add_argument("--conc", type=float, nargs="+", default=list(LAMBDAS_CONC))
    parser.add_argument("--shift", type=float, nargs="+", default=list(LAMBDAS_SHIFT))
    args = parser.parse_args(argv)
    if args.seeds < 2:
        parser.error("--seeds must be >= 2 (the table reports a standard deviation)")
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    base = ToyConfig(rounds=args.rounds, solver=SolverConfig("identity"))
    study = run_study(base, list(range(args.seeds)), args.lrs, args.conc, args.shift)
    chosen = study["chosen"]
    header = (f"{args.seeds} seeds, {args.rounds} rounds, inner lr from {args.lrs} per arm; BOOST's λ_conc="
              f"{chosen['concentration']:g}, λ_shift={chosen['task_shift']:g} (chosen on the tuning split).")  # fmt: skip
    plot = write_outputs(study, args.out, header)
    print(header)
    print(table(study))
    print(sweep_table(study))
    print(f"plot: {plot}; {study['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
