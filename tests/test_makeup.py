"""gradbook.makeup on transformer blocks (post-LN against pre-LN) and the cautions of gradbook.remedies that
read it: risks a gradient profile at initialization does not show."""
import numpy as np
import pytest
import torch
from torch import nn

import gradbook as gb


class Encoder(nn.Module):
    """Embedding -> PyTorch's encoder layers (post-LN unless ``norm_first``) -> read-out."""

    def __init__(self, norm_first: bool, depth: int = 3, width: int = 32):
        super().__init__()
        self.emb = nn.Embedding(40, width)
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(width) if norm_first else None,
                                         enable_nested_tensor=False)
        self.out = nn.Linear(width, 40)

    def forward(self, x):
        return self.out(self.enc(self.emb(x)))


class HandWritten(nn.Module):
    """The same two kinds of block written by hand, with functional layer norms."""

    def __init__(self, post: bool, depth: int = 4, width: int = 16, embedding_norm: bool = False):
        super().__init__()
        self.post, self.embedding_norm = post, embedding_norm
        self.branches = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        ln = lambda h: nn.functional.layer_norm(h, h.shape[-1:])   # noqa: E731
        if self.embedding_norm:
            x = ln(x)
        for f in self.branches:
            x = ln(x + f(x)) if self.post else x + f(ln(x))
        return x


def _seen(model, x):
    with gb.makeup.observe(model) as seen:
        model(x)
    return seen.makeup


@pytest.mark.parametrize("norm_first", [False, True])
def test_pytorch_encoder_layers_are_told_apart(norm_first):
    m = _seen(Encoder(norm_first), torch.randint(0, 40, (2, 7)))
    assert m.residual == 6
    assert m.post_ln is (not norm_first), (m.residual, m.post_norm)


@pytest.mark.parametrize("post", [False, True])
@pytest.mark.parametrize("embedding_norm", [False, True])
def test_hand_written_blocks_are_told_apart(post, embedding_norm):
    m = _seen(HandWritten(post, embedding_norm=embedding_norm), torch.randn(3, 16))
    assert m.residual == 4
    assert m.post_norm == (4 if post and embedding_norm else 3 if post else int(embedding_norm))
    assert m.post_ln is post


def test_a_model_without_residual_additions_is_not_post_ln():
    m = _seen(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8)), torch.randn(2, 8))
    assert m.residual == 0 and not m.post_ln


def _cautions(model, x, y, **kw):
    d = gb.diagnose(model, x, y)
    return d, gb.remedies.cautions(d, model, d.makeup, **kw)


def test_post_ln_gets_a_warm_up_caution_whatever_the_verdict():
    torch.manual_seed(0)
    x, y = torch.randint(0, 40, (8, 12)), torch.randint(0, 40, (8, 12))
    d, said = _cautions(Encoder(norm_first=False), x, y)
    assert d.verdict == "healthy" and not d.remedies            # nothing to remedy in the profile ...
    assert [r.topic for r in said] == ["transformers"] and "warm" in said[0].action   # ... but a risk
    assert said[0].page == gb.book.page_url("transformers")
    d, said = _cautions(Encoder(norm_first=True), x, y)
    assert said == []


def test_a_collapsing_loss_scale_is_a_caution_and_an_early_one_is_not():
    torch.manual_seed(0)
    model = gb.mlp(4, 16, in_dim=8, out_dim=2)
    x, y = torch.randn(16, 8), torch.randn(16, 2)
    early = [True] * 8 + [False] * 32            # the scale comes down from 65536 in the first steps
    late = [False] * 20 + [True] * 20            # halved 20 times in a row: below 1, and still overflowing
    assert _cautions(model, x, y, skipped=early)[1] == []
    said = _cautions(model, x, y, skipped=late)[1]
    assert [r.topic for r in said] == ["precision"] and "20 times in a row" in said[0].reason
    assert _cautions(model, x, y, skipped=[])[1] == []


