"""Tests of gradbook.measure: every number is compared with a direct autograd computation."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradbook as gb

DT = torch.float64
RTOL = 2e-5   # the package reduces in float32
ATOL = 1e-9

def _assert_same_numbers(a, b):
    # equal up to rounding: torch's in-place ELU computes its derivative from the output, not the input
    for k in gb.records.FIELDS:
        np.testing.assert_allclose(getattr(a, k), getattr(b, k), rtol=1e-12, atol=0, err_msg=k)


ACTIVATIONS = ["sigmoid", "tanh", "relu", "leaky_relu", "elu", "gelu", "linear"]


# ---------------------------------------------------------------------------------------------
# independent reference computations
# ---------------------------------------------------------------------------------------------
def _gamma_by_grid(module: nn.Module) -> float:
    """sup |phi'| found numerically with autograd on a fine grid (independent of gradbook's table)."""
    x = torch.linspace(-10, 10, 400001, dtype=DT, requires_grad=True)
    (d,) = torch.autograd.grad(module(x.clone()).sum(), x)
    return d.abs().max().item()


GAMMA = {"sigmoid": 0.25, "tanh": 1.0, "relu": 1.0, "leaky_relu": 1.0, "elu": 1.0, "linear": 1.0,
         "gelu": _gamma_by_grid(nn.GELU())}


def phi_prime(module: nn.Module, u: torch.Tensor) -> torch.Tensor:
    """Elementwise derivative of an activation module at u, by autograd."""
    u = u.detach().clone().requires_grad_(True)
    out = module(u.clone())          # clone: an in-place module must not touch u
    (d,) = torch.autograd.grad(out.sum(), u)
    return d


def act_reference(module, gamma, pre_list, out_list):
    """mean, population std, saturated fraction, dead fraction pooled over the calls of one activation."""
    outs = torch.cat([o.detach().reshape(-1) for o in out_list])
    ds = [phi_prime(module, u) for u in pre_list]
    sat = torch.cat([(d < 0.1 * gamma).reshape(-1) for d in ds]).double().mean().item()
    dead_mask = torch.stack([(d == 0).reshape(d.shape[0], -1).all(0) for d in ds]).all(0)
    return (outs.mean().item(), outs.std(unbiased=False).item(), sat, dead_mask.double().mean().item())


def norm(t: torch.Tensor) -> float:
    return torch.linalg.vector_norm(t.detach()).item()


def close(a, b, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), rtol=rtol, atol=atol)


def mlp_reference(net: gb.nets.MLP, x, y):
    """Manual forward of a gradbook MLP; returns the direct numbers gradbook should report."""
    h = x
    zs, pres, outs = [], [], []
    for block in net.layers:
        z = F.linear(h, block.linear.weight, block.linear.bias)
        zs.append(z)
        u = block.norm(z)
        a = block.act(u)
        pres.append(u)
        outs.append(a)
        h = h + a if block.residual else a
    out = F.linear(h, net.readout.weight, net.readout.bias)
    zs.append(out)
    loss = F.cross_entropy(out, y)
    weights = [b.linear.weight for b in net.layers] + [net.readout.weight]
    grads = torch.autograd.grad(loss, weights + zs)
    L = len(weights)
    return {
        "weight_grad_norm": [norm(g) for g in grads[:L]],
        "grad_norm": [norm(g) for g in grads[L:]],
        "pres": pres,
        "outs": outs,
    }


def make_mlp(activation, norm_kind=None, residual=False, seed=0, depth=3, width=8, in_dim=5, out_dim=4):
    torch.manual_seed(seed)
    init = "xavier_normal" if activation in ("sigmoid", "tanh", "linear") else "he"
    net = gb.mlp(depth, width, activation, init, in_dim=in_dim, out_dim=out_dim, norm=norm_kind,
                 residual=residual).to(DT)
    if norm_kind is not None:
        with torch.no_grad():         # spread the normalized pre-activations so that some saturate
            for b in net.layers:
                b.norm.weight.fill_(3.0)
                b.norm.bias.uniform_(-0.5, 0.5)
    return net


def batch(n=32, d=5, classes=4, scale=3.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, d, generator=g, dtype=DT), torch.randint(0, classes, (n,), generator=g)


# ---------------------------------------------------------------------------------------------
# gb.gradients on MLPs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [(None, False), ("batch", True), ("layer", False)],
                         ids=["plain", "batchnorm-residual", "layernorm"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradients_mlp_matches_direct_autograd(activation, config):
    norm_kind, residual = config
    net = make_mlp(activation, norm_kind, residual)
    x, y = batch()
    ref_net = copy.deepcopy(net)            # same weights; batch-norm running stats are irrelevant in train mode
    snap = gb.gradients(net, x, y)
    ref = mlp_reference(ref_net, x, y)

    assert snap.layers == [f"layers.{i}.linear" for i in range(3)] + ["readout"]
    assert snap.activations == [f"layers.{i}.act" for i in range(3)]
    close(snap.weight_grad_norm, ref["weight_grad_norm"])
    close(snap.grad_norm, ref["grad_norm"])

    module = ref_net.layers[0].act
    stats = [act_reference(module, GAMMA[activation], [u], [a]) for u, a in zip(ref["pres"], ref["outs"])]
    mean, std, sat, dead = (list(s) for s in zip(*stats))
    close(snap.act_mean, mean, atol=1e-6)
    close(snap.act_std, std)
    close(snap.saturated, sat, atol=1e-7)
    close(snap.dead, dead, atol=1e-7)
    # the test must be able to fail: the gradients are not trivial and, for a saturating
    # activation, some but not all entries are saturated
    assert all(v > 0 for v in ref["weight_grad_norm"])
    if activation in ("sigmoid", "tanh", "relu", "leaky_relu", "elu", "gelu"):
        assert any(0 < s < 1 for s in sat)
    else:
        assert all(s == 0 for s in sat)


def test_gradients_weight_norm_excludes_biases():
    net = make_mlp("tanh")
    x, y = batch()
    with torch.no_grad():                    # a large bias gradient would show if biases were included
        for b in net.layers:
            b.linear.bias.fill_(0.3)
    snap = gb.gradients(net, x, y)
    loss = F.cross_entropy(net(x), y)
    layers = [b.linear for b in net.layers] + [net.readout]
    gw = torch.autograd.grad(loss, [m.weight for m in layers])
    gb_ = torch.autograd.grad(F.cross_entropy(net(x), y), [m.bias for m in layers])
    close(snap.weight_grad_norm, [norm(g) for g in gw])
    with_bias = [math.hypot(norm(a), norm(b)) for a, b in zip(gw, gb_)]
    assert not np.allclose(snap.weight_grad_norm, with_bias, rtol=1e-3)


def test_gradients_dead_relu_units_by_design():
    width = 10
    net = make_mlp("relu", width=width)
    with torch.no_grad():
        net.layers[0].linear.bias[:3] = -1e3      # units 0-2 of layer 0 never fire
        net.layers[1].linear.weight[4:7] = 0.0    # units 4-6 of layer 1: pre-activation = bias ...
        net.layers[1].linear.bias[4:7] = -1.0     # ... = -1 for every example
    x, y = batch(n=64)
    snap = gb.gradients(net, x, y)
    ref = mlp_reference(copy.deepcopy(net), x, y)
    dead = [act_reference(nn.ReLU(), 1.0, [u], [a])[3] for u, a in zip(ref["pres"], ref["outs"])]
    close(snap.dead, dead, atol=1e-7)
    assert dead[0] >= 3 / width and dead[1] >= 3 / width
    # a unit dead on some but not all examples is alive: dead < fraction of negative entries
    assert snap.dead[0] < snap.saturated[0]


def test_gradients_without_targets_uses_half_sum_of_squares():
    net = make_mlp("tanh")
    x, _ = batch()
    snap = gb.gradients(net, x)
    ref_net = copy.deepcopy(net)
    out = ref_net(x)
    loss = out.pow(2).sum() / 2
    g = torch.autograd.grad(loss, [b.linear.weight for b in ref_net.layers] + [ref_net.readout.weight])
    close(snap.weight_grad_norm, [norm(t) for t in g])


def test_gradients_under_float64_default_dtype():
    """Bug probe: gb.gradients must work when torch's default dtype is float64."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        net = make_mlp("tanh")
        x, y = batch()
        snap = gb.gradients(net, x, y)
        ref = mlp_reference(copy.deepcopy(net), x, y)
    finally:
        torch.set_default_dtype(old)
    close(snap.weight_grad_norm, ref["weight_grad_norm"])
    close(snap.grad_norm, ref["grad_norm"])


