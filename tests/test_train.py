"""The trainer end to end on a tiny chat model and generated gridnav data (CPU, seconds), and its
config loading: files written, outer-step metrics, resume, atomic checkpoints, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from boost.config import load_config
from boost.generate import main as generate
from boost.train import TrainConfig, Trainer
from boost.train.checkpoint_io import latest_checkpoint, read_checkpoint
from boost.train.loop import _cycle
from boost.train.report import write_report
from tests.envs.tiny_chat_lm import save_tiny_chat_model


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    model = save_tiny_chat_model(root / "model")
    data = root / "data.jsonl"
    assert (
        generate(["--env", "gridnav", "--out", str(data), "--sources", "real:24,corrupt:16,eps0.3:16"]) == 0
    )
    return model, data


def _config(assets, out, *overrides):
    model, data = assets
    base = [f"data.path={data}", f"model.name={model}", f"out_dir={out}", "data.token_budget=1024",
            "data.max_length=512", "steps=4", "eval.episodes=0"]  # fmt: skip
    return load_config(TrainConfig, None, [*base, *overrides])


def saved_checkpoint(out):
    """The newest checkpoint of the run in ``out``: trainer_state.json plus the model tensors."""
    return read_checkpoint(latest_checkpoint(out))


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_boost_run_writes_metrics_checkpoint_and_report(assets, tmp_path):
    trainer = Trainer(_config(assets, tmp_path), progress=False)
    final = trainer.train()
    report = write_report(trainer.out, trainer.data.summary)
    metrics = _metrics(tmp_path)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for m in metrics:  # an outer step after every inner step
        assert (
            m["n_eff"] > 0 and m["mass"] > 0 and m["weights"] and torch.isfinite(torch.tensor(m["val_loss"]))
        )
        assert set(m["weights"]) <= {"real", "corrupt", "eps0.3"}
    assert all(torch.isfinite(torch.tensor(final[k])) for k in ("validation_loss", "test_loss"))
    assert all(m["solver_residual"] is not None for m in metrics)  # always computed
    # CG warm-starts from the previous outer step's v (or says it dropped a useless guess)
    assert metrics[0]["solver_warm_started"] is False and all("solver_warm_started" in m for m in metrics)
    # batches of 2-3 trajectories: some hold no synthetic one (then no weight or distance to report)
    with_synthetic = [m for m in metrics if set(m["weights"]) - {"real"}]
    assert with_synthetic and all(
        m["synthetic_weight"] > 0 and m["task_shift_distance"] > 0 for m in with_synthetic
    )
    assert all(
        m["synthetic_weight"] == 0 and m["task_shift_distance"] is None
        for m in metrics
        if m not in with_synthetic
    )
    text = report.read_text()
    assert "| source |" in text and "training.png" in text and "real tasks:" in text
    assert (tmp_path / "training.png").read_bytes()[:4] == b"\x89PNG"
    assert saved_checkpoint(tmp_path)["step"] == 4
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary files or folders left


@pytest.mark.parametrize("method", ["neumann", "identity"])
def test_the_trainable_block_restores_the_model_and_moves_the_head(assets, tmp_path, method):
    # the trunk makes H indefinite (CG refuses it with a clear error): Neumann, which does not care,
    # or the AdamW look-ahead; both at θ_t (swapped in for the outer step, then the stepped θ back)
    solver = ("solver.steps=2", "solver.alpha=1e-3") if method == "neumann" else ()
    overrides = ("block=trainable", f"solver.method={method}", *solver)
    trainer = Trainer(_config(assets, tmp_path, *overrides), progress=False)
    batch, val = next(_cycle(trainer.data.train)), next(_cycle(trainer.data.validation))
    _, state = trainer.inner_step(batch)
    model_before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    head_before = [p.detach().clone() for p in trainer.head.parameters()]
    record = trainer.outer_step(batch, state, val)
    for (
        k,
        v,
    ) in trainer.model.state_dict().items():  # finite differences put every parameter back, bit for bit
        assert torch.equal(model_before[k], v), k
    assert any(not torch.equal(a, b) for a, b in zip(head_before, trainer.head.parameters()))
    assert record["n_eff"] > 0 and (record["solver_residual"] is None) == (method == "identity")


def test_the_identity_look_ahead_uses_the_pre_step_head_and_the_adamw_response(assets, tmp_path):
    """identity: σ_i on the hidden states and the head *before* the inner step, v = the AdamW step's
    own response to the post-step validation gradient (boost.bilevel.step_response; its exactness against a
    real step is tested in tests/test_step_response.py)."""
    from boost.bilevel.hypergradient import HeadBatch, trajectory_scores
    from boost.bilevel.step_response import optimizer_response

    trainer = Trainer(_config(assets, tmp_path, "solver.method=identity", "optim.lr=0.05"), progress=False)
    batch, val = next(_cycle(trainer.data.train)), next(_cycle(trainer.data.validation))
    before = trainer.lm_head.weight.detach().clone()
    _, state = trainer.inner_step(batch)
    assert torch.equal(state["pre_step"][0], before) and not torch.equal(trainer.lm_head.weight, before)
    _, hyper = trainer.outer.head_block(batch, state, val)
    W = trainer.lm_head.weight.detach().requires_grad_()
    (g,) = torch.autograd.grad(trainer.losses(trainer.hidden_states(val), val, W).loss, W)
    v = optimizer_response(trainer.opt, [trainer.lm_head.weight], [g], state["clip"])[0]
    train = HeadBatch(state["hidden"], batch.labels, batch.segment_ids, batch.num_segments)
    expected = -trajectory_scores(train, before, v) / batch.num_segments
    assert torch.allclose(hyper.traj_weights, expected, rtol=1e-4, atol=1e-12)
    post_step = -trajectory_scores(train, trainer.lm_head.weight.detach(), v) / batch.num_segments
    assert not torch.allclose(expected, post_step, rtol=1e-2)  # the head it is taken at matters
    record = trainer.outer_step(batch, state, val)
    assert record["solver_residual"] is None  # identity solves nothing


def test_the_uniform_baseline_takes_no_outer_steps(assets, tmp_path):
    trainer = Trainer(
        _config(assets, tmp_path, "weighting.method=uniform", "steps=2", "data.test=0"), progress=False
    )
    final = trainer.train()
    assert all("n_eff" not in m for m in _metrics(tmp_path))
    assert final["test_loss"] is None  # no test split: said, not NaN
    text = write_report(trainer.out, trainer.data.summary).read_text()
    assert "test none (no such split)" in text and "| source |" not in text
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=_no_nan)


def _no_nan(name):
    raise AssertionError(f"{name} in a JSON file")


def test_resume_continues_from_the_checkpoint_and_refuses_another_config(assets, tmp_path):
    Trainer(_config(assets, tmp_path, "steps=2"), progress=False).train()
    trainer = Trainer(_config(assets, tmp_path, "steps=3"), progress=False)
    trainer.train(resume=True)
    assert [m["step"] for m in _metrics(tmp_path)] == [1, 2, 3]
    with pytest.raises(ValueError, match="another config .*optim"):
        Trainer(_config(assets, tmp_path, "steps=5", "optim.lr=0.5"), progress=False).train(resume=True)


def test_a_crash_while_saving_leaves_the_previous_checkpoint_intact(assets, tmp_path, monkeypatch):
    trainer = Trainer(_config(assets, tmp_path, "steps=1"), progress=False)
    trainer.train()
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def crash(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    trainer.step = 2  # a new step's checkpoint: its optimiser file fails half-way
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint()
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert not [p for p in tmp_path.rglob(".*")]  # the half-written folder is gone


def test_data_without_real_trajectories_is_refused(assets, tmp_path):
    only_synthetic = tmp_path / "synthetic.jsonl"
    lines = [line for line in assets[1].read_text().splitlines() if '"source": "real"' not in line]
    only_synthetic.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="none of the 32 trajectories has source 'real'"):
        Trainer(_config(assets, tmp_path, f"data.path={only_synthetic}"), progress=False)


def test_config_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("steps: 7\nsolver:\n  method: neumann\n  alpha: 0.5\nhead:\n  concentration: 0.1\n")
    cfg = load_config(TrainConfig, path, ["solver.steps=3", "optim.lr=3e-5"])
    assert (cfg.steps, cfg.solver.method, cfg.solver.alpha, cfg.solver.steps) == (7, "neumann", 0.5, 3)
    assert cfg.head.concentration == 0.1 and cfg.optim.lr == 3e-5


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("stepz: 3\n", [], r"run.yaml: unknown key 'stepz' for TrainConfig; known keys: data, model"),
        ("solver:\n  method: lbfgs\n", [], r"run.yaml: solver: .*method must be one of"),
        ("solver:\n  stepz: 3\n", [], r"run.yaml: solver: unknown key 'solver.stepz' for SolverConfig"),
        ("", ["steps=many"], r"run.yaml with overrides: steps: expected an integer, got 'many'"),
        ("", ["optim.lr=fast"], r"run.yaml with overrides: optim.lr: expected a number, got 'fast'"),
        ("", ["steps"], r"override 'steps': write it as key=value"),
        ("", ["data.validation=0.9", "data.test=0.2"], r"data.validation must be in \(0, 1\)"),
        ("- 1\n", [], r"run.yaml: the top level must be a mapping"),
        (
            "",
            ["solver.method=identity", "solver.alpha=0.1"],
            r"solver.alpha is not used with solver.method=identity",
        ),
        ("", ["solver.residual=false"], r"always reports the solver's residual"),
        # the retired weighting switch: weighting.method is the one setting
        ("", ["reweight=false"], r"with overrides: reweight=false is gone: use weighting.method=uniform \("),
        (
            "reweight: true\n",
            [],
            r"run.yaml: reweight=true is gone: use weighting.method=boost \(the default",
        ),
    ],
)
def test_bad_config_names_the_file_and_key(tmp_path, text, overrides, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_config(TrainConfig, path, overrides)


def test_cli_reports_a_bad_setting_and_exits_2(capsys):
    from boost.train.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["stepz=3"])
    assert exit_info.value.code == 2
    assert "unknown key 'stepz' for TrainConfig" in capsys.readouterr().err


def test_the_kernel_settings_reach_every_fused_op_of_a_boost_step(assets, tmp_path, monkeypatch):
    import boost_kernels as bk

    seen = {"loss": [], "hvp": []}
    loss_op, hvp_op = bk.trajectory_cross_entropy, bk.trajectory_hvp

    def loss(*args, **kwargs):
        seen["loss"].append({k: kwargs.get(k, "absent") for k in ("deterministic", "grad_filter")})
        return loss_op(*args, **kwargs)

    def hvp(*args, **kwargs):
        seen["hvp"].append(kwargs.get("deterministic", "absent"))
        return hvp_op(*args, **kwargs)

    monkeypatch.setattr(bk, "trajectory_cross_entropy", loss)
    monkeypatch.setattr(bk, "trajectory_hvp", hvp)
    settings = ["steps=1", "kernels.deterministic=true", "kernels.grad_filter=true"]
    Trainer(_config(assets, tmp_path, *settings), progress=False).train()
    assert seen["loss"] and seen["hvp"]  # the inner step, the validation loss, the CG solve
    assert all(s == {"deterministic": True, "grad_filter": True} for s in seen["loss"])
    assert all(d is True for d in seen["hvp"])


def test_an_outer_step_that_leaves_the_weights_at_one_leaves_training_unchanged(assets, tmp_path):
    """BOOST with a head that cannot move (weights exactly 1) trains the model bit for bit as uniform
    weighting does: the outer step (validation forward, CG solve, head update) has no side effect on
    the model, its optimiser, the batches or the RNG."""

    def params(name, *extra):
        cfg = _config(assets, tmp_path / name, "steps=4", *extra)
        trainer = Trainer(cfg, progress=False)
        trainer.train()
        return trainer.model.state_dict()

    uniform = params("uniform", "weighting.method=uniform")
    still = params("still", "weighting.method=boost", "optim.head_lr=1e-30", "weighting.freeze_mass=true")
    assert all("val_loss" in m for m in _metrics(tmp_path / "still"))  # the outer step ran every step
    assert all(torch.equal(uniform[k], still[k]) for k in uniform)
