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


def test_cliff_gradient_equals_autograd_on_a_grid():
    """The hand-written backward pass through time against torch's autograd, both in float64."""
    import torch

    w, b = np.meshgrid(np.linspace(-1, 9, 7), np.linspace(-4, 2, 6))
    tw = torch.tensor(w, requires_grad=True)
    tb = torch.tensor(b, requires_grad=True)
    x = torch.full_like(tw, 0.5)
    for _ in range(50):
        x = tw * torch.sigmoid(x) + tb
    loss = (torch.sigmoid(x) - 0.7) ** 2
    gw_ref, gb_ref = torch.autograd.grad(loss.sum(), [tw, tb])
    ours = gb.toys.cliff(w, b)
    for a, ref in zip(ours, (loss.detach(), gw_ref, gb_ref)):
        np.testing.assert_allclose(a, ref.numpy(), rtol=1e-9, atol=1e-300)


def _clip_norm_reference(g, c):
    """torch.nn.utils.clip_grad_norm_ on a two-entry gradient."""
    import torch

    p = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    p.grad = torch.tensor([float(v) for v in g], dtype=torch.float64)
    torch.nn.utils.clip_grad_norm_([p], c)
    return p.grad.numpy()


def test_descend_takes_the_steps_torch_clipping_takes():
    run = gb.toys.descend(6.0, -3.0, lr=0.5, mode="norm", threshold=1.0, steps=40)
    w, b = 6.0, -3.0
    for k in range(40):
        _, gw, gb_ = gb.toys.cliff(w, b)
        step = _clip_norm_reference([gw, gb_], 1.0)
        np.testing.assert_allclose(run.norm_after[k], np.hypot(*step), rtol=1e-6)
        w, b = w - 0.5 * step[0], b - 0.5 * step[1]
    np.testing.assert_allclose(run.path[-1], [w, b], rtol=1e-6)
    assert run.loss.shape == (40,) and run.path.shape == (41, 2) and run.diverged == -1


def test_descend_runs_many_starts_with_their_own_thresholds():
    w0, b0 = np.array([6.0, 6.0, 6.0]), np.array([-3.0, -3.0, -3.0])
    many = gb.toys.descend(w0, b0, lr=1.0, mode="norm", threshold=np.array([np.inf, 1.0, 0.1]), steps=100)
    for i, c in enumerate([np.inf, 1.0, 0.1]):
        one = gb.toys.descend(6.0, -3.0, lr=1.0, mode="norm", threshold=c, steps=100)
        np.testing.assert_allclose(many.loss[:, i], one.loss)
        np.testing.assert_allclose(many.path[:, :, i], one.path)
    assert not many.clipped[0] and many.clipped[2]
    value = gb.toys.descend(6.0, -3.0, lr=1.0, mode="value", threshold=0.01, steps=5)
    assert np.all(np.abs(np.diff(value.path, axis=0)) <= 0.01 + 1e-15)
    np.testing.assert_allclose(value.final_loss, gb.toys.cliff(*value.path[-1])[0])


def test_descend_rejects_bad_arguments_by_name():
    with pytest.raises(ValueError, match="mode"):
        gb.toys.descend(6.0, -3.0, lr=1.0, mode="clip")
    with pytest.raises(ValueError, match="lr"):
        gb.toys.descend(6.0, -3.0, lr=-1.0)
    with pytest.raises(ValueError, match="threshold"):
        gb.toys.descend(6.0, -3.0, lr=1.0, mode="norm", threshold=0.0)


def test_whitened_problem_matches_least_squares_on_the_data():
    import torch

    task = gb.data.digits()
    p = gb.toys.whitened(task)
    x = task.x_train.double() - task.x_train.double().mean(0)
    y = torch.nn.functional.one_hot(task.y_train, 10).double()
    y = y - y.mean(0)
    evals, evecs = torch.linalg.eigh(x.T @ x / len(x))
    keep = evals > 1e-3 * evals.max()
    xw = x @ evecs[:, keep] / evals[keep].sqrt()
    m = torch.randn(10, p.dim, dtype=torch.float64)
    direct = 0.5 * ((xw @ m.T - y) ** 2).sum(1).mean()
    assert torch.allclose(p.loss(m), direct)
    optimum = torch.linalg.lstsq(xw, y).solution.T
    assert abs(p.loss(optimum).item() - p.loss_best) < 1e-9 and p.loss_zero > p.loss_best > 0


def test_orthogonal_chains_learn_in_few_steps_whatever_the_depth_and_gaussian_ones_slow_down():
    import torch

    p = gb.toys.whitened(gb.data.digits())
    g = torch.Generator().manual_seed(0)
    chain = gb.toys.linear_chain("orthogonal", 8, p.dim, 10, g)
    assert all(torch.allclose(torch.linalg.svdvals(w), torch.ones(min(w.shape), dtype=torch.float64)) for w in chain)
    orth = [gb.toys.learning_time(gb.toys.linear_chain("orthogonal", L, p.dim, 10, g), p)[0] for L in (2, 8)]
    gauss = [gb.toys.learning_time(gb.toys.linear_chain("gaussian", L, p.dim, 10, g), p)[0] for L in (2, 8)]
    assert max(orth) <= 12 and gauss[1] > 3 * gauss[0] and gauss[1] > 3 * orth[1], (orth, gauss)
    steps, lr = gb.toys.learning_time(chain, p, max_steps=1, learning_rates=[1e-6])
    assert (steps, lr) == (1, 0.0)                      # not reached: the cap and no rate
    with pytest.raises(ValueError, match="kind"):
        gb.toys.linear_chain("uniform", 2, 4, 2)


def test_shattering_measures_and_networks():
    import torch

    sh = gb.shattering
    assert np.allclose(sh.autocorrelation(np.ones(10), 3), [1.0, 0.9, 0.8, 0.7])   # sums over the overlap, / n
    alt = np.array([1.0, -1.0] * 8)
    assert sh.autocorrelation(alt, 2)[1] == pytest.approx(-15 / 16)
    g = torch.eye(4, dtype=torch.float64)                           # orthogonal gradients: no correlation
    assert sh.pair_correlation(g) == 0.0 and sh.pair_correlation(torch.ones(4, 3)) == pytest.approx(1.0)
    assert sh.residual_correlation(1) == pytest.approx((1 + 1 / 4) / (1 + 1 / 2))
    assert sh.residual_correlation(50) < sh.residual_correlation(10) < 1
    torch.manual_seed(0)
    x = torch.linspace(-2, 2, 64, dtype=torch.float64).reshape(-1, 1)
    net = sh.network("grid", "resnet_bn", 3, 16, 1).double()
    slopes = sh.input_slopes(net, x)
    h = 1e-6                                                         # the derivative of the frozen network
    with torch.no_grad():
        numeric = (net(x + h) - net(x - h)) / (2 * h)
    assert torch.allclose(slopes, numeric, atol=1e-5)
    with pytest.raises(ValueError, match="arch"):
        sh.network("grid", "resnet", 3, 16, 1)
