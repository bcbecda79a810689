"""gradbook.onepass: one measured pass, with the numbers of a step recorded by gb.watch, leaving the model as it was."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradbook as gb
from gradbook.onepass import run
from gradbook.probe import MEASURING


def _net(seed=0, norm=None):
    torch.manual_seed(seed)
    return gb.mlp(4, 16, "tanh", "xavier_normal", in_dim=6, out_dim=3, norm=norm)


def _batch(seed=1, n=32):
    g = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_the_same_numbers_as_a_step_recorded_by_watch():
    net, (x, y) = _net(), _batch()
    snap, loss = run(net, x, y)
    with gb.watch(net) as w:
        F.cross_entropy(net(x), y).backward()
    net.zero_grad(set_to_none=True)
    recorded = w.trace[-1]
    assert snap.layers == recorded.layers and snap.activations == recorded.activations
    for k in gb.records.FIELDS:
        np.testing.assert_allclose(getattr(snap, k), getattr(recorded, k), rtol=1e-6, err_msg=k)
    with torch.no_grad():
        assert loss == pytest.approx(float(F.cross_entropy(net(x), y)), rel=1e-6)


def test_relu_statistics_against_a_direct_count():
    """Saturated: the fraction of ReLU outputs that are 0; dead: units 0 for every example; mean and std."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(6, 64), nn.ReLU(), nn.Linear(64, 3))
    with torch.no_grad():
        net[0].bias[:10] = -50.0          # ten units dead on every example
    x = torch.randn(200, 6)
    h = torch.relu(net[0](x)).detach()
    snap, _ = run(net, x, torch.randint(0, 3, (200,)))
    assert snap.saturated[0] == pytest.approx(float((h == 0).double().mean()), abs=1e-12)
    assert snap.dead[0] == pytest.approx(float((h.amax(0) == 0).double().mean()), abs=1e-12)
    assert snap.dead[0] >= 10 / 64
    assert snap.act_mean[0] == pytest.approx(float(h.double().mean()), rel=1e-6)
    assert snap.act_std[0] == pytest.approx(float(h.double().std(unbiased=False)), rel=1e-5)


