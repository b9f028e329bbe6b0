"""Bad input raises a clear error naming the argument; nothing is computed silently wrong."""

from __future__ import annotations

import pytest
import torch

import boost_kernels as bk

T, D, V, S = 6, 8, 20, 2


def _args(**over):
    base = dict(
        hidden=torch.randn(T, D),
        weight=torch.randn(V, D),
        labels=torch.randint(0, V, (T,)),
        segment_ids=torch.tensor([0, 0, 0, 1, 1, -1]),
        num_segments=S,
    )
    base.update(over)
    return base


@pytest.mark.parametrize(
    "over, exc, match",
    [
        (dict(hidden=torch.randn(T, D, 1)), ValueError, "hidden must have 2 dimension"),
        (dict(weight=torch.randn(V, D + 1)), ValueError, "weight must have shape"),
        (dict(weight=torch.randn(V, D).double()), TypeError, "weight has dtype"),
        (dict(hidden=torch.randint(0, 3, (T, D))), TypeError, "hidden must be float16"),
        (dict(bias=torch.randn(V + 1)), ValueError, "bias must have shape"),
        (dict(labels=torch.randint(0, V, (T + 1,))), ValueError, "labels must have shape"),
        (dict(labels=torch.rand(T)), TypeError, "labels must be an integer tensor"),
        (dict(labels=torch.full((T,), V)), ValueError, r"labels\[0\] = 20 is outside \[0, 20\)"),
        (dict(labels=torch.full((T,), -5)), ValueError, "not ignore_index"),
        (dict(segment_ids=torch.tensor([0, 0, 0, 2, 1, -1])), ValueError, r"segment_ids\[3\] = 2"),
        (dict(segment_ids=torch.tensor([0, 0, 0, -2, 1, -1])), ValueError, "outside \\[-1, num_segments"),
        (dict(num_segments=0), ValueError, "num_segments must be a positive int"),
        (dict(traj_weights=torch.tensor([1.0, float("nan")])), ValueError, "traj_weights contains NaN"),
        (dict(traj_weights=torch.ones(S + 1)), ValueError, "traj_weights must have shape"),
        (dict(normalize="avg"), ValueError, "normalize must be 'mean' or 'sum'"),
        (dict(softcap=0.0), ValueError, "softcap must be a positive"),
        (dict(normalizer=-1.0), ValueError, "normalizer must be a positive"),
        (dict(backend="cuda"), ValueError, "backend must be"),
    ],
)
def test_bad_input_names_the_argument(over, exc, match):
    with pytest.raises(exc, match=match):
        bk.trajectory_cross_entropy(**_args(**over))


def test_triton_backend_refuses_float64():
    with pytest.raises(TypeError, match="does not support float64"):
        bk.trajectory_cross_entropy(
            **_args(hidden=torch.randn(T, D).double(), weight=torch.randn(V, D).double()), backend="triton"
        )


def test_labels_at_ignored_positions_may_be_anything():
    # A label out of range is fine where the token does not count (segment -1 or ignore_index).
    labels = torch.randint(0, V, (T,))
    labels[5] = 10_000  # segment_ids[5] == -1
    out = bk.trajectory_cross_entropy(**_args(labels=labels))
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_batch_gives_zero_losses_and_zero_gradients(backend):
    hidden = torch.randn(0, D, requires_grad=True)
    weight = torch.randn(V, D, requires_grad=True)
    empty = torch.zeros(0, dtype=torch.long)
    out = bk.trajectory_cross_entropy(hidden, weight, empty, empty, S, backend=backend)
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.per_trajectory.tolist() == [0.0, 0.0]
    assert hidden.grad.shape == (0, D) and (weight.grad == 0).all()
    jvp = bk.trajectory_jvp(hidden, weight, empty, empty, S, tangent_weight=torch.ones(V, D), backend=backend)
    assert jvp.tangent.tolist() == [0.0, 0.0]
