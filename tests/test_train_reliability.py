"""Trainer defects that leaked held-out tasks, poisoned checkpoints or overwrote runs (issue 13), on
the tiny chat model of the trainer tests: held-out tasks, non-finite steps, out_dir handling,
resume, and the command line."""

from __future__ import annotations

import json
import logging
import math
import shutil

import pytest
import torch

from boost.data import Trajectory, write_jsonl
from boost.data.reader import read_trajectories
from boost.envs import make_env
from boost.generate import main as generate_main
from boost.generators import GeneratorConfig, generate
from boost.train import Trainer, prepare_data
from boost.train.loop import _cycle
from tests.envs.tiny_chat_lm import save_tiny_chat_model
from tests.test_train import _config, _metrics, saved_checkpoint

SEEDLESS = ("inner_seconds", "outer_seconds")
# Errors are caught by their base classes (NonFiniteStepError is a FloatingPointError, RunDirError a
# ValueError), so that on the code before issue 13 these tests fail on its behaviour, not an import.


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The tiny chat model and gridnav data of tests/test_train.py."""
    root = tmp_path_factory.mktemp("reliability")
    data = root / "data.jsonl"
    assert (
        generate_main(["--env", "gridnav", "--out", str(data), "--sources", "real:24,corrupt:16,eps0.3:16"])
        == 0
    )
    return save_tiny_chat_model(root / "model"), data


def _fast(assets, out, *overrides):
    """The trainer tests' config on shorter batches, without outer steps unless asked (CPU seconds)."""
    return _config(
        assets, out, "data.token_budget=384", "data.max_length=192", "weighting.method=uniform", *overrides
    )


def _no_nan(name):
    raise AssertionError(f"{name} in metrics.jsonl")


def _strict_rows(out):
    """metrics.jsonl parsed line by line as strict JSON (no NaN / Infinity)."""
    return [
        json.loads(line, parse_constant=_no_nan) for line in (out / "metrics.jsonl").read_text().splitlines()
    ]


def _without_times(rows):
    return [{k: v for k, v in row.items() if k not in SEEDLESS} for row in rows]


def _content_key(task_id):
    env, _, _ = task_id.rpartition("/")
    return make_env(env).task(task_id).key


# ---------------------------------------------------------------- 1. held-out tasks never train


def test_no_synthetic_trajectory_of_a_held_out_task_reaches_training(assets, tmp_path):
    gridnav, _ = read_trajectories(assets[1])
    copies = [Trajectory(t.messages, "copy", t.reward, t.task_id) for t in gridnav if t.is_real]  # same ids
    guess = generate(GeneratorConfig("guess", {"real": 12, "eps0.3": 48}))  # secrets repeat across seeds
    path = tmp_path / "data.jsonl"
    write_jsonl(path, [*gridnav, *copies, *guess])
    cfg = _config(assets, tmp_path / "run", f"data.path={path}").data
    from transformers import AutoTokenizer

    data = prepare_data(cfg, AutoTokenizer.from_pretrained(assets[0]))
    held_ids = {t.task_id for p in (data.validation, data.test) if p for t in p.trajectories}
    held_keys = {_content_key(t) for t in held_ids}
    train_ids = {t.task_id for t in data.train.trajectories}
    assert not train_ids & held_ids
    assert not {_content_key(t) for t in train_ids} & held_keys
    synthetic = [t for t in [*copies, *guess] if not t.is_real]
    expected = sum(t.task_id in held_ids or _content_key(t.task_id) in held_keys for t in synthetic)
    assert expected > 0 and any(
        f"excluded {expected} synthetic trajectories" in line for line in data.summary
    )


def test_keeping_held_out_synthetic_data_is_a_switch_with_a_warning(tmp_path, caplog):
    from boost.train.config import DataConfig
    from boost.train.selection import select_trajectories

    path = tmp_path / "data.jsonl"
    real = generate(GeneratorConfig("guess", {"real": 12}))
    write_jsonl(path, [*real, *(Trajectory(t.messages, "copy", t.reward, t.task_id) for t in real)])
    excluded = select_trajectories(DataConfig(path=str(path)))
    kept = select_trajectories(DataConfig(path=str(path), keep_held_out_synthetic=True))
    assert excluded.excluded and not kept.excluded
    assert len(kept.train) == len(excluded.train) + len(excluded.excluded)
    assert "WARNING" in kept.summary[2] and "measure tasks the model has trained on" in caplog.text