# ---------------------------------------------------------------------------------------------
# in-place activations, .grad preservation
# ---------------------------------------------------------------------------------------------
def _seq(inplace):
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(inplace=inplace), nn.Linear(8, 8),
                         nn.ReLU(inplace=inplace), nn.Linear(8, 4)).to(DT)


def test_inplace_relu_equals_out_of_place_and_direct():
    x, y = batch()
    a = gb.gradients(_seq(True), x, y)
    b = gb.gradients(_seq(False), x, y)
    assert a.layers == b.layers == ["0", "2", "4"]
    assert a.activations == b.activations == ["1", "3"]
    _assert_same_numbers(a, b)

    net = _seq(False)
    z0 = net[0](x)
    h0 = net[1](z0)
    z2 = net[2](h0)
    h2 = net[3](z2)
    z4 = net[4](h2)
    loss = F.cross_entropy(z4, y)
    g = torch.autograd.grad(loss, [net[0].weight, net[2].weight, net[4].weight, z0, z2, z4])
    close(a.weight_grad_norm, [norm(t) for t in g[:3]])
    close(a.grad_norm, [norm(t) for t in g[3:]])        # dL/d(Linear output), i.e. before the ReLU
    close(a.act_mean, [h0.mean().item(), h2.mean().item()])
    close(a.saturated, [(z0 <= 0).double().mean().item(), (z2 <= 0).double().mean().item()])


