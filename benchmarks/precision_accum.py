"""CPU measurements behind issue 14's precision and accumulation settings (benchmarks/RESULTS.md).

    python benchmarks/precision_accum.py timing --rounds 3   # CPU preset: fp32 vs grad_accum=2 vs bf16
    python benchmarks/precision_accum.py fd                  # finite-difference scores: fp32 vs bf16

``timing``: BOOST on the CPU preset (``configs/cpu_preset.yaml``, gridnav-compact data generated into
``--work``), 8 inner steps each followed by an outer step, one subprocess per run, the configurations
interleaved round by round. Per run: the median inner and outer seconds of steps 2..8 and the peak
resident set (``ru_maxrss``). ``grad_accum=2`` packs half the budget per micro-batch (4 rows of 768
instead of 8), so a step holds the same trajectories; note that the validation batches shrink with the
budget too, which makes its outer step cheaper.

``fd``: on one packed batch of the tests' tiny chat model (every parameter trained), the scores
σ_i = <∇L_i, v> for an Adam-step-like direction v (1e-4 × the sign of a Gaussian vector), exact by
autograd in float32 and by central differences (``fd_step`` 1e-2) with the trunk in float32 and
under bf16 autocast.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent
CONFIGS = {
    "fp32": [],
    "fp32, grad_accum=2": ["data.token_budget=3072", "data.rows=4", "grad_accum=2"],
    "bf16 autocast": ["precision=bf16"],
}


def one_run(work: Path, overrides: list[str]) -> dict:
    from boost.config import load_config
    from boost.train import TrainConfig, Trainer

    out = work / "run"
    cfg = load_config(TrainConfig, str(REPO / "configs/cpu_preset.yaml"), [
        f"data.path={work / 'data.jsonl'}", f"out_dir={out}", "steps=8", "log_every=1", "eval.episodes=0",
        "weighting.method=boost", "solver.steps=5", *overrides])  # fmt: skip
    Trainer(cfg, progress=False).train(overwrite=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    return {
        "inner_s": statistics.median(r["inner_seconds"] for r in rows),
        "outer_s": statistics.median(r["outer_seconds"] for r in rows),
        "trajectories_per_step": statistics.mean(r["trajectories"] for r in rows),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def timing(work: Path, rounds: int) -> None:
    from boost.generate import main as generate

    work.mkdir(parents=True, exist_ok=True)
    if not (work / "data.jsonl").exists():
        with contextlib.redirect_stdout(io.StringIO()):
            generate(["--env", "gridnav-compact", "--out", str(work / "data.jsonl"), "--sources",
                      "real:64,eps0.3:128,corrupt:128", "--no-progress"])  # fmt: skip
    results: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    for _ in range(rounds):
        for name, overrides in CONFIGS.items():
            cmd = [sys.executable, __file__, "one", str(work), *overrides]
            line = subprocess.run(
                cmd, capture_output=True, text=True, check=True, cwd=REPO
            ).stdout.splitlines()[-1]
            results[name].append(json.loads(line))
            print(name, line, flush=True)
    for name, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"{name}: median of {rounds}: " + ", ".join(f"{k} {v:.3g}" for k, v in med.items()))


def fd() -> None:
    import tempfile

    import torch

    from benchmarks.kill_resume import make_assets
    from boost.bilevel.hypergradient_trainable import finite_difference_scores
    from boost.config import load_config
    from boost.train import TrainConfig, Trainer
    from boost.train.loop import _cycle

    root = Path(tempfile.mkdtemp(prefix="fd_"))
    model, data = make_assets(root)
    cfg = load_config(TrainConfig, None, [f"data.path={data}", f"model.name={model}", f"out_dir={root / 'run'}",
                      "data.token_budget=1024", "data.max_length=512", "block=trainable", "eval.episodes=0"])  # fmt: skip
    t = Trainer(cfg, progress=False)
    batch = next(_cycle(t.data.train))
    params = t._trained()
    torch.manual_seed(0)
    v = torch.cat([torch.randn(p.numel()).sign() * 1e-4 for p in params])
    exact = []
    for i in range(batch.num_segments):
        loss = t.losses(t.hidden_states(batch, "fp32"), batch).per_trajectory[i]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        flat = torch.cat(
            [(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)]
        )
        exact.append(float(flat @ v))
    exact = torch.tensor(exact)
    print(f"{batch.num_segments} trajectories, exact scores {exact.tolist()}")
    for precision in ("fp32", "bf16"):
        with torch.no_grad():
            scores = finite_difference_scores(
                lambda p=precision: t.losses(t.hidden_states(batch, p), batch).per_trajectory, params, v, 1e-2
            )
        print(
            f"{precision}: relative error of the central differences {float((scores - exact).norm() / exact.norm()):.3f}"
        )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "one":  # the subprocess of one timed run
        print(json.dumps(one_run(Path(argv[1]), argv[2:])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("timing", "fd"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/precision_accum"))
    args = parser.parse_args(argv)
    timing(args.work, args.rounds) if args.what == "timing" else fd()
    return 0


if __name__ == "__main__":
    sys.exit(main())
