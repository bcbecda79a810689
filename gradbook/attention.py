"""Attention entropy and attention-logit size, per layer and head, from one forward pass.

Attention whose logits grow large turns its softmax nearly one-hot: the entropy of each query's
attention weights collapses towards 0, and the softmax's gradient (p_i (delta_ij - p_j)) vanishes
with it. Dehghani et al. (2023) saw this diverge the training of a 22B-parameter vision transformer,
and Wortsman et al. (2023) reproduced it in small transformers at high learning rates; both fix it
with LayerNorm on the queries and keys (``qk_norm`` of :func:`gradbook.transformers.transformer`).

>>> import gradbook as gb, torch
>>> net = gb.transformer(vocab=64, context=16, depth=2)
>>> stats = gb.attention.stats(net, torch.randint(64, (4, 16)))
>>> stats.entropy.shape, stats.max_logit.shape          # (layers, heads)
((2, 4), (2, 4))

The logits are read by forward hooks on the :class:`gradbook.transformers.Scores` modules, where a
:func:`gradbook.transformers.transformer` computes them. For any model with ``torch.nn.MultiheadAttention``
or ``scaled_dot_product_attention``, :class:`gradbook.makeup.observe` gives the largest logit and the
lowest entropy over all heads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .transformers import Scores

__all__ = ["AttentionStats", "stats", "entropy", "uniform_entropy"]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """The entropy (nats) of softmax(``logits``) over the last axis, one value per query: shape
    ``logits.shape[:-1]``. Masked keys (logit ``-inf``) have weight 0 and add nothing."""
    return torch.special.entr(torch.softmax(logits.detach().double(), dim=-1)).sum(-1)


def uniform_entropy(length: int, causal: bool = True) -> float:
    """The mean entropy of uniform attention over ``length`` queries: ln(length) for full attention, and
    for causal attention, where query t sees t + 1 keys, the mean of ln(t + 1) over t = 0 .. length - 1
    (ln(length!) / length). The largest mean entropy attention can have."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive integer, got {length!r}")
    return math.lgamma(length + 1) / length if causal else math.log(length)


@dataclass
class AttentionStats:
    """Attention of one forward pass: arrays of shape (layers, heads), averaged over the batch.

    ``entropy`` is the mean over queries of each query's attention entropy (nats); ``max_logit`` the
    largest ``|logit|`` and ``rms_logit`` the root mean square of the logits over the keys each query sees;
    ``max_entropy`` the entropy of uniform attention over the same keys (:func:`uniform_entropy`).
    """

    layers: list[str]
    entropy: np.ndarray
    max_logit: np.ndarray
    rms_logit: np.ndarray
    max_entropy: float

    @property
    def normalized_entropy(self) -> np.ndarray:
        """``entropy / max_entropy``: 1 for uniform attention, 0 for one-hot attention."""
        return self.entropy / self.max_entropy


def _summarize(logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Entropy, max ``|logit|`` and RMS logit per head of (batch, heads, queries, keys) logits."""
    seen = torch.isfinite(logits)
    finite = torch.where(seen, logits, torch.zeros((), dtype=logits.dtype)).double()
    ent = entropy(logits).mean(dim=(0, 2))
    biggest = finite.abs().amax(dim=(0, 2, 3))
    rms = (finite.pow(2).sum(dim=(0, 2, 3)) / seen.sum(dim=(0, 2, 3))).sqrt()
    return ent.numpy(), biggest.numpy(), rms.numpy()


def stats(model: nn.Module, tokens: torch.Tensor) -> AttentionStats:
    """Run ``model(tokens)`` once, without gradients, and summarize every
    :class:`~gradbook.transformers.Scores` module's logits: :class:`AttentionStats`, layers in the order
    the modules are registered."""
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, Scores)]
    if not named:
        raise ValueError("the model has no gradbook.transformers.Scores modules (build it with gb.transformer; "
                         "for torch.nn.MultiheadAttention use gradbook.makeup.observe)")
    seen: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda mod, args, out, name=n: seen.__setitem__(name, out.detach()))
               for n, m in named]
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for h in handles:
            h.remove()
    rows = [_summarize(seen[n]) for n, _ in named]
    causal = bool(torch.isinf(seen[named[0][0]]).any())
    return AttentionStats([n for n, _ in named], np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]),
                          np.stack([r[2] for r in rows]), uniform_entropy(seen[named[0][0]].shape[-2], causal))