@pytest.mark.parametrize("make_act, gamma", [(lambda ip: nn.ReLU(inplace=ip), 1.0),
                                             (lambda ip: nn.LeakyReLU(0.01, inplace=ip), 1.0),
                                             (lambda ip: nn.ELU(inplace=ip), 1.0),
                                             (lambda ip: nn.LeakyReLU(0.2, inplace=ip), 1.0),
                                             (lambda ip: nn.ELU(alpha=0.5, inplace=ip), 1.0)],
                         ids=["relu", "leaky_relu", "elu", "leaky_relu(0.2)", "elu(0.5)"])
def test_inplace_activations_equal_out_of_place_and_direct(make_act, gamma):
    def net_for(inplace):
        torch.manual_seed(13)
        return nn.Sequential(nn.Linear(5, 8), make_act(inplace), nn.Linear(8, 8), make_act(inplace),
                             nn.Linear(8, 4)).to(DT)
    x, y = batch(scale=4.0)
    a = gb.gradients(net_for(True), x, y)
    b = gb.gradients(net_for(False), x, y)
    _assert_same_numbers(a, b)
    net = net_for(False)
    z0 = net[0](x)
    h0 = net[1](z0)
    z2 = net[2](h0)
    h2 = net[3](z2)
    out = net[4](h2)
    g = torch.autograd.grad(F.cross_entropy(out, y), [net[0].weight, net[2].weight, net[4].weight, z0, z2, out])
    close(a.weight_grad_norm, [norm(t) for t in g[:3]])
    close(a.grad_norm, [norm(t) for t in g[3:]])
    stats = [act_reference(net[1], gamma, [z], [h]) for z, h in ((z0, h0), (z2, h2))]
    mean, std, sat, dead = (list(s) for s in zip(*stats))
    close(a.act_mean, mean)
    close(a.act_std, std)
    close(a.saturated, sat, atol=1e-7)
    close(a.dead, dead, atol=1e-7)
    assert any(s > 0 for s in sat) or isinstance(net[1], nn.LeakyReLU)


def test_gradients_leaves_grad_untouched():
    net = make_mlp("tanh")
    x, y = batch()
    params = list(net.parameters())
    existing = {}
    for i, p in enumerate(params):
        if i % 2 == 0:
            p.grad = torch.randn_like(p)
            existing[i] = (p.grad, p.grad.clone())
        else:
            p.grad = None
    frozen = net.layers[1].linear.bias
    frozen.requires_grad_(False)
    frozen_grad = torch.ones_like(frozen)
    frozen.grad = frozen_grad
    gb.gradients(net, x, y)
    for i, p in enumerate(params):
        if i in existing:
            obj, val = existing[i]
            assert p.grad is obj
            torch.testing.assert_close(p.grad, val, rtol=0, atol=0)
        elif p is frozen:
            assert p.grad is frozen_grad and torch.equal(p.grad, torch.ones_like(p))
        else:
            assert p.grad is None


def test_gradients_all_none_grads_stay_none():
    net = make_mlp("relu")
    x, y = batch()
    gb.gradients(net, x, y)
    assert all(p.grad is None for p in net.parameters())


