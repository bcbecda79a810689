"""The hand-written NumPy backward pass agrees with torch autograd and with finite differences."""
import numpy as np
import pytest
import torch

from gradbook import activations
from gradbook.scratch import NumpyMLP


def _torch_grads(net, x, y, act):
    ws = [torch.tensor(w, requires_grad=True) for w in net.weights]
    bs = [torch.tensor(b, requires_grad=True) for b in net.biases]
    h = torch.tensor(x)
    pre = []
    for i, (w, b) in enumerate(zip(ws, bs)):
        a = h @ w.T + b
        a.retain_grad()
        pre.append(a)
        h = a if i == len(ws) - 1 else act(a)
    loss = 0.5 * ((h - torch.tensor(y)) ** 2).sum() / len(x)
    loss.backward()
    return loss.item(), [w.grad.numpy() for w in ws], [b.grad.numpy() for b in bs], [a.grad.numpy() for a in pre]


@pytest.mark.parametrize("name", activations.names())
def test_backward_matches_autograd(name):
    rng = np.random.default_rng(0)
    net = NumpyMLP([6, 9, 7, 3], activation=name, init="xavier_normal", rng=rng)
    x, y = rng.normal(size=(5, 6)), rng.normal(size=(5, 3))
    loss, dout = net.mse(net.forward(x), y)
    grads = net.backward(dout)
    t_loss, gw, gb, deltas = _torch_grads(net, x, y, activations.get(name))
    assert loss == pytest.approx(t_loss, rel=1e-12)
    for mine, ref in zip(grads.weights + grads.biases + grads.deltas, gw + gb + deltas):
        np.testing.assert_allclose(mine, ref, rtol=1e-10, atol=1e-14)


def test_backward_matches_finite_differences():
    rng = np.random.default_rng(1)
    net = NumpyMLP([4, 5, 2], activation="tanh", init="standard", rng=rng)
    x, y = rng.normal(size=(3, 4)), rng.normal(size=(3, 2))
    grads = net.backward(net.mse(net.forward(x), y)[1])
    eps = 1e-6
    for l in range(2):
        for idx in [(0, 0), (1, 2)]:
            w = net.weights[l]
            old = w[idx]
            w[idx] = old + eps
            up = net.mse(net.forward(x), y)[0]
            w[idx] = old - eps
            down = net.mse(net.forward(x), y)[0]
            w[idx] = old
            assert grads.weights[l][idx] == pytest.approx((up - down) / (2 * eps), rel=1e-6, abs=1e-10)


def test_weights_follow_the_named_init():
    net = NumpyMLP([500, 400, 1], activation="relu", init="he", rng=np.random.default_rng(2))
    assert abs(net.weights[0].var() - 2 / 500) < 0.03 * 2 / 500


def test_misuse_is_refused():
    with pytest.raises(ValueError, match="sizes"):
        NumpyMLP([3])
    with pytest.raises(RuntimeError, match="forward"):
        NumpyMLP([2, 2]).backward(np.zeros((1, 2)))
