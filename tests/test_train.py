"""Tests of gradbook.train: fit, evaluate, clipping, update ratios and divergence reports."""
from __future__ import annotations

import copy
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradbook as gb

DT = torch.float64


@pytest.fixture(scope="module")
def digits():
    return gb.data.digits()


@pytest.fixture(scope="module")
def teacher():
    return gb.data.teacher(n_train=256, n_test=64, in_dim=8, width=16)


def small_mlp(task, seed=0, width=16, activation="relu", dtype=torch.float32):
    torch.manual_seed(seed)
    return gb.mlp(2, width, activation, in_dim=task.in_dim, out_dim=task.out_dim).to(dtype)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def layer_names(model):
    return {n for n, _ in model.named_modules() if n} | {n for n, _ in model.named_parameters()}


# ---------------------------------------------------------------------------------------------
# ordinary training
# ---------------------------------------------------------------------------------------------
def test_fit_reduces_loss_on_digits(digits, capsys):
    net = small_mlp(digits, width=32)
    h = gb.fit(net, digits, 150, lr=0.1, batch_size=64, generator=gen(0), progress=False)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    assert isinstance(h, gb.History)
    assert h.loss.shape == (150,) and h.grad_norm.shape == (150,) and h.clipped.shape == (150,)
    assert h.steps_run == 150
    assert h.diverged is None and h.trace is None and h.update_ratio is None
    assert np.isfinite(h.loss).all() and np.isfinite(h.grad_norm).all() and (h.grad_norm > 0).all()
    assert not h.clipped.any()
    assert h.loss[-10:].mean() < 0.5 * h.loss[:10].mean()
    assert h.loss[:10].mean() > 1.5                # ~ln 10 at the start: the drop is real


def test_fit_loss_and_grad_norm_equal_direct_replay(digits):
    """History.loss / grad_norm are those of a hand-written SGD loop on the same batches."""
    net = small_mlp(digits, dtype=DT)
    ref = copy.deepcopy(net)
    h = gb.fit(net, digits, 5, lr=0.05, batch_size=16, generator=gen(3), progress=False)
    task = digits.to(dtype=DT)
    g = gen(3)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    losses, norms = [], []
    for _ in range(5):
        x, y = task.batch(16, g)
        opt.zero_grad()
        loss = F.cross_entropy(ref(x), y)
        loss.backward()
        losses.append(loss.item())
        norms.append(torch.sqrt(sum((p.grad ** 2).sum() for p in ref.parameters())).item())
        opt.step()
    np.testing.assert_allclose(h.loss, losses, rtol=1e-10)
    np.testing.assert_allclose(h.grad_norm, norms, rtol=1e-10)
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_progress_bar_can_be_turned_off_and_on(digits, capsys):
    net = small_mlp(digits)
    gb.fit(net, digits, 3, generator=gen(0), progress=False)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    gb.fit(net, digits, 3, generator=gen(0), progress=True)
    out = capsys.readouterr()
    assert out.out + out.err != ""               # so the empty capture above can fail


# ---------------------------------------------------------------------------------------------
# per-layer records and update ratios
# ---------------------------------------------------------------------------------------------
def test_every_records_trace_and_update_ratio(digits):
    every, steps, lr = 3, 8, 0.05
    net = small_mlp(digits, dtype=DT)
    ref = copy.deepcopy(net)
    h = gb.fit(net, digits, steps, lr=lr, batch_size=16, every=every, generator=gen(5), progress=False)
    tr = h.trace
    np.testing.assert_array_equal(tr.steps, [0, 3, 6])
    names = ["layers.0.linear", "layers.1.linear", "readout"]
    assert tr.layers == names
    assert h.update_ratio.shape == (3, 3) and tr.weight_grad_norm.shape == (3, 3)

    # replay with plain SGD and compute the ratios and weight-gradient norms directly
    task = digits.to(dtype=DT)
    g = gen(5)
    opt = torch.optim.SGD(ref.parameters(), lr=lr)
    layers = [ref.layers[0].linear, ref.layers[1].linear, ref.readout]
    ratios, wgn = [], []
    for step in range(steps):
        x, y = task.batch(16, g)
        opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        before = [m.weight.detach().clone() for m in layers]
        grads = [m.weight.grad.norm().item() for m in layers]
        opt.step()
        if step % every == 0:
            ratios.append([(m.weight - b).norm().item() / b.norm().item() for m, b in zip(layers, before)])
            wgn.append(grads)
            # plain SGD without momentum: ratio = lr * ||grad W|| / ||W||
            np.testing.assert_allclose(ratios[-1], [lr * gw / b.norm().item() for gw, b in zip(grads, before)],
                                       rtol=1e-9)
    np.testing.assert_allclose(h.update_ratio, ratios, rtol=1e-6)
    np.testing.assert_allclose(tr.weight_grad_norm, wgn, rtol=2e-5)
    assert (h.update_ratio > 0).all()


