"""gradbook.precision: format ranges, underflow and overflow counts, lost updates, loss-scale skips."""
import math

import numpy as np
import pytest
import torch

import gradbook as gb
from gradbook import precision as P


def test_ranges_read_torch_finfo():
    half, bf16, single = P.ranges()
    assert (half.name, half.bits, half.mantissa, half.max) == ("float16", 16, 10, 65504.0)
    assert half.smallest_normal == 2.0 ** -14 and half.smallest_subnormal == 2.0 ** -24
    assert bf16.mantissa == 7 and bf16.eps == 2.0 ** -7 and bf16.smallest_normal == single.smallest_normal
    assert single.smallest_subnormal == 2.0 ** -149
    assert 12 < half.decades < 12.1 and bf16.decades > 78
    assert P.ranges(torch.bfloat16)[0] == bf16               # one dtype, not a sequence
    assert P.ranges(["float8_e5m2"])[0].mantissa == 2


@pytest.mark.parametrize("bad", [torch.int32, "int8", "float17", 3, None])
def test_non_floating_dtypes_are_refused_with_the_argument_named(bad):
    with pytest.raises(TypeError, match="dtypes must be a floating-point torch dtype"):
        P.ranges([bad])
    with pytest.raises(TypeError, match="dtype must be a floating-point"):
        P.underflow(torch.ones(2), bad)
    with pytest.raises(TypeError, match="dtype must be a floating-point"):
        P.lost_updates(torch.ones(2), torch.ones(2), bad)


def test_underflow_counts_zero_subnormal_and_overflow_of_a_cast():
    t = torch.tensor([0.0, 1e-9, 2e-8, 1e-6, 1.0, 7e4, float("inf")], dtype=torch.float64)
    c = P.underflow(t, torch.float16)
    # counted: the 5 entries non-zero and finite (1e-9, 2e-8, 1e-6, 1, 7e4)
    assert c.count.tolist() == [5]
    assert c.zero[0] == pytest.approx(2 / 5)      # 1e-9 and 2e-8 are below half of 2^-24
    assert c.subnormal[0] == pytest.approx(1 / 5)  # 1e-6
    assert c.overflow[0] == pytest.approx(1 / 5)   # 7e4 > 65504
    assert c.lost[0] == pytest.approx(3 / 5)
    b = P.underflow([t, t[4:5]], "bfloat16")
    assert b.zero.tolist() == [0.0, 0.0] and b.overflow.tolist() == [0.0, 0.0] and b.count.tolist() == [5, 1]


def test_underflow_against_a_reference_takes_the_tensors_as_computed():
    ref = torch.tensor([1e-9, 1e-3, 2.0])
    computed = torch.tensor([0.0, 1e-3, float("nan")])
    c = P.underflow(computed, "float16", reference=ref)
    assert c.zero[0] == pytest.approx(1 / 3) and c.overflow[0] == pytest.approx(1 / 3)
    # unscaled float32 values below float16's range are not cast again: nothing was lost
    assert P.underflow(ref, "float16", reference=ref).zero[0] == 0
    with pytest.raises(ValueError, match="reference has 2 tensors"):
        P.underflow([ref], "float16", reference=[ref, ref])
    with pytest.raises(ValueError, match="shape"):
        P.underflow(ref, "float16", reference=ref[:2])
    with pytest.raises(TypeError, match="tensors must be a tensor"):
        P.underflow([1.0, 2.0], "float16")
    assert math.isnan(P.underflow(torch.zeros(3), "float16").zero[0])


def test_layer_gradients_match_float32_and_leave_grads_alone():
    torch.manual_seed(0)
    net = gb.mlp(depth=3, width=8, activation="tanh", in_dim=4, out_dim=3)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    net(x).sum().backward()
    before = [p.grad.clone() for p in net.parameters()]
    g = P.layer_gradients(net, x, y)
    assert len(g) == 4 and g[0].shape == (4 * 8,) and g[-1].shape == (8 * 3,)
    assert all(torch.equal(p.grad, b) for p, b in zip(net.parameters(), before))
    net.zero_grad()
    torch.nn.functional.cross_entropy(net(x), y).backward()
    assert torch.allclose(g[0], net.layers[0].linear.weight.grad.reshape(-1))
    scaled = P.layer_gradients(net, x, y, scale=2.0 ** 10)
    assert all(torch.allclose(a, b, rtol=1e-5) for a, b in zip(g, scaled))
    low = P.layer_gradients(net, x, y, autocast=torch.bfloat16)
    assert all(t.dtype == torch.float32 for t in low)
    assert all(torch.allclose(a, b, rtol=0.1, atol=1e-3) for a, b in zip(g, low))
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        P.layer_gradients(net, x, y, scale=0)
    with pytest.raises(TypeError, match="autocast must be a floating-point"):
        P.layer_gradients(net, x, y, autocast="int8")


