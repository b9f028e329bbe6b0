"""The trainer's precision and attention settings on the CPU: the choice is printed at start, bf16
autocast keeps float32 master weights, and the flash-attention path's inputs train like the block mask.

The flash path runs here through ``transformers``' flash-attention code with the PyTorch reference of
the varlen kernel (``tests/data/test_attention_paths.py`` says what that proves); on a GPU the
``attention`` row of ``benchmarks/gpu_suite.py`` runs the real kernel.
"""

from __future__ import annotations

import logging

import pytest
import torch
import transformers.modeling_flash_attention_utils as flash_utils

import boost.train.attention_backend as backend
import boost.train.evaluation as evaluation
import boost.train.loop as loop
from benchmarks.kill_resume import make_assets
from boost.data.attention import reference_varlen_attention
from boost.train import Trainer
from tests.test_train import _config, _metrics


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("precision"))


def test_the_cpu_trains_in_float32_and_says_so(assets, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="boost.train.loop"):
        trainer = Trainer(_config(assets, tmp_path, "steps=1"), progress=False)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("precision:")]
    assert lines == ["precision: fp32 (precision=auto on the CPU); attention: block_mask "
                     "(model.attention=auto: SDPA with the block mask; flash_varlen needs a CUDA device)"]  # fmt: skip
    assert trainer.precision == "fp32" and trainer.attention == "block_mask"


def test_bf16_autocast_keeps_float32_master_weights(assets, tmp_path):
    fp32 = Trainer(_config(assets, tmp_path / "fp32", "steps=2", "precision=fp32"), progress=False)
    bf16 = Trainer(_config(assets, tmp_path / "bf16", "steps=2", "precision=bf16"), progress=False)
    batch = next(loop._cycle(bf16.data.train))
    with torch.no_grad():
        exact, rounded = fp32.hidden_states(batch), bf16.hidden_states(batch)
    assert rounded.dtype == torch.float32  # handed on in float32 to the fused loss and the hypergradient
    gap = float((rounded - exact).norm() / exact.norm())
    assert 1e-4 < gap < 5e-2  # the trunk really ran in bf16, and stayed close
    bf16.train()
    rows = _metrics(tmp_path / "bf16")
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())
    assert all(s.dtype == torch.float32 for st in bf16.opt.state.values() for s in st.values() if s.ndim)


def test_the_flash_path_trains_like_the_block_mask(assets, tmp_path, monkeypatch):
    """The trainer's flash-attention wiring (every forward: inner, validation, evaluation), with the
    reference kernel standing in for flash-attn's: the same losses as the block mask."""
    calls = []

    def kernel(*args, **kwargs):
        calls.append(1)
        return reference_varlen_attention(*args, **kwargs)

    process = flash_utils._lazy_define_process_function(reference_varlen_attention)
    run = ("steps=2", "solver.steps=2", "checkpoint_every=0")
    Trainer(_config(assets, tmp_path / "mask", *run, "model.attention=block_mask"), progress=False).train()
    monkeypatch.setattr(
        flash_utils,
        "lazy_import_flash_attention",
        lambda *a, **k: ((None, kernel, None, None, None), (process, dict)),
    )
    monkeypatch.setattr(loop, "resolve_attention", lambda *a, **k: ("flash_varlen", "test: reference kernel"))
    # set_attn_implementation("flash_attention_2") refuses without flash-attn: set the config directly
    monkeypatch.setattr(backend, "set_implementation", lambda model, name: setattr(
        model.config, "_attn_implementation", name))  # fmt: skip
    generated_with = []
    monkeypatch.setattr(evaluation, "task_success", lambda model, *a, **k: generated_with.append(
        model.config._attn_implementation) or {})  # fmt: skip
    flash = Trainer(_config(assets, tmp_path / "flash", *run, "eval.episodes=1"), progress=False)
    assert flash.model.config._attn_implementation == "flash_attention_2"
    flash.train()
    assert flash.attention == "flash_varlen" and calls
    # rollouts (generate) ran with sdpa, and training's flash attention came back after them
    assert generated_with == ["sdpa"] and flash.model.config._attn_implementation == "flash_attention_2"
    for a, b in zip(_metrics(tmp_path / "flash"), _metrics(tmp_path / "mask")):
        for key in ("loss", "val_loss", "n_eff", "real_train_loss"):
            if b[key] is None:  # a batch without real trajectories logs null on both paths
                assert a[key] is None, key
            else:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key


def test_the_finite_differences_of_block_trainable_run_in_float32_under_bf16(assets, tmp_path, monkeypatch):
    seen, original = [], loop.Trainer.hidden_states

    def hidden_states(self, batch, precision=None):
        seen.append(precision or self.precision)
        return original(self, batch, precision)

    monkeypatch.setattr(loop.Trainer, "hidden_states", hidden_states)
    run = ("steps=1", "precision=bf16", "block=trainable", "solver.method=identity", "checkpoint_every=0")
    trainer = Trainer(_config(assets, tmp_path, *run), progress=False)
    trainer.train()
    # inner step and validation forward in bf16; the two central differences of the scores in float32
    assert seen[:2] == ["bf16", "bf16"] and seen[2:4] == ["fp32", "fp32"]
    monkeypatch.setattr(backend, "flash_attn_installed", lambda: True)
    choice, why = backend.resolve_attention("auto", torch.device("cuda"), "bf16", fp32_forwards=True)
    assert choice == "block_mask" and "block=trainable" in why
