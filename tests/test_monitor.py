"""gb.watch as a training monitor (issue 21): optimizer steps, gradient accumulation, update:weight ratios,
spikes, AMP, exporters (TensorBoard, any callable, Lightning) and clear errors for misuse."""
from __future__ import annotations

import math
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import gradbook as gb
from gradbook.spikes import Rolling, SpikeWarning


def _net(seed=0):
    torch.manual_seed(seed)
    return gb.mlp(depth=4, width=32, activation="tanh", init="xavier_normal", in_dim=64, out_dim=10)


def _layer_norms(net):
    return np.array([math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in gb.records.weight_tensors(m)))
                     for _, m in gb.records.layers(net)])


def _train(seed, steps=200, lr=0.05, lr_jump_at=None, corrupt_at=None, window=32, spikes=True, opt_name="sgd",
           ratios=True):
    gb.setup(seed, style=False)
    task, net = gb.data.digits(), _net(seed)
    opt = (torch.optim.SGD if opt_name == "sgd" else torch.optim.Adam)(net.parameters(), lr=lr)
    with gb.watch(net, optimizer=opt, level="norms", window=window, spikes=spikes, ratios=ratios) as w:
        for t in range(steps):
            x, y = task.batch(64)
            if t == corrupt_at:
                x = x * 30.0   # a corrupted batch: inputs on the wrong scale
            if t == lr_jump_at:
                for g in opt.param_groups:
                    g["lr"] = lr * 40
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            w.log_loss(loss)
            opt.step()
    return w.trace


@pytest.mark.parametrize("seed", range(10))
def test_no_false_alarm_on_healthy_runs(seed):
    trace = _train(seed, steps=300)
    assert trace.spikes == [], [str(s) for s in trace.spikes]
    assert len(trace) == 300 and np.isfinite(trace.loss).all()


@pytest.mark.parametrize("seed", [0, 3, 7])
def test_a_corrupted_batch_is_caught_at_its_step(seed):
    trace = _train(seed, steps=120, corrupt_at=90)
    first = trace.spikes[0]
    assert first.step == 90 and first.quantity in ("loss", "grad_norm") and first.z >= 6
    assert {s.step for s in trace.spikes if s.quantity == "grad_norm"} >= {90}
    assert first.layers and first.layers[0] == "layers.0.linear"   # the input layer's gradient jumps most
    assert trace.spikes[0].update_ratio is not None and trace.spikes[0].update_ratio_before is not None


def test_a_learning_rate_jump_is_caught_the_step_after():
    trace = _train(0, steps=160, lr_jump_at=120)
    # the jump makes update 120 forty times larger; the gradient it leaves shows at step 121
    assert trace.spikes and trace.spikes[0].step == 121, [str(s) for s in trace.spikes]
    ratio = trace.update_ratio
    assert (ratio[120] > 20 * np.median(ratio[90:120], axis=0)).all()   # the ratio sees the actual update


def test_spikes_warn_and_call_back():
    seen = []
    gb.setup(0, style=False)
    net, opt = _net(), None
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    with pytest.warns(SpikeWarning, match="grad_norm spike at step 40"):
        with gb.watch(net, optimizer=opt, level="norms", window=16, spikes="warn", on_spike=seen.append) as w:
            for t in range(45):
                opt.zero_grad()
                nn.functional.cross_entropy(net(x * (50 if t == 40 else 1)), y).backward()
                opt.step()
    assert [s.step for s in seen] == [s.step for s in w.trace.spikes] and seen[0].step == 40


def test_rolling_z_score_and_window_check():
    r = Rolling(window=4, threshold=3)
    z = [r.update([v], i)[0] for i, v in enumerate([1.0, 1.1, 0.9, 1.0, 1.05, 9.0])]
    assert np.isnan(z[:4]).all() and abs(z[4]) < 3 and z[5] > 3
    expected = (9.0 - np.mean([1.1, 0.9, 1.0, 1.05])) / np.std([1.1, 0.9, 1.0, 1.05], ddof=1)
    assert z[5] == pytest.approx(expected)
    for bad in (1, 0):
        with pytest.raises(ValueError, match="window"):
            gb.watch(_net(), window=bad)


