"""gb.diagnose on a zoo of the models practitioners train (issue 18): token models, transformers, CNNs,
residual stacks, functional and unknown activations, dict/tuple outputs, multi-argument forwards, other
dtypes, frozen layers, eval mode, torch.compile and autocast.

Each entry states its truth and how it is known: by construction (mean-field theory, or a model with no
depth to vanish through) or by training it briefly (``test_truth_by_training`` trains those entries and
checks that the healthy ones learn and the exploding one diverges). Every model must get its true verdict,
or "cannot tell" where that is the truth (a model whose layers mostly receive no gradient); none may crash.
"""
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradbook as gb

V, T, D = 50, 16, 32   # vocabulary, sequence length, model width


def _emb(std):
    e = nn.Embedding(V, D)
    nn.init.normal_(e.weight, 0, std)
    return e


class BagOfWords(nn.Module):
    """Embedding -> mean over tokens -> Linear: two layers, no depth."""
    def __init__(self, std, bag=False):
        super().__init__()
        self.bag = bag
        self.emb = nn.EmbeddingBag(V, D, mode="mean") if bag else _emb(std)
        if bag:
            nn.init.normal_(self.emb.weight, 0, std)
        self.out = nn.Linear(D, 4)

    def forward(self, x):
        return self.out(self.emb(x) if self.bag else self.emb(x).mean(1))


class RecurrentLM(nn.Module):
    """A language model: embedding, one GRU or LSTM layer, a read-out at every position."""
    def __init__(self, cell, std):
        super().__init__()
        self.emb, self.rnn, self.out = _emb(std), cell(D, D, batch_first=True), nn.Linear(D, V)

    def forward(self, x):
        return self.out(self.rnn(self.emb(x))[0])


class Encoder(nn.Module):
    """Tokens through nn.TransformerEncoder (post-LN, or pre-LN with a final LayerNorm), a read-out per token."""
    def __init__(self, depth, pre_ln, std=1.0):
        super().__init__()
        self.emb = _emb(std)
        layer = nn.TransformerEncoderLayer(D, 4, 2 * D, dropout=0.0, batch_first=True, norm_first=pre_ln)
        self.enc = nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(D) if pre_ln else None,
                                         enable_nested_tensor=False)
        self.out = nn.Linear(D, V)

    def forward(self, x):
        return self.out(self.enc(self.emb(x)))


