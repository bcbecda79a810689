"""gradbook.width: muP's initialization and learning rates (Yang et al. 2022, Table 3), the coordinate check,
the learning-rate sweep, and the exponents of gradbook.theory.width_exponents that the check measures."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import gradbook as gb
from gradbook import theory
from gradbook import width as W


@pytest.fixture(scope="module")
def task():
    return gb.data.digits()


def _check(task, parametrization, optimizer, lr, widths=(128, 256, 512, 1024), steps=1):
    torch.set_num_threads(1)
    return W.coordinate_check(lambda n: W.mup_mlp(64, n, 10, depth=3, parametrization=parametrization),
                              widths, task, steps=steps, lr=lr, optimizer=optimizer, seeds=1)


def test_init_variances_follow_table_3():
    torch.manual_seed(0)
    net = W.mup_mlp(64, 1024, 10, depth=2, base_width=64)
    m = 1024 / 64
    assert net.roles == ["input", "hidden", "output"]
    expected = [1 / 64, 1 / 1024, 1 / (1024 * m)]
    for layer, var in zip(net.layers, expected):
        assert layer.weight.var().item() == pytest.approx(var, rel=0.1)
        assert torch.all(layer.bias == 0)
    sp = W.mup_mlp(64, 1024, 10, depth=2, parametrization="sp")
    assert sp.layers[-1].weight.var().item() == pytest.approx(1 / 1024, rel=0.1)


def test_mup_equals_sp_at_the_base_width():
    torch.manual_seed(0)
    mup = W.mup_mlp(64, 64, 10, base_width=64)
    torch.manual_seed(0)
    sp = W.mup_mlp(64, 64, 10, parametrization="sp")
    x = torch.randn(5, 64)
    assert torch.equal(mup(x), sp(x))
    for opt in W.OPTIMIZERS:
        assert {g["lr"] for g in W.param_groups(mup, 0.1, opt)} == {0.1}


@pytest.mark.parametrize("optimizer, factors", [
    ("adam", {"input": (1, 1), "hidden": (1 / 4, 1), "output": (1 / 4, 1)}),
    ("sgd", {"input": (4, 4), "hidden": (1, 4), "output": (1 / 4, 1)}),
])
def test_learning_rates_follow_table_3(optimizer, factors):
    net = W.mup_mlp(64, 256, 10, depth=2, base_width=64)      # m = 4
    groups = W.param_groups(net, 0.1, optimizer)
    assert len(groups) == 2 * len(net.layers)
    for k, role in enumerate(net.roles):
        weight_factor, bias_factor = factors[role]
        assert groups[2 * k]["lr"] == pytest.approx(0.1 * weight_factor)
        assert groups[2 * k + 1]["lr"] == pytest.approx(0.1 * bias_factor)
    sp = W.mup_mlp(64, 256, 10, parametrization="sp")
    assert [g["lr"] for g in W.param_groups(sp, 0.1, optimizer)] == [0.1]


def test_sp_with_adam_blows_up_at_the_theory_exponents(task):
    cc = _check(task, "sp", "adam", 1e-3)
    slopes, theory_ = cc.slopes(1), theory.width_exponents("sp", "adam")
    expected = [theory_["input"], theory_["hidden"], theory_["hidden"], theory_["output"]]
    assert np.all(np.abs(slopes - expected) < 0.25), (slopes, expected)      # measured ~0, 0.9, 0.95, 1.35
    assert slopes[-1] > 1.1


def test_sp_with_sgd_at_the_theory_exponents(task):
    cc = _check(task, "sp", "sgd", 0.05)
    slopes, theory_ = cc.slopes(1), theory.width_exponents("sp", "sgd")
    expected = [theory_["input"], theory_["hidden"], theory_["hidden"], theory_["output"]]
    assert np.all(np.abs(slopes - expected) < 0.25), (slopes, expected)


@pytest.mark.parametrize("optimizer, lr", [("adam", 1e-3), ("sgd", 0.05)])
def test_mup_is_flat(task, optimizer, lr):
    cc = _check(task, "mup", optimizer, lr, steps=2)
    for step in (1, 2):
        assert np.all(np.abs(cc.slopes(step)) < 0.12), cc.slopes(step)
    assert cc.slopes(0, "size")[-1] == pytest.approx(-0.5, abs=0.2)      # logits ~ n^-1/2 at init (Table 3)
    assert np.all(np.abs(cc.slopes(0, "size")[:-1]) < 0.05)


def test_coordinate_check_shapes_and_records(task):
    cc = W.coordinate_check(lambda n: W.mup_mlp(64, n, 10, depth=1), [16, 32], task, steps=2, lr=0.01,
                            seeds=2, batch_size=8)
    assert cc.size.shape == cc.change.shape == (2, 3, 2)
    assert cc.layers == ["layers.0", "layers.1"]
    assert np.all(cc.change[:, 0] == 0) and np.all(cc.change[:, 1:] > 0)
    rows = cc.records()
    assert len(rows) == 12 and set(rows[0]) == {"width", "step", "layer", "size", "change"}
    assert cc.slopes(2, min_width=16).shape == (2,)


def test_coordinate_check_rejects_bad_input(task):
    make = lambda n: W.mup_mlp(64, n, 10)  # noqa: E731
    with pytest.raises(TypeError, match="make_model"):
        W.coordinate_check("mlp", [16, 32], task)
    with pytest.raises(ValueError, match="widths"):
        W.coordinate_check(make, [16], task)
    with pytest.raises(ValueError, match="width must be a positive integer"):
        W.coordinate_check(make, [16, -4], task)
    with pytest.raises(TypeError, match="task"):
        W.coordinate_check(make, [16, 32], "digits")
    with pytest.raises(ValueError, match="optimizer"):
        W.coordinate_check(make, [16, 32], task, optimizer="rmsprop")
    with pytest.raises(ValueError, match="steps"):
        W.coordinate_check(make, [16, 32], task, steps=0)
    with pytest.raises(ValueError, match="lr"):
        W.coordinate_check(make, [16, 32], task, lr=-1.0)
    cc = W.coordinate_check(make, [16, 32], task, steps=1, seeds=1, batch_size=4)
    with pytest.raises(ValueError, match="step must be an integer from 1 to 1"):
        cc.slopes(0)
    with pytest.raises(ValueError, match="quantity"):
        cc.slopes(1, "grad")
    with pytest.raises(ValueError, match="min_width"):
        cc.slopes(1, min_width=32)


def test_mlp_rejects_bad_input():
    with pytest.raises(ValueError, match="parametrization"):
        W.mup_mlp(64, 128, 10, parametrization="ntk")
    with pytest.raises(ValueError, match="width must be a positive integer, got 0"):
        W.mup_mlp(64, 0, 10)
    with pytest.raises(ValueError, match="activation"):
        W.mup_mlp(64, 16, 10, activation="gelu")
    with pytest.raises(ValueError, match="optimizer"):
        W.param_groups(W.mup_mlp(64, 16, 10), 0.1, "adamw")


def test_theory_exponents_and_their_errors():
    assert theory.width_exponents("mup", "adam") == {"input": 0.0, "hidden": 0.0, "output": 0.0}
    assert theory.width_exponents("sp", "sgd")["output"] == 1.0
    with pytest.raises(ValueError, match="parametrization"):
        theory.width_exponents("standard", "sgd")
    with pytest.raises(ValueError, match="optimizer"):
        theory.width_exponents("sp", "lion")


def test_final_losses_and_best_lr(task):
    torch.set_num_threads(1)
    lrs = [1e-3, 1e-2, 1e-1]
    make = lambda n: W.mup_mlp(64, n, 10, depth=1, base_width=16)  # noqa: E731
    losses = W.final_losses(make, [16, 32], lrs, task, steps=5, n_eval=64)
    assert losses.shape == (2, 3) and np.all(np.isfinite(losses))
    again = W.final_losses(make, [16, 32], lrs, task, steps=5, n_eval=64)
    assert np.array_equal(losses, again)                   # same init and batches: reproducible
    huge = W.final_losses(lambda n: W.mup_mlp(64, n, 10, parametrization="sp"), [16, 32], [1e30], task,
                          steps=3, optimizer="sgd")
    assert np.all(np.isinf(huge))
    assert W.best_lr(lrs, [1.0, 0.5, 1.0]) == pytest.approx(1e-2)
    assert 1e-2 < W.best_lr(lrs, [1.0, 0.5, 0.8]) < math.sqrt(1e-3 * 1e-1) * 10 ** 0.5
    assert W.best_lr(lrs, [0.1, 0.5, 0.8]) == 1e-3             # at the grid's end: the end
    with pytest.raises(ValueError, match="lrs"):
        W.best_lr([1e-2, 1e-3, 1e-1], [1, 2, 3])
    with pytest.raises(ValueError, match="steps"):
        W.final_losses(make, [16, 32], lrs, task, steps=0)
