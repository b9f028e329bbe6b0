"""Does the head-block hypergradient rank gridnav's synthetic sources by quality? (issue 10)

At a fixed model (a behaviour-cloned run's ``model/`` folder and its last checkpoint's optimiser
state), over ``--batches`` training batches of the CPU preset, this measures per trajectory:

* σ_i = <∇_W L_i, v> (the outer objective's gradient w.r.t. w_i is −σ_i / S: larger σ = more useful)
  for three v: ``cg`` (CG-5 on (H + 1e-3 I) v = g, the trainer's default), ``sgd`` (v = g: the
  one-step look-ahead of plain SGD) and ``adam`` (v = g / (√v̂ + ε), SAMA's preconditioner from the
  run's AdamW state); g = ∇_W L_out over the *whole* validation set;
* what the head sees: the loss L_i, log N_i, the task-shift distance d_i of
  :meth:`boost.bilevel.reweighting.ReweightingHead.shift_distance` (distance of the mean-pooled state to
  the validation mean, in units of the validation trajectories' mean distance) and, for comparison,
  a length-free variant: the mean over i's counted tokens of each token's distance to the validation
  tokens' mean (in units of theirs);
* the noise of σ when g comes from one validation batch of B tokens instead of the whole set: the
  correlation of σ_B with σ_full over the batch's trajectories, per B in ``--val-budgets``, and the
  cost of the validation forward;
* at the initial head, the gradient of each term of the outer objective (surrogate, λ_conc / √n_eff,
  λ_shift · Σ w d / S) w.r.t. the head's parameters: which one moves the head.

Writes ``<out>/rows.jsonl`` (one row per trajectory) and ``<out>/summary.json``, and prints tables.

    python benchmarks/hypergradient_diagnostics.py --run runs/d10/bc --data runs/d10/gridnav.jsonl \
        --out runs/d10/diag --batches 12
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from boost.bilevel.hypergradient import HeadBatch, SolverConfig, head_hypergradient
from boost.bilevel.reweighting import HeadConfig, ReweightingHead, outer_objective, trajectory_features
from boost.config import load_config
from boost.data import PackingConfig, TrajectoryPacker
from boost.stats import spearman
from boost.train import TrainConfig, Trainer
from boost.train.baselines import ground_truth_quality
from boost.train.checkpoint_io import latest_checkpoint, load_optimizer_states

SOURCES_ORDER = ("eps0.1", "eps0.3", "corrupt", "expert_shifted", "random", "real")


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    return float((x * y).sum() / (x.norm() * y.norm()).clamp_min(1e-300))


def validation_grad(trainer: Trainer, batches) -> tuple[torch.Tensor, float]:
    """g = ∇_W of the mean per-trajectory validation loss over ``batches`` (the trainer's L_out is the
    batch mean of per-trajectory losses, so batches are weighted by their trajectory counts)."""
    W = trainer.lm_head.weight.detach().requires_grad_()
    total = sum(b.num_segments for b in batches)
    g = torch.zeros_like(W)
    seconds = 0.0
    for b in batches:
        started = time.perf_counter()
        with torch.no_grad():
            hidden = trainer.hidden_states(b)
        seconds += time.perf_counter() - started
        out = trainer.losses(hidden, b, W)
        (gb,) = torch.autograd.grad(out.loss, W)
        g += gb * (b.num_segments / total)
    return g, seconds


def adam_preconditioner(run: Path, trainer: Trainer) -> torch.Tensor | None:
    """1 / (√v̂ + ε) of the LM head from the run's last checkpoint (None without one)."""
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        return None
    state = load_optimizer_states(ckpt)["model"]
    names = [p for p in trainer.model.parameters() if p.requires_grad]
    index = next(i for i, p in enumerate(names) if p is trainer.lm_head.weight)
    s = state["state"][index]
    beta2 = state["param_groups"][0]["betas"][1]
    eps = state["param_groups"][0]["eps"]
    v_hat = s["exp_avg_sq"].float() / (1 - beta2 ** float(s["step"]))
    if v_hat.shape != trainer.lm_head.weight.shape:
        raise ValueError("the checkpoint's optimiser state does not match the LM head")
    return 1.0 / (v_hat.sqrt() + eps)