class Block(nn.Module):
    def __init__(self, depth):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(D), nn.MultiheadAttention(D, 4, batch_first=True)
        self.ln2, self.fc, self.proj = nn.LayerNorm(D), nn.Linear(D, 4 * D), nn.Linear(4 * D, D)
        for w in (self.attn.out_proj.weight, self.proj.weight):   # GPT-2's 1/sqrt(2L) residual projections
            nn.init.normal_(w, 0, 0.02 / math.sqrt(2 * depth))

    def forward(self, x, mask):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A small GPT: token and position embeddings (std 0.02), pre-LN blocks, tied read-out."""
    def __init__(self, depth=4):
        super().__init__()
        self.tok, self.pos = _emb(0.02), nn.Embedding(T, D)
        nn.init.normal_(self.pos.weight, 0, 0.02)
        self.blocks = nn.ModuleList(Block(depth) for _ in range(depth))
        self.ln = nn.LayerNorm(D)
        for m in self.modules():
            if isinstance(m, nn.Linear) and m not in (b.proj for b in self.blocks):
                nn.init.normal_(m.weight, 0, 0.02)

    def forward(self, x):
        mask = torch.triu(torch.full((x.shape[1], x.shape[1]), float("-inf")), 1)
        h = self.tok(x) + self.pos(torch.arange(x.shape[1]))
        for b in self.blocks:
            h = b(h, mask)
        return self.ln(h) @ self.tok.weight.T


def _he(net):
    for m in net.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight)
            nn.init.zeros_(m.bias)
    return net


def _cnn(depth, bn, he=True):
    mods, c = [], 1
    for _ in range(depth):
        mods += [nn.Conv2d(c, 8, 3, padding=1)] + ([nn.BatchNorm2d(8)] if bn else []) + [nn.ReLU()]
        c = 8
    net = nn.Sequential(*mods, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    return _he(net) if he else net


class PreLNResidual(nn.Module):
    """Residual MLP blocks x + W2 relu(W1 LN(x)), He init: normalization keeps the stream in check."""
    def __init__(self, depth):
        super().__init__()
        self.inp = nn.Linear(16, 64)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
                                    for _ in range(depth))
        self.out = nn.Linear(64, 10)
        _he(self)

    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks:
            x = x + b(x)
        return self.out(x)


class Functional(nn.Module):
    """Linear layers with a nonlinearity called as a function (torch.sigmoid, F.relu) in forward."""
    def __init__(self, depth, fn, he=False):
        super().__init__()
        self.fn = fn
        self.layers = nn.ModuleList(nn.Linear(16 if i == 0 else 64, 64) for i in range(depth))
        self.out = nn.Linear(64, 10)
        if he:
            _he(self)

    def forward(self, x):
        for lin in self.layers:
            x = self.fn(lin(x))
        return self.out(x)


class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = gb.mlp(10, 64, "relu", "he", in_dim=16, out_dim=10)

    def forward(self, x):
        y = self.net(x)
        return {"logits": y, "norm": y.norm()}


class TupleOut(DictOut):
    def forward(self, x):
        y = self.net(x)
        return y.detach().mean(), y        # an auxiliary scalar first


class TwoArgs(DictOut):
    def forward(self, x, mask):
        return self.net(x * mask)


def _seq(depth, act, var=None, dtype=torch.float32):
    """Linear + activation modules, PyTorch's default init or N(0, var/fan_in) with zero biases."""
    mods, d = [], 16
    for _ in range(depth):
        lin = nn.Linear(d, 64)
        if var is not None:
            nn.init.normal_(lin.weight, 0, math.sqrt(var / d))
            nn.init.zeros_(lin.bias)
        mods += [lin, act()]
        d = 64
    return nn.Sequential(*mods, nn.Linear(d, 10)).to(dtype)


def _frozen(net, n_trainable):
    """All but the first ``n_trainable`` Linear layers frozen."""
    for i, lin in enumerate(m for m in net.modules() if isinstance(m, nn.Linear)):
        if i >= n_trainable:
            lin.requires_grad_(False)
    return net


def _frozen_tanh():
    net = _seq(20, nn.Tanh)
    for lin in list(net)[:10:2]:      # the first five Linear layers: a frozen "backbone"
        lin.requires_grad_(False)
    return net


def _eval(model):
    return model.eval()


def _compiled(make):
    return lambda: torch.compile(make())


TOKENS = lambda: (torch.randint(0, V, (16, T)), torch.randint(0, 4, (16,)))        # noqa: E731
LM = lambda: (torch.randint(0, V, (16, T)), torch.randint(0, V, (16, T)))          # noqa: E731
X = lambda: (torch.randn(64, 16), torch.randint(0, 10, (64,)))                     # noqa: E731
X64 = lambda: (torch.randn(64, 16, dtype=torch.float64), torch.randint(0, 10, (64,)))   # noqa: E731
XBF = lambda: (torch.randn(64, 16, dtype=torch.bfloat16), torch.randint(0, 10, (64,)))  # noqa: E731
IMG = lambda: (torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)))             # noqa: E731
TWO = lambda: ((torch.randn(64, 16), torch.ones(64, 16)), torch.randint(0, 10, (64,)))       # noqa: E731
KW = lambda: ({"x": torch.randn(64, 16), "mask": torch.ones(64, 16)}, torch.randint(0, 10, (64,)))   # noqa: E731
DICT_LOSS = lambda out, y: F.cross_entropy(out["logits"], y)     # noqa: E731
TUPLE_LOSS = lambda out, y: F.cross_entropy(out[1], y)           # noqa: E731

