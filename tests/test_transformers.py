import math

import pytest
import torch

import gradbook as gb
from gradbook.transformers import lm_loss, residual_stream


def _tokens(b=3, t=16, vocab=50, seed=0):
    return torch.randint(vocab, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("norm", ["pre", "post"])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_shapes_and_blocks(norm, qk_norm):
    torch.manual_seed(0)
    net = gb.transformer(50, 16, depth=3, width=32, heads=4, norm=norm, qk_norm=qk_norm)
    assert isinstance(net.blocks, torch.nn.ModuleList) and len(net.blocks) == 3
    assert net(_tokens()).shape == (3, 16, 50)
    assert net(_tokens(t=5)).shape == (3, 5, 50)  # shorter than the context
    assert isinstance(net.ln_f, torch.nn.LayerNorm if norm == "pre" else torch.nn.Identity)
    assert isinstance(net.blocks[0].attn.q_norm, torch.nn.LayerNorm if qk_norm else torch.nn.Identity)


def test_causal_a_later_token_never_changes_an_earlier_logit():
    torch.manual_seed(0)
    for norm in ["pre", "post"]:
        net = gb.transformer(50, 16, depth=2, width=32, heads=4, norm=norm)
        a = _tokens(1)
        b = a.clone()
        b[0, 10:] = (b[0, 10:] + 1) % 50
        out_a, out_b = net(a), net(b)
        torch.testing.assert_close(out_a[:, :10], out_b[:, :10])
        assert not torch.allclose(out_a[:, 10:], out_b[:, 10:])


def test_attention_matches_torch_scaled_dot_product_attention():
    torch.manual_seed(0)
    attn = gb.transformer(50, 16, width=32, heads=4).blocks[0].attn
    x = torch.randn(2, 16, 32)
    q, k, v = attn.qkv(x).view(2, 16, 3, 4, 8).permute(2, 0, 3, 1, 4)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(attn(x), attn.proj(ref.transpose(1, 2).reshape(2, 16, 32)))


def test_post_ln_normalizes_each_block_output_and_pre_ln_does_not():
    torch.manual_seed(0)
    tokens = _tokens()
    post = gb.transformer(50, 16, depth=2, width=32, norm="post")
    out = post.blocks[0](post.embedding(tokens))
    torch.testing.assert_close(out.mean(-1), torch.zeros(3, 16), atol=1e-5, rtol=0)
    pre = gb.transformer(50, 16, depth=2, width=32, norm="pre")
    assert pre.blocks[0](pre.embedding(tokens)).mean(-1).abs().max() > 1e-3


def test_residual_scale_multiplies_the_residual_output_projections():
    torch.manual_seed(1)
    base = gb.transformer(50, 16, depth=8, width=32)
    torch.manual_seed(1)
    gpt2 = gb.transformer(50, 16, depth=8, width=32, residual_scale="gpt2")
    for b0, b1 in zip(base.blocks, gpt2.blocks):
        torch.testing.assert_close(b1.attn.proj.weight, b0.attn.proj.weight / 4)  # 1/sqrt(2 * 8)
        torch.testing.assert_close(b1.fc2.weight, b0.fc2.weight / 4)
        torch.testing.assert_close(b1.fc1.weight, b0.fc1.weight)
    torch.manual_seed(1)
    half = gb.transformer(50, 16, depth=8, width=32, residual_scale=0.5)
    torch.testing.assert_close(half.blocks[3].fc2.weight, base.blocks[3].fc2.weight / 2)


def test_the_residual_stream_grows_with_depth_in_pre_ln_and_gpt2_scaling_keeps_it_level():
    torch.manual_seed(0)
    tokens = _tokens(8, 16)
    plain = [r.mean().item() for r in residual_stream(gb.transformer(50, 16, depth=12, width=32), tokens)]
    scaled = [r.mean().item() for r in residual_stream(
        gb.transformer(50, 16, depth=12, width=32, residual_scale="gpt2"), tokens)]
    assert len(plain) == 13 and plain[-1] > 2 * plain[1]
    assert scaled[-1] < plain[-1] / 2


def test_tied_embeddings_share_one_parameter():
    net = gb.transformer(50, 16, width=32, tie_embeddings=True)
    assert net.head.weight is net.embed.weight
    assert sum(p.numel() for p in net.parameters()) == \
        sum(p.numel() for p in gb.transformer(50, 16, width=32).parameters()) - 50 * 32


def test_bad_arguments_name_the_argument_the_value_and_the_choices():
    with pytest.raises(ValueError, match=r"norm 'mid'.*'pre', 'post'"):
        gb.transformer(50, 16, norm="mid")
    with pytest.raises(ValueError, match="multiple of heads"):
        gb.transformer(50, 16, width=30, heads=4)
    with pytest.raises(ValueError, match="residual_scale"):
        gb.transformer(50, 16, residual_scale="gpt3")
    with pytest.raises(ValueError, match="residual_scale"):
        gb.transformer(50, 16, residual_scale=-1.0)
    with pytest.raises(ValueError, match="depth"):
        gb.transformer(50, 16, depth=0)
    net = gb.transformer(50, 16, width=32)
    with pytest.raises(ValueError, match="context 16"):
        net(_tokens(t=17))
    with pytest.raises(ValueError, match="LongTensor"):
        net(torch.zeros(2, 16))


def test_lm_loss_is_cross_entropy_plus_z_loss():
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 5, 7), torch.randint(7, (2, 5))
    ce = torch.nn.functional.cross_entropy(logits.reshape(10, 7), targets.reshape(10))
    torch.testing.assert_close(lm_loss(logits, targets), ce)
    z = torch.logsumexp(logits, -1)
    torch.testing.assert_close(lm_loss(logits, targets, z_loss=1e-2), ce + 1e-2 * (z**2).mean())
    # uniform logits of 0 give ln(vocab) and log Z = ln 7
    zero = torch.zeros(2, 5, 7)
    assert lm_loss(zero, targets).item() == pytest.approx(math.log(7))
    assert lm_loss(zero, targets, z_loss=1.0).item() == pytest.approx(math.log(7) + math.log(7) ** 2)
    with pytest.raises(ValueError, match="targets of shape"):
        lm_loss(logits, targets[:, :4])
    with pytest.raises(ValueError, match="z_loss"):
        lm_loss(logits, targets, z_loss=-1)


def test_a_transformer_learns_the_repeat_task():
    torch.manual_seed(0)
    task = gb.data.sequences("repeat", length=16, vocab=16, period=4, n_train=512, n_test=64)
    net = gb.transformer(task.vocab, 16, depth=2, width=32, heads=2)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        x, y = task.batch(32, g)
        loss = lm_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    floor = 3 / 16 * math.log(16)
    with torch.no_grad():
        assert lm_loss(net(task.x_test), task.y_test).item() < floor + 0.3


def test_xiong_bound_scales_as_one_over_sqrt_depth_in_pre_ln_and_not_in_post_ln():
    bound = gb.theory.ln_gradient_bound
    assert bound(24, 64, "pre") / bound(6, 64, "pre") == pytest.approx(0.5)
    assert bound(24, 64, "post") == bound(6, 64, "post") == pytest.approx(64 * math.sqrt(math.log(64)))
    with pytest.raises(ValueError, match="norm 'mid'"):
        bound(6, 64, "mid")