# ---------------------------------------------------------------------------------------------
# modules called several times: Elman RNN, nn.RNN, nn.LSTM
# ---------------------------------------------------------------------------------------------
def test_elman_rnn_recurrent_linear_called_several_times():
    torch.manual_seed(4)
    net = gb.rnn(3, 6, 2, activation="tanh", recurrent_gain=1.2).to(DT)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 7, 3, generator=g, dtype=DT)
    y = torch.randint(0, 2, (8,), generator=g)
    snap = gb.gradients(net, x, y)
    assert snap.layers == ["input", "recurrent", "readout"]
    assert snap.activations == ["act"]

    h = x.new_zeros(8, 6)
    drive = F.linear(x, net.input.weight, net.input.bias)
    recs, pres, outs = [], [], []
    for t in range(7):
        r = F.linear(h, net.recurrent.weight)
        u = drive[:, t] + r
        h = torch.tanh(u)
        recs.append(r)
        pres.append(u)
        outs.append(h)
    out = F.linear(h, net.readout.weight, net.readout.bias)
    loss = F.cross_entropy(out, y)
    grads = torch.autograd.grad(loss, [net.input.weight, net.recurrent.weight, net.readout.weight,
                                       drive, out, *recs])
    for v in (snap.weight_grad_norm, snap.grad_norm, snap.act_mean, snap.act_std, snap.saturated, snap.dead):
        assert np.isfinite(v).all()
    close(snap.weight_grad_norm, [norm(t) for t in grads[:3]])
    rec_norm = math.sqrt(sum(norm(t) ** 2 for t in grads[5:]))
    close(snap.grad_norm, [norm(grads[3]), rec_norm, norm(grads[4])])
    mean, std, sat, dead = act_reference(nn.Tanh(), 1.0, pres, outs)
    close(snap.act_mean, [mean], atol=1e-6)
    close(snap.act_std, [std])
    close(snap.saturated, [sat], atol=1e-7)
    close(snap.dead, [dead], atol=1e-7)


class _SeqNet(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.rnn = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[kind](3, 5, num_layers=2, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
def test_torch_recurrent_layers(kind):
    torch.manual_seed(6)
    net = _SeqNet(kind).to(DT)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 6, 3, generator=g, dtype=DT)
    y = torch.randint(0, 2, (4,), generator=g)
    snap = gb.gradients(net, x, y)
    assert snap.layers == ["rnn", "head"]
    assert np.isfinite(snap.weight_grad_norm).all() and np.isfinite(snap.grad_norm).all()

    out, _ = net.rnn(x)
    logits = net.head(out[:, -1])
    loss = F.cross_entropy(logits, y)
    rnn_w = [p for n, p in net.rnn.named_parameters() if n.startswith("weight")]
    assert len(rnn_w) == 4
    grads = torch.autograd.grad(loss, rnn_w + [net.head.weight, out, logits])
    rnn_norm = math.sqrt(sum(norm(t) ** 2 for t in grads[:4]))
    close(snap.weight_grad_norm, [rnn_norm, norm(grads[4])])
    close(snap.grad_norm, [norm(grads[5]), norm(grads[6])])


# ---------------------------------------------------------------------------------------------
# conv nets and frozen parameters
# ---------------------------------------------------------------------------------------------
def _conv(seed=8):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 4)).to(DT)


def _conv_batch():
    g = torch.Generator().manual_seed(9)
    return torch.randn(10, 1, 8, 8, generator=g, dtype=DT), torch.randint(0, 4, (10,), generator=g)


def test_conv_net_matches_direct():
    net = _conv()
    with torch.no_grad():
        net[0].bias[1] = -100.0             # channel 1 is dead everywhere
    x, y = _conv_batch()
    snap = gb.gradients(net, x, y)
    assert snap.layers == ["0", "3"] and snap.activations == ["1"]
    z = net[0](x)
    a = torch.relu(z)
    out = net[3](a.flatten(1))
    loss = F.cross_entropy(out, y)
    g = torch.autograd.grad(loss, [net[0].weight, net[3].weight, z, out])
    close(snap.weight_grad_norm, [norm(g[0]), norm(g[1])])
    close(snap.grad_norm, [norm(g[2]), norm(g[3])])
    mean, std, sat, dead = act_reference(nn.ReLU(), 1.0, [z], [a])
    close(snap.act_mean, [mean])
    close(snap.act_std, [std])
    close(snap.saturated, [sat], atol=1e-7)
    close(snap.dead, [dead], atol=1e-7)
    assert dead >= 1 / 3


def test_frozen_layer_is_skipped():
    net = _conv()
    for p in net[0].parameters():
        p.requires_grad_(False)
    x, y = _conv_batch()
    snap = gb.gradients(net, x, y)
    assert snap.layers == ["3"]
    assert snap.weight_grad_norm.shape == (1,) and snap.grad_norm.shape == (1,)
    out = net(x)
    g = torch.autograd.grad(F.cross_entropy(out, y), [net[3].weight, out])
    close(snap.weight_grad_norm, [norm(g[0])])
    close(snap.grad_norm, [norm(g[1])])
    assert all(p.grad is None for p in net.parameters())


def test_frozen_weight_trainable_bias_measures_bias():
    net = _conv()
    net[3].weight.requires_grad_(False)
    x, y = _conv_batch()
    snap = gb.gradients(net, x, y)
    assert snap.layers == ["0", "3"]
    loss = F.cross_entropy(net(x), y)
    g = torch.autograd.grad(loss, [net[0].weight, net[3].bias])
    close(snap.weight_grad_norm, [norm(g[0]), norm(g[1])])