def test_update_ratio_relation_with_trace_for_plain_sgd(digits):
    """ratio * ||W_before|| = lr * ||grad W||, with ||W_before|| taken from the weights before each step."""
    lr = 0.2
    net = small_mlp(digits, dtype=DT)
    norms_before = []
    layers = [net.layers[0].linear, net.layers[1].linear, net.readout]
    # record ||W|| before each step through a pre-hook that fires on every training forward pass
    hook = net.register_forward_pre_hook(
        lambda m, a: norms_before.append([l.weight.detach().norm().item() for l in layers]))
    try:
        h = gb.fit(net, digits, 6, lr=lr, every=2, level="norms", batch_size=32, generator=gen(8), progress=False)
    finally:
        hook.remove()
    assert h.trace.grad_norm is None and h.trace.act_mean is None
    wn = np.array(norms_before)[[0, 2, 4]]
    np.testing.assert_allclose(h.update_ratio * wn, lr * h.trace.weight_grad_norm, rtol=2e-5)


# ---------------------------------------------------------------------------------------------
# clipping
# ---------------------------------------------------------------------------------------------
def test_clip_norm_flags_and_history(teacher):
    # lr = 0: the weights, hence the gradients, are the same with and without clipping, so c can be
    # placed exactly next to an observed norm
    net0 = small_mlp(teacher, seed=1, activation="tanh")
    free = gb.fit(copy.deepcopy(net0), teacher, 40, lr=0.0, batch_size=4, generator=gen(1), progress=False)
    v = np.sort(free.grad_norm)
    assert v[0] < v[20] < v[-1]
    for c in [v[20] * (1 + 1e-6), v[20] * (1 - 1e-6)]:
        h = gb.fit(copy.deepcopy(net0), teacher, 40, lr=0.0, batch_size=4, clip_norm=c, generator=gen(1),
                   progress=False)
        np.testing.assert_allclose(h.grad_norm, free.grad_norm, rtol=1e-12)   # the norm before clipping
        np.testing.assert_array_equal(h.clipped, h.grad_norm > c)
        assert h.clipped.sum() == (20 if c < v[20] else 19)
    # and while training
    trained = gb.fit(copy.deepcopy(net0), teacher, 40, lr=0.05, batch_size=4, generator=gen(1), progress=False)
    c = float(np.median(trained.grad_norm))
    h = gb.fit(copy.deepcopy(net0), teacher, 40, lr=0.05, batch_size=4, clip_norm=c, generator=gen(1),
               progress=False)
    assert h.grad_norm[0] == pytest.approx(free.grad_norm[0], rel=1e-6)
    np.testing.assert_array_equal(h.clipped, h.grad_norm > c)
    assert h.clipped.any() and not h.clipped.all()


def test_clip_norm_applies_clipped_gradient(digits):
    lr, c = 0.1, 1e-3
    net = small_mlp(digits, dtype=DT)
    ref = copy.deepcopy(net)
    h = gb.fit(net, digits, 1, lr=lr, batch_size=32, clip_norm=c, generator=gen(2), progress=False)
    x, y = digits.to(dtype=DT).batch(32, gen(2))
    grads = torch.autograd.grad(F.cross_entropy(ref(x), y), list(ref.parameters()))
    total = torch.sqrt(sum((g ** 2).sum() for g in grads)).item()
    assert total > 100 * c
    assert h.grad_norm[0] == pytest.approx(total, rel=1e-10)
    assert h.clipped.tolist() == [True]
    for p, q, g in zip(net.parameters(), ref.parameters(), grads):
        torch.testing.assert_close(p.detach() - q.detach(), -lr * g * (c / total), rtol=1e-5, atol=1e-15)
    step = torch.sqrt(sum(((p - q) ** 2).sum() for p, q in zip(net.parameters(), ref.parameters()))).item()
    assert step == pytest.approx(lr * c, rel=1e-5)