OFFLINE_ENVS = [
    "gridnav",
    "guess",
    "textarena:GuessTheNumber-v0",
    "textarena:Mastermind-v0",
    "textarena:TowerOfHanoi-v0",
    "textarena:FrozenLake-v0",
    "textarena:FrozenLake-v0-hardcore-compact",
    "textarena:Minesweeper-v0-small",
]
README_SOURCES = ("real", "expert_shifted", "eps0.1", "eps0.3", "eps0.6", "random", "corrupt")


@pytest.mark.parametrize("env", OFFLINE_ENVS)
def test_generated_data_of_every_offline_environment_leaks_no_held_out_task(env, tmp_path):
    pytest.importorskip("textarena") if env.startswith("textarena") else None
    from boost.data.split import environment_task_keys
    from boost.train.config import DataConfig
    from boost.train.selection import select_trajectories

    counts = {source: 24 if source == "real" else 12 for source in README_SOURCES}
    path = tmp_path / "data.jsonl"
    write_jsonl(path, generate(GeneratorConfig(env, counts), progress=False))
    chosen = select_trajectories(DataConfig(path=str(path)))
    held_ids = {t.task_id for t in chosen.validation + chosen.test}
    keys = environment_task_keys({t.task_id for t in chosen.train + chosen.excluded} | held_ids)
    held_keys = {keys[t] for t in held_ids}
    leaked = [
        t for t in chosen.train if not t.is_real and (t.task_id in held_ids or keys[t.task_id] in held_keys)
    ]
    assert leaked == []
    assert sum(not t.is_real for t in chosen.train) + len(chosen.excluded) == 12 * (len(README_SOURCES) - 1)
    assert f"excluded {len(chosen.excluded)} synthetic trajectories" in " ".join(chosen.summary)


# ---------------------------------------------------------------- 2. non-finite steps


def _head_and_model(trainer):
    return [p.detach().clone() for p in [*trainer.head.parameters(), *trainer.model.parameters()]]


def _unchanged(before, trainer):
    return all(torch.equal(a, b) for a, b in zip(before, _head_and_model(trainer)))


def test_a_nonfinite_validation_loss_or_head_weight_skips_the_update(assets, tmp_path, monkeypatch):
    trainer = Trainer(_fast(assets, tmp_path, "weighting.method=boost"), progress=False)
    batch, val = next(_cycle(trainer.data.train)), next(_cycle(trainer.data.validation))
    _, state = trainer.inner_step(batch)
    head_block = trainer.outer.head_block

    def nan_validation_loss(*args):
        _, hyper = head_block(*args)
        return torch.tensor(float("nan")), hyper

    monkeypatch.setattr(trainer.outer, "head_block", nan_validation_loss)
    before = _head_and_model(trainer)
    record = trainer.outer_step(batch, state, val)
    assert _unchanged(before, trainer) and record.get("skipped") == ["validation_loss"]
    head_forward = trainer.head.forward
    monkeypatch.setattr(trainer.head, "forward", lambda features: head_forward(features) * float("nan"))
    record, _ = trainer.inner_step(batch)
    assert _unchanged(before, trainer) and record.get("skipped") == ["loss", "head_weights"]


def test_a_run_with_one_bad_step_finishes_and_reports_it(assets, tmp_path, monkeypatch):
    trainer = Trainer(
        _fast(assets, tmp_path, "weighting.method=boost", "steps=3", "solver.steps=1"), progress=False
    )
    calls, forward = [], trainer.head.forward

    def nan_once(features):  # the head's weights are NaN at step 2 only
        calls.append(1)
        return forward(features) * (float("nan") if len(calls) == 2 else 1.0)

    monkeypatch.setattr(trainer.head, "forward", nan_once)
    trainer.train()
    rows = _strict_rows(tmp_path)
    assert [r.get("skipped") for r in rows] == [None, ["loss", "head_weights"], None]
    assert "val_loss" not in rows[1] and rows[2]["val_loss"] is not None
    from boost.train.report import write_report

    assert "Skipped 1 steps with a non-finite number (steps 2)." in write_report(tmp_path, []).read_text()


