import numpy as np
import pytest
import torch
from torch import nn

import gradbook as gb


def test_mlp_hidden_layers_are_addressable_in_order():
    net = gb.mlp(depth=6, width=16, activation="tanh", init="xavier_normal", in_dim=8, out_dim=3)
    assert len(net.layers) == 6
    assert net.layers[0].linear.in_features == 8 and net.layers[5].linear.out_features == 16
    assert isinstance(net.layers[2].act, nn.Tanh)
    x = torch.randn(5, 8)
    outs = net.hidden(x)
    assert len(outs) == 6 and outs[-1].shape == (5, 16)
    torch.testing.assert_close(net(x), net.readout(outs[-1]))


def test_mlp_applies_the_init_to_every_weight_and_zero_biases():
    torch.manual_seed(0)
    net = gb.mlp(depth=3, width=400, activation="relu", init="he", out_dim=400)
    for layer in [b.linear for b in net.layers] + [net.readout]:
        assert abs(layer.weight.var().item() - 2 / 400) < 0.03 * 2 / 400
        assert torch.count_nonzero(layer.bias) == 0


def test_mlp_normal_init_needs_its_std_and_accepts_a_callable():
    with pytest.raises(ValueError, match="std"):
        gb.mlp(depth=2, width=4, init="normal")
    net = gb.mlp(depth=2, width=4, init="normal", init_kwargs={"std": 0.0})
    assert all(torch.count_nonzero(b.linear.weight) == 0 for b in net.layers)
    net = gb.mlp(depth=2, width=4, init=lambda w: nn.init.constant_(w, 0.5))
    assert torch.all(net.layers[1].linear.weight == 0.5)


def test_mlp_norms_and_residual():
    bn = gb.mlp(depth=3, width=8, norm="batch", in_dim=4)
    assert isinstance(bn.layers[0].norm, nn.BatchNorm1d) and bn.layers[0].linear.bias is None
    ln = gb.mlp(depth=3, width=8, norm="layer")
    assert isinstance(ln.layers[1].norm, nn.LayerNorm)
    res = gb.mlp(depth=3, width=8, in_dim=4, residual=True, activation="relu")
    assert [b.residual for b in res.layers] == [False, True, True]
    x = torch.randn(2, 8)
    block = res.layers[1]
    torch.testing.assert_close(block(x), x + torch.relu(block.linear(x)))


@pytest.mark.parametrize("kwargs,bad", [({"depth": 0}, "depth"), ({"width": -3}, "width"),
                                         ({"activation": "swish"}, "'swish'"), ({"init": "glorot"}, "'glorot'"),
                                         ({"norm": "group"}, "'group'")])
def test_mlp_refuses_bad_arguments_by_name(kwargs, bad):
    args = {"depth": 2, "width": 4, **kwargs}
    with pytest.raises(ValueError, match=bad):
        gb.mlp(**args)


def test_rnn_is_an_elman_recurrence():
    net = gb.rnn(3, 5, 2, activation="tanh")
    x = torch.randn(4, 7, 3)
    h = torch.zeros(4, 5)
    for t in range(7):
        h = torch.tanh(net.input(x[:, t]) + h @ net.recurrent.weight.T)
    torch.testing.assert_close(net.states(x)[-1], h)
    torch.testing.assert_close(net(x), net.readout(h))


@pytest.mark.parametrize("init,gain", [("orthogonal", 0.9), ("identity", 1.1)])
def test_rnn_recurrent_gain_sets_every_singular_value(init, gain):
    net = gb.rnn(2, 16, recurrent_init=init, recurrent_gain=gain)
    s = torch.linalg.svdvals(net.recurrent.weight.detach())
    torch.testing.assert_close(s, torch.full_like(s, gain))


def test_spectral_dials():
    w = torch.randn(12, 12)
    gb.nets.set_largest_singular_value(w, 1.3)
    assert torch.linalg.matrix_norm(w, ord=2).item() == pytest.approx(1.3, rel=1e-5)
    gb.nets.set_spectral_radius(w, 0.7)
    assert torch.linalg.eigvals(w).abs().max().item() == pytest.approx(0.7, rel=1e-5)


def test_rnn_refuses_bad_arguments():
    with pytest.raises(ValueError, match="'unitary'"):
        gb.rnn(2, 4, recurrent_init="unitary")
    with pytest.raises(ValueError, match="time"):
        gb.rnn(2, 4).states(torch.randn(3, 2))


def test_lstm_states_forget_bias_and_carousel():
    torch.manual_seed(0)
    net = gb.lstm(3, 8, 2, forget_bias=1.0)
    b = net.cell.bias_ih + net.cell.bias_hh
    assert torch.allclose(b[8:16], torch.ones(8))          # forget gate starts at sigmoid(1)
    x = torch.randn(4, 30, 3)
    assert len(net.states(x)) == 30 and net.states(x, which="hidden")[-1].shape == (4, 8)
    assert net(x).shape == (4, 2)
    with pytest.raises(ValueError, match="which"):
        net.states(x, which="cells")
    with pytest.raises(ValueError, match="batch, time"):
        net.states(x[0])
    # the cell state keeps a gradient through time far better than a vanilla tanh RNN of the same size
    keep = gb.measure.through_time(gb.lstm(3, 8, forget_bias=5.0), x)
    fade = gb.measure.through_time(gb.rnn(3, 8, recurrent_gain=0.5), x)
    assert keep[-1] > 1e3 * fade[-1]


def test_through_time_passes_which_to_the_lstm():
    torch.manual_seed(0)
    net = gb.lstm(3, 8, forget_bias=1.0)
    x = torch.randn(2, 10, 3)
    cell = gb.measure.through_time(net, x)
    hidden = gb.measure.through_time(net, x, which="hidden")
    assert cell.shape == hidden.shape == (10,)
    assert not np.allclose(cell, hidden)


def test_branch_scale_shrinks_residual_branches_only():
    torch.manual_seed(0)
    a = gb.mlp(4, 16, "tanh", "xavier_normal", residual=True, in_dim=8)
    torch.manual_seed(0)
    b = gb.mlp(4, 16, "tanh", "xavier_normal", residual=True, in_dim=8, branch_scale=0.5)
    assert torch.equal(a.layers[0].linear.weight, b.layers[0].linear.weight)    # 8 -> 16: no skip there
    assert torch.allclose(0.5 * a.layers[1].linear.weight, b.layers[1].linear.weight)
    torch.manual_seed(0)
    z = gb.mlp(3, 16, "tanh", "xavier_normal", residual=True, branch_scale=0.0)
    x = torch.randn(5, 16)
    assert torch.allclose(z(x), x)                                              # tanh(0) = 0: identity
    with pytest.raises(ValueError, match="residual=True"):
        gb.mlp(3, 16, branch_scale=0.5)
    with pytest.raises(ValueError, match="branch_scale must be"):
        gb.mlp(3, 16, residual=True, branch_scale=-1)