def test_clip_value_applies_clipped_gradient(digits):
    lr, v = 0.1, 1e-3
    net = small_mlp(digits, dtype=DT)
    ref = copy.deepcopy(net)
    h = gb.fit(net, digits, 1, lr=lr, batch_size=32, clip_value=v, generator=gen(2), progress=False)
    x, y = digits.to(dtype=DT).batch(32, gen(2))
    grads = torch.autograd.grad(F.cross_entropy(ref(x), y), list(ref.parameters()))
    assert h.clipped.tolist() == [True]
    for p, q, g in zip(net.parameters(), ref.parameters(), grads):
        torch.testing.assert_close(p.detach() - q.detach(), -lr * g.clamp(-v, v), rtol=1e-9, atol=1e-15)


def test_clip_norm_and_clip_value_together_raise(digits):
    net = small_mlp(digits)
    with pytest.raises(ValueError, match="clip"):
        gb.fit(net, digits, 1, clip_norm=1.0, clip_value=1.0, progress=False)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, bad", [
    ({"optimizer": "bogus"}, "bogus"),
    ({"steps": 0}, "0"),
    ({"steps": -3}, "-3"),
    ({"lr": -1}, "-1"),
    ({"lr": float("nan")}, "nan"),
    ({"clip_norm": -2.0}, "-2.0"),
    ({"every": -1}, "-1"),
    ({"every": 2, "level": "bogus"}, "bogus"),
])
def test_fit_bad_input_raises_value_error(digits, kwargs, bad):
    net = small_mlp(digits)
    before = [p.detach().clone() for p in net.parameters()]
    args = {"steps": 2, **kwargs}
    with pytest.raises(ValueError, match=bad):
        gb.fit(net, digits, progress=False, **args)
    for p, b in zip(net.parameters(), before):
        assert torch.equal(p, b)


# ---------------------------------------------------------------------------------------------
# divergence: reported, never raised, never silent
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task_name, activation, lr", [
    ("digits", "relu", 1e6), ("digits", "relu", 1e10), ("digits", "relu", 1e20),
    ("teacher", "tanh", 1e3), ("teacher", "relu", 1e20), ("teacher", "tanh", 1e10)])
def test_huge_lr_divergence_is_reported(digits, teacher, task_name, activation, lr):
    # each of these settings diverged within 4 steps on every one of 10 seeds tried
    task = {"digits": digits, "teacher": teacher}[task_name]
    net = small_mlp(task, activation=activation)
    h = gb.fit(net, task, 50, lr=lr, generator=gen(0), progress=False)   # must not raise
    d = h.diverged
    assert d is not None
    assert d.phase in {"loss", "gradient", "weights"}
    assert d.value in {"nan", "inf", "too large to represent"}
    assert d.layer in layer_names(net), d
    assert len(h.loss) == d.step + 1 == len(h.grad_norm)
    assert np.isfinite(h.loss[:-1]).all()
    if d.phase == "loss":
        assert not np.isfinite(h.loss[-1])
    if d.phase == "gradient":
        assert not np.isfinite(h.grad_norm[-1])
    assert str(d).startswith(f"diverged at step {d.step}")


def test_divergence_message_is_printed_with_progress(digits, capsys):
    net = small_mlp(digits)
    h = gb.fit(net, digits, 50, lr=1e20, generator=gen(0), progress=True)
    assert h.diverged is not None
    out = capsys.readouterr()
    assert str(h.diverged) in out.out + out.err


class NaNAfter(nn.Module):
    """Identity until it has run ``at`` times with gradients enabled; NaN from then on."""

    def __init__(self, at):
        super().__init__()
        self.at, self.count = at, 0

    def forward(self, x):
        bad = self.count >= self.at
        if torch.is_grad_enabled():
            self.count += 1
        return x * float("nan") if bad else x


@pytest.mark.parametrize("at", [0, 5])
def test_nan_in_forward_reports_module_and_step(digits, at):
    torch.manual_seed(0)
    net = nn.Sequential(OrderedDict(fc1=nn.Linear(64, 16), act=nn.Tanh(), bomb=NaNAfter(at),
                                    fc2=nn.Linear(16, 16), act2=nn.Tanh(), out=nn.Linear(16, 10)))
    h = gb.fit(net, digits, 20, lr=0.05, every=1, generator=gen(0), progress=False)
    d = h.diverged
    assert d is not None
    assert (d.step, d.phase, d.layer, d.value) == (at, "loss", "bomb", "nan")
    assert len(h.loss) == at + 1 and np.isnan(h.loss[-1]) and np.isfinite(h.loss[:-1]).all()
    # records stop before the failed step; ratios match the records
    np.testing.assert_array_equal(h.trace.steps, np.arange(at))
    assert h.update_ratio.shape[0] == at
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


