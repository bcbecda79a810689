"""gb.diagnose on a labelled zoo of small models whose truth is known by construction, and on awkward modules."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import gradbook as gb
from gradbook.profiles import log_change
from gradbook.theory import TRAINABLE_DEPTH_SCALES as THRESHOLD


def _seq(depth, width, act, var=None, in_dim=16, out=10):
    """nn.Sequential of Linear+act; PyTorch's default init, or weights N(0, var/fan_in) and zero biases."""
    mods, d = [], in_dim
    for _ in range(depth):
        lin = nn.Linear(d, width)
        if var is not None:
            nn.init.normal_(lin.weight, 0, math.sqrt(var / d))
            nn.init.zeros_(lin.bias)
        mods += [lin, act()]
        d = width
    return nn.Sequential(*mods, nn.Linear(d, out))


class _TorchLSTM(nn.Module):
    def __init__(self, forget_bias):
        super().__init__()
        self.rnn, self.out = nn.LSTM(4, 32, batch_first=True), nn.Linear(32, 1)
        with torch.no_grad():
            for b in (self.rnn.bias_ih_l0, self.rnn.bias_hh_l0):
                b[32:64].fill_(forget_bias / 2)

    def forward(self, x):
        return self.out(self.rnn(x)[0][:, -1])


class _GRU(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.out = nn.GRU(4, 32), nn.Linear(32, 1)   # time-major: batch_first=False

    def forward(self, x):
        return self.out(self.rnn(x)[0][-1])


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = nn.Linear(32, 1)

    def forward(self, x):
        return self.out(self.enc(self.inp(x)).mean(1))


def _cnn():
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(16, 16, 3, padding=1),
                        nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
            nn.init.zeros_(m.bias)
    return net


def _scaled_residual(depth):
    """He-init residual blocks whose branches are scaled by depth^-1/2 (Fixup's idea): the signal stays O(1)."""
    return gb.mlp(depth, 64, "relu", "he", residual=True, branch_scale=depth ** -0.5, in_dim=16, out_dim=10)


X = (lambda: (torch.randn(64, 16), torch.randint(0, 10, (64,))))
SEQ = (lambda: (torch.randn(32, 50, 4) * 0.01, torch.randn(32, 1)))

# name -> (truth, model factory, data factory). The truth follows from the construction:
ZOO = {
    # sigmoid' <= 1/4 with n Var W = 1/3: the gradient loses >= 12x per layer (Glorot & Bengio 2010)
    "deep sigmoid, standard init": ("vanishing", lambda: gb.mlp(10, 64, "sigmoid", "standard", in_dim=16, out_dim=10), X),
    # PyTorch's default Linear init is U(+-1/sqrt(fan_in)): n Var W = 1/3 < 1 for tanh, < 2 for ReLU
    "tanh, PyTorch default init, depth 20": ("vanishing", lambda: _seq(20, 64, nn.Tanh), X),
    "ReLU, PyTorch default init, depth 20": ("vanishing", lambda: _seq(20, 64, nn.ReLU), X),
    # Xavier's variance 1/fan_in halves a ReLU signal's second moment per layer: 2^-30 (He et al. 2015)
    "ReLU, Xavier init, depth 30": ("vanishing", lambda: gb.mlp(30, 128, "relu", "xavier_normal", in_dim=16, out_dim=10), X),
    # tanh in the chaotic phase, sigma_w^2 = 4: chi = 1.36 per layer (mean field)
    "tanh, sigma_w = 2, depth 30": ("exploding", lambda: _seq(30, 128, nn.Tanh, var=4.0), X),
    # ReLU with sigma_w^2 = 4 doubles the signal's second moment per layer
    "ReLU, sigma_w^2 = 4, depth 20": ("exploding", lambda: _seq(20, 64, nn.ReLU, var=4.0), X),
    # He-init residual blocks without scaling: each block adds a branch as large as its input (2^20)
    "ReLU residual, unscaled He branches, depth 20": ("exploding", lambda: gb.mlp(20, 64, "relu", "he", residual=True, in_dim=16, out_dim=10), X),
    "vanilla RNN, sigma_max(W_rec) = 1.6": ("exploding", lambda: gb.rnn(4, 32, 1, recurrent_gain=1.6), SEQ),
    # gamma * sigma_max = 0.6 < 1: Pascanu et al.'s sufficient condition for vanishing, 0.6^50
    "vanilla RNN, sigma_max(W_rec) = 0.6": ("vanishing", lambda: gb.rnn(4, 32, 1, recurrent_gain=0.6), SEQ),
    # chi = sigma_w^2 / 2 = 1 exactly
    "ReLU, He init, depth 20": ("healthy", lambda: gb.mlp(20, 64, "relu", "he", in_dim=16, out_dim=10), X),
    "tanh, Xavier init, depth 10": ("healthy", lambda: gb.mlp(10, 64, "tanh", "xavier_normal", in_dim=16, out_dim=10), X),
    "sigmoid with batch norm, depth 20": ("healthy", lambda: gb.mlp(20, 64, "sigmoid", "standard", norm="batch", in_dim=16, out_dim=10), X),
    "ReLU residual, branches scaled by depth^-1/2": ("healthy", lambda: _scaled_residual(20), X),
    # forget gate sigmoid(3) = 0.95 on average keeps the cell state's gradient over 50 steps; with the
    # usual bias of 1, sigmoid(1) = 0.73 and 0.73^50 = 1e-7 on the cell path: an LSTM is no cure by itself
    "LSTM, forget-gate bias 3": ("healthy", lambda: gb.lstm(4, 32, 1, forget_bias=3.0), SEQ),
    "nn.LSTM, forget-gate bias 3": ("healthy", lambda: _TorchLSTM(3.0), SEQ),
    "nn.LSTM, forget-gate bias 1, 50 steps": ("vanishing", lambda: _TorchLSTM(1.0), SEQ),
    "CNN with He init, in-place ReLU": ("healthy", _cnn, lambda: (torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)))),
    "transformer encoder, 2 layers": ("healthy", _Encoder, lambda: (torch.randn(8, 10, 4), torch.randn(8, 1))),
}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_verdicts(name, seed):
    truth, make, data = ZOO[name]
    torch.manual_seed(seed)
    model = make()
    x, y = data()
    d = gb.diagnose(model, x, y)
    assert d.verdict == truth, f"{name}: {d.verdict}, {d.reason}"
    assert (d.start is None) == (truth == "healthy")
    assert bool(d.remedies) == (truth != "healthy")
    assert d.verdict.upper() in d.report()