def val_packer(trainer: Trainer, budget: int, seed: int) -> TrajectoryPacker:
    row = trainer.cfg.data.token_budget // trainer.cfg.data.rows
    cfg = PackingConfig(token_budget=budget, seed=seed, pad_token_id=trainer.tokenizer.pad_token_id or 0,
                        mode="mixed", rows=max(1, budget // row))  # fmt: skip
    return TrajectoryPacker(trainer.data.validation.trajectories, cfg, name=f"validation-{budget}")


def token_distance(hidden, segment_ids, num_segments, mean, scale) -> torch.Tensor:
    """[S] mean over each trajectory's counted tokens of |h_t − mean| / scale."""
    keep = segment_ids >= 0
    seg = segment_ids[keep].long()
    dist = (hidden[keep].float() - mean).norm(dim=1) / scale
    return dist.new_zeros(num_segments).index_add_(0, seg, dist) / torch.bincount(
        seg, minlength=num_segments
    ).clamp_min(1)


def head_term_gradients(feats, hyper, synthetic, val_pooled) -> dict:
    """|∇_φ| of each outer-objective term at a fresh default head, and their cosines with the surrogate's."""
    torch.manual_seed(0)
    head = ReweightingHead(feats.pooled.shape[1], HeadConfig())
    head.update_reference(val_pooled)
    params = [p for p in head.parameters() if p.requires_grad]
    obj = outer_objective(head, head(feats, update=False), hyper, synthetic, pooled=feats.pooled)
    grads = {}
    for name in ("surrogate", "concentration", "task_shift"):
        term = getattr(obj, name)
        if term.requires_grad:
            gs = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
            grads[name] = torch.cat(
                [(torch.zeros_like(p) if d is None else d).reshape(-1) for d, p in zip(gs, params)]
            )
    norms = {k: float(v.norm()) for k, v in grads.items()}
    ref = grads.get("surrogate")
    cos = {
        k: float(v @ ref / (v.norm() * ref.norm() + 1e-30))
        for k, v in grads.items()
        if k != "surrogate" and ref is not None
    }
    return {"norms": norms, "cos_with_surrogate": cos}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a finished training run folder (model/ and checkpoints/)")
    ap.add_argument(
        "--model", default=None, help="model folder (default: <run>/model; <run>/init: the initial model)"
    )
    ap.add_argument("--data", required=True)
    ap.add_argument("--config", default="configs/cpu_preset.yaml")
    ap.add_argument("--out", required=True)
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--val-budgets", default="768,1536,3072,6144")
    ap.add_argument("--draws", type=int, default=3, help="validation batches per budget and training batch")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    run, out = Path(args.run), Path(args.out)
    model_dir = Path(args.model) if args.model else run / "model"
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(TrainConfig, args.config, [
        f"data.path={args.data}", f"model.name={model_dir}", f"out_dir={out / 'trainer'}",
        "weighting.method=boost", "eval.episodes=0",
    ])  # fmt: skip
    trainer = Trainer(cfg, progress=False)
    trainer.model.eval()
    W = trainer.lm_head.weight.detach()
    P = adam_preconditioner(run, trainer) if model_dir == run / "model" else None
    full_val = list(trainer.data.validation.batches(0))
    g_full, full_seconds = validation_grad(trainer, full_val)
    # the validation reference of both task-shift distances, over the whole validation set
    val_pooled, val_tok = [], []
    with torch.no_grad():
        for b in full_val:
            h = trainer.hidden_states(b)
            o = trainer.losses(h, b)
            f = trajectory_features(
                h, b.segment_ids, b.segment_ids >= 0, o.per_trajectory, o.num_tokens, ~b.is_real
            )
            val_pooled.append(f.pooled)
            val_tok.append(h[b.segment_ids >= 0].float())
    val_pooled, val_tok = torch.cat(val_pooled), torch.cat(val_tok)
    tok_mean = val_tok.mean(0)
    tok_scale = (val_tok - tok_mean).norm(dim=1).mean()
    pooled_head = ReweightingHead(W.shape[1], HeadConfig())
    pooled_head.update_reference(val_pooled)

    budgets = [int(x) for x in args.val_budgets.split(",") if x]
    packers = {B: val_packer(trainer, B, seed=7) for B in budgets}
    val_streams = {B: iter([b for e in range(50) for b in packers[B].batches(e)]) for B in budgets}
    cg = SolverConfig("cg", steps=5, damping=1e-3)
    rows, noise, head_grads = [], defaultdict(list), []
    val_seconds = defaultdict(list)
    train_iter = trainer.data.train.batches(0)
    for k in range(args.batches):
        batch = next(train_iter)
        with torch.no_grad():
            hidden = trainer.hidden_states(batch)
            o = trainer.losses(hidden, batch)
        synthetic = ~batch.is_real
        feats = trajectory_features(hidden, batch.segment_ids, batch.segment_ids >= 0, o.per_trajectory,
                                    o.num_tokens, synthetic)  # fmt: skip
        tok_d = token_distance(hidden, batch.segment_ids, batch.num_segments, tok_mean, tok_scale)
        S = batch.num_segments
        hb = HeadBatch(hidden, batch.labels, batch.segment_ids, S)
        ones = torch.ones(S)
        sig = {
            "cg": head_hypergradient(hb, W, ones, g_full, cg).scores,
            "sgd": head_hypergradient(hb, W, ones, g_full, SolverConfig("identity", alpha=1.0)).scores,
        }
        if P is not None:
            sig["adam"] = head_hypergradient(hb, W, ones, g_full, SolverConfig("identity"),
                                             precondition=lambda g: P * g).scores  # fmt: skip
        d_pooled = pooled_head.shift_distance(feats.pooled)
        trajs = [trainer.data.train_trajectories[i] for i in batch.trajectory_index.tolist()]
        for i, t in enumerate(trajs):
            rows.append({
                "batch": k, "source": t.source, "quality": ground_truth_quality(t.meta) if t.source != "real" else 1.0,
                "return": t.reward, "tokens": int(o.num_tokens[i]), "loss": float(o.per_trajectory[i]),
                "truncated": bool(batch.truncated[i]) if batch.truncated is not None else None,
                "d_pooled": float(d_pooled[i]), "d_tokens": float(tok_d[i]),
                **{f"sigma_{m}": float(s[i]) for m, s in sig.items()},
            })  # fmt: skip
        for B in budgets:
            for _ in range(args.draws):
                vb = next(val_streams[B])
                gB, secs = validation_grad(trainer, [vb])
                val_seconds[B].append(secs)
                sB = head_hypergradient(hb, W, ones, gB, cg).scores
                noise[B].append({
                    "pearson_with_full": pearson(sB[synthetic], sig["cg"][synthetic]),
                    "spearman_quality": spearman(sB[synthetic].tolist(),
                                                 [r["quality"] for r, s in zip(rows[-S:], synthetic.tolist()) if s]),
                    "val_trajectories": vb.num_segments, "val_counted": int((vb.segment_ids >= 0).sum()),
                })  # fmt: skip
        if k < 4:
            head_grads.append(head_term_gradients(feats, -sig["cg"] / S, synthetic, val_pooled))

    (out / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    syn = [r for r in rows if r["source"] != "real"]
    methods = [m for m in ("cg", "sgd", "adam") if f"sigma_{m}" in rows[0]]
    summary = {"model": str(model_dir), "batches": args.batches, "trajectories": len(rows), "synthetic": len(syn),
               "full_validation": {"batches": len(full_val), "trajectories": sum(b.num_segments for b in full_val),
                                   "forward_seconds": full_seconds}}  # fmt: skip
    per_source = {}
    for s in SOURCES_ORDER:
        sel = [r for r in rows if r["source"] == s]
        if not sel:
            continue
        per_source[s] = {"n": len(sel), **{k: sum(r[k] for r in sel) / len(sel)
                         for k in ("quality", "tokens", "loss", "d_pooled", "d_tokens", *[f"sigma_{m}" for m in methods])}}  # fmt: skip
    summary["per_source"] = per_source
    summary["spearman_sigma_quality"] = {m: spearman([r[f"sigma_{m}"] for r in syn], [r["quality"] for r in syn])
                                         for m in methods}  # fmt: skip
    summary["spearman_sigma_quality_no_expert_shifted"] = {
        m: spearman([r[f"sigma_{m}"] for r in syn if r["source"] != "expert_shifted"],
                    [r["quality"] for r in syn if r["source"] != "expert_shifted"]) for m in methods}  # fmt: skip
    for feat in ("loss", "tokens", "d_pooled", "d_tokens"):
        summary[f"spearman_{feat}_quality"] = spearman([r[feat] for r in syn], [r["quality"] for r in syn])
        summary[f"spearman_{feat}_sigma_cg"] = spearman([r[feat] for r in syn], [r["sigma_cg"] for r in syn])
    # within-batch: eps0.1 vs random, by mean σ
    wins = defaultdict(lambda: [0, 0])
    for m in methods:
        for k in range(args.batches):
            b = [r for r in rows if r["batch"] == k]
            a = [r[f"sigma_{m}"] for r in b if r["source"] == "eps0.1"]
            z = [r[f"sigma_{m}"] for r in b if r["source"] == "random"]
            if a and z:
                wins[m][1] += 1
                wins[m][0] += sum(a) / len(a) > sum(z) / len(z)
    summary["eps01_above_random_batches"] = {m: f"{w}/{n}" for m, (w, n) in wins.items()}
    summary["validation_noise"] = {
        B: {"pearson_with_full": sum(x["pearson_with_full"] for x in v) / len(v),
            "spearman_quality": sum(x["spearman_quality"] for x in v if x["spearman_quality"] is not None) / len(v),
            "val_trajectories": sum(x["val_trajectories"] for x in v) / len(v),
            "val_counted": sum(x["val_counted"] for x in v) / len(v),
            "forward_ms": 1000 * sum(val_seconds[B]) / len(val_seconds[B])} for B, v in noise.items()}  # fmt: skip
    summary["head_term_gradients"] = head_grads
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "head_term_gradients"}, indent=1))
    print("head term gradients:", head_grads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