# ---------------------------------------------------------------------------------------------
# gb.watch
# ---------------------------------------------------------------------------------------------
def _train_loop(net, steps, lr=0.05, no_grad_every_step=False, seed=11, record=None, clone=None,
                every=None):
    """An ordinary SGD loop; optionally computes gb.gradients on a hook-free clone before recorded steps."""
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = 3 * torch.randn(16, 5, generator=g, dtype=DT)
        y = torch.randint(0, 4, (16,), generator=g)
        if record is not None and step % every == 0:
            clone.load_state_dict(net.state_dict())
            record.append(gb.gradients(clone, x, y))
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        if no_grad_every_step:
            with torch.no_grad():
                net(10 * torch.randn(16, 5, generator=g, dtype=DT))   # an evaluation pass


@pytest.mark.parametrize("every", [1, 3])
def test_watch_records_steps_and_ignores_no_grad_passes(every):
    net = make_mlp("tanh")
    with gb.watch(net, every=every) as w:
        _train_loop(net, 10, no_grad_every_step=True)
    tr = w.trace
    np.testing.assert_array_equal(tr.steps, np.arange(0, 10, every))
    assert len(tr) == len(range(0, 10, every))
    for k in ["weight_grad_norm", "grad_norm", "act_mean", "act_std", "saturated", "dead"]:
        assert getattr(tr, k).shape == (len(tr), 4 if k in ("weight_grad_norm", "grad_norm") else 3)
    assert np.isfinite(tr.weight_grad_norm).all() and np.isfinite(tr.grad_norm).all()


def test_watch_numbers_equal_gradients_before_each_recorded_step():
    net = make_mlp("tanh")
    clone = copy.deepcopy(net)
    ref = []
    with gb.watch(net, every=3) as w:
        _train_loop(net, 8, record=ref, clone=clone, every=3)
    tr = w.trace
    np.testing.assert_array_equal(tr.steps, [0, 3, 6])
    assert len(ref) == 3
    for i, r in enumerate(ref):
        for k in ["weight_grad_norm", "grad_norm", "act_mean", "act_std", "saturated", "dead"]:
            close(getattr(tr, k)[i], getattr(r, k))
    # training moved the weights, so the recorded rows differ (the comparison is not vacuous)
    assert not np.allclose(tr.weight_grad_norm[0], tr.weight_grad_norm[2])


def test_watch_no_grad_passes_do_not_change_records():
    """An evaluation pass under torch.no_grad() between steps must not alter the recorded step."""
    net = make_mlp("tanh")
    clone = copy.deepcopy(net)
    ref = []
    with gb.watch(net, every=3) as w:
        _train_loop(net, 8, record=ref, clone=clone, every=3, no_grad_every_step=True)
    tr = w.trace
    np.testing.assert_array_equal(tr.steps, [0, 3, 6])
    for i, r in enumerate(ref):
        for k in ["weight_grad_norm", "grad_norm", "act_mean", "act_std", "saturated", "dead"]:
            close(getattr(tr, k)[i], getattr(r, k), atol=1e-6)


@pytest.mark.parametrize("every", [1, 2])
def test_watch_many_recorded_steps(every):
    """More recorded steps than the internal buffer (64): all kept, in order, equal to a direct check."""
    torch.manual_seed(12)
    net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 4)).to(DT)
    clone = copy.deepcopy(net)
    ref = []
    steps = 70 * every
    with gb.watch(net, every=every) as w:
        _train_loop(net, steps, record=ref, clone=clone, every=every)
    tr = w.trace
    np.testing.assert_array_equal(tr.steps, np.arange(0, steps, every))
    close(tr.weight_grad_norm, np.stack([r.weight_grad_norm for r in ref]))
    close(tr.act_std, np.stack([r.act_std for r in ref]))


def test_watch_level_norms():
    net = make_mlp("relu")
    clone = copy.deepcopy(net)
    ref = []
    with gb.watch(net, every=2, level="norms") as w:
        _train_loop(net, 5, record=ref, clone=clone, every=2)
    tr = w.trace
    np.testing.assert_array_equal(tr.steps, [0, 2, 4])
    close(tr.weight_grad_norm, np.stack([r.weight_grad_norm for r in ref]))
    for k in ["grad_norm", "act_mean", "act_std", "saturated", "dead"]:
        assert getattr(tr, k) is None
        assert getattr(tr[0], k) is None
    x, y = batch()
    snap = gb.gradients(net, x, y, level="norms")
    full = gb.gradients(net, x, y)
    close(snap.weight_grad_norm, full.weight_grad_norm, rtol=1e-6)
    assert snap.grad_norm is None and snap.act_mean is None and snap.dead is None