def test_remedies_name_the_cause_and_link_chapters():
    torch.manual_seed(0)
    sig = gb.diagnose(gb.mlp(10, 64, "sigmoid", "standard", in_dim=16, out_dim=10), *X())
    assert any("sigmoid" in r.action or "sigmoid" in r.reason for r in sig.remedies[:3])
    rnn = gb.diagnose(gb.rnn(4, 32, 1, recurrent_gain=1.6), *SEQ())
    assert rnn.remedies[0].topic == "clipping"
    relu = gb.diagnose(gb.mlp(30, 128, "relu", "xavier_normal", in_dim=16, out_dim=10), *X())
    assert any("He" in r.action for r in relu.remedies[:2]), relu.remedies
    assert relu.start.endswith("(ReLU)")
    # every remedy points to a chapter of the book, at its full address on the website
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[1]
    for d in (sig, rnn, relu):
        for r in d.remedies:
            assert r.page.startswith(gb.book.SITE) and r.page.endswith(".html") and r.page in str(r)
            document = r.page[len(gb.book.SITE):-len(".html")]
            assert list(root.glob(document + ".*")), r.page


def test_evidence_is_per_layer_and_update_ratio_follows_lr():
    torch.manual_seed(0)
    net = gb.mlp(6, 32, "tanh", "xavier_normal", in_dim=16, out_dim=10)
    x, y = X()
    d = gb.diagnose(net, x, y, lr=0.1)
    assert d.layers == [n for n, _ in gb.records.layers(net)] and len(d.relative_grad) == 7
    np.testing.assert_allclose(d.update_ratio, 0.1 * d.weight_grad_norm / d.weight_norm)
    np.testing.assert_allclose(d.weight_norm[0], net.layers[0].linear.weight.detach().norm().item(), rtol=1e-6)
    assert "update ratio" in d.report()
    assert gb.diagnose(net, x, y).update_ratio is None
    axes = gb.plot.diagnosis(d)
    assert len(axes) == 3
    import matplotlib.pyplot as plt
    plt.close("all")


def test_leaves_model_untouched_and_frozen_layers_are_skipped():
    torch.manual_seed(0)
    net = gb.mlp(5, 32, "relu", "he", norm="batch", in_dim=16, out_dim=10)
    net.layers[0].linear.weight.requires_grad_(False)
    x, y = X()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    d = gb.diagnose(net, x, y)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())
    assert d.verdict == "healthy"
    # the frozen layer's bias still learns, so the layer is measured by its bias; nothing is NaN-poisoned
    assert np.isfinite(d.depth_scales["backward"])


def test_hooks_removed_when_forward_raises():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            self.lin(x)
            raise RuntimeError("boom")
    m = Boom()
    with pytest.raises(RuntimeError, match="boom"):
        gb.diagnose(m, torch.randn(2, 4))
    assert not m._forward_hooks and not m._forward_pre_hooks and not m.lin._forward_hooks
    gb.gradients(nn.Linear(4, 4), torch.randn(2, 4))   # nothing is left "watched"
    with gb.watch(m):
        pass


def test_nonfinite_gradient_is_exploding_and_named():
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    with torch.no_grad():
        net[2].weight.fill_(float("inf"))
    d = gb.diagnose(net, torch.randn(4, 4), torch.randn(4, 1))
    # the loss itself is inf at initialization: a verdict of its own, with the module where it appeared
    assert d.verdict == "non-finite" and d.start == "2 (Linear)" and "the loss is nan" in d.reason
    assert d.remedies and "non-finite" in d.report().lower()
    # a finite loss whose gradient is not finite (sqrt at 0) is exploding, named from the output side
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    d = gb.diagnose(net, torch.randn(4, 4), loss_fn=lambda out, y: (out - out.detach()).sqrt().sum())
    assert d.verdict == "exploding" and "not finite" in d.reason and d.start == "2 (Linear)"


