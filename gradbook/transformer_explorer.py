"""The explorer of Part IV: where a transformer's gradient goes, pre-LN against post-LN.

:func:`transformer` is a row of dials above one figure (:mod:`gradbook.widgets`), redrawn in place:

* left: the gradient of each block's last weight, ``||dL/dW||`` of the feed-forward output projection
  ``fc2``, against the block's index, for a pre-LN and a post-LN transformer of the same depth and width
  at initialization (Xiong et al. 2020);
* right: the root mean square of the residual stream entering each block (and leaving the last), for
  the same two models: it grows with depth in pre-LN, which adds every branch to an un-normalized
  stream, unless the residual projections start small (GPT-2's ``1/sqrt(2 depth)``; Radford et al.
  2019), and stays at 1 in post-LN, which normalizes the stream after every addition.

Both are measured on one batch of the book's ``repeat`` task (:func:`gradbook.data.sequences`) with the
language-model loss (:func:`gradbook.transformers.lm_loss`). In Jupyter::

    import gradbook as gb
    gb.explorers.transformer()        # the live explorer
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from . import data as _data
from . import transformers as _tf
from .plot import PALETTE, finite_positive, log_axis, log_limits
from .records import norms
from .widgets import Explorer, Refused, Spec, dropdown, frozen, slider

__all__ = ["transformer", "profiles", "RESIDUAL_SCALES", "SIZE"]

#: The choices of the ``residual`` dial: PyTorch's initialization of the residual projections, or GPT-2's.
RESIDUAL_SCALES = {"default": None, "gpt2": "gpt2"}
#: The models' size: vocabulary, context, width, heads, and the batch they are measured on.
SIZE = dict(vocab=32, context=16, width=32, heads=4, batch=8)


@functools.lru_cache(maxsize=256)
def profiles(depth: int, residual: str, seed: int) -> dict:
    """For ``norm`` in ("pre", "post"): ``||dL/dW||`` of every block's ``fc2`` weight and the residual
    stream's RMS entering each block and leaving the last (``depth + 1`` values), at initialization."""
    if not (isinstance(depth, int) and 1 <= depth <= 48):
        raise Refused(f"depth must be a whole number from 1 to 48, got {depth!r}")
    if residual not in RESIDUAL_SCALES:
        raise Refused(f"residual must be one of {list(RESIDUAL_SCALES)}, got {residual!r}")
    task = _data.sequences("repeat", length=SIZE["context"], vocab=SIZE["vocab"], n_train=SIZE["batch"],
                           n_test=1, seed=seed)
    x, y = task.x_train, task.y_train
    out = {}
    for norm in ("pre", "post"):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            net = _tf.transformer(SIZE["vocab"], SIZE["context"], depth, SIZE["width"], SIZE["heads"], norm=norm,
                                  residual_scale=RESIDUAL_SCALES[residual])
        _tf.lm_loss(net(x), y).backward()
        out[norm] = norms([b.fc2.weight.grad for b in net.blocks]).numpy()
        out[f"{norm}_stream"] = np.array([s.mean().item() for s in _tf.residual_stream(net, x)])
    return frozen(out)


def _draw(fig, art, r, v):
    if not art:
        ax_g, ax_s = fig.subplots(1, 2)
        art.update(ax_g=ax_g, ax_s=ax_s)
        for ax, what in [(ax_g, ""), (ax_s, "_stream")]:
            for i, norm in enumerate(("pre", "post")):
                art[norm + what] = ax.plot([], [], "o-", ms=3, color=PALETTE[i], label=f"{norm}-LN")[0]
            log_axis(ax)
            ax.legend(fontsize=9, loc="best")
        ax_g.set_xlabel("block (1 = nearest the input)")
        ax_g.set_ylabel(r"$\|\partial L/\partial W_\mathrm{fc2}\|$")
        ax_g.set_title("Gradient of each block's last weight", fontsize=10)
        ax_s.set_xlabel("residual stream entering block (depth + 1: after the last)")
        ax_s.set_ylabel("RMS of the residual stream")
        ax_s.set_title("Size of the residual stream", fontsize=10)
    depth = v["depth"]
    for what, ax, x in [("", art["ax_g"], np.arange(1, depth + 1)),
                        ("_stream", art["ax_s"], np.arange(1, depth + 2))]:
        values = [finite_positive(r["pre" + what]), finite_positive(r["post" + what])]
        art["pre" + what].set_data(x, values[0])
        art["post" + what].set_data(x, values[1])
        lo, hi = log_limits(np.concatenate(values), floor=0.5, ceil=2.0)
        ax.set_ylim(lo / 1.5, hi * 1.5)
        ax.set_xlim(0.5, x[-1] + 0.5)
    fig.suptitle(f"{depth} blocks, width {SIZE['width']}, residual projections: {v['residual']}", fontsize=10)


def _describe(v):
    return (f"Two log-scale panels for a pre-LN and a post-LN transformer of {v['depth']} blocks at initialization, "
            f"residual projections initialized {v['residual']}: left, the norm of the gradient of each block's "
            "feed-forward output weight against the block's index; right, the root mean square of the residual "
            "stream entering each block.")


def _notes(r, v):
    return (f"first / last block's gradient: pre-LN {r['pre'][0] / r['pre'][-1]:.2f}, post-LN "
            f"{r['post'][0] / r['post'][-1]:.2f}; stream RMS after the last block: pre-LN {r['pre_stream'][-1]:.2f}, "
            f"post-LN {r['post_stream'][-1]:.2f}")


def _dials(v):
    return {"depth": slider("int", v["depth"], 1, 24, 1, "depth"),
            "residual": dropdown(v["residual"], list(RESIDUAL_SCALES), "residual init"),
            "seed": slider("int", v["seed"], 0, 9, 1, "seed")}


def transformer(**values) -> Explorer:
    """The transformer explorer: each block's gradient and the residual stream's size against depth, for a
    pre-LN and a post-LN transformer at initialization.

    Dials: ``depth`` (12 blocks), ``residual`` ("default": PyTorch's initialization of the residual
    projections; "gpt2": scaled by 1/sqrt(2 depth)), ``seed`` (0). The models are those of
    :func:`gradbook.transformers.transformer` at the size :data:`gradbook.transformer_explorer.SIZE`, measured by
    :func:`gradbook.transformer_explorer.profiles`.
    """
    spec = Spec("Pre-LN against post-LN transformers at initialization", dict(depth=12, residual="default", seed=0),
                _dials, lambda depth, residual, seed: profiles(depth, residual, seed), _draw, _describe,
                figsize=(9.6, 3.8), notes=_notes)
    return Explorer(spec, values)