def _no_hooks(net):
    for name, m in net.named_modules():
        assert not m._forward_hooks, name
        assert not m._forward_pre_hooks, name
        assert not m._backward_hooks, name
    for name, p in net.named_parameters():
        assert not p._backward_hooks, name


def test_watch_removes_hooks_on_exit():
    net = make_mlp("tanh")
    x, y = batch()
    with gb.watch(net) as w:
        F.cross_entropy(net(x), y).backward()
        pending = F.cross_entropy(net(x), y)      # step 1: forward inside, backward after exit
    _no_hooks(net)
    before = w.trace
    assert len(before) == 2
    pending.backward()
    F.cross_entropy(net(x), y).backward()
    after = w.trace
    np.testing.assert_array_equal(after.steps, before.steps)
    for k in ["weight_grad_norm", "grad_norm", "act_mean", "act_std", "saturated", "dead"]:
        np.testing.assert_array_equal(getattr(after, k), getattr(before, k))
    # step 1 never got its backward inside the block: its gradient norms are missing, not invented
    assert np.isnan(after.weight_grad_norm[1]).all()


def test_watch_removes_hooks_when_loop_raises():
    net = make_mlp("tanh")
    x, y = batch()
    with pytest.raises(ZeroDivisionError):
        with gb.watch(net, every=1):
            F.cross_entropy(net(x), y).backward()
            1 / 0
    _no_hooks(net)
    with gb.watch(net) as w:                     # and it can be watched again
        F.cross_entropy(net(x), y).backward()
    assert len(w.trace) == 1
    _no_hooks(net)


def test_second_watch_on_same_model_raises_until_first_exits():
    net = make_mlp("tanh")
    with gb.watch(net) as w:
        with pytest.raises(RuntimeError):
            gb.watch(net).attach()
        with pytest.raises(RuntimeError):
            w.attach()
    with gb.watch(net):
        pass
    _no_hooks(net)


@pytest.mark.parametrize("with_optimizer", [False, True])
def test_a_one_off_measurement_inside_a_watch_is_not_a_training_step(with_optimizer):
    """gb.gradients and gb.diagnose in the middle of a watched run: the same numbers as outside it, and the
    watch's records neither gain a step nor change."""
    net = make_mlp("tanh")
    x, y = batch()
    alone, verdict = gb.gradients(net, x, y), gb.diagnose(net, x, y).verdict
    opt = torch.optim.SGD(net.parameters(), lr=0.0) if with_optimizer else None
    with gb.watch(net, optimizer=opt) as w:
        F.cross_entropy(net(x), y).backward()
        if opt is not None:
            opt.step()
        before = w.trace
        inside = gb.gradients(net, x, y)
        assert gb.diagnose(net, x, y).verdict == verdict
        after = w.trace
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()
        if opt is not None:
            opt.step()
    for k in gb.records.FIELDS:
        np.testing.assert_allclose(getattr(inside, k), getattr(alone, k), rtol=1e-6)
        np.testing.assert_array_equal(getattr(after, k), getattr(before, k))
    assert len(before) == len(after) == 1 and len(w.trace) == 2
    np.testing.assert_allclose(w.trace.weight_grad_norm[1], w.trace.weight_grad_norm[0], rtol=1e-6)
    _no_hooks(net)


def test_watch_on_parent_of_watched_submodule_raises():
    net = make_mlp("tanh")
    with gb.watch(net.layers[1]):
        with pytest.raises(RuntimeError):
            gb.watch(net).attach()
    with gb.watch(net):
        pass


def test_watch_on_submodule_of_watched_model_raises():
    net = make_mlp("tanh")
    with gb.watch(net):
        second = gb.watch(net.layers[1])
        try:
            with pytest.raises(RuntimeError):
                second.attach()
        finally:
            second.detach()
    with gb.watch(net.layers[1]):
        pass
    _no_hooks(net)


@pytest.mark.parametrize("kwargs, bad", [({"every": 0}, "0"), ({"every": -2}, "-2"), ({"every": 1.5}, "1.5"),
                                         ({"level": "bogus"}, "bogus")])
def test_watch_bad_arguments(kwargs, bad):
    net = make_mlp("tanh")
    with pytest.raises(ValueError, match=bad):
        gb.watch(net, **kwargs)
    with pytest.raises(ValueError, match=bad):
        gb.watch(net, **kwargs).__enter__()
    _no_hooks(net)


def test_watch_rejects_non_module():
    with pytest.raises(TypeError):
        gb.watch(lambda x: x)


