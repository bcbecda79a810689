import math

import numpy as np
import pytest
import torch

import gradbook as gb


def _net(depth=2, width=32, heads=4, **kw):
    torch.manual_seed(0)
    return gb.transformer(50, 12, depth=depth, width=width, heads=heads, **kw)


def test_uniform_entropy_is_the_mean_of_ln_visible_keys():
    assert gb.attention.uniform_entropy(1) == 0.0
    assert gb.attention.uniform_entropy(4) == pytest.approx((math.log(1) + math.log(2) + math.log(3) + math.log(4)) / 4)
    assert gb.attention.uniform_entropy(4, causal=False) == pytest.approx(math.log(4))
    with pytest.raises(ValueError, match="length"):
        gb.attention.uniform_entropy(0)


def test_entropy_of_known_logits():
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, float("-inf")]])
    p = np.array([0.25, 0.75])
    np.testing.assert_allclose(gb.attention.entropy(logits).numpy(), [-(p * np.log(p)).sum(), 0.0])


def test_constant_logits_give_uniform_causal_attention_and_the_known_logit():
    net = _net()
    a, b = 0.5, 3.0
    with torch.no_grad():
        for block in net.blocks:
            block.attn.qkv.weight.zero_()
            block.attn.qkv.bias.zero_()
            block.attn.qkv.bias[:32] = a       # every query a * ones(d_head)
            block.attn.qkv.bias[32:64] = b     # every key b * ones(d_head)
    s = gb.attention.stats(net, torch.randint(50, (3, 12)))
    assert s.layers == ["blocks.0.attn.scores", "blocks.1.attn.scores"]
    np.testing.assert_allclose(s.entropy, gb.attention.uniform_entropy(12), rtol=1e-6)
    np.testing.assert_allclose(s.normalized_entropy, 1.0, rtol=1e-6)
    np.testing.assert_allclose(s.max_logit, math.sqrt(8) * a * b, rtol=1e-5)   # d_head a b / sqrt(d_head)
    np.testing.assert_allclose(s.rms_logit, math.sqrt(8) * a * b, rtol=1e-5)


def test_large_logits_collapse_the_entropy_and_qk_norm_bounds_them():
    net = _net()
    tokens = torch.randint(50, (3, 12), generator=torch.Generator().manual_seed(1))
    before = gb.attention.stats(net, tokens)
    assert before.entropy.shape == before.max_logit.shape == (2, 4)
    assert (before.normalized_entropy > 0.8).all()
    with torch.no_grad():
        for block in net.blocks:
            block.attn.qkv.weight[:64] *= 30.0    # queries and keys 30x: logits 900x
    after = gb.attention.stats(net, tokens)
    assert (after.max_logit > 100 * before.max_logit).all() and (after.normalized_entropy < 0.3).all()
    normed = _net(qk_norm=True)
    with torch.no_grad():
        for block in normed.blocks:
            block.attn.qkv.weight[:64] *= 30.0
    # unit-variance queries and keys of d_head = 8: |q.k| / sqrt(8) <= sqrt(8)
    assert (gb.attention.stats(normed, tokens).max_logit <= math.sqrt(8) + 1e-4).all()


def test_stats_leave_the_model_without_hooks_and_refuse_models_without_scores():
    net = _net()
    gb.attention.stats(net, torch.randint(50, (2, 12)))
    assert all(not m._forward_hooks for m in net.modules())
    with pytest.raises(ValueError, match="Scores"):
        gb.attention.stats(torch.nn.Sequential(torch.nn.Embedding(5, 4)), torch.zeros(1, 3, dtype=torch.long))