def test_ratios_every_k_recorded_steps_and_at_each_spike():
    """ratios=5: the update ratio on recorded steps 0, 5, 10, ... and on the step with a spike (read before its
    update), each equal to the one every step computes; NaN elsewhere; the spike carries its step's ratio."""
    every_step, sparse = _train(0, steps=120, corrupt_at=93), _train(0, steps=120, corrupt_at=93, ratios=5)
    spike_steps = {s.step for s in sparse.spikes}
    assert 93 in spike_steps and [s.step for s in sparse.spikes] == [s.step for s in every_step.spikes]
    taken = np.isfinite(sparse.update_ratio).all(axis=1)
    np.testing.assert_array_equal(np.flatnonzero(taken), sorted(set(range(0, 120, 5)) | spike_steps))
    assert np.isnan(sparse.update_ratio[~taken]).all()
    np.testing.assert_allclose(sparse.update_ratio[taken], every_step.update_ratio[taken], rtol=1e-6)
    np.testing.assert_allclose(sparse.weight_grad_norm, every_step.weight_grad_norm, rtol=1e-6)
    spike = sparse.spikes[0]
    np.testing.assert_allclose(spike.update_ratio, sparse.update_ratio[spike.step])
    assert spike.update_ratio_before is not None
    for bad in (-1, 0.5, "5"):
        with pytest.raises(ValueError, match="ratios"):
            gb.watch(_net(), ratios=bad)


def test_update_ratio_is_the_optimizers_actual_step_not_the_gradient():
    gb.setup(0, style=False)
    net = _net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    mods = [m for _, m in gb.records.layers(net)]
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    expected = []
    with gb.watch(net, optimizer=opt, every=2, level="norms") as w:
        for t in range(6):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            before = [m.weight.detach().clone() for m in mods]
            opt.step()
            if t % 2 == 0:
                expected.append([float((m.weight.detach() - b).norm() / b.norm()) for m, b in zip(mods, before)])
    assert list(w.trace.steps) == [0, 2, 4]
    np.testing.assert_allclose(w.trace.update_ratio, expected, rtol=1e-5)
    # Adam's first step moves every weight by about lr: not lr * grad
    assert not np.allclose(w.trace.update_ratio[0], 1e-3 * w.trace.weight_grad_norm[0] /
                           np.array([float(m.weight.norm()) for m in mods]), rtol=0.5)


def test_gradient_accumulation_one_record_per_optimizer_step():
    gb.setup(0, style=False)
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    expected, micro = [], 4
    with gb.watch(net, optimizer=opt, level="full") as w:
        for step in range(5):
            opt.zero_grad()
            for k in range(micro):
                x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))
                loss = nn.functional.cross_entropy(net(x), y) / micro
                loss.backward()
                w.log_loss(loss * micro)
            expected.append(_layer_norms(net))
            opt.step()
    trace = w.trace
    assert list(trace.steps) == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(trace.weight_grad_norm, expected, rtol=1e-6)
    assert np.isfinite(trace.grad_norm).all() and np.isfinite(trace.act_std).all()


def test_mixed_precision_reports_unscaled_norms_and_skipped_steps():
    """bfloat16 autocast with a GradScaler against the same model in float32: the norms agree to bfloat16's
    precision (a scaled norm would be 2**16 times larger), and a step the scaler skips is in the trace."""
    gb.setup(0, style=False)
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    ref, amp = _net(), _net()
    ref_opt, opt = torch.optim.SGD(ref.parameters(), lr=0.01), torch.optim.SGD(amp.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    expected = []
    with gb.watch(amp, optimizer=opt, scaler=scaler, level="norms") as w:
        for t in range(6):
            ref_opt.zero_grad()
            nn.functional.cross_entropy(ref(x), y).backward()
            expected.append(_layer_norms(ref))
            if t != 3:
                ref_opt.step()
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(amp(x), y) * (float("inf") if t == 3 else 1.0)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    trace = w.trace
    assert list(trace.steps) == list(range(6)) and list(trace.skipped) == [t == 3 for t in range(6)]
    assert not np.isfinite(trace.total_grad_norm[3])
    ok = [t for t in range(6) if t != 3]
    np.testing.assert_allclose(trace.weight_grad_norm[ok], np.array(expected)[ok], rtol=0.05)
    assert np.isnan(trace.update_ratio[3]).all() and np.isfinite(trace.update_ratio[ok]).all()
    assert "update" not in vars(scaler)   # the scaler is left as it was


def test_without_optimizer_total_norm_and_no_ratio():
    net = _net()
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    with gb.watch(net, level="norms") as w:
        net.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        total = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in net.parameters()))
    assert w.trace.total_grad_norm[0] == pytest.approx(total, rel=1e-6) and w.trace.update_ratio is None
    np.testing.assert_allclose(w.trace.weight_grad_norm[0], _layer_norms(net), rtol=1e-6)