def test_a_caution_already_given_as_a_remedy_is_not_repeated():
    f = gb.remedies.Facts(recurrent=False, gated=False, normed=True, activation_types={"relu"}, saturated=[],
                          dead=[], time_vanishing=False, residual=True, attention=True, attention_logit=80.0)
    assert sum(r.action == gb.remedies.QK_NORM for r in gb.remedies.RULES if r.when(f)) == 2   # exploding, caution


class SDPA(nn.Module):
    """Attention written with F.scaled_dot_product_attention, as many libraries write it."""

    def __init__(self, width=32, heads=4, gain=1.0):
        super().__init__()
        self.heads, self.qkv = heads, nn.Linear(width, 3 * width)
        with torch.no_grad():
            self.qkv.weight.mul_(gain)

    def forward(self, x):
        b, t, w = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        return nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, w)


def _reference(q, k, causal=True):
    logits = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    if causal:
        logits = logits.masked_fill(torch.ones(logits.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    p = torch.softmax(logits, -1)
    entropy = (-(p * torch.log(p.clamp_min(1e-30))).sum(-1)).mean(dim=(0, 2)).min()
    return logits.masked_fill(logits.isinf(), 0).abs().max().item(), entropy.item()


@pytest.mark.parametrize("gain", [1.0, 8.0])
def test_attention_logits_and_entropy_of_hand_written_attention(gain):
    torch.manual_seed(0)
    model, x = SDPA(gain=gain), torch.randn(2, 9, 32)
    m = _seen(model, x)
    q, k, _ = model.qkv(x).view(2, 9, 3, 4, 8).permute(2, 0, 3, 1, 4)
    logit, entropy = _reference(q.detach(), k.detach())
    assert m.attention_logit == pytest.approx(logit, rel=1e-5)
    assert m.attention_entropy == pytest.approx(entropy, rel=1e-4, abs=1e-6)


def test_gradbook_transformer_attention_is_seen_and_large_logits_are_a_caution():
    torch.manual_seed(0)
    net = gb.transformer(vocab=40, context=12, depth=2, width=32, heads=4)
    x, y = torch.randint(0, 40, (4, 12)), torch.randint(0, 40, (4, 12))
    d, said = _cautions(net, x, y)
    assert 0 < d.makeup.attention_logit < gb.remedies.ATTENTION_LOGIT and said == []
    with torch.no_grad():
        for block in net.blocks:
            block.attn.qkv.weight.mul_(6.0)            # queries and keys 6x: logits 36x
    d, said = _cautions(net, x, y)
    assert d.makeup.attention_logit > gb.remedies.ATTENTION_LOGIT
    assert any(r.action == gb.remedies.QK_NORM for r in [*d.remedies, *said])
    assert d.makeup.attention_entropy < 0.5


def test_the_diagnosis_carries_its_cautions_and_reports_them():
    torch.manual_seed(0)
    x, y = torch.randint(0, 40, (8, 12)), torch.randint(0, 40, (8, 12))
    d = gb.diagnose(Encoder(norm_first=False), x, y)
    assert [r.topic for r in d.cautions] == ["transformers"]
    assert "Cautions" in d.report() and gb.book.page_url("transformers") in d.report()
    assert gb.diagnose(Encoder(norm_first=True), x, y).cautions == []


def test_a_diagnosis_of_a_watched_window_reads_a_collapsed_loss_scale():
    torch.manual_seed(0)
    model = gb.mlp(4, 16, in_dim=8, out_dim=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 8), torch.randn(16, 2)
    with gb.watch(model, optimizer=opt) as w:
        for _ in range(20):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    trace = w.trace
    assert len(trace) == 20 and gb.diagnosis.from_trace(model, trace).cautions == []
    trace.skipped = np.arange(20) < 5            # as if AMP had skipped the first five: the scale coming down
    assert gb.diagnosis.from_trace(model, trace).cautions == []
    trace.skipped = np.arange(20) >= 2           # ... and then every step: halved 18 times in a row
    assert [r.topic for r in gb.diagnosis.from_trace(model, trace).cautions] == ["precision"]


def test_weights_stored_in_bfloat16_get_a_master_weights_caution():
    torch.manual_seed(0)
    model = gb.mlp(4, 16, in_dim=8, out_dim=2)
    x, y = torch.randn(16, 8), torch.randn(16, 2)
    assert gb.diagnose(model, x, y).cautions == []
    model = model.to(torch.bfloat16)
    d = gb.diagnose(model, x.bfloat16(), y.bfloat16())
    assert d.makeup.low_precision and [r.topic for r in d.cautions] == ["precision"]
    assert "float32" in d.cautions[0].action and "16 bits" in d.cautions[0].reason


class SoftmaxModule(nn.Module):
    """Attention written with an nn.Softmax module over (batch, heads, queries, keys) logits."""

    def __init__(self, width=32, heads=4):
        super().__init__()
        self.heads, self.qkv, self.softmax = heads, nn.Linear(width, 3 * width), nn.Softmax(dim=-1)

    def forward(self, x):
        b, t, w = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        p = self.softmax(q @ k.transpose(-2, -1) / (w // self.heads) ** 0.5)
        return (p @ v).transpose(1, 2).reshape(b, t, w)


def test_attention_through_an_nn_softmax_module_is_seen():
    torch.manual_seed(0)
    model, x = SoftmaxModule(), torch.randn(2, 9, 32)
    m = _seen(model, x)
    q, k, _ = model.qkv(x).view(2, 9, 3, 4, 8).permute(2, 0, 3, 1, 4)
    logit, entropy = _reference(q.detach(), k.detach(), causal=False)
    assert m.attention_logit == pytest.approx(logit, rel=1e-5)
    assert m.attention_entropy == pytest.approx(entropy, rel=1e-4, abs=1e-6)


def test_observing_leaves_torch_as_it_found_it_even_when_the_forward_pass_raises():
    """The make-up's function mode is left while torch's own layers run and re-entered after them; an
    exception inside one must not leave the mode behind, or pop another's."""
    from torch.overrides import _get_current_function_mode

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with pytest.raises(RuntimeError):   # the first Linear's forward raises: the wrong input width
        with gb.makeup.observe(model):
            model(torch.randn(3, 5))
    assert _get_current_function_mode() is None
    with gb.makeup.observe(model) as seen:   # and it still works afterwards
        model(torch.randn(3, 4))
    assert _get_current_function_mode() is None and seen.makeup.residual == 0
    assert not nn.modules.module._global_forward_pre_hooks and not nn.modules.module._global_forward_hooks


def test_a_nonlinearity_in_the_loss_function_is_not_one_of_the_models():
    """The make-up describes the model's forward pass: a sigmoid applied by ``loss_fn`` (binary cross-entropy
    written by hand) is not a functional activation of the model, and a diagnosis does not say it is unmeasured;
    the same sigmoid inside ``forward`` is one."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 8), torch.randint(0, 2, (32, 1)).float()

    def bce(out, target):
        p = torch.sigmoid(out)
        return -(target * p.log() + (1 - target) * (1 - p).log()).mean()
    plain = gb.mlp(3, 8, "tanh", "xavier_normal", in_dim=8, out_dim=1)
    ev = gb.measure.evidence(plain, x, y, bce)
    assert ev.makeup.functional == {} and ev.makeup.unmeasured is None

    class Inside(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = gb.mlp(3, 8, "tanh", "xavier_normal", in_dim=8, out_dim=1)

        def forward(self, x):
            return torch.sigmoid(self.net(x))
    ev = gb.measure.evidence(Inside(), x, y)
    assert ev.makeup.functional == {"sigmoid": 1}