C, TR = "construction", "training"
# name -> (truth, how it is known, model factory, data factory, loss_fn)
ZOO = {
    # no depth: two layers cannot vanish through depth, whatever the embedding's scale
    "bag of words, embedding std 1": ("healthy", C, lambda: BagOfWords(1.0), TOKENS, None),
    "bag of words, embedding std 0.02": ("healthy", C, lambda: BagOfWords(0.02), TOKENS, None),
    "EmbeddingBag, std 1": ("healthy", C, lambda: BagOfWords(1.0, bag=True), TOKENS, None),
    "GRU language model, embedding std 1": ("healthy", TR, lambda: RecurrentLM(nn.GRU, 1.0), LM, None),
    "GRU language model, embedding std 0.02": ("healthy", TR, lambda: RecurrentLM(nn.GRU, 0.02), LM, None),
    "LSTM language model, embedding std 1": ("healthy", TR, lambda: RecurrentLM(nn.LSTM, 1.0), LM, None),
    "post-LN encoder, depth 2, embedding std 1": ("healthy", TR, lambda: Encoder(2, False), LM, None),
    "post-LN encoder, depth 2, embedding std 0.02": ("healthy", TR, lambda: Encoder(2, False, 0.02), LM, None),
    "post-LN encoder, depth 12": ("healthy", TR, lambda: Encoder(12, False), LM, None),
    "pre-LN encoder, depth 2": ("healthy", TR, lambda: Encoder(2, True), LM, None),
    "pre-LN encoder, depth 12": ("healthy", TR, lambda: Encoder(12, True), LM, None),
    "GPT, tied embeddings, 1/sqrt(2L) projections": ("healthy", TR, GPT, LM, None),
    # CNNs: He init keeps chi = 1 per ReLU layer; PyTorch's default conv init has fan_in Var W = 1/3, chi = 1/6
    "CNN, batch norm, depth 8": ("healthy", C, lambda: _cnn(8, True), IMG, None),
    "CNN, He init, no batch norm, depth 8": ("healthy", C, lambda: _cnn(8, False), IMG, None),
    "CNN, PyTorch default init, no batch norm, depth 12": ("vanishing", C, lambda: _cnn(12, False, he=False), IMG, None),
    # residual stacks: unscaled He branches double the stream's second moment per block (2^20); the
    # issue's case, trained: loss in the thousands at step 0, NaN within 10 steps
    "residual, He, no normalization, depth 20": (
        "exploding", TR, lambda: gb.mlp(20, 64, "relu", "he", residual=True, in_dim=16, out_dim=10), X, None),
    "residual, pre-LN blocks, depth 20": ("healthy", TR, lambda: PreLNResidual(20), X, None),
    "residual, branches scaled by depth^-1/2": (
        "healthy", C, lambda: gb.mlp(20, 64, "relu", "he", residual=True, branch_scale=20 ** -0.5, in_dim=16, out_dim=10),
        X, None),
    # functional and unknown activations: the backward profile still decides (sigmoid' <= 1/4; fan_in Var W
    # = 1/3 gives SiLU chi < 0.5)
    "torch.sigmoid in forward, depth 30": ("vanishing", C, lambda: Functional(30, torch.sigmoid), X, None),
    "F.relu in forward, He init, depth 20": ("healthy", C, lambda: Functional(20, F.relu, he=True), X, None),
    "nn.SiLU, PyTorch default init, depth 20": ("vanishing", C, lambda: _seq(20, nn.SiLU), X, None),
    # outputs and arguments
    "dict output": ("healthy", C, DictOut, X, DICT_LOSS),
    "tuple output, auxiliary scalar first": ("healthy", C, TupleOut, X, TUPLE_LOSS),
    "two positional arguments": ("healthy", C, TwoArgs, TWO, None),
    "keyword arguments": ("healthy", C, TwoArgs, KW, None),
    # dtypes: tanh with sigma_w^2 = 4 has chi = 1.36 per layer (mean field)
    "float64, tanh sigma_w = 2, depth 30": ("exploding", C, lambda: _seq(30, nn.Tanh, 4.0, torch.float64), X64, None),
    "bfloat16 weights, ReLU He, depth 10": ("healthy", C, lambda: _seq(10, nn.ReLU, 2.0, torch.bfloat16), XBF, None),
    "bfloat16 weights, sigmoid default init, depth 10": ("vanishing", C, lambda: _seq(10, nn.Sigmoid, None, torch.bfloat16), XBF, None),
    # frozen layers: the trainable part decides; two trainable layers of twenty show no trend, so only the
    # forward profile can tell, and with a functional activation there is none
    "tanh default init, first five layers frozen": ("vanishing", C, _frozen_tanh, X, None),
    "ReLU He, all but two layers frozen": (
        "healthy", C, lambda: _frozen(gb.mlp(20, 64, "relu", "he", in_dim=16, out_dim=10), 2), X, None),
    "F.relu in forward, all but two layers frozen": (
        "cannot tell", C, lambda: _frozen(Functional(20, F.relu, he=True), 2), X, None),
    # eval mode: an untrained BatchNorm in eval mode normalizes by running statistics (0, 1): it does nothing
    "sigmoid + batch norm, eval mode, depth 20": (
        "vanishing", C, lambda: _eval(gb.mlp(20, 64, "sigmoid", "standard", norm="batch", in_dim=16, out_dim=10)), X, None),
    "sigmoid + batch norm, train mode, depth 20": (
        "healthy", C, lambda: gb.mlp(20, 64, "sigmoid", "standard", norm="batch", in_dim=16, out_dim=10), X, None),
    # torch.compile: diagnosed in eager mode through the compiled module
    "torch.compile, ReLU He, depth 10": ("healthy", C, _compiled(lambda: _seq(10, nn.ReLU, 2.0)), X, None),
    "torch.compile, tanh sigma_w = 2, depth 30": ("exploding", C, _compiled(lambda: _seq(30, nn.Tanh, 4.0)), X, None),
}


