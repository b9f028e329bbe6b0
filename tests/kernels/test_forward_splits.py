"""The forward's vocabulary splits (``triton_ops.forward_splits``): the token blocks in flight keep
their hidden rows within ``L2_HIDDEN_BYTES`` at the issue's target shapes, the split rule is the old
one wherever their rows fit (every interpreter run), and a forced split still gives the loss."""

from __future__ import annotations

import pytest
import torch

from boost_kernels import triton_ops
from tests.kernels import reference
from tests.kernels.cases import fresh_seed

TARGETS = [(16384, 4096, 128256), (65536, 8192, 256000)]
CARDS = {80: 108, 90: 132}  # SMs of an A100 and an H100, as in boost_kernels.launch_capture


def _old_rule(T, V, cfg, num_sms):
    t_blocks, v_blocks = -(-T // cfg.block_t), -(-V // cfg.block_v)
    wanted = max(1, -(-4 * num_sms // t_blocks))
    per_split = -(-v_blocks // min(wanted, v_blocks)) * cfg.block_v
    return per_split, -(-V // per_split)


@pytest.mark.parametrize("shape", TARGETS, ids=["T16k_D4k_V128k", "T64k_D8k_V256k"])
@pytest.mark.parametrize("arch", sorted(CARDS))
@pytest.mark.parametrize("tangent", [False, True], ids=["loss", "jvp_with_dh"])
def test_hidden_rows_in_flight_fit_the_bound_at_the_targets(shape, arch, tangent):
    T, D, V = shape
    cfg = triton_ops.GPU_CONFIGS[arch][("stats", tangent, False)]
    rows = (1 + tangent) * cfg.block_t * D * 2  # bf16 hidden (and tangent_hidden) rows of one block
    per_split, splits = triton_ops.forward_splits(T, V, cfg, CARDS[arch], rows)
    assert per_split % cfg.block_v == 0
    assert (splits - 1) * per_split < V <= splits * per_split, "an empty or missing vocabulary split"
    in_flight = min(-(-T // cfg.block_t), -(-CARDS[arch] // splits))
    assert in_flight * rows <= triton_ops.L2_HIDDEN_BYTES, (splits, in_flight)
    assert splits >= _old_rule(T, V, cfg, CARDS[arch])[1]


@pytest.mark.parametrize("T", [1, 33, 200, 4096])
@pytest.mark.parametrize("D", [16, 256, 1024])
@pytest.mark.parametrize("num_sms", [2, 132])
def test_split_rule_unchanged_where_the_rows_fit(T, D, num_sms):
    cfg = triton_ops.INTERPRETER_CONFIG
    rows = cfg.block_t * D * 4
    assert min(-(-T // cfg.block_t), num_sms) * rows <= triton_ops.L2_HIDDEN_BYTES
    for V in (37, 161, 32000):
        assert triton_ops.forward_splits(T, V, cfg, num_sms, rows) == _old_rule(T, V, cfg, num_sms)


@pytest.mark.skipif(not triton_ops.interpreting(), reason="interpreter run")
def test_bound_forces_splits_and_the_loss_is_unchanged(monkeypatch):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    T, D, V = 256, 16, 200  # 8 token blocks of 32: one split under the old rule on the interpreter's 2 "SMs"
    hidden, weight = torch.randn(T, D, generator=g), torch.randn(V, D, generator=g) / D**0.5
    labels = torch.randint(0, V, (T,), generator=g)
    cfg = triton_ops.INTERPRETER_CONFIG
    assert triton_ops.forward_splits(T, V, cfg, 2, cfg.block_t * D * 4)[1] == 1
    one = triton_ops.token_losses(hidden, weight, None, labels, None)
    monkeypatch.setattr(triton_ops, "L2_HIDDEN_BYTES", 1)
    assert triton_ops.forward_splits(T, V, cfg, 2, cfg.block_t * D * 4)[1] == 2
    two = triton_ops.token_losses(hidden, weight, None, labels, None)
    ref = reference.token_losses(hidden, weight, None, labels)
    for name, k in (("loss", 0), ("lse", 1)):
        assert reference.rel_err(two[k], one[k]) <= 1e-6, f"{name}: seed={seed}"
    assert reference.rel_err(two[0], ref) <= 1e-5, f"seed={seed}"