# ---------------------------------------------------------------------------------------------
# Trace indexing
# ---------------------------------------------------------------------------------------------
def test_trace_indexing():
    net = make_mlp("tanh")
    with gb.watch(net, every=2) as w:
        _train_loop(net, 7)
    tr = w.trace
    assert len(tr) == 4
    for i in range(4):
        s = tr[i]
        assert isinstance(s, gb.Snapshot)
        assert s.step == 2 * i
        assert s.layers == tr.layers and s.activations == tr.activations
        for k in ["weight_grad_norm", "grad_norm", "act_mean", "act_std", "saturated", "dead"]:
            np.testing.assert_array_equal(getattr(s, k), getattr(tr, k)[i])
    last = tr[-1]
    assert last.step == 6
    np.testing.assert_array_equal(last.grad_norm, tr.grad_norm[3])
    np.testing.assert_array_equal(tr[-4].act_mean, tr.act_mean[0])
    with pytest.raises(IndexError):
        tr[4]
    with pytest.raises(IndexError):
        tr[-5]


def test_tiny_and_huge_float32_gradients_are_measured_accurately():
    """float32 norms square entries in float32: 1e-22 underflows and 1e20 overflows unless handled."""
    for scale in [1e-22, 1e20]:
        net = nn.Sequential(nn.Linear(16, 16, bias=False), nn.Tanh(), nn.Linear(16, 4, bias=False))
        x = torch.randn(32, 16)
        # the loss scale sets every gradient's scale; the reference is float64 autograd on the same weights
        loss_fn = lambda out, _t: scale * out.pow(2).sum()  # noqa: E731
        rec = gb.gradients(net, x, None, loss_fn=loss_fn)
        ref = copy.deepcopy(net).double()
        (scale * ref(x.double()).pow(2).sum()).backward()
        expected = [torch.linalg.vector_norm(m.weight.grad).item() for m in (ref[0], ref[2])]
        np.testing.assert_allclose(rec.weight_grad_norm, expected, rtol=1e-5)
        assert np.all(np.isfinite(rec.grad_norm)) and np.all(rec.grad_norm > 0)


def test_activations_measures_a_forward_pass_only():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3), nn.Sigmoid())
    with torch.no_grad():
        net[0].bias[:4] = -100.0    # four units never fire
    x = torch.randn(50, 6)
    snap = gb.measure.activations(net, x)
    assert snap.weight_grad_norm is None and snap.grad_norm is None
    h = net[0](x)
    assert snap.dead[0] == pytest.approx(4 / 10)
    assert snap.act_mean[0] == pytest.approx(torch.relu(h).mean().item(), rel=1e-5)
    out = net(x)
    assert snap.act_std[1] == pytest.approx(out.std(unbiased=False).item(), rel=1e-5)
    assert all(p.grad is None for p in net.parameters())


def test_capture_returns_what_enters_or_leaves_a_module():
    torch.manual_seed(0)
    net = gb.mlp(depth=3, width=5, activation="sigmoid", init="xavier_normal", in_dim=4, out_dim=2)
    x = torch.randn(7, 4)
    pre = gb.measure.capture(net, x, net.layers[2].act)
    torch.testing.assert_close(pre, net.layers[2].linear(net.hidden(x)[1]))
    post = gb.measure.capture(net, x, net.layers[2].act, what="output")
    torch.testing.assert_close(post, torch.sigmoid(pre))
    with pytest.raises(ValueError, match="not part of model"):
        gb.measure.capture(net, x, nn.Tanh())
    with pytest.raises(ValueError, match="'middle'"):
        gb.measure.capture(net, x, net.layers[0].act, what="middle")


def test_through_time_is_the_spectral_norm_of_the_jacobian():
    torch.manual_seed(0)
    net = gb.rnn(3, 6, activation="tanh", recurrent_gain=1.2).double()
    x = 0.1 * torch.randn(2, 5, 3, dtype=torch.float64)
    norms = gb.measure.through_time(net, x)
    assert norms.shape == (5,) and norms[0] == pytest.approx(1.0)       # dh_T/dh_T = I
    # direct: Jacobian of h_T with respect to h_2 (k = 2), example by example, by torch.autograd.functional
    w_in, w_rec = net.input, net.recurrent.weight

    def h_last_from(h2, example):
        h = h2
        for t in (3, 4):
            h = torch.tanh(w_in(x[example, t]) + w_rec @ h)
        return h
    hs = net.states(x)
    direct = np.mean([torch.linalg.matrix_norm(torch.autograd.functional.jacobian(
        lambda h: h_last_from(h, e), hs[2][e].detach()), ord=2).item() for e in range(2)])
    assert norms[2] == pytest.approx(direct, rel=1e-10)