def test_relu_counts_are_exact_in_bfloat16():
    """A bfloat16 sum holds 8 significant bits: counts are taken in float32, so a fraction is not rounded."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 257), nn.ReLU(), nn.Linear(257, 3)).to(torch.bfloat16)
    x = torch.randn(61, 6, dtype=torch.bfloat16)
    h = torch.relu(net[0](x)).detach()
    snap, _ = run(net, x, torch.randint(0, 3, (61,)))
    assert snap.saturated[0] == float((h == 0).double().mean())


def test_model_left_as_it_was():
    net, (x, y) = _net(norm="batch"), _batch()
    F.cross_entropy(net(x), y).backward()
    grads = [p.grad.clone() for p in net.parameters()]
    buffers = [b.clone() for b in net.buffers()]
    run(net, x, y)
    for p, g in zip(net.parameters(), grads):
        assert torch.equal(p.grad, g)
    for b, old in zip(net.buffers(), buffers):
        assert torch.equal(b, old)
    assert net not in MEASURING
    for _, m in net.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_forward_only_and_norms_level():
    net, (x, y) = _net(), _batch()
    fwd, loss = run(net, x, backward=False)
    assert fwd.weight_grad_norm is None and fwd.grad_norm is None and np.isnan(loss)
    assert np.isfinite(fwd.act_std).all()
    norms, _ = run(net, x, y, level="norms")
    assert norms.grad_norm is None and norms.act_std is None and norms.activations == []
    np.testing.assert_allclose(norms.weight_grad_norm, run(net, x, y)[0].weight_grad_norm, rtol=1e-6)


def test_a_non_finite_loss_is_returned_not_back_propagated():
    net, (x, y) = _net(), _batch()
    snap, loss = run(net, x, y, loss_fn=lambda out, t: out.sum() * float("inf"))
    assert not np.isfinite(loss)
    assert (snap.weight_grad_norm == 0).all()


def test_bad_arguments_and_a_failing_forward_leave_nothing_behind():
    net, (x, y) = _net(), _batch()
    with pytest.raises(ValueError, match="level"):
        run(net, x, y, level="everything")
    frozen = _net().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        run(frozen, x, y)
    with pytest.raises(ValueError, match="expects in_features=6"):
        run(net, torch.randn(4, 7), y)   # the wrong input width, said by gradbook.batches.call
    assert net not in MEASURING
    for _, m in net.named_modules():
        assert not m._forward_hooks
    assert not nn.modules.module._global_forward_hooks and not nn.modules.module._global_forward_pre_hooks


def test_which_modules_are_layers_and_recurrent():
    """records.is_layer: a layer type with a trainable parameter of its own; records.is_recurrent: torch's RNNs
    or a class with a ``states`` method (an attribute of that name on an instance is not one)."""
    frozen = nn.Linear(3, 3).requires_grad_(False)
    assert gb.records.is_layer(nn.Linear(3, 3)) and not gb.records.is_layer(frozen)
    assert not gb.records.is_layer(nn.LayerNorm(3)) and not gb.records.is_layer(nn.Sequential(nn.Linear(3, 3)))
    assert gb.records.is_recurrent(nn.GRU(3, 3)) and gb.records.is_recurrent(gb.rnn(3, 4, 2))
    odd = nn.Linear(3, 3)
    odd.states = 1
    assert not gb.records.is_recurrent(odd) and not gb.records.is_recurrent(nn.Linear(3, 3))
    modules = list(nn.Sequential(nn.Linear(3, 3), frozen, nn.ReLU()).named_modules())
    assert [n for n, _ in gb.records.layers(modules)] == ["0"]


def test_the_inventory_lists_what_torch_lists():
    """records.Inventory: one walk, the same lists as named_modules, named_parameters, buffers, layers,
    weight_tensors and activation_modules, for tied weights, frozen layers, buffers and attention."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.body = nn.Embedding(10, 8), gb.mlp(2, 8, "tanh", norm="batch")
            self.frozen, self.out = nn.Linear(8, 8).requires_grad_(False), nn.Linear(8, 10, bias=False)
            self.out.weight = self.emb.weight
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    for model in (Tied(), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), _net(norm="batch")):
        inv = gb.records.Inventory(model)
        assert inv.modules == list(model.named_modules())
        assert [(n, id(p)) for n, p in inv.named_params] == [(n, id(p)) for n, p in model.named_parameters()]
        assert [id(p) for p in inv.params] == [id(p) for p in model.parameters() if p.requires_grad]
        assert [id(b) for b in inv.buffers] == [id(b) for b in model.buffers()]
        assert inv.layers == gb.records.layers(model) and gb.records.layers(inv) is inv.layers
        assert [[id(w) for w in ws] for ws in inv.weights] == \
            [[id(w) for w in gb.records.weight_tensors(m)] for _, m in gb.records.layers(model)]
        assert [a[:2] for a in inv.acts] == [a[:2] for a in gb.records.activation_modules(model)]
        assert not inv.compiled
        np.testing.assert_array_equal(gb.records.weight_norms(inv), gb.records.weight_norms(gb.records.layers(model)))


def test_to_numpy_reads_cpu_tensors_in_place_and_the_rest_in_one_transfer():
    """The CPU float path (each tensor read in place) and the general one (stacked by dtype) agree."""
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(5, generator=g), torch.tensor(2.5, dtype=torch.float64), torch.randn(2, 3, generator=g)]
    fast = gb.records.to_numpy(tensors)
    general = gb.records.to_numpy(tensors + [torch.ones(2, dtype=torch.bfloat16)])   # bfloat16: no in-place read
    assert [a.dtype for a in fast] == [np.float64] * 3 and [a.shape for a in fast] == [(5,), (1,), (6,)]
    for a, b, t in zip(fast, general, tensors):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, t.double().reshape(-1).numpy())
    np.testing.assert_array_equal(general[3], [1.0, 1.0])


