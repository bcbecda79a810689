"""A small configurable causal transformer, and the language-model loss with PaLM's z-loss.

>>> import gradbook as gb, torch
>>> net = gb.transformer(vocab=64, context=32, depth=2, width=64, heads=4, norm="post")
>>> net(torch.zeros(3, 32, dtype=torch.long)).shape
torch.Size([3, 32, 64])

The knobs are the ones Part IV of the book turns: where the LayerNorm sits (``norm="pre"`` as in GPT-2,
``"post"`` as in Vaswani et al. 2017), LayerNorm on each head's queries and keys (``qk_norm``; Dehghani et
al. 2023, Wortsman et al. 2023), the scale of the residual output projections' initial weights
(``residual_scale="gpt2"``: 1/sqrt(2 * depth), Radford et al. 2019) and tied input/output embeddings.
The attention logits are computed by a module of their own (:class:`Scores`), so that a forward hook
sees them (:mod:`gradbook.attention` does).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ._checks import choice, non_negative, positive_int

__all__ = ["Transformer", "TransformerBlock", "SelfAttention", "Scores", "transformer", "lm_loss", "residual_stream",
           "NORMS"]

#: Where the LayerNorm of a block sits: before each sublayer (inside the residual branch) or after the addition.
NORMS = ["pre", "post"]


class Scores(nn.Module):
    """Causal attention logits ``q . k / sqrt(d_head)``, shape (B, heads, T, T), ``-inf`` above the diagonal.

    A module of its own so that a forward hook sees the logits before the softmax.
    """

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        t = q.shape[-2]
        logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        future = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
        return logits.masked_fill(future, float("-inf"))


class SelfAttention(nn.Module):
    """Multi-head causal self-attention: ``qkv`` projection, optional per-head ``q_norm``/``k_norm``
    (LayerNorm over each head's d_head features), :class:`Scores`, softmax, and the output projection
    ``proj`` (a residual output projection)."""

    def __init__(self, width: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads, self.d_head = heads, width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.q_norm = nn.LayerNorm(self.d_head) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.d_head) if qk_norm else nn.Identity()
        self.scores = Scores()
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.d_head).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(self.scores(self.q_norm(q), self.k_norm(k)), dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, t, w))


class TransformerBlock(nn.Module):
    """Attention then a GELU MLP (``fc1`` -> ``act`` -> ``fc2``, 4x wide), each on a residual branch.

    ``norm="pre"``: x + f(LN(x)) (GPT-2); ``norm="post"``: LN(x + f(x)) (Vaswani et al. 2017).
    """

    def __init__(self, width: int, heads: int, norm: str, qk_norm: bool):
        super().__init__()
        self.norm = norm
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, qk_norm)
        self.fc1, self.act, self.fc2 = nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm == "pre":
            x = x + self.attn(self.ln1(x))
            return x + self.mlp(self.ln2(x))
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.mlp(x))


class Transformer(nn.Module):
    """Token and learned position embeddings, ``blocks`` (an nn.ModuleList of :class:`TransformerBlock`),
    an optional final LayerNorm ``ln_f`` and the linear ``head`` to the vocabulary."""

    def __init__(self, vocab: int, context: int, blocks: list[TransformerBlock], width: int, final_norm: bool,
                 tie_embeddings: bool):
        super().__init__()
        self.context = context
        self.embed, self.pos = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.ModuleList(blocks)
        self.ln_f = nn.LayerNorm(width) if final_norm else nn.Identity()
        self.head = nn.Linear(width, vocab, bias=False)
        if tie_embeddings:
            self.head.weight = self.embed.weight

    def embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """The residual stream entering the first block, (B, T, width)."""
        if tokens.dim() != 2 or tokens.dtype != torch.long:
            raise ValueError(f"tokens must be a (batch, time) LongTensor, got shape {tuple(tokens.shape)} "
                             f"and dtype {tokens.dtype}")
        if tokens.shape[1] > self.context:
            raise ValueError(f"tokens has {tokens.shape[1]} positions, more than the context {self.context}")
        return self.embed(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def transformer(vocab: int, context: int, depth: int = 2, width: int = 64, heads: int = 4, *, norm: str = "pre",
                qk_norm: bool = False, residual_scale: float | str | None = None, tie_embeddings: bool = False,
                final_norm: bool | None = None) -> Transformer:
    """A causal transformer language model: tokens (B, T) -> logits (B, T, vocab).

    Linear layers and LayerNorms start as PyTorch makes them; token and position embeddings are drawn
    from N(0, 1/width), so each embedding vector has a norm near 1 and tied output logits start near
    unit variance. ``residual_scale`` multiplies the initial weights of each residual output projection
    (``attn.proj`` and ``fc2`` of every block): a number, or ``"gpt2"`` for 1/sqrt(2 * depth), GPT-2's
    scaling by the number of residual layers (Radford et al. 2019). Their biases keep PyTorch's random
    draw (GPT-2 starts every bias at 0). ``final_norm`` (a LayerNorm before
    the head) defaults to True for ``norm="pre"`` (GPT-2) and False for ``"post"``, whose last block
    already ends in one (Xiong et al. 2020 compare these two).
    """
    for name, v in [("vocab", vocab), ("context", context), ("depth", depth), ("width", width), ("heads", heads)]:
        positive_int(name, v)
    choice("norm", norm, NORMS)
    if width % heads:
        raise ValueError(f"width ({width}) must be a multiple of heads ({heads})")
    if residual_scale == "gpt2":
        scale = 1.0 / math.sqrt(2 * depth)
    elif residual_scale is None:
        scale = 1.0
    elif isinstance(residual_scale, str):
        raise ValueError(f"residual_scale must be None, a number >= 0 or 'gpt2', got {residual_scale!r}")
    else:
        scale = float(non_negative("residual_scale", residual_scale))
    blocks = [TransformerBlock(width, heads, norm, bool(qk_norm)) for _ in range(depth)]
    net = Transformer(vocab, context, blocks, width, norm == "pre" if final_norm is None else bool(final_norm),
                      tie_embeddings)
    with torch.no_grad():
        nn.init.normal_(net.embed.weight, std=width**-0.5)
        nn.init.normal_(net.pos.weight, std=width**-0.5)
        for block in net.blocks:
            block.attn.proj.weight.mul_(scale)
            block.fc2.weight.mul_(scale)
    return net


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, z_loss: float = 0.0) -> torch.Tensor:
    """Mean next-token cross-entropy plus ``z_loss * mean(log Z ** 2)``, Z the softmax normalizer.

    The z-loss of PaLM (Chowdhery et al. 2022, who use z_loss = 1e-4) pulls log Z = logsumexp(logits)
    towards 0, which keeps the output logits from drifting to large values. ``logits`` is (..., vocab)
    and ``targets`` the matching (...) integer tensor.
    """
    non_negative("z_loss", z_loss)
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits of shape {tuple(logits.shape)} need targets of shape {tuple(logits.shape[:-1])}, "
                         f"got {tuple(targets.shape)}")
    flat = logits.reshape(-1, logits.shape[-1])
    loss = nn.functional.cross_entropy(flat, targets.reshape(-1))
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(flat, dim=-1).pow(2).mean()
    return loss


def residual_stream(model: Transformer, tokens: torch.Tensor) -> list[torch.Tensor]:
    """The residual stream's RMS per example and position entering each block and after the last,
    as ``depth + 1`` tensors of shape (B, T) (before ``ln_f``)."""
    out = []
    with torch.no_grad():
        x = model.embedding(tokens)
        for block in model.blocks:
            out.append(x.pow(2).mean(-1).sqrt())
            x = block(x)
        out.append(x.pow(2).mean(-1).sqrt())
    return out
