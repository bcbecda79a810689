"""gradbook: measure, explain and remedy vanishing and exploding gradients in PyTorch networks.

The companion package of the book *Vanishing and exploding gradients*. A notebook cell reads like prose::

    import gradbook as gb
    gb.setup()
    net = gb.mlp(depth=20, width=64, activation="sigmoid", init="standard")
    rec = gb.gradients(net, x, y)
    gb.plot.gradient_flow(rec)
"""
from __future__ import annotations

import os
import random

from . import (activations, attention, batches, book, correlation, data, diagnosis, diagrams, distributed, explorers,
               export, init, makeup, measure, nets, onepass, plot, precision, probe, profiles, progress, records, remedies, scratch, shattering,
               spikes, theory, toys, train, transformer_explorer, transformers, widgets, width)
from .book import glue
from .diagnosis import Diagnosis, diagnose
from .measure import gradients
from .nets import lstm, mlp, rnn
from .records import Snapshot, Trace
from .train import History, evaluate, fit
from .transformers import transformer
from .watch import watch

__version__ = "0.4.0"
__all__ = ["setup", "glue", "mlp", "rnn", "lstm", "watch", "gradients", "diagnose", "Diagnosis", "fit", "evaluate",
           "History", "Snapshot", "Trace", "activations", "attention", "batches", "book", "correlation", "data", "diagnosis",
           "diagrams", "distributed", "explorers", "export", "init", "makeup", "measure", "nets", "onepass", "plot", "precision",
           "probe", "profiles", "progress", "records", "remedies", "scratch", "shattering", "spikes", "theory", "toys", "train",
           "transformers", "transformer", "transformer_explorer", "widgets", "width", "DEFAULT_SEED"]

DEFAULT_SEED = 0


def setup(seed: int | None = None, threads: int = 1, style: bool = True) -> int:
    """Seed Python, NumPy and torch, use ``threads`` math threads, and apply the plot style.

    The seed is ``seed`` if given, else the environment variable ``GRADBOOK_SEED`` if set, else
    ``DEFAULT_SEED`` (0), so the whole book can be re-run under other seeds. One thread is several
    times faster than two for the small networks of the book. Returns the seed used.
    """
    import numpy as np
    import torch

    if seed is None:
        raw = os.environ.get("GRADBOOK_SEED", "").strip()
        try:
            seed = int(raw) if raw else DEFAULT_SEED
        except ValueError:
            raise ValueError(f"GRADBOOK_SEED must be an integer, got {raw!r}") from None
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    if style:
        plot.style()
    return seed