class _InfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, float("inf"))


class InfGradAfter(nn.Module):
    """Identity forward; its backward returns +inf from its ``at``-th training forward on."""

    def __init__(self, at):
        super().__init__()
        self.at, self.count = at, 0

    def forward(self, x):
        bad = self.count >= self.at
        self.count += 1
        return _InfGrad.apply(x) if bad else x


def test_inf_gradient_reports_layer_parameter(digits):
    torch.manual_seed(0)
    net = nn.Sequential(OrderedDict(fc1=nn.Linear(64, 16), act=nn.Tanh(), fc2=nn.Linear(16, 16, bias=False),
                                    boom=InfGradAfter(3), act2=nn.Tanh(), out=nn.Linear(16, 10)))
    h = gb.fit(net, digits, 20, lr=0.05, every=1, generator=gen(0), progress=False)
    d = h.diverged
    assert d is not None
    assert (d.step, d.phase, d.layer) == (3, "gradient", "fc2.weight")
    assert d.value in {"nan", "inf"}
    assert len(h.loss) == 4 and np.isfinite(h.loss).all()
    assert len(h.grad_norm) == 4 and not np.isfinite(h.grad_norm[-1])
    np.testing.assert_array_equal(h.trace.steps, [0, 1, 2])
    # the bad gradient was not applied: the weights stay finite
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_finite_output_with_overflowing_loss_names_a_real_layer(teacher):
    """MSE of a finite but huge output overflows float32: the report must still name a layer of the
    model (not the pseudo-name 'loss') and say the loss went inf (it is inf, not nan)."""
    net = small_mlp(teacher, activation="tanh")
    with torch.no_grad():
        net.readout.weight.fill_(1e25)     # |output| ~ 1e26: finite in float32, its square is not
    h = gb.fit(net, teacher, 5, lr=0.01, generator=gen(0), progress=False)
    d = h.diverged
    assert d is not None and d.phase == "loss" and d.step == 0
    assert np.isinf(h.loss[0])
    assert d.layer in layer_names(net), d
    assert d.value == "inf", d


# ---------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------
def test_evaluate_digits(digits):
    net = small_mlp(digits)
    gb.fit(net, digits, 60, lr=0.1, generator=gen(0), progress=False)
    net.train()
    res = gb.evaluate(net, digits)
    assert set(res) == {"loss", "accuracy"}
    assert 0.0 <= res["accuracy"] <= 1.0
    with torch.no_grad():
        out = net(digits.x_test)
    assert res["accuracy"] == pytest.approx((out.argmax(1) == digits.y_test).double().mean().item(), abs=1e-7)
    assert res["loss"] == pytest.approx(F.cross_entropy(out, digits.y_test).item(), rel=1e-6)
    assert res["accuracy"] > 0.5                       # trained, far above chance (0.1)
    tr = gb.evaluate(net, digits, split="train")
    with torch.no_grad():
        out = net(digits.x_train)
    assert tr["accuracy"] == pytest.approx((out.argmax(1) == digits.y_train).double().mean().item(), abs=1e-7)
    assert net.training                                # mode restored
    with pytest.raises(ValueError, match="bogus"):
        gb.evaluate(net, digits, split="bogus")


def test_evaluate_teacher_has_only_loss(teacher):
    net = small_mlp(teacher, activation="tanh")
    net.eval()
    res = gb.evaluate(net, teacher)
    assert set(res) == {"loss"}
    with torch.no_grad():
        ref = F.mse_loss(net(teacher.x_test), teacher.y_test).item()
    assert res["loss"] == pytest.approx(ref, rel=1e-6)
    assert not net.training                            # mode restored