def test_select_keeps_the_monitor_fields():
    trace = _train(0, steps=120, corrupt_at=90)
    late = trace.select(trace.steps >= 60)
    assert len(late) == 60 and late.update_ratio.shape == (60, 5) and len(late.loss) == 60
    assert late.spikes == trace.spikes and trace.select(trace.steps < 60).spikes == []


def test_clear_errors_for_misuse():
    net = _net()
    with pytest.raises(ValueError, match="wrapped twice"):
        gb.watch(nn.DataParallel(nn.DataParallel(net)))
    assert gb.watch(nn.DataParallel(net)).model is net
    with pytest.raises(ValueError, match="scaler needs optimizer"):
        gb.watch(net, scaler=torch.amp.GradScaler("cpu"))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with gb.watch(net, optimizer=opt) as w:
        loss = net(torch.randn(4, 64)).sum()
        loss.backward()
        opt.step()
        with pytest.raises(RuntimeError, match="after the step was closed"):
            w.log_loss(loss)
    with pytest.raises(ValueError, match="spikes"):
        gb.watch(net, spikes="loud")


# -- exporters ------------------------------------------------------------------------------------------
def _event_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def test_tensorboard_export_is_read_back_from_the_event_file(tmp_path):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    trace = None
    gb.setup(0, style=False)
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    with gb.watch(net, optimizer=opt, every=2, level="norms",
                  export=gb.export.TensorBoard(writer, histograms=True)) as w:
        for t in range(10):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(torch.randn(32, 64)), torch.randint(0, 10, (32,)))
            loss.backward()
            w.log_loss(loss)
            opt.step()
    writer.close()
    trace, acc = w.trace, _event_scalars(tmp_path)
    for i, name in enumerate(trace.layers):
        events = acc.Scalars(f"gradbook/grad_norm/{name}")
        assert [e.step for e in events] == list(trace.steps)
        np.testing.assert_allclose([e.value for e in events], trace.weight_grad_norm[:, i], rtol=1e-6)
        ratio = [e.value for e in acc.Scalars(f"gradbook/update_ratio/{name}")]
        np.testing.assert_allclose(ratio, trace.update_ratio[:, i], rtol=1e-6)
        assert len(acc.Histograms(f"gradbook/grad/{name}")) == len(trace)
    np.testing.assert_allclose([e.value for e in acc.Scalars("gradbook/loss")], trace.loss, rtol=1e-6)
    with pytest.raises(RuntimeError, match="closed"):       # exporting to the closed writer
        with gb.watch(net, optimizer=opt, export=gb.export.TensorBoard(writer)):
            opt.zero_grad()
            net(torch.randn(4, 64)).sum().backward()
            opt.step()


def test_any_callable_gets_the_scalars():
    logged = []
    trace = None
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    with gb.watch(net, optimizer=opt, level="norms",
                  export=gb.export.Scalars(lambda d, step: logged.append((step, d)))) as w:
        for t in range(3):
            opt.zero_grad()
            net(torch.randn(4, 64)).pow(2).mean().backward()
            opt.step()
    trace = w.trace
    assert [s for s, _ in logged] == [0, 1, 2]
    assert logged[1][1]["gradbook/total_grad_norm"] == pytest.approx(trace.total_grad_norm[1])
    assert "gradbook/loss" not in logged[0][1]   # never logged: left out, not NaN
    with pytest.raises(TypeError, match="callable"):
        gb.export.Scalars("not callable")


def test_missing_extras_are_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r'pip install "gradbook\[tensorboard\]"'):
        gb.export.TensorBoard("runs")
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.setitem(sys.modules, "pytorch_lightning", None)
    with pytest.raises(ImportError, match=r'pip install "gradbook\[lightning\]"'):
        gb.export.lightning_callback()


