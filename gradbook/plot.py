"""Plots in the book's house style: a colour-blind-safe palette, log axes for gradients, labelled axes."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ._checks import choice
from .measure import Snapshot, Trace

__all__ = ["PALETTE", "style", "gradient_flow", "loss_curves"]

#: Okabe & Ito's colour-blind-safe palette (black first, then the eight hues minus yellow).
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"]

_WHICH = {
    "weight": ("weight_grad_norm", r"$\|\partial L / \partial W_\ell\|$"),
    "backprop": ("grad_norm", r"$\|\partial L / \partial y_\ell\|$"),
}


def style() -> None:
    """Apply the house style to matplotlib."""
    import matplotlib as mpl
    from cycler import cycler

    mpl.rcParams.update({
        "axes.prop_cycle": cycler(color=PALETTE),
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "figure.figsize": (6.4, 3.6),
        "figure.dpi": 100,
        "savefig.dpi": 120,
        "font.size": 11,
        "legend.frameon": False,
        "lines.linewidth": 2,
        "lines.markersize": 5,
    })


def gradient_flow(*records: Snapshot | Trace, labels: Sequence[str] | None = None, which: str = "weight",
                  ax=None, title: str | None = None, predicted=None,
                  predicted_label: str = "mean-field prediction"):
    """Per-layer gradient norms on a log axis, one line per record; layer 1 is nearest the input.

    ``which="weight"`` draws ||dL/dW|| per layer, ``which="backprop"`` the back-propagated ||dL/dy||.
    A :class:`~gradbook.measure.Trace` is drawn at its last recorded step. Returns the axes.

    ``predicted`` overlays a theoretical profile as a dashed line: one array of per-layer norms (drawn
    in black), or one array per record (each in its record's colour; None to skip one), for layers
    1, 2, ... (it may be shorter than the record, e.g. without the readout). The first dashed line is
    labelled ``predicted_label`` in the legend. ``gradbook.theory.gradient_profile`` computes such a
    profile for ``which="backprop"``.
    """
    import matplotlib.pyplot as plt

    attr, ylabel = _WHICH[choice("which", which, _WHICH)]
    if labels is not None and len(labels) != len(records):
        raise ValueError(f"got {len(labels)} labels for {len(records)} records")
    if ax is None:
        _, ax = plt.subplots()
    for i, rec in enumerate(records):
        snap = rec[-1] if isinstance(rec, Trace) else rec
        values = getattr(snap, attr)
        if values is None:
            raise ValueError(f"this record has no {attr!r}: measure it with level='full'")
        ax.semilogy(np.arange(1, len(values) + 1), values, marker="o",
                    label=None if labels is None else labels[i])
    if predicted is not None:
        _overlay(ax, predicted, len(records), predicted_label)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer (1 = nearest the input)")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if labels is not None or predicted is not None:
        ax.legend()
    return ax


def _overlay(ax, predicted, n_records: int, label: str) -> None:
    """Dashed predicted profiles: one array (black), or one per record in the records' colours."""
    one = all(p is not None and np.ndim(p) == 0 for p in predicted)   # a single profile of numbers
    profiles = [predicted] if one else list(predicted)
    if not one and len(profiles) != n_records:
        raise ValueError(f"got {len(profiles)} predicted profiles for {n_records} records")
    colours = [line.get_color() for line in ax.get_lines()[-n_records:]] if n_records else []
    first = True
    for i, profile in enumerate(profiles):
        if profile is None:
            continue
        values = np.asarray(profile, dtype=float)
        if values.ndim != 1 or len(values) == 0:
            raise ValueError(f"a predicted profile must be a non-empty 1-D array, got shape {values.shape}")
        colour = "black" if one or not colours else colours[i]
        ax.semilogy(np.arange(1, len(values) + 1), values, linestyle="--", linewidth=1.5, color=colour,
                    label=label if first else None)
        first = False


def loss_curves(*losses: np.ndarray, labels: Sequence[str] | None = None, ax=None, log: bool = True):
    """Training-loss curves against the step, on a log axis by default. Returns the axes."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots()
    for i, loss in enumerate(losses):
        ax.plot(np.arange(len(loss)), loss, label=None if labels is None else labels[i])
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    if labels is not None:
        ax.legend()
    return ax