def test_callback_follows_a_quantity_over_training():
    gb.setup(0)
    net = gb.mlp(depth=2, width=8, activation="tanh", init="xavier_normal", in_dim=64, out_dim=10)
    w0 = net.layers[0].linear.weight.detach().clone()
    seen_grad_mode = []

    def norm_change(step, model):
        seen_grad_mode.append(torch.is_grad_enabled())
        return (model.layers[0].linear.weight - w0).norm().item()

    hist = gb.fit(net, gb.data.digits(), steps=25, lr=0.05, callback=norm_change, callback_every=10, progress=False)
    assert hist.callback_steps.tolist() == [0, 10, 20]
    assert hist.callback_values[0] == 0.0 and hist.callback_values[2] > hist.callback_values[1] > 0
    assert not any(seen_grad_mode)
    hist = gb.fit(net, gb.data.digits(), steps=20, lr=0.05, callback=norm_change, callback_every=10, progress=False)
    assert hist.callback_steps.tolist() == [0, 10, 20]   # the end of training is included
    with pytest.raises(ValueError, match="callback_every"):
        gb.fit(net, gb.data.digits(), steps=5, callback=norm_change, callback_every=0)


def test_fit_trains_an_rnn_on_sequences_with_clipping():
    gb.setup(0)
    task = gb.data.adding_problem(length=8, n_train=512, n_test=128)
    net = gb.rnn(2, 16, 1)
    hist = gb.fit(net, task, steps=60, lr=0.1, batch_size=32, clip_norm=0.5, every=20, progress=False)
    assert hist.diverged is None and hist.steps_run == 60
    assert hist.clipped.tolist() == (hist.grad_norm > 0.5).tolist()
    assert hist.trace.layers == ["input", "recurrent", "readout"]
    assert np.all(np.isfinite(hist.trace.grad_norm))     # the recurrent Linear's 8 calls are pooled


# ---------------------------------------------------------------------------------------------
# warm-up, schedules, Adam's betas and eps, sequence models, the monitor
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("warmup", [1, 4, 10])
def test_warmup_ramps_the_learning_rate_linearly(digits, warmup):
    net = small_mlp(digits)
    h = gb.fit(net, digits, 12, lr=0.1, warmup=warmup, generator=gen(0), progress=False)
    expected = [0.1 * min(1.0, (s + 1) / warmup) for s in range(12)]
    np.testing.assert_allclose(h.lr, expected, rtol=1e-12)


def test_warmup_steps_are_the_updates_made(digits):
    """Step s of the run moves the weights by exactly lr(s) * gradient under plain SGD."""
    net = small_mlp(digits, dtype=DT)
    ref = copy.deepcopy(net)
    h = gb.fit(net, digits.to(dtype=DT), 3, lr=0.3, warmup=3, generator=gen(1), progress=False)
    g = gen(1)
    for s in range(3):
        x, y = digits.to(dtype=DT).batch(64, g)
        ref.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        with torch.no_grad():
            for p in ref.parameters():
                p -= 0.3 * (s + 1) / 3 * p.grad
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)
    np.testing.assert_allclose(h.lr, [0.1, 0.2, 0.3])


def test_schedule_multiplies_the_warmup(digits):
    net = small_mlp(digits)
    h = gb.fit(net, digits, 6, lr=0.01, optimizer="adam", warmup=2, schedule=lambda s: 10.0 if s >= 4 else 1.0,
               generator=gen(0), progress=False)
    np.testing.assert_allclose(h.lr, [0.005, 0.01, 0.01, 0.01, 0.1, 0.1])


def test_no_warmup_keeps_the_learning_rate(digits):
    h = gb.fit(small_mlp(digits), digits, 5, lr=0.05, generator=gen(0), progress=False)
    np.testing.assert_allclose(h.lr, 0.05)


@pytest.mark.parametrize("kwargs, bad", [
    ({"warmup": -1}, "-1"), ({"warmup": 2.5}, "2.5"), ({"warmup": True}, "True"),
    ({"optimizer": "adam", "betas": (0.9, 1.0)}, r"\(0.9, 1.0\)"), ({"optimizer": "adam", "betas": 0.9}, "0.9"),
    ({"optimizer": "adam", "eps": 0.0}, "0.0"), ({"optimizer": "adamw", "eps": -1e-8}, "-1e-08"),
    ({"optimizer": "sgd", "eps": 1e-8}, "sgd"), ({"monitor": {"spikes": True}}, "every"),
])
def test_new_fit_arguments_bad_input_raise(digits, kwargs, bad):
    net = small_mlp(digits)
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(ValueError, match=bad):
        gb.fit(net, digits, 2, progress=False, **kwargs)
    for p, b in zip(net.parameters(), before):
        assert torch.equal(p, b)