def test_lightning_callback_records_each_optimizer_step_and_logs(tmp_path):
    """A real Trainer (Lightning's automatic optimization steps the optimizer with a closure that runs the
    forward and backward passes inside ``optimizer.step``): the recorded norms are those of the gradient the
    optimizer used, as the module's own ``on_before_optimizer_step`` hook sees it, and reach the logger."""
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers.logger import Logger

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net, self.seen = _net(), []

        def training_step(self, batch, i):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def on_before_optimizer_step(self, optimizer):
            self.seen.append(_layer_norms(self.net))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    class Collect(Logger):
        name, version = "collect", 0
        metrics: list = []

        def log_metrics(self, metrics, step=None):
            self.metrics.append((step, metrics))

        def log_hyperparams(self, *args, **kwargs):
            pass

    gb.setup(0, style=False)
    data = torch.utils.data.TensorDataset(torch.randn(96, 64), torch.randint(0, 10, (96,)))
    module, logger = Module(), Collect()
    cb = gb.export.lightning_callback(level="norms")
    trainer = pl.Trainer(max_steps=12, accelerator="cpu", devices=1, logger=logger, callbacks=[cb],
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path), log_every_n_steps=1)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=16))
    trace = cb.trace
    assert list(trace.steps) == list(range(12)) and np.isfinite(trace.loss).all()
    np.testing.assert_allclose(trace.weight_grad_norm, module.seen, rtol=1e-6)
    ours = [(s, m) for s, m in logger.metrics if "gradbook/total_grad_norm" in m]
    assert [s for s, _ in ours] == list(range(12))
    assert ours[5][1]["gradbook/total_grad_norm"] == pytest.approx(trace.total_grad_norm[5])


class _DictOut(nn.Module):
    """A model whose output is a dict led by an auxiliary value that carries no gradient."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return {"aux": x.detach().sum(), "logits": self.b(torch.tanh(self.a(x)))}


class _TupleOut(_DictOut):
    def forward(self, x):
        out = super().forward(x)
        return out["aux"], out["logits"]


@pytest.mark.parametrize("model_cls", [_DictOut, _TupleOut])
def test_watch_reads_the_gradient_whatever_output_carries_it(model_cls):
    torch.manual_seed(0)
    model, x, y = model_cls(), torch.randn(16, 6), torch.randint(0, 3, (16,))
    with gb.watch(model, every=1, level="norms") as w:
        for _ in range(3):
            model.zero_grad()
            out = model(x)
            logits = out["logits"] if isinstance(out, dict) else out[1]
            nn.functional.cross_entropy(logits, y).backward()
            expected = [model.a.weight.grad.norm().item(), model.b.weight.grad.norm().item()]
    trace = w.trace
    assert len(trace) == 3
    np.testing.assert_allclose(trace.weight_grad_norm[-1], expected, rtol=1e-6)


def test_a_compiled_model_is_watched_without_recompiling_and_with_eager_numbers():
    """torch.compile'd: the watch's hooks are never traced into the graph (compiled once, at the first step,
    not again as recorded and unrecorded steps alternate) and every field equals the eager model's."""
    gb.setup(0, style=False)
    compiles = []

    def backend(gm, example_inputs):   # counts the graphs dynamo compiles; runs them as traced
        compiles.append(1)
        return gm.forward
    torch._dynamo.reset()
    net = gb.mlp(depth=3, width=16, activation="tanh", in_dim=8, out_dim=4)
    ref = gb.mlp(depth=3, width=16, activation="tanh", in_dim=8, out_dim=4)
    ref.load_state_dict(net.state_dict())
    x, y = torch.randn(8, 8), torch.randn(8, 4)
    traces, counts = [], []
    for model, params in ((torch.compile(net, backend=backend), net.parameters()), (ref, ref.parameters())):
        opt = torch.optim.SGD(params, lr=0.1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with gb.watch(model, optimizer=opt, level="full", every=2) as w:
                for _ in range(8):
                    opt.zero_grad()
                    loss = nn.functional.mse_loss(model(x), y)
                    loss.backward()
                    w.log_loss(loss)
                    opt.step()
                    counts.append(len(compiles))
        assert not [c for c in caught if "gradbook" in c.filename], [str(c.message) for c in caught]
        traces.append(w.trace)
    assert counts[0] > 0 and counts[1:8] == [counts[0]] * 7, counts[:8]
    for k in ["weight_grad_norm", "grad_norm", "act_mean", "act_std", "saturated", "dead", "update_ratio", "loss"]:
        np.testing.assert_allclose(getattr(traces[0], k), getattr(traces[1], k), rtol=1e-5, err_msg=k)
