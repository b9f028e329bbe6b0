"""Data parallelism (boost/train/distributed.py) on CPU ranks with gloo: 2 ranks against 1 on the same
global batches, under DDP and FSDP2, and resuming a run on another number of ranks.

The runs are launched with ``torchrun --standalone`` (a free port), several runs per launch
(tests/distributed_worker.py): one launch of 1 rank (a plain single-process run, then DDP and FSDP2
on 1 rank), one of 2 ranks (DDP and FSDP2, and the 1-rank runs resumed on 2 ranks from their
step-3 checkpoints), one of 1 rank (the 2-rank runs resumed on 1 rank). Tiny chat model and gridnav
data as in tests/test_train.py; 5 steps, an outer step (CG) after each.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from boost.config import load_config
from boost.generate import main as generate
from boost.train import TrainConfig, Trainer
from boost.train.distributed import DEBUG_FILE, BatchView, ParallelError, TorchRun, make_parallel
from boost.train.loop import RunDirError
from tests.envs.tiny_chat_lm import save_tiny_chat_model

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5  # relative, |a - b| / |b| over each compared vector
KINDS = ("ddp", "fsdp2")


def _launch(ranks: int, runs: list[dict], folder: Path) -> None:
    spec = folder / f"spec-{ranks}-{len(list(folder.glob('spec-*')))}.json"
    spec.write_text(json.dumps(runs))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
           "-m", "tests.distributed_worker", str(spec)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


LORA = ("lora.enabled=true", "lora.r=4", "lora.train_head=true")  # block=head: the exact fused hypergradient
EVAL = ("eval.episodes=4", "eval.batch_size=1")  # after eval.episodes=0: the last one counts
TRAINABLE = ("block=trainable", "solver.method=neumann", "solver.steps=2", "solver.alpha=1e-3")
# every objective term at once; fresh rollouts at outer steps 1, 3, 5 (reused at 2 and 4: from the
# step-3 checkpoint on resume); 3 tasks x 2 episodes: the 2 ranks play 3 episodes each
OBJECTIVE = ("outer.objective=nll+decision+0.5*return", "outer.rollout_tasks=3", "outer.episodes_per_task=2",
             "outer.rollout_every=2", "eval.max_new_tokens=4", "eval.batch_size=2")  # fmt: skip


def _overrides(assets, out: Path, parallel: str, steps: int = 5) -> list[str]:
    model, data = assets
    extra = {"trainable": TRAINABLE, "identity": ("solver.method=identity",), "accum": ("grad_accum=2",),
             "accumfsdp": ("grad_accum=2",), "refilter": ("weighting.refilter_every=2",),
             "refilterfsdp": ("weighting.refilter_every=2",), "evalddp": EVAL, "evalfsdp": EVAL, "lora": LORA, "loraddp": LORA, "gathered": ("sharded_outer=false",),
             "trainablefsdp": TRAINABLE, "objddp": OBJECTIVE, "objfsdp": OBJECTIVE,
             "objgathered": (*OBJECTIVE, "sharded_outer=false"), "streamed": ("sharded_tokens=streamed",)}.get(out.name.split("-")[0], ())  # fmt: skip
    return [f"data.path={data}", f"model.name={model}", f"out_dir={out}", "data.token_budget=1024",
            "data.max_length=512", f"steps={steps}", "eval.episodes=0", "checkpoint_every=3",
            f"parallel={parallel}", *(["parallel_debug=true"] if parallel != "none" else []), *extra]  # fmt: skip


def _resumable_copy(out: Path, to: Path) -> Path:
    """``out`` as it was after step 3: the step-3 checkpoint and the files a resume trims itself."""
    shutil.copytree(out, to)
    shutil.rmtree(to / "checkpoints" / "step-00000005")
    return to  # metrics.jsonl and parallel_debug.jsonl still hold steps 4 and 5: the resume drops them


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed_assets")
    data = root / "data.jsonl"
    assert (
        generate(["--env", "gridnav", "--out", str(data), "--sources", "real:24,corrupt:16,eps0.3:16"]) == 0
    )
    return save_tiny_chat_model(root / "model"), data


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    """Output folders: {"plain", "ddp-1", "ddp-2", "fsdp2-1", "fsdp2-2", "ddp-2to1", "ddp-1to2", ...,
    "trainable-1", "trainable-2" (DDP, block=trainable), "identity-1", "identity-2" (FSDP2, solver.method=identity),
    "accum-1", "accum-2" (DDP, grad_accum=2), "accumfsdp-1", "accumfsdp-2" (FSDP2, grad_accum=2),
    "refilter-1", "refilter-2" (DDP, refilter_every=2), "refilterfsdp-1", "refilterfsdp-2" (FSDP2),
    "refilter-2to1", "lora-1", "lora-2" (FSDP2, LoRA with a trained head), "lora-2to1", "loraddp-1",
    "loraddp-2" (DDP, the same), "gathered-1", "gathered-2" (FSDP2 with sharded_outer=false), "streamed-2" (FSDP2, sharded_tokens=streamed), "objddp-1", "objddp-2", "objfsdp-1", "objfsdp-2", "objgathered-1", "objgathered-2" (outer.objective=nll+decision+0.5*return), "objfsdp-2to1", "diverging", "evalddp-1", "evalddp-2", "evalfsdp-1", "evalfsdp-2" (eval.episodes=4 at
    the end of the run), "play" (a folder: play-none-1.json, play-ddp-2.json, play-fsdp2-2.json)}."""
    root = tmp_path_factory.mktemp("distributed_runs")
    pairs = ("trainable", "identity", "accum", "accumfsdp", "refilter", "refilterfsdp", "evalddp", "evalfsdp",
             "lora", "loraddp", "gathered", "trainablefsdp", "objddp", "objfsdp", "objgathered")  # fmt: skip
    more = (*(f"{k}-{n}" for k in pairs for n in (1, 2)), "streamed-2", "diverging", "play")
    names = ("plain", *(f"{k}-{n}" for k in KINDS for n in (1, 2)), *more)
    out = {name: root / name for name in names}
    out["play"].mkdir()

    def run(name, kind, resume=False):
        scored = name.startswith("obj")  # the return objective: gridnav scored by reply length
        return {"overrides": _overrides(assets, out[name], kind), "resume": resume, "text_reward": scored}

    def play(kind, ranks):  # the untrained model plays 6 test tasks, each rank its share
        spec = [*_overrides(assets, out["play"] / "run", kind), "eval.episodes=6", "eval.batch_size=1"]
        return {"overrides": spec, "play": str(out["play"] / f"play-{kind}-{ranks}.json")}

    _launch(
        1,
        [
            run("plain", "none"),
            run("ddp-1", "ddp"),
            run("fsdp2-1", "fsdp2"),
            run("trainable-1", "ddp"),
            run("identity-1", "fsdp2"),
            run("accum-1", "ddp"),
            run("accumfsdp-1", "fsdp2"),
            run("refilter-1", "ddp"),
            run("refilterfsdp-1", "fsdp2"),
            run("evalddp-1", "ddp"),
            run("evalfsdp-1", "fsdp2"),
            run("lora-1", "fsdp2"),
            run("loraddp-1", "ddp"),
            run("gathered-1", "fsdp2"),
            run("trainablefsdp-1", "fsdp2"),
            run("objddp-1", "ddp"),
            run("objfsdp-1", "fsdp2"),
            run("objgathered-1", "fsdp2"),
            play("none", 1),
        ],
        root,
    )
    for kind in KINDS:
        out[f"{kind}-1to2"] = _resumable_copy(out[f"{kind}-1"], root / f"{kind}-1to2")
    resumes = [run(f"{k}-1to2", k, True) for k in KINDS]
    # an lr that blows the model up after one step: the next steps are non-finite and skipped
    diverging = {"overrides": [*_overrides(assets, out["diverging"], "ddp", steps=3), "optim.lr=1e30",
                               "checkpoint_every=0"]}  # fmt: skip
    _launch(
        2,
        [run(f"{k}-2", k) for k in KINDS]
        + [
            run("trainable-2", "ddp"),
            run("identity-2", "fsdp2"),
            run("accum-2", "ddp"),
            run("accumfsdp-2", "fsdp2"),
            run("refilter-2", "ddp"),
            run("refilterfsdp-2", "fsdp2"),
            run("evalddp-2", "ddp"),
            run("evalfsdp-2", "fsdp2"),
            run("lora-2", "fsdp2"),
            run("loraddp-2", "ddp"),
            run("gathered-2", "fsdp2"),
            run("trainablefsdp-2", "fsdp2"),
            run("objddp-2", "ddp"),
            run("objfsdp-2", "fsdp2"),
            run("objgathered-2", "fsdp2"),
            run("streamed-2", "fsdp2"),
            play("ddp", 2),
            play("fsdp2", 2),
        ]  # fmt: skip
        + resumes
        + [diverging],
        root,
    )
    for kind in KINDS:
        out[f"{kind}-2to1"] = _resumable_copy(out[f"{kind}-2"], root / f"{kind}-2to1")
    out["ddp-2to1-fsdp2"] = _resumable_copy(out["ddp-2"], root / "ddp-2to1-fsdp2")  # DDP's, under FSDP2
    out["fsdp2-2to1-ddp"] = _resumable_copy(out["fsdp2-2"], root / "fsdp2-2to1-ddp")  # rows of v, under DDP
    out["refilter-2to1"] = _resumable_copy(out["refilter-2"], root / "refilter-2to1")  # refiltered at step 2
    out["lora-2to1"] = _resumable_copy(out["lora-2"], root / "lora-2to1")
    out["objfsdp-2to1"] = _resumable_copy(out["objfsdp-2"], root / "objfsdp-2to1")  # rows of the estimate
    _launch(1, [run(f"{k}-2to1", k, True) for k in KINDS] + [run("ddp-2to1-fsdp2", "fsdp2", True),
                                                            run("fsdp2-2to1-ddp", "ddp", True),
                                                            run("refilter-2to1", "ddp", True),
                                                            run("lora-2to1", "fsdp2", True),
                                                            run("objfsdp-2to1", "fsdp2", True)], root)  # fmt: skip
    return out


def _relative(a, b) -> float:
    if None in (a, b) or None in list(a) + list(b):  # e.g. no real trajectory in the batch: both None
        return 0.0 if list(a) == list(b) else float("inf")
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _debug_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / DEBUG_FILE).read_text().splitlines()]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _final_parameters(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


@pytest.mark.parametrize(
    "kind",
    [
        *KINDS,
        "trainable",
        "identity",
        "accum",
        "accumfsdp",
        "refilter",
        "refilterfsdp",
        "lora",
        "loraddp",
        "gathered",
        "objddp",
        "objfsdp",
        "objgathered",
    ],
)
def test_two_ranks_agree_with_one_on_the_same_global_batches(runs, kind):
    """DDP and FSDP2 with the head block (CG), DDP with block=trainable (Neumann, finite differences:
    the same perturbations θ ± εv on every rank, each HVP summed over ranks), FSDP2 with the AdamW
    look-ahead (solver.method=identity: the sharded optimiser state of the head, gathered), grad_accum=2
    under DDP and FSDP2 (each rank's shares of two global batches, stepped as their union) and
    LoRA with a trained head under FSDP2 and DDP (adapters and the head's trainable copy sharded with
    the frozen base; out_dir/model is a plain copy with the adapters merged), refiltering under DDP and
    FSDP2 (the pool scored on each rank's share of every batch, gathered: the same
    training set chosen on every rank as on one).

    block=trainable's scores are differences of float32 losses, [L_i(θ+εv) − L_i(θ−εv)] / 2ε: the
    trunk's rounding on another packing (~1e-7 of L) is amplified by L / (L(θ+εv) − L(θ−εv)); measured
    (2026-12-02) 8e-6 on the hypergradients and 1.8e-5 on the weights (the head's Adam steps follow
    them), hence 1e-4 there. The head block (fused JVP / HVP, no differences) agrees to ~2e-7.
    identity at Adam's first step: the response nearly cancels (the first step is ≈ lr·sign(G),
    docs/method.md), so the small v carries the gradient's rounding at a large relative size:
    measured 1.9e-4 on the hypergradients at step 1, 1.6e-6 to 8e-6 after, 6e-6 on the weights.
    """
    scores = 1e-4 if kind.startswith("trainable") else TOLERANCE
    hyper = {"trainable": 1e-4, "trainablefsdp": 1e-4, "identity": 1e-3}.get(kind, TOLERANCE)
    one, two = _debug_rows(runs[f"{kind}-1"]), _debug_rows(runs[f"{kind}-2"])
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4, 5]
    for a, b in zip(two, one):
        assert a["index"] == b["index"]  # the same trajectories, in the global batch's order
        for key, tolerance in (("loss", TOLERANCE), ("weight", scores), ("hypergradient", hyper)):
            assert _relative(a[key], b[key]) <= tolerance, (kind, a["step"], key)
        assert any(h != 0 for h in a["hypergradient"])  # the outer step had something to compare
    for a, b in zip(_metrics(runs[f"{kind}-2"]), _metrics(runs[f"{kind}-1"])):
        for key in ("loss", "val_loss", "n_eff", "mass", "solver_residual"):
            assert _relative([a[key]], [b[key]]) <= scores, (kind, a["step"], key)
    p2, p1 = _final_parameters(runs[f"{kind}-2"]), _final_parameters(runs[f"{kind}-1"])
    assert p2.keys() == p1.keys()
    for name in p1:
        assert _relative(p2[name], p1[name]) <= TOLERANCE, (kind, name)
    final2, final1 = (json.loads((runs[f"{kind}-{n}"] / "final.json").read_text()) for n in (2, 1))
    chosen = [
        [{k: v for k, v in r.items() if k != "seconds"} for r in f.get("refilters", [])]
        for f in (final2, final1)
    ]
    assert chosen[0] == chosen[1] and bool(chosen[0]) == kind.startswith("refilter")
    assert (
        _relative(
            list(final2["mean_weight_per_source"].values()), list(final1["mean_weight_per_source"].values())
        )
        <= scores
    )
    lines = [(runs[f"{kind}-{n}"] / "pool_weights.jsonl").read_text().splitlines() for n in (2, 1)]
    assert [json.loads(r)["key"] for r in lines[0]] == [json.loads(r)["key"] for r in lines[1]]


def test_fsdp2_block_trainable_equals_ddp(runs):
    """block=trainable under FSDP2 (finite differences on the sharded parameters: gradients from FSDP2's
    reduce-scatter, inner products summed over ranks, the unsharded copies dropped after each
    in-place change) against DDP on one rank (plain parameters), same finite-difference tolerance."""
    fsdp, ddp = _debug_rows(runs["trainablefsdp-2"]), _debug_rows(runs["trainable-1"])
    assert len(fsdp) == len(ddp) == 5
    for a, b in zip(fsdp, ddp):
        assert a["index"] == b["index"]
        assert _relative(a["loss"], b["loss"]) <= TOLERANCE, a["step"]
        for key in ("weight", "hypergradient"):
            assert _relative(a[key], b[key]) <= 1e-4, (a["step"], key)
    p_fsdp, p_ddp = _final_parameters(runs["trainablefsdp-2"]), _final_parameters(runs["trainable-1"])
    for name in p_ddp:
        assert _relative(p_fsdp[name], p_ddp[name]) <= TOLERANCE, name


@pytest.mark.parametrize("sharded", ["fsdp2-2", "streamed-2"])
def test_sharded_outer_step_equals_the_gathered_one(runs, sharded):
    """FSDP2's outer step on vocabulary rows (sharded_outer, the default; its tokens gathered or
    streamed one rank's block at a time) against the gathered head (sharded_outer=false) on the same 2
    ranks: the same hypergradients, weights and head."""
    gathered = _debug_rows(runs["gathered-2"])
    metrics = _metrics(runs[sharded])
    sharded = _debug_rows(runs[sharded])
    assert len(sharded) == len(gathered) == 5
    for a, b in zip(sharded, gathered):
        assert a["index"] == b["index"]
        for key in ("loss", "weight", "hypergradient"):
            assert _relative(a[key], b[key]) <= TOLERANCE, (a["step"], key)
    for a, b in zip(metrics, _metrics(runs["gathered-2"])):
        for key in ("val_loss", "solver_residual", "n_eff"):
            assert _relative([a[key]], [b[key]]) <= TOLERANCE, (a["step"], key)


RETURN_KEYS = ("return_mean", "return_std", "return_success", "return_nonzero_advantage", "return_episodes")


@pytest.mark.parametrize("kind", ["objddp", "objfsdp", "objgathered"])
def test_the_outer_objectives_rollouts_split_over_ranks_are_those_of_one_process(runs, kind):
    """outer.objective=nll+decision+0.5*return: each rank plays its share of the validation rollouts
    (each episode from its own seed), the episodes are gathered, every rank takes its share of every
    rollout batch for the score function, and the terms are summed over ranks. The rollouts (the same
    returns), the terms and the estimate's norm and halves' cosine equal one process's; the head's
    numbers are compared by test_two_ranks_agree_with_one_on_the_same_global_batches. FSDP2's
    sharded head computes the same terms from vocabulary rows (objfsdp against objgathered)."""
    two, one = _metrics(runs[f"{kind}-2"]), _metrics(runs[f"{kind}-1"])
    fresh = [m["step"] for m in two if not m.get("return_reused")]
    assert fresh == [m["step"] for m in one if not m.get("return_reused")] == [1, 3, 5]
    for a, b in zip(two, one):
        assert {k: a.get(k) for k in RETURN_KEYS} == {k: b.get(k) for k in RETURN_KEYS}, a["step"]
        for key in ("outer_nll", "outer_decision", "outer_return", "outer_loss", "decision_trajectories"):
            assert _relative([a[key]], [b[key]]) <= TOLERANCE, (kind, a["step"], key)
        if not a.get("return_reused"):
            assert _relative([a["return_grad_norm"]], [b["return_grad_norm"]]) <= TOLERANCE, (kind, a["step"])
            # a cosine near 0 (here 5e-4 at step 5): compared absolutely
            assert abs(a["return_halves_cosine"] - b["return_halves_cosine"]) <= TOLERANCE, (kind, a["step"])
    # not a vacuous estimate: some rollouts of a task scored differently (steps 3 and 5 here)
    assert any(m.get("return_nonzero_advantage", 0) > 0 and m["return_grad_norm"] > 0 for m in two)
    if kind == "objfsdp":
        for a, b in zip(_debug_rows(runs["objfsdp-2"]), _debug_rows(runs["objgathered-2"])):
            for key in ("weight", "hypergradient"):
                assert _relative(a[key], b[key]) <= TOLERANCE, (a["step"], key)


def test_the_sharded_return_estimate_resumes_on_one_rank(runs):
    """FSDP2's return estimate is saved as rows of the head (like the warm start); on one rank it is
    loaded whole: step 4 reuses it and step 5 plays the next rollouts, as the 2-rank run did."""
    resumed, original = _metrics(runs["objfsdp-2to1"]), _metrics(runs["objfsdp-2"])
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5] and resumed[3].get("return_reused")
    state = json.loads((runs["objfsdp-2"] / "checkpoints/step-00000003/trainer_state.json").read_text())
    assert state["sharded_head_rows"]["names"] == ["last_v", "return_grad"]
    for a, b in zip(resumed[3:], original[3:]):
        for key in ("loss", "val_loss", "outer_loss", "solver_residual", "n_eff"):
            assert _relative([a[key]], [b[key]]) <= TOLERANCE, (a["step"], key)
        assert {k: a.get(k) for k in RETURN_KEYS} == {k: b.get(k) for k in RETURN_KEYS}, a["step"]


def test_grad_accum_takes_one_step_on_two_global_batches(runs):
    """Each accumulated step holds two global batches' trajectories (both ranks' shares of each)."""
    plain, accum = _debug_rows(runs["ddp-1"]), _debug_rows(runs["accum-2"])
    assert [len(r["index"]) for r in accum[:2]] == [len(plain[0]["index"]) + len(plain[1]["index"]),
                                                    len(plain[2]["index"]) + len(plain[3]["index"])]  # fmt: skip
    assert accum[0]["index"] == plain[0]["index"] + plain[1]["index"]


def test_refiltering_under_ddp_trains_on_the_chosen_set_and_resumes_on_another_rank_count(runs):
    rows = _metrics(runs["refilter-2"])
    assert [r["step"] for r in rows if "refilter" in r] == [2, 4]
    kept = rows[1]["refilter"]["kept"]
    assert sum(k for k, _ in kept.values()) < sum(n for _, n in kept.values())  # it dropped some
    resumed = _metrics(runs["refilter-2to1"])
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5]
    for a, b in zip(resumed[3:], rows[3:]):  # step 4 trains on the set chosen at step 2, from the checkpoint
        for key in ("loss", "val_loss", "real_train_loss", "n_eff"):
            assert _relative([a[key]], [b[key]]) <= TOLERANCE, (a["step"], key)
    assert resumed[3]["refilter"] == {**rows[3]["refilter"], "seconds": resumed[3]["refilter"]["seconds"]}


def test_one_parallel_rank_computes_what_the_single_process_trainer_does(runs, assets):
    plain = _metrics(runs["plain"])
    final, start = _final_parameters(runs["plain"]), load_file(str(assets[0] / "model.safetensors"))
    assert max(_relative(final[n], start[n]) for n in final) > 100 * TOLERANCE  # training moved them
    for kind in KINDS:
        for a, b in zip(_metrics(runs[f"{kind}-1"]), plain):
            for key in ("loss", "val_loss", "n_eff", "solver_residual"):
                assert _relative([a[key]], [b[key]]) <= 1e-6, (kind, a["step"], key)
        ours = _final_parameters(runs[f"{kind}-1"])
        assert all(_relative(ours[n], final[n]) <= TOLERANCE for n in final), kind


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("direction", ["2to1", "1to2"])
def test_a_run_resumes_on_another_number_of_ranks_with_the_same_losses(runs, kind, direction):
    source = runs[f"{kind}-{direction[0]}"]
    resumed = _metrics(runs[f"{kind}-{direction}"])
    original = _metrics(source)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5]
    assert resumed[:3] == original[:3]  # the rows up to the checkpoint, kept as they were
    assert [r["step"] for r in _debug_rows(runs[f"{kind}-{direction}"])] == [1, 2, 3, 4, 5]
    for a, b in zip(resumed[3:], original[3:]):
        for key in (
            "loss",
            "val_loss",
            "real_train_loss",
            "n_eff",
            "solver_residual",
        ):  # residual: the warm start
            assert _relative([a[key]], [b[key]]) <= TOLERANCE, (kind, direction, a["step"], key)
    state = json.loads(
        (runs[f"{kind}-{direction}"] / "checkpoints/step-00000005/trainer_state.json").read_text()
    )
    assert state["parallel"] == {"mode": kind, "world_size": int(direction[-1])}


@pytest.mark.parametrize("resumed_as", ["ddp-2to1-fsdp2", "fsdp2-2to1-ddp"])
def test_a_checkpoint_resumes_under_the_other_parallel_kind(runs, resumed_as):
    """DDP's replicated warm start v resumed as FSDP2's rows, and FSDP2's rows of v (saved sharded in
    dcp/) resumed whole under DDP."""
    original_run = {"ddp-2to1-fsdp2": "ddp-2", "fsdp2-2to1-ddp": "fsdp2-2"}[resumed_as]
    resumed, original = _metrics(runs[resumed_as]), _metrics(runs[original_run])
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5]
    for a, b in zip(resumed[3:], original[3:]):
        for key in ("loss", "val_loss", "n_eff", "solver_residual"):
            assert _relative([a[key]], [b[key]]) <= TOLERANCE, (a["step"], key)


def test_non_finite_steps_are_skipped_on_every_rank_and_ddp_goes_on(runs):
    rows = _metrics(runs["diverging"])
    assert [r["step"] for r in rows] == [1, 2, 3] and "loss" not in rows[0].get("skipped", [])
    assert all("loss" in r["skipped"] for r in rows[1:])  # the same decision on both ranks, no hang


def test_fsdp2_checkpoints_are_sharded_per_rank(runs):
    folder = runs["fsdp2-2"] / "checkpoints" / "step-00000005"
    assert sorted(p.name for p in (folder / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (folder / "head.safetensors").is_file() and not (folder / "model.safetensors").exists()


def test_a_single_process_run_refuses_a_parallel_checkpoint(runs, assets, tmp_path):
    copy = shutil.copytree(runs["ddp-1"], tmp_path / "run")
    cfg = load_config(TrainConfig, None, _overrides(assets, copy, "none", steps=6))
    with pytest.raises(RunDirError, match="written by a parallel run.*torchrun"):
        Trainer(cfg, progress=False).train(resume=True)


# ------------------------------------------------------------------ without a process group


def _ranks(world: int) -> list[TorchRun]:
    """TorchRun objects of each rank of a world, for the parts that need no process group."""
    out = []
    for rank in range(world):
        p = TorchRun.__new__(TorchRun)
        p.rank, p.world = rank, world
        out.append(p)
    return out


def test_ranks_collate_disjoint_shares_and_an_empty_share_is_a_phantom(assets):
    from transformers import AutoTokenizer

    from boost.train import prepare_data

    cfg = load_config(TrainConfig, None, _overrides(assets, Path("unused"), "none"))
    packer = prepare_data(cfg.data, AutoTokenizer.from_pretrained(assets[0])).train
    positions = [0, 1, 2]
    shares = [p.collate(packer)(positions) for p in _ranks(2)]
    assert all(s.rows == 1 for s in shares)
    index = [t.index for t in packer.trajectories]
    assert shares[0].trajectory_index.tolist() == [index[0], index[2]] and shares[
        0
    ].global_order.tolist() == [0, 2]
    assert shares[1].trajectory_index.tolist() == [index[1]] and shares[1].global_order.tolist() == [1]
    assert {s.global_size for s in shares} == {3}
    lone = [p.collate(packer)([5]) for p in _ranks(2)]
    assert lone[0].global_order.tolist() == [0]
    phantom = lone[1]  # nothing left for rank 1: a copy of the trajectory with no counted token
    assert phantom.global_order.tolist() == [-1] and phantom.num_counted.tolist() == [0]
    assert bool((phantom.labels == -100).all()) and bool((phantom.segment_ids == -1).all())
    moved = phantom.to("cpu")
    assert type(moved) is type(phantom) and moved.global_size == 1


def test_with_rows_a_share_keeps_only_the_rows_it_fills(assets):
    from transformers import AutoTokenizer

    from boost.train import prepare_data

    cfg = load_config(TrainConfig, None, [*_overrides(assets, Path("unused"), "none"), "data.rows=4",
                                          "data.max_length=256"])  # fmt: skip
    packer = prepare_data(cfg.data, AutoTokenizer.from_pretrained(assets[0])).train
    positions = max(packer.plan(0), key=len)  # the fullest batch of the epoch
    whole = packer.collate(positions)
    shares = [p.collate(packer)(positions) for p in _ranks(2)]
    assert sum(s.num_segments for s in shares) == whole.num_segments and whole.rows == 4
    assert all(s.rows < whole.rows and s.num_tokens == 256 * s.rows for s in shares)
    assert sorted(i for s in shares for i in s.trajectory_index.tolist()) == sorted(
        whole.trajectory_index.tolist()
    )


def test_a_view_takes_and_scatters_this_ranks_trajectories():
    local = torch.tensor([2, 0, -1])
    view = BatchView(4, local, *([torch.zeros(4)] * 7), None)
    x = torch.tensor([10.0, 11.0, 12.0, 13.0], requires_grad=True)
    taken = view.take(x)
    assert taken.tolist() == [12.0, 10.0, 0.0]
    taken.sum().backward()
    assert x.grad.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert view.scatter(torch.tensor([1.0, 2.0, 3.0])).tolist() == [2.0, 0.0, 1.0, 0.0]


def test_parallel_settings_are_checked_before_anything_runs(monkeypatch):
    with pytest.raises(ValueError, match="parallel must be one of none, ddp, fsdp2"):
        TrainConfig(parallel="deepspeed")
    with pytest.raises(ValueError, match="parallel_debug checks the ranks"):
        TrainConfig(parallel_debug=True)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ParallelError, match="torchrun --standalone --nproc-per-node N"):
        make_parallel("ddp", "cpu")


@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_ranks_play_their_share_of_the_test_tasks_and_gather_them_in_task_order(runs, kind):
    """Each rank plays tasks rank, rank + N, ... (FSDP2: on a plain copy of the gathered model); the
    gathered episodes are those one process plays, reply for reply (eval.batch_size=1)."""
    one = json.loads((runs["play"] / "play-none-1.json").read_text())
    two = json.loads((runs["play"] / f"play-{kind}-2.json").read_text())
    assert len(one) == 6 and len({r["task"] for r in one}) == 6
    assert two == one
    assert len({json.dumps(r["messages"][2:]) for r in one}) > 1  # the replies differ between tasks


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_end_of_run_evaluation_on_two_ranks_is_the_one_of_one_rank(runs, kind):
    """Test episodes split over the ranks and gathered, the held-out test loss and accuracy sharded."""
    two, one = (json.loads((runs[f"eval{kind}-{n}"] / "final.json").read_text()) for n in (2, 1))
    assert two["episodes"] == one["episodes"] == 4
    for key in ("success_rate", "mean_return", "mean_turns", "invalid_per_turn", "test_agent_token_accuracy"):
        assert two[key] == one[key], key
    assert _relative([two["test_loss"]], [one["test_loss"]]) <= TOLERANCE


def test_fsdp2_with_lora_trains_only_the_adapters_and_the_head_and_resumes_on_one_rank(runs, assets):
    final, start = _final_parameters(runs["lora-2"]), load_file(str(assets[0] / "model.safetensors"))
    assert final.keys() == start.keys()  # out_dir/model: the adapters merged into a plain checkpoint
    moved = {n for n in final if not torch.equal(final[n], start[n])}
    assert "lm_head.weight" in moved and any("proj" in n for n in moved)  # the head and merged adapters
    assert torch.equal(final["model.embed_tokens.weight"], start["model.embed_tokens.weight"])  # frozen
    resumed, original = _metrics(runs["lora-2to1"]), _metrics(runs["lora-2"])
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5]
    for a, b in zip(resumed[3:], original[3:]):
        for key in ("loss", "val_loss", "real_train_loss", "n_eff"):
            assert _relative([a[key]], [b[key]]) <= TOLERANCE, (a["step"], key)