def test_schedule_must_be_callable(digits):
    with pytest.raises(TypeError, match="schedule"):
        gb.fit(small_mlp(digits), digits, 2, schedule=3.0, progress=False)


def test_adam_betas_and_eps_reach_the_optimizer():
    params = [nn.Parameter(torch.zeros(3))]
    opt = gb.train.make_optimizer("adamw", params, 1e-3, betas=(0.9, 0.95), eps=1e-6)
    assert opt.param_groups[0]["betas"] == (0.9, 0.95) and opt.param_groups[0]["eps"] == 1e-6
    opt = gb.train.make_optimizer("adam", params, 1e-3)
    assert opt.param_groups[0]["betas"] == (0.9, 0.999) and opt.param_groups[0]["eps"] == 1e-8


def test_adam_eps_sets_the_size_of_the_first_update(digits):
    """Adam's first update is lr * g / (|g| + eps): about lr per entry for a tiny eps, far less for a large one."""
    sizes = {}
    for eps in (1e-8, 10.0):
        net = small_mlp(digits)
        w0 = net.readout.weight.detach().clone()
        gb.fit(net, digits, 1, lr=1e-3, optimizer="adam", eps=eps, generator=gen(0), progress=False)
        sizes[eps] = (net.readout.weight.detach() - w0).abs().max().item()
    assert sizes[1e-8] == pytest.approx(1e-3, rel=1e-3)
    assert sizes[10.0] < 0.2 * sizes[1e-8]


class TinyLM(nn.Module):
    def __init__(self, vocab=11, width=8):
        super().__init__()
        self.emb, self.out = nn.Embedding(vocab, width), nn.Linear(width, vocab)

    def forward(self, tokens):
        return self.out(torch.tanh(self.emb(tokens)))


def next_token_task(vocab=11, length=6, n=128):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(vocab, (n, length), generator=g)
    y = (x + 1) % vocab
    return gb.data.Task("next", x[:96], y[:96], x[96:], y[96:], "classification")


def test_fit_trains_a_sequence_model_with_token_targets():
    """(batch, time, vocabulary) logits against (batch, time) tokens: the default loss and evaluate fit them."""
    torch.manual_seed(0)
    task, net = next_token_task(), TinyLM()
    h = gb.fit(net, task, 150, lr=0.05, optimizer="adamw", betas=(0.9, 0.95), warmup=10, batch_size=16,
               generator=gen(0), progress=False)
    assert h.diverged is None and h.loss[0] > 2.0 and h.loss[-10:].mean() < 0.3
    ev = gb.evaluate(net, task)
    assert ev["accuracy"] > 0.95 and ev["loss"] < 0.3
    lm = lambda logits, t: F.cross_entropy(logits.flatten(0, 1), t.flatten())   # noqa: E731
    torch.manual_seed(0)
    h2 = gb.fit(TinyLM(), task, 150, lr=0.05, optimizer="adamw", betas=(0.9, 0.95), warmup=10, batch_size=16,
                loss_fn=lm, generator=gen(0), progress=False)
    np.testing.assert_allclose(h2.loss, h.loss, rtol=1e-5)


def test_monitor_records_loss_ratios_and_spikes(digits):
    net = small_mlp(digits)
    jump = lambda s: 300.0 if s >= 40 else 1.0   # noqa: E731
    h = gb.fit(net, digits, 50, lr=1e-3, optimizer="adam", schedule=jump, every=1,
               monitor={"spikes": True, "window": 20, "threshold": 6.0}, generator=gen(0), progress=False)
    t = h.trace
    np.testing.assert_array_equal(t.steps, np.arange(50))
    np.testing.assert_allclose(t.loss, h.loss, rtol=1e-6)
    assert h.update_ratio is t.update_ratio and h.update_ratio.shape == (50, len(t.layers))
    assert np.isfinite(h.update_ratio).all()
    # the 300x learning rate multiplies Adam's update, and the update:weight ratio with it
    assert (h.update_ratio[40] > 50 * h.update_ratio[39]).all()
    assert any(s.step >= 40 for s in t.spikes)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