def test_time_axis_follows_batch_first():
    torch.manual_seed(0)
    d = gb.diagnose(_GRU(), torch.randn(50, 8, 4) * 0.1, torch.randn(8, 1))   # (time, batch, features)
    assert d.time_grad is not None and len(d.time_grad) == 50
    with pytest.raises(ValueError, match="time_dim must be 0 or 1"):
        gb.diagnose(_GRU(), torch.randn(50, 8, 4), torch.randn(8, 1), time_dim=2)


def test_bad_input_is_refused_clearly():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        gb.diagnose("net", torch.randn(2, 4))
    with pytest.raises(ValueError, match="lr must be a positive number, got -1"):
        gb.diagnose(nn.Linear(4, 4), torch.randn(2, 4), lr=-1)
    with pytest.raises(ValueError, match="no trainable"):
        gb.diagnose(nn.Sequential(nn.Tanh()), torch.randn(2, 4))


def test_watch_diagnoses_a_window_of_training():
    torch.manual_seed(0)
    net = gb.mlp(10, 64, "sigmoid", "standard", in_dim=16, out_dim=10)
    x, y = X()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with gb.watch(net, every=2) as w:
        for _ in range(6):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    d = gb.diagnosis.from_trace(net, w.trace, lr=0.1)
    assert d.verdict == "vanishing" and d.update_ratio is not None
    with gb.watch(net, level="norms") as w:
        net(x).sum().backward()
    with pytest.raises(ValueError, match="level='full'"):
        gb.diagnosis.from_trace(net, w.trace)


def test_log_change_is_robust_to_one_odd_entry():
    prof = np.exp(-0.5 * np.arange(10))
    assert log_change(prof) == pytest.approx(-4.5)
    prof[-1] = 1e3                          # a read-out with another shape
    assert log_change(prof) == pytest.approx(-4.5)
    assert log_change(np.array([1.0, np.nan, 0.0])) == 0.0
    assert THRESHOLD == 6.0 == gb.theory.TRAINABLE_DEPTH_SCALES


def test_the_batch_is_checked_before_any_verdict():
    """Bad inputs, targets and learning rates get errors that name the argument, the value and what is allowed."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    bad = x.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"inputs holds 1 non-finite value"):
        gb.diagnose(net, bad, y)                      # not "exploding, starts at 2 (Linear)"
    with pytest.raises(ValueError, match=r"targets holds 3 non-finite value\(s\)"):
        gb.diagnose(net, x, torch.tensor([0.0, 1, float("inf"), 0, 0, 0]).reshape(6, 1).expand(6, 3))
    with pytest.raises(ValueError, match=r"inputs is an empty batch .*shape \(0, 4\)"):
        gb.diagnose(net, torch.randn(0, 4), y[:0])
    with pytest.raises(ValueError, match=r"lr must be a positive number, got '0.1'"):
        gb.diagnose(net, x, y, lr="0.1")
    with pytest.raises(TypeError, match=r"targets must be a torch.Tensor, got a NumPy array of shape \(6,\)"):
        gb.diagnose(net, x, y.numpy())
    with pytest.raises(ValueError, match=r"cannot run on inputs \(a torch.float32 tensor of shape \(6, 5\)\).*in_features=4"):
        gb.diagnose(net, torch.randn(6, 5), y)
    with pytest.raises(ValueError, match=r"integer targets of shape \(6, 2\) do not fit outputs of shape \(6, 3\)"):
        gb.diagnose(net, x, torch.zeros(6, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="loss_fn must return a scalar tensor"):
        gb.diagnose(net, x, y, loss_fn=lambda out, t: out)
    with pytest.raises(TypeError, match=r"returned dict; pass loss_fn"):
        gb.diagnose(_Dict(), x, y)


class _Dict(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return {"logits": self.lin(x)}


def test_loss_fn_receives_exactly_what_the_model_returned():
    seen = []

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

        def forward(self, x, scale):
            h = torch.tanh(self.a(x)) * scale
            return h.detach().mean(), {"logits": self.b(h)}

    def loss(out, y):
        seen.append(out)
        return nn.functional.cross_entropy(out[1]["logits"], y)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    d = gb.diagnose(Model(), (x, 2.0), y, loss_fn=loss)
    assert isinstance(seen[0], tuple) and isinstance(seen[0][1], dict) and d.verdict == "healthy"
    assert d.makeup.functional == {"tanh": 1}
    d = gb.diagnose(Model(), {"x": x, "scale": 1.0}, y, loss_fn=loss)
    assert np.all(d.weight_grad_norm > 0)


def test_language_model_logits_take_token_targets_with_the_default_loss():
    torch.manual_seed(0)
    lm = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 20))
    tokens = torch.randint(0, 20, (4, 7))
    d = gb.diagnose(lm, tokens, torch.randint(0, 20, (4, 7)))        # (B, T, V) logits, (B, T) targets
    assert np.isfinite(d.loss) and d.loss == pytest.approx(np.log(20), rel=0.3)