def test_lr_1e30_stops_after_max_bad_steps_and_keeps_the_last_good_checkpoint(assets, tmp_path):
    run = ("optim.lr=1e30", "weighting.method=uniform", "steps=10", "checkpoint_every=1", "max_bad_steps=3")
    message = (
        r"stopped at step 4: 3 steps in a row \(max_bad_steps=3\) had a non-finite loss \(the last good step "
        r"was 1\).*checkpoint .* of step 1 is intact"
    )
    with pytest.raises(FloatingPointError, match=message):
        Trainer(_fast(assets, tmp_path / "a", *run), progress=False).train()
    rows = _strict_rows(tmp_path / "a")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["loss"] is None for r in rows] == [False] + [
        True
    ] * 3
    kept = saved_checkpoint(tmp_path / "a")
    assert kept["step"] == 1 and all(torch.isfinite(v).all() for v in kept["model"].values())
    # the good step, run again: the same checkpoint bit for bit
    Trainer(_fast(assets, tmp_path / "b", *run[:-3], "steps=1"), progress=False).train()
    again = saved_checkpoint(tmp_path / "b")["model"]
    assert all(torch.equal(kept["model"][k], again[k]) for k in kept["model"])
    # --resume from the kept checkpoint replays the same steps and stops the same way
    with pytest.raises(FloatingPointError, match=message):
        Trainer(_fast(assets, tmp_path / "a", *run), progress=False).train(resume=True)
    assert _without_times(_strict_rows(tmp_path / "a")) == _without_times(rows)


def test_resume_after_a_divergence_reproduces_the_good_steps_bit_for_bit(assets, tmp_path, monkeypatch):
    run = ("weighting.method=boost", "solver.steps=2", "steps=6", "checkpoint_every=2", "max_bad_steps=2")
    Trainer(_fast(assets, tmp_path / "reference", *run), progress=False).train()
    save = Trainer.save_checkpoint

    def diverge_after_step_2(self):  # the learning rate explodes once the step-2 checkpoint is saved
        path = save(self)
        if self.step == 2:
            self.opt.param_groups[0]["lr"] = 1e30
        return path

    monkeypatch.setattr(Trainer, "save_checkpoint", diverge_after_step_2)
    with pytest.raises(FloatingPointError, match="checkpoint .* of step 2 is intact"):
        Trainer(_fast(assets, tmp_path / "run", *run), progress=False).train()
    monkeypatch.setattr(Trainer, "save_checkpoint", save)
    _strict_rows(tmp_path / "run")
    Trainer(_fast(assets, tmp_path / "run", *run), progress=False).train(resume=True)
    assert _without_times(_strict_rows(tmp_path / "run")) == _without_times(
        _strict_rows(tmp_path / "reference")
    )
    ours, ref = (saved_checkpoint(tmp_path / d) for d in ("run", "reference"))
    assert all(torch.equal(ours["model"][k], ref["model"][k]) for k in ref["model"])


# ---------------------------------------------------------------- 5, 7. out_dir, resume