def _diagnose(name, seed, **kw):
    truth, _, make, data, loss_fn = ZOO[name]
    torch.manual_seed(seed)
    model = make()
    x, y = data()
    return truth, gb.diagnose(model, x, y, loss_fn=loss_fn, **kw)


def test_the_zoo_is_large_and_says_how_each_truth_is_known():
    assert len(ZOO) >= 25
    assert {how for _, how, *_ in ZOO.values()} == {C, TR}
    assert set(t for t, *_ in ZOO.values()) == {"healthy", "vanishing", "exploding", "cannot tell"}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_verdicts(name, seed):
    truth, d = _diagnose(name, seed)
    assert d.verdict == truth, f"{name}: {d.verdict}, {d.reason}\n{d.report()}"
    assert bool(d.remedies) == (truth in ("vanishing", "exploding"))
    assert d.verdict.upper() in d.report()
    if truth == "cannot tell":
        assert "received a gradient" in d.reason


def _train(model, data, steps, lr, opt=torch.optim.Adam):
    x, y = data()
    o = opt(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        o.zero_grad()
        out = model(x)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
        loss.backward()
        o.step()
    return losses


#: Adam's learning rate for the training check: 1e-2, except a 12-layer post-LN encoder, which without
#: warm-up learns slowly at 1e-2 (Xiong et al. 2020: an optimization problem of post-LN, not a gradient
#: that vanishes at initialization) and is checked at 3e-3.
TRAIN_LR = {"post-LN encoder, depth 12": 3e-3}


@pytest.mark.parametrize("name", [n for n, v in ZOO.items() if v[1] == TR])
def test_truth_by_training(name):
    """The entries whose truth is known by training: the healthy ones learn (loss at most 80% of its
    start within 40 Adam steps on one batch); the unnormalized He residual stack diverges under SGD."""
    truth, _, make, data, _ = ZOO[name]
    torch.manual_seed(0)
    if truth == "healthy":
        losses = _train(make(), data, 40, TRAIN_LR.get(name, 1e-2))
        assert losses[-1] < 0.8 * losses[0], (name, losses[0], losses[-1])
    else:
        losses = _train(make(), data, 10, 0.05, torch.optim.SGD)
        assert losses[0] > 100 and not math.isfinite(losses[-1]) or losses[-1] > 1e6, (name, losses)


def test_embeddings_are_reported_but_do_not_decide():
    _, d = _diagnose("GRU language model, embedding std 1", 0)
    assert "emb" in d.layers and np.isfinite(d.relative_grad[d.layers.index("emb")])
    assert any("embedding" in n for n in d.notes) and "time" in d.depth_scales
    _, d = _diagnose("post-LN encoder, depth 2, embedding std 1", 0)
    # the attention's packed projection is measured; out_proj's |dL/dy| is n/a and said to be
    attn = [i for i, n in enumerate(d.layers) if n.endswith("self_attn")]
    assert len(attn) == 2 and all(d.weight_grad_norm[i] > 0 for i in attn)
    assert "n/a" in d.report() and any("out_proj" in n for n in d.notes)


def test_unknown_and_functional_activations_are_said_and_reach_the_remedies():
    _, d = _diagnose("torch.sigmoid in forward, depth 30", 0)
    assert "forward" not in d.depth_scales and any("sigmoid x30" in n for n in d.notes)
    assert any("replace sigmoid" in r.action for r in d.remedies)
    assert "profile changes 1x" not in d.report()
    _, d = _diagnose("nn.SiLU, PyTorch default init, depth 20", 0)
    assert any("SiLU" in n for n in d.notes)
    _, d = _diagnose("post-LN encoder, depth 2, embedding std 1", 0)
    assert d.makeup.functional == {"relu": 2} and d.makeup.residual == 4


def test_remedies_take_the_make_up_into_account():
    _, d = _diagnose("residual, He, no normalization, depth 20", 0)
    assert "residual branch" in d.remedies[0].action and "Fixup" in d.remedies[0].action
    assert not any("scale the initial weights down" in r.action for r in d.remedies)   # He is what it uses
    assert all(r.page.startswith(gb.book.SITE) and r.page.endswith(".html") for r in d.remedies)
    _, d = _diagnose("CNN, PyTorch default init, no batch norm, depth 12", 0)
    assert any("He initialization" in r.action for r in d.remedies)
    assert any("residual connections" in r.action for r in d.remedies)
    _, d = _diagnose("tanh default init, first five layers frozen", 0)
    assert d.verdict == "vanishing"
    # a model with residual connections is never told to add them
    _, d = _diagnose("sigmoid + batch norm, eval mode, depth 20", 0)
    assert any("residual connections" in r.action for r in d.remedies)
    f = gb.remedies.Facts(recurrent=False, gated=False, normed=True, activation_types={"relu"}, saturated=[],
                          dead=[], time_vanishing=False, residual=True, attention=True, attention_logit=80.0)
    actions = [r.action for r in gb.remedies.RULES if r.verdict == "exploding" and r.when(f)]
    assert any("QK-norm" in a for a in actions) and not any("residual branch" in a for a in actions)
    f.attention_logit = 3.0
    assert not any("QK-norm" in r.action for r in gb.remedies.RULES if r.when(f))


def test_compiled_model_gives_the_eager_numbers_without_warnings(recwarn, capfd):
    torch.manual_seed(0)
    model = _seq(10, nn.ReLU, 2.0)
    x, y = X()
    eager = gb.diagnose(model, x, y)
    compiled = gb.diagnose(torch.compile(model), x, y)
    np.testing.assert_allclose(compiled.relative_grad, eager.relative_grad, rtol=1e-6)
    assert compiled.layers == eager.layers
    assert not [w for w in recwarn if "gradbook" in str(w.filename)]
    out, err = capfd.readouterr()
    assert "dynamo" not in err.lower() and "graph break" not in err.lower()


def test_autocast_measures_unscaled_gradients_close_to_float32():
    torch.manual_seed(0)
    model = _seq(10, nn.ReLU, 2.0)
    x, y = X()
    full = gb.diagnose(model, x, y)
    half = gb.diagnose(model, x, y, autocast=torch.bfloat16)
    assert half.verdict == full.verdict == "healthy"
    # bfloat16 keeps 8 bits of mantissa: the per-layer gradients agree within a few percent, no loss scale
    np.testing.assert_allclose(half.weight_grad_norm, full.weight_grad_norm, rtol=0.1)
    with pytest.raises(ValueError, match="autocast must be None"):
        gb.diagnose(model, x, y, autocast=torch.int8)
    _, d = _diagnose("float64, tanh sigma_w = 2, depth 30", 0)
    torch.manual_seed(0)
    m = _seq(30, nn.Tanh, 4.0)
    assert gb.diagnose(m, *X(), autocast=torch.bfloat16).verdict == "exploding" == d.verdict