def test_modules_outside_the_model_are_passed_over():
    """The pass's hooks are global (one registration, not one per module) and pass over the modules of
    another network that the model's forward happens to run: only the model's layers are measured."""
    helper = _net(seed=5)

    class Uses(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.hidden = _net(), [helper]   # in a list: not a submodule

        def forward(self, x):
            return self.net(x) + self.hidden[0](x).detach()
    model, (x, y) = Uses(), _batch()
    snap, _ = run(model, x, y)
    alone, _ = run(model.net, x, y)
    assert snap.layers == ["net." + n for n in alone.layers]
    for k in gb.records.FIELDS:
        assert getattr(snap, k).shape == getattr(alone, k).shape, k
    np.testing.assert_allclose(snap.act_std, alone.act_std, rtol=1e-6)


def test_weight_gradients_are_read_as_they_arrive_and_not_kept():
    """Each weight's gradient norm is read when the backward pass accumulates it and the gradient let go at
    once (no second set of gradients beside the caller's): the same norms as a plain backward pass, for a
    weight tied between two layers (counted in each), a layer the loss does not reach (0) and a frozen one."""
    torch.manual_seed(0)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.mid, self.unused = nn.Embedding(12, 8), nn.Linear(8, 8), nn.Linear(8, 8)
            self.frozen, self.out = nn.Linear(8, 8).requires_grad_(False), nn.Linear(8, 12, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, x):
            return self.out(self.frozen(torch.tanh(self.mid(self.emb(x)))))
    model, x = Tied(), torch.randint(0, 12, (4, 5))
    y = torch.randint(0, 12, (4, 5))
    seen = []   # when the tied weight's gradient arrives (the last), is mid's, read before, still held?
    model.emb.weight.register_post_accumulate_grad_hook(lambda w: seen.append(model.mid.weight.grad))
    snap, _ = run(model, x, y)
    assert len(seen) == 1 and seen[0] is None
    F.cross_entropy(model(x).reshape(-1, 12), y.reshape(-1)).backward()
    expected = [float(m.weight.grad.norm()) if m.weight.grad is not None else 0.0 for _, m in gb.records.layers(model)]
    assert snap.layers == ["emb", "mid", "unused", "out"] and expected[2] == 0.0
    np.testing.assert_allclose(snap.weight_grad_norm, expected, rtol=1e-6)


def test_a_sparse_embedding_gradient_is_measured():
    """nn.Embedding(sparse=True) gives a sparse COO gradient (rows of the tokens in the batch, repeated
    tokens as duplicate entries): its norm is that of the summed rows, in a pass, a watch and a diagnosis
    (torch's vector norm has no sparse kernel: the diagnosis raised NotImplementedError before)."""
    torch.manual_seed(0)

    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.out = nn.Embedding(50, 8, sparse=True), nn.Linear(8, 50)

        def forward(self, x):
            return self.out(self.emb(x).mean(1))
    model, x, y = Bag(), torch.randint(0, 10, (4, 6)), torch.randint(0, 50, (4,))   # 24 tokens of 10: repeats
    snap, _ = run(model, x, y)
    F.cross_entropy(model(x), y).backward()
    expected = [float(model.emb.weight.grad.to_dense().norm()), float(model.out.weight.grad.norm())]
    np.testing.assert_allclose(snap.weight_grad_norm, expected, rtol=1e-6)
    model.zero_grad(set_to_none=True)
    with gb.watch(model) as w:
        F.cross_entropy(model(x), y).backward()
    np.testing.assert_allclose(w.trace.weight_grad_norm[-1], expected, rtol=1e-6)
    assert gb.diagnose(model, x, y).verdict in gb.diagnosis.VERDICTS