def test_a_finished_run_is_refused_not_overwritten(assets, tmp_path):
    Trainer(_fast(assets, tmp_path, "steps=2"), progress=False).train()
    before = {str(p): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(
        ValueError, match="already holds a run .*--resume to continue it, --overwrite to replace"
    ):
        Trainer(_fast(assets, tmp_path, "steps=3"), progress=False).train()
    assert {str(p): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    Trainer(_fast(assets, tmp_path, "steps=1"), progress=False).train(overwrite=True)
    assert [m["step"] for m in _metrics(tmp_path)] == [1]


def test_resume_drops_rows_logged_after_the_checkpoint_and_stale_temporaries(assets, tmp_path):
    Trainer(_fast(assets, tmp_path, "steps=2"), progress=False).train()
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    with open(tmp_path / "metrics.jsonl", "a") as f:  # a run killed after logging steps 3 and 4
        f.write(rows[0].replace('"step": 1', '"step": 3') + "\n" + rows[1].replace('"step": 2', '"step": 4'))
        f.write('\n{"step": 5, "lo')
    stale = tmp_path / ".checkpoint.pt.k1ll3d.tmp.pt"
    stale.write_bytes(b"half a checkpoint")
    half_folder = tmp_path / "checkpoints" / ".step-00000003.k1ll3d.tmp"  # a save killed mid-way
    half_folder.mkdir()
    (half_folder / "optimizer.pt").write_bytes(b"half a checkpoint")
    Trainer(_fast(assets, tmp_path, "steps=4"), progress=False).train(resume=True)
    assert [m["step"] for m in _strict_rows(tmp_path)] == [1, 2, 3, 4] and not stale.exists()
    assert not half_folder.exists()


def test_a_moved_run_resumes_and_a_refusal_names_the_keys(assets, tmp_path):
    Trainer(_fast(assets, tmp_path / "a", "steps=2"), progress=False).train()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    Trainer(_fast(assets, tmp_path / "b", "steps=3"), progress=False).train(resume=True)
    assert [m["step"] for m in _metrics(tmp_path / "b")] == [1, 2, 3]
    with pytest.raises(
        ValueError, match=r"optim.lr: 0.0001 in the checkpoint, 0.5 now; seed: 0 in the checkpoint"
    ):
        Trainer(_fast(assets, tmp_path / "a", "steps=5", "optim.lr=0.5", "seed=1"), progress=False).train(
            resume=True
        )


# ---------------------------------------------------------------- 8. the command line


def _cli(capsys, *args):
    from boost.train.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()[-1]


def test_cli_data_errors_are_one_line_with_exit_2_before_the_model_loads(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    no_model = f"model.name={tmp_path / 'no-such-model'}"  # loading it would fail: the data fails first
    code, line = _cli(capsys, f"data.path={empty}", "--quiet", no_model, f"out_dir={tmp_path / 'run'}")
    assert code == 2 and line.startswith("python -m boost.train: error: ")  # no usage banner above it
    assert (
        f"{empty}: the file is empty (no record in it); point data.path at the data or regenerate it" in line
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"messages": [{"role": "assistant", "content": "x"}], "source": "real"}\n{"messages": [\n'
    )
    code, line = _cli(capsys, f"data.path={bad}", "data.strict=true", no_model, f"out_dir={tmp_path / 'run'}")
    assert (
        code == 2
        and f"{bad}:2: malformed_json" in line
        and "(fix: write exactly one complete JSON object" in line
    )
    assert not (tmp_path / "run").exists()  # nothing was created for a run that could not start


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_device_cuda_without_cuda_is_one_line(tmp_path, capsys):
    code, line = _cli(capsys, "device=cuda", f"out_dir={tmp_path}")
    assert code == 2 and "device=cuda but this torch" in line and "use device=cpu or device=auto" in line


def test_cli_refuses_an_existing_run_and_stops_a_diverging_one_with_exit_1(assets, tmp_path, capsys):
    model, data = assets
    args = [f"data.path={data}", f"model.name={model}", f"out_dir={tmp_path}", "data.token_budget=384",
            "data.max_length=192", "steps=6", "weighting.method=uniform", "optim.lr=1e30", "max_bad_steps=2"]  # fmt: skip
    code, line = _cli(capsys, *args, "--quiet")
    assert code == 1 and "stopped at step 3: 2 steps in a row" in line
    assert math.isfinite(_strict_rows(tmp_path)[0]["loss"])
    code, line = _cli(capsys, *args)
    assert code == 2 and "already holds a run" in line and "--resume" in line and "--overwrite" in line


def test_each_data_summary_line_is_logged_once(assets, tmp_path, caplog):
    """The reader, the selection and the tokeniser log their lines as they go; the trainer does not
    log the summary again, and the evaluation's replanning of epoch 0 logs nothing new."""
    caplog.set_level(logging.INFO)
    Trainer(_fast(assets, tmp_path, "steps=2"), progress=False).train()
    lines = [r.getMessage().split("\n")[0] for r in caplog.records]
    for start in ("real tasks:", "excluded ", "train: tokenised", "validation: tokenised", "train, epoch 0:"):
        assert sum(line.startswith(start) for line in lines) == 1, start
    assert sum("read " in line and " records" in line for line in lines) == 1
