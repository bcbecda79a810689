import numpy as np
import pytest

import gradbook as gb


def test_cliff_loss_and_gradient_match_a_direct_computation():
    w, b = 5.0, -2.5
    x = 0.5
    for _ in range(50):
        x = w / (1 + np.exp(-x)) + b
    loss, gw, gb_ = gb.toys.cliff(w, b)
    assert loss == pytest.approx((1 / (1 + np.exp(-x)) - 0.7) ** 2, rel=1e-12)
    eps = 1e-6   # finite differences, away from the wall
    assert gw == pytest.approx((gb.toys.cliff(w + eps, b)[0] - gb.toys.cliff(w - eps, b)[0]) / (2 * eps), rel=1e-5)
    assert gb_ == pytest.approx((gb.toys.cliff(w, b + eps)[0] - gb.toys.cliff(w, b - eps)[0]) / (2 * eps), rel=1e-5)


def test_cliff_accepts_grids():
    w, b = np.meshgrid(np.linspace(4, 7, 5), np.linspace(-4, -2, 3))
    loss, gw, gb_ = gb.toys.cliff(w, b)
    assert loss.shape == gw.shape == gb_.shape == (3, 5)
    with pytest.raises(ValueError, match="same shape"):
        gb.toys.cliff(np.zeros(2), np.zeros(3))


def test_the_wall_is_a_jump_in_the_loss_with_a_huge_gradient():
    wall = gb.toys.cliff_wall(6.0, -3.5, -3.0)
    assert wall == pytest.approx(-3.2347560, abs=1e-6)
    below, above = gb.toys.cliff(6.0, wall - 1e-6)[0], gb.toys.cliff(6.0, wall + 1e-6)[0]
    assert below > 0.4 and above < 0.04
    assert abs(gb.toys.cliff(6.0, wall + 1e-9)[2]) > 1e4 * abs(gb.toys.cliff(6.0, -3.0)[2])
    with pytest.raises(ValueError, match="no wall"):
        gb.toys.cliff_wall(6.0, -3.0, -2.9)