def test_through_time_follows_the_recurrent_scale():
    torch.manual_seed(1)
    x = 0.01 * torch.randn(4, 60, 2, dtype=torch.float64)
    small = gb.measure.through_time(gb.rnn(2, 32, recurrent_gain=0.8).double(), x)
    assert small[-1] < 0.8 ** 50                         # Pascanu's sufficient condition: it vanishes
    with pytest.raises(TypeError, match="ElmanRNN"):
        gb.measure.through_time(nn.RNN(2, 4), x)


def test_measurements_leave_batchnorm_statistics_untouched():
    gb.setup(0)
    net = gb.mlp(depth=2, width=4, activation="sigmoid", in_dim=3, norm="batch", out_dim=2)
    x = torch.randn(10, 3) + 5
    before = [b.clone() for b in net.buffers()]
    gb.measure.capture(net, x, net.layers[0].act)
    gb.measure.activations(net, x)
    gb.gradients(net, x, torch.randint(0, 2, (10,)))
    for old, new in zip(before, net.buffers()):
        torch.testing.assert_close(old, new)


# --- stream: the output of every block and the gradient it receives --------------------------------------

@pytest.mark.parametrize("residual", [False, True])
def test_stream_matches_direct_autograd_at_each_block_output(residual):
    torch.manual_seed(0)
    net = gb.mlp(12, 32, activation="tanh", init="xavier_normal", in_dim=8, out_dim=3, residual=residual).double()
    x, y = torch.randn(16, 8, dtype=DT), torch.randint(0, 3, (16,))
    hs = net.hidden(x)
    grads = torch.autograd.grad(F.cross_entropy(net.readout(hs[-1]), y), hs)
    s = gb.measure.stream(net, x, y)
    assert s.names == [f"layers.{i}" for i in range(12)]
    np.testing.assert_allclose(s.rms, [h.detach().pow(2).mean().sqrt().item() for h in hs], rtol=1e-12)
    np.testing.assert_allclose(s.grad_norm, [g.norm().item() for g in grads], rtol=1e-12)


def test_stream_of_a_sequential_leaves_grads_and_batchnorm_statistics_untouched():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.Tanh(), nn.Linear(10, 2))
    x, y = torch.randn(20, 6), torch.randn(20, 2)
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    stats = copy.deepcopy(model[1].state_dict())
    s = gb.measure.stream(model, x, y)
    assert s.names == ["0", "1", "2", "3"]
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())
    assert all(torch.equal(v, stats[k]) for k, v in model[1].state_dict().items())
    # the last block's output is the model's: dL/dout of the mean squared error
    assert s.grad_norm[-1] == pytest.approx((2 * (model(x) - y) / y.numel()).norm().item(), rel=1e-5)


def test_stream_measures_a_block_output_before_a_later_in_place_change():
    torch.manual_seed(2)
    lin = nn.Linear(5, 5).double()
    model = nn.Sequential(lin, nn.ReLU(inplace=True), nn.Linear(5, 1).double())
    x = torch.randn(9, 5, dtype=DT)
    a = lin(x)
    (g,) = torch.autograd.grad((model[2](torch.relu(a)) ** 2).sum() / 2, a)
    s = gb.measure.stream(model, x, blocks=[lin])
    assert s.grad_norm[0] == pytest.approx(g.norm().item(), rel=1e-12)
    assert s.rms[0] == pytest.approx(a.pow(2).mean().sqrt().item(), rel=1e-12)


def test_stream_bad_input_names_what_is_wrong():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 1)

        def forward(self, x):
            return self.b(self.a(self.a(x)))

    model, x = Custom(), torch.randn(4, 3)
    with pytest.raises(TypeError, match="blocks="):
        gb.measure.stream(model, x)
    with pytest.raises(ValueError, match="not part of it: \\['Linear'\\]"):
        gb.measure.stream(model, x, blocks=[nn.Linear(3, 3)])
    with pytest.raises(ValueError, match="once per forward pass.*'a': 2"):
        gb.measure.stream(model, x, blocks=[model.a, model.b])
    frozen = nn.Sequential(nn.Linear(3, 1)).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        gb.measure.stream(frozen, x)


def test_norms_compile_without_a_graph_break():
    """records.norms runs inside the hooks of a torch.compile'd model: no .item() there, so no graph break,
    and the same accurate norm of a gradient too small for a float32 sum of squares."""
    x = torch.full((100,), 1e-25)            # float32 would square each entry to 0: the norm is 1e-24
    explained = torch._dynamo.explain(lambda t: gb.records.norms([t]))(x)
    assert explained.graph_break_count == 0
    compiled = torch.compile(lambda t: gb.records.norms([t]))(x)
    torch.testing.assert_close(compiled, gb.records.norms([x]))
    assert compiled.item() == pytest.approx(1e-24, rel=1e-6)
