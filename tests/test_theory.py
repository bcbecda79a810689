"""Mean-field predictions: closed forms, known constants, and agreement with measurement on wide nets."""
import math

import numpy as np
import pytest
import torch

import gradbook as gb
from gradbook import theory as th


def test_piecewise_linear_closed_forms():
    assert th.chi("relu", 3.7, math.sqrt(2)) == pytest.approx(1.0)
    assert th.chi("relu", 0.1, 2.0) == pytest.approx(2.0)          # sigma_w^2 = 4 doubles it per layer
    assert th.chi("linear", 5.0, 0.5) == pytest.approx(0.25)
    assert th.length_map("relu", 2.0, math.sqrt(2), 0.3) == pytest.approx(2.0 + 0.09)
    assert th.chi("leaky_relu", 1.0, 1.0) == pytest.approx((1 + 0.01**2) / 2)


def test_quadrature_matches_known_gaussian_moments():
    assert th.expect(lambda x: x**2, 2.5) == pytest.approx(2.5, rel=1e-12)
    assert th.expect(lambda x: x**4, 2.0) == pytest.approx(3 * 4.0, rel=1e-12)
    assert th.expect(np.abs, 1.0) == pytest.approx(math.sqrt(2 / math.pi), rel=1e-10)   # a kink at 0


def test_tanh_near_zero_variance_behaves_linearly():
    # tanh'(0) = 1, so as q -> 0 the factor tends to sigma_w^2
    assert th.chi("tanh", 1e-8, 0.7) == pytest.approx(0.49, rel=1e-6)
    assert th.chi("sigmoid", 1e-8, 1.0) == pytest.approx(1 / 16, rel=1e-6)


def test_critical_points():
    assert th.critical_sigma_w("tanh", math.sqrt(0.05)) ** 2 == pytest.approx(1.761, abs=1e-3)
    assert th.critical_sigma_w("tanh", 0.0) == pytest.approx(1.0, abs=1e-3)
    assert th.critical_sigma_w("relu", 0.5) == pytest.approx(math.sqrt(2))
    assert th.depth_scale("tanh", th.critical_sigma_w("tanh", 0.2) * 0.999, 0.2) > 100
    xi = th.depth_scale("tanh", 0.9, 0.0)     # ordered phase: chi* = 0.81 at q* = 0
    assert xi == pytest.approx(-1 / math.log(0.81), rel=1e-6)
    assert th.trainable_depth("tanh", 0.9, 0.0) == pytest.approx(6 * xi)


def test_gradient_factors_follow_the_path_of_q():
    # tanh, sigma_w = 1, sigma_b = 0: q shrinks slowly towards 0, so chi rises towards 1 along the path
    f = th.gradient_factors("tanh", 30, 1.0)
    assert np.all(np.diff(f) > 0) and f[-1] < 1
    q = th.q_path("tanh", 30, 1.0)
    assert q[0] == pytest.approx(1.0) and np.all(np.diff(q) < 0)


def test_init_sigma_w_maps_the_named_initializers():
    assert th.init_sigma_w("standard", 256, 256) == pytest.approx(1 / math.sqrt(3))
    assert th.init_sigma_w("he", 100, 300) == pytest.approx(math.sqrt(2))
    assert th.init_sigma_w("xavier_normal", 256, 256) == pytest.approx(1.0)
    assert th.init_sigma_w("normal", 400, 400, std=0.1) == pytest.approx(2.0)


def test_rnn_bounds_follow_pascanu():
    w = torch.eye(8) * 3.0
    b = th.rnn_bounds(w, "sigmoid")
    assert b["sigma_max"] == pytest.approx(3.0) and b["threshold"] == 4.0
    assert b["vanishing_sufficient"] and not b["exploding_necessary"]
    assert b["bound"](2) == pytest.approx(0.75**2)
    assert th.rnn_bounds(w, "tanh")["exploding_necessary"]


def _measured_factors(activation, init, depth, width, seeds, **init_kwargs):
    """Per-layer ratio ||delta_l||^2 / ||delta_{l+1}||^2, geometric mean over seeds, with a loss whose
    gradient at the top is a random direction (the mean-field assumption)."""
    logs = []
    for seed in seeds:
        torch.manual_seed(seed)
        net = gb.mlp(depth, width, activation, init, init_kwargs=init_kwargs).double()
        x = torch.randn(32, width, dtype=torch.float64)
        r = torch.randn(32, width, dtype=torch.float64)
        rec = gb.gradients(net, x, None, loss_fn=lambda out, _t: (out * r).sum())
        g = rec.grad_norm**2
        logs.append(np.log(g[:-1] / g[1:]))
    return np.exp(np.mean(logs, axis=0))


# the activation x init pairs the book uses; sigma_w from the init's variance at fan_in = fan_out = width
PAIRS = [("sigmoid", "standard", {}), ("tanh", "standard", {}), ("tanh", "xavier_normal", {}),
         ("tanh", "normal", {"std": 2 / 16}), ("relu", "he", {}), ("relu", "xavier_normal", {}),
         ("relu", "normal", {"std": 2 / 16}), ("leaky_relu", "he", {}), ("linear", "lecun", {})]


@pytest.mark.parametrize("activation,init,kwargs", PAIRS, ids=lambda v: str(v))
def test_measured_factors_agree_with_theory_within_5_percent(activation, init, kwargs):
    width, depth = 256, 20
    measured = _measured_factors(activation, init, depth, width, seeds=range(4), **kwargs)
    sw = th.init_sigma_w(init, width, width, **kwargs)
    predicted = th.gradient_factors(activation, depth, sw, q0=1.0)[:-1]
    geo = lambda a: float(np.exp(np.mean(np.log(a))))  # noqa: E731
    assert geo(measured) == pytest.approx(geo(predicted), rel=0.05)