def test_lr_sweep_final_loss_band_and_sensitivity(teacher):
    make = lambda: gb.mlp(2, 16, "tanh", in_dim=teacher.in_dim, out_dim=teacher.out_dim)   # noqa: E731
    sweep = gb.train.lr_sweep(make, teacher, [1e-4, 1e-2, 1e-1, 1e12], 40, seed=3, last=5, optimizer="sgd",
                              progress=False)
    assert sweep.lrs.tolist() == [1e-4, 1e-2, 1e-1, 1e12]
    assert len(sweep.histories) == 4 and sweep.diverged.tolist() == [False, False, False, True]
    # every rate starts from the same weights and batches: the same first loss
    assert len({h.loss[0] for h in sweep.histories}) == 1 and sweep.initial == sweep.histories[0].loss[0]
    for h, f in zip(sweep.histories[:3], sweep.final_loss[:3]):
        assert f == pytest.approx(min(h.loss[-5:].mean(), sweep.initial))
    assert sweep.final_loss[3] == sweep.initial        # diverged: counted as the loss at initialization
    assert sweep.final_loss[2] < sweep.final_loss[0]
    best = sweep.final_loss.min()
    assert sweep.band(0.0) == (sweep.lrs[sweep.final_loss.argmin()],) * 2
    lo, hi = sweep.band(10 * sweep.initial)
    assert (lo, hi) == (1e-4, 1e12)
    assert sweep.sensitivity == pytest.approx(np.mean(sweep.final_loss - best))
    again = gb.train.lr_sweep(make, teacher, [1e-2], 40, seed=3, last=5, optimizer="sgd", progress=False)
    assert again.final_loss[0] == sweep.final_loss[1]    # reproducible from the seed


@pytest.mark.parametrize("lrs", [[], [0.1, -1.0], [float("nan")], [[0.1]]])
def test_lr_sweep_bad_rates_raise(teacher, lrs):
    with pytest.raises(ValueError, match="lrs"):
        gb.train.lr_sweep(lambda: gb.mlp(1, 4, in_dim=8, out_dim=1), teacher, lrs, 2)


def test_lr_sweep_needs_a_model_factory(teacher):
    with pytest.raises(TypeError, match="make_model"):
        gb.train.lr_sweep(gb.mlp(1, 4, in_dim=8, out_dim=1), teacher, [0.1], 2)


def test_fit_trains_a_transformer_on_a_language_task_with_lm_loss():
    task = gb.data.sequences("repeat", length=16, vocab=16, period=4, n_train=512, n_test=64)
    torch.manual_seed(0)
    net = gb.transformer(16, 16, depth=1, width=32, heads=4)
    h = gb.fit(net, task, 120, lr=1e-2, optimizer="adamw", betas=(0.9, 0.95), warmup=12, batch_size=16,
               loss_fn=gb.transformers.lm_loss, generator=gen(0), progress=False)
    assert h.diverged is None and h.loss[0] > 2.0
    best = 3 / 16 * np.log(16)   # the first period - 1 tokens of each sequence cannot be predicted
    assert h.loss[-10:].mean() < best + 0.25
    ev = gb.evaluate(net, task, "train")
    assert set(ev) == {"loss", "accuracy"} and ev["loss"] < best + 0.4 and ev["accuracy"] > 0.6
    torch.manual_seed(0)   # the default loss of a language task is lm_loss without the z-loss
    h2 = gb.fit(gb.transformer(16, 16, depth=1, width=32, heads=4), task, 5, lr=1e-2, optimizer="adamw",
                betas=(0.9, 0.95), warmup=12, batch_size=16, generator=gen(0), progress=False)
    np.testing.assert_allclose(h2.loss, h.loss[:5], rtol=1e-6)


def test_fit_uses_a_given_optimizer_and_a_callback_can_reset_it(digits):
    """An optimizer instance is used as it is; clearing Adam's state in a callback makes the next update a
    first update again: every entry moves by lr (m_hat / sqrt(v_hat) = +-1)."""
    net = small_mlp(digits)
    opt = gb.train.make_optimizer("adam", net.parameters(), 1e-3)
    seen = []

    def forget(step, model):
        if step == 5:
            opt.state.clear()
            seen.append(net.readout.weight.detach().clone())
    h = gb.fit(net, digits, 6, optimizer=opt, callback=forget, generator=gen(0), progress=False)
    np.testing.assert_allclose(h.lr, 1e-3)
    moved = (net.readout.weight.detach() - seen[0]).abs()
    moved = moved[moved > 0]
    torch.testing.assert_close(moved, torch.full_like(moved, 1e-3), rtol=1e-3, atol=0)
    assert opt.state[net.readout.weight]["step"] == 1