def test_float16_flushes_a_vanishing_gradient_that_bfloat16_and_loss_scaling_keep():
    torch.manual_seed(0)
    net = gb.mlp(depth=10, width=32, activation="sigmoid", init="standard", in_dim=16, out_dim=4)
    x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
    ref = P.layer_gradients(net, x, y)
    half = P.underflow(P.layer_gradients(net, x, y, autocast=torch.float16), "float16", reference=ref)
    bf16 = P.underflow(P.layer_gradients(net, x, y, autocast=torch.bfloat16), "bfloat16", reference=ref)
    assert half.zero[0] == 1.0 and half.zero[-1] == 0.0
    assert bf16.zero.max() == 0.0
    scaled = P.layer_gradients(net, x, y, autocast=torch.float16, scale=2.0 ** 16)
    assert P.underflow(scaled, "float16", reference=ref).zero[0] < 0.5


def test_lost_updates_half_an_ulp():
    w = torch.ones(4)
    # ulp(1) in bfloat16 is 2^-7: half of it ties to even (lost), a little more rounds up, less is lost
    u = torch.tensor([2.0 ** -8, 2.0 ** -8 * 1.01, 2.0 ** -9, 0.0])
    assert P.lost_updates(w, u, torch.bfloat16) == pytest.approx(2 / 3)   # the zero update is not counted
    assert P.lost_updates(w, u, torch.float32) == 0.0
    assert P.lost_updates(torch.full((3,), 100.0), torch.full((3,), 0.1), "bfloat16") == 1.0
    assert math.isnan(P.lost_updates(w, torch.zeros(4), "bfloat16"))
    with pytest.raises(ValueError, match="update has shape"):
        P.lost_updates(w, torch.ones(3), "bfloat16")
    with pytest.raises(TypeError, match="param must be a tensor"):
        P.lost_updates([1.0], torch.ones(1), "bfloat16")


def test_skips_tells_a_collapse_from_isolated_skips():
    healthy = np.zeros(100, dtype=bool)
    healthy[[20, 41, 62]] = True
    s = P.skips(healthy)
    assert (s.fraction, s.longest_run, s.collapsed) == (0.03, 1, False)
    assert "healthy" in str(s)
    collapse = np.r_[np.zeros(10, dtype=bool), np.ones(30, dtype=bool)]
    c = P.skips(collapse)
    assert c.longest_run == 30 and c.collapsed and "collapse" in str(c)
    assert not P.skips(collapse, run=31).collapsed

    class Trace:
        skipped = collapse
    assert P.skips(Trace()).collapsed
    with pytest.raises(ValueError, match="skipped must be a non-empty 1-d boolean"):
        P.skips([])
    with pytest.raises(ValueError, match="skipped must be"):
        P.skips([0.5, 2.0])
    with pytest.raises(ValueError, match="run must be a positive integer"):
        P.skips(healthy, run=0)


def test_skips_reads_the_watch_record_of_a_grad_scaler():
    torch.manual_seed(0)
    net = gb.mlp(depth=3, width=8, activation="relu", in_dim=4, out_dim=2)
    with torch.no_grad():
        net.layers[0].linear.weight.mul_(1e6)           # the forward pass overflows float16
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    x, y = torch.randn(8, 4) * 100, torch.randint(0, 2, (8,))
    with gb.watch(net, optimizer=opt, scaler=scaler, level="norms", spikes=False) as w:
        for _ in range(20):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = torch.nn.functional.cross_entropy(net(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    s = P.skips(w.trace, run=16)
    assert s.fraction == 1.0 and s.collapsed
    assert scaler.get_scale() == 2.0 ** (16 - 20)
