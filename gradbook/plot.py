"""Every figure of the package, in the book's house style: a colour-blind-safe palette, log axes for
gradients, labelled axes.

Gradient-flow profiles and loss curves, the panels of a diagnosis (:func:`diagnosis`), and the log-axis
helpers the explorers use (:func:`log_axis`, :func:`log_limits`, :func:`finite_positive`). Nothing here
measures: every function draws numbers it is given.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ._checks import choice
from .records import Snapshot, Trace

__all__ = ["PALETTE", "style", "gradient_flow", "loss_curves", "diagnosis", "log_axis", "log_limits",
           "magnitude_over_time",
           "power_of_ten", "finite_positive"]

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
    A :class:`~gradbook.records.Trace` is drawn at its last recorded step. Returns the axes.

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
        ax.semilogy(np.arange(1, len(values) + 1), values, marker="o", markersize=4.5, linewidth=1.2,
                    alpha=0.8, zorder=2, label=None if labels is None else labels[i])
    if predicted is not None:
        _overlay(ax, predicted, len(records), predicted_label)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer (1 = nearest the input)")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if labels is not None or predicted is not None:
        handles, texts = ax.get_legend_handles_labels()
        if predicted is not None:       # the prediction's legend entry in neutral black, whatever its colours
            from matplotlib.lines import Line2D

            handles = [Line2D([], [], color="black", linestyle="--", linewidth=2.0) if t == predicted_label
                       else h for h, t in zip(handles, texts)]
        ax.legend(handles, texts)
    return ax


def _overlay(ax, predicted, n_records: int, label: str) -> None:
    """Dashed predicted profiles: one array (black), or one per record in the records' colours.

    Drawn on top of the measurements (a higher zorder) with a white halo, so that a prediction lying
    exactly on its measured markers stays visible instead of hiding underneath them.
    """
    from matplotlib import patheffects

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
        ax.semilogy(np.arange(1, len(values) + 1), values, linestyle="--", linewidth=2.0, color=colour,
                    zorder=5, dashes=(4, 2), label=label if first else None,
                    path_effects=[patheffects.withStroke(linewidth=4.0, foreground="white")])
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


def finite_positive(a) -> np.ndarray:
    """``a`` as floats, with entries that are zero, negative or not finite replaced by NaN (a log axis
    leaves them out instead of failing)."""
    a = np.asarray(a, dtype=float)
    return np.where(np.isfinite(a) & (a > 0), a, np.nan)


def diagnosis(diag, axes=None):
    """Draw the evidence of a :class:`gradbook.diagnosis.Diagnosis`: the relative gradient per layer,
    the activations' std, their saturated and dead fractions, and (for sequence models) the gradient
    through time. Returns the axes."""
    import matplotlib.pyplot as plt

    panels = 3 if diag.time_grad is None else 4
    if axes is None:
        _, axes = plt.subplots(1, panels, figsize=(3.6 * panels, 3.2), constrained_layout=True)
    ax = axes[0]
    ax.semilogy(np.arange(1, len(diag.layers) + 1), finite_positive(diag.relative_grad), "o-", color=PALETTE[0], ms=3)
    ax.set(xlabel="layer (input to output)", ylabel="|dL/dW| / |W|", title="backward")
    ax = axes[1]
    j = np.arange(1, len(diag.activations) + 1)
    if diag.activations:
        ax.semilogy(j, finite_positive(diag.act_std), "o-", color=PALETTE[1], ms=3)
    ax.set(xlabel="activation layer", ylabel="output std", title="forward")
    ax = axes[2]
    if diag.activations:
        ax.plot(j, diag.saturated, "o-", color=PALETTE[2], ms=3, label="saturated")
        ax.plot(j, diag.dead, "s-", color=PALETTE[3], ms=3, label="dead")
        ax.legend()
    ax.set(xlabel="activation layer", ylabel="fraction", ylim=(-0.05, 1.05), title="units")
    if diag.time_grad is not None:
        ax = axes[3]
        ax.semilogy(np.arange(1, len(diag.time_grad) + 1), finite_positive(diag.time_grad), "-", color=PALETTE[4])
        ax.set(xlabel="input time step", ylabel="|dL/dx_t|", title="through time")
    axes[0].figure.suptitle(f"verdict: {diag.verdict}")
    return axes


def log_limits(*arrays, floor=None, ceil=None) -> tuple[float, float]:
    """(low, high) for a log axis around the finite positive values of ``arrays``, padded a little and at
    least a decade wide; ``floor`` and ``ceil`` are values the range must include."""
    vals = np.concatenate([np.asarray(a, dtype=float).ravel() for a in arrays])
    vals = vals[np.isfinite(vals) & (vals > 0)]
    lo, hi = (vals.min(), vals.max()) if vals.size else (0.1, 10.0)
    lo, hi = (lo if floor is None else min(lo, floor)), (hi if ceil is None else max(hi, ceil))
    if hi / lo < 10:
        mid = math.sqrt(lo * hi)
        lo, hi = mid / math.sqrt(10), mid * math.sqrt(10)
    return lo / 2, hi * 2


_SUPERSCRIPT = str.maketrans("-0123456789", "\u207b\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079")


def power_of_ten(value, _pos=None) -> str:
    """A log-axis tick label such as 10\u207b\u2076 in plain Unicode (mathtext labels cost most of a redraw)."""
    if not value > 0:
        return ""
    exponent = math.log10(value)
    if abs(exponent - round(exponent)) < 1e-9:
        return "10" + str(int(round(exponent))).translate(_SUPERSCRIPT)
    return f"{value:.3g}"


def log_axis(ax, which: str = "y") -> None:
    """Log scale with Unicode labels on the decades and none on the minor ticks."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    choice("which", which, ["x", "y"])
    axis = ax.yaxis if which == "y" else ax.xaxis
    (ax.set_yscale if which == "y" else ax.set_xscale)("log")
    axis.set_major_formatter(FuncFormatter(power_of_ten))
    axis.set_minor_formatter(NullFormatter())


def magnitude_over_time(steps: Sequence[int], values: Sequence, ax=None, bins: int = 40, lim=None,
                        title: str | None = None, ylabel: str = r"$\log_{10}|v|$"):
    """A time-by-magnitude picture: one column per recorded step, the histogram of log10|v| of that
    step's values (e.g. one layer's activations or weight gradients) as the column's shading.

    ``values[i]`` holds the values recorded at ``steps[i]``; exact zeros are left out. ``lim`` fixes the
    (low, high) range of log10|v|, else it spans the data. Returns the axes.
    """
    import matplotlib.pyplot as plt

    if len(steps) != len(values) or len(steps) < 2:
        raise ValueError(f"need one array of values per step, at least two steps; got {len(steps)} steps "
                         f"and {len(values)} arrays")
    logs = [np.log10(np.abs(a[np.asarray(a) != 0])) for a in (np.asarray(v, dtype=float).ravel() for v in values)]
    low, high = lim if lim is not None else (min(x.min() for x in logs), max(x.max() for x in logs))
    edges = np.linspace(low, high, bins + 1)
    counts = np.array([np.histogram(x, edges)[0] / max(len(x), 1) for x in logs]).T
    if ax is None:
        _, ax = plt.subplots()
    ax.imshow(counts, origin="lower", aspect="auto", cmap="Greys", interpolation="nearest",
              extent=(steps[0], steps[-1], low, high))
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    return ax
