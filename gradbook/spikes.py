"""Spikes: a value far above its own recent past, flagged the step it happens.

A :class:`Rolling` z-score compares each new value with the mean and standard deviation of the ``window``
values before it (large labs watch the loss and the total gradient norm at about 6 sigma over the last 128
steps); nothing is flagged until ``window`` values have been seen. A flagged value still enters the window,
so a lasting change of level raises one alarm, not one per step. :class:`Spike` is what a monitor keeps
about one alarm; :class:`SpikeWarning` is the warning it raises when asked.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._checks import positive_int

__all__ = ["Rolling", "Detector", "Spike", "SpikeWarning", "WINDOW", "THRESHOLD"]

#: Default window (recorded steps) and threshold (standard deviations above the window's mean).
WINDOW, THRESHOLD = 128, 6.0


class SpikeWarning(UserWarning):
    """A loss or gradient-norm spike, raised by :class:`gradbook.watch.watch` when ``spikes="warn"``."""


@dataclass
class Spike:
    """One alarm: ``quantity`` (``"loss"`` or ``"grad_norm"``, the total gradient norm) was ``z`` standard
    deviations above the mean of its window at recorded step ``step``.

    ``layers`` names the layers whose own weight-gradient norm was above the threshold at that step,
    the ones that jumped first (at an earlier recorded step, still high now) first. ``update_ratio`` is each
    layer's ||Delta W|| / ||W|| of that step's optimizer update and ``update_ratio_before`` the median of
    the window before it (both None when the monitor was given no optimizer, or before the update ran).
    """

    step: int
    quantity: str
    value: float
    mean: float
    std: float
    z: float
    layers: list[str] = field(default_factory=list)
    update_ratio: np.ndarray | None = None
    update_ratio_before: np.ndarray | None = None

    def __str__(self) -> str:
        where = f"; first in {', '.join(self.layers[:3])}" if self.layers else ""
        return (f"{self.quantity} spike at step {self.step}: {self.value:.4g}, {self.z:.1f} sigma above the "
                f"mean {self.mean:.4g} of the window before{where}")


class Rolling:
    """The z-score of each new value of ``width`` series against the ``window`` values before it.

    ``update(x, step)`` returns the z-scores of ``x`` (NaN while fewer than ``window`` values have been seen)
    against the window's ``mean`` and ``std`` (kept), then adds ``x`` to the window. ``since[i]`` is the
    step where series i's current run above ``threshold`` began, or -1.
    """

    def __init__(self, window: int = WINDOW, threshold: float = THRESHOLD, width: int = 1):
        if positive_int("window", window) < 2:
            raise ValueError(f"window must be at least 2 steps (a standard deviation needs two), got {window}")
        if not float(threshold) > 0:
            raise ValueError(f"threshold must be a number of standard deviations > 0, got {threshold!r}")
        self.window, self.threshold = window, float(threshold)
        self.values = np.full((window, width), np.nan)
        self.count = 0
        self.since = np.full(width, -1)
        self._sum = self._sumsq = self._ref = None   # running sums of (x - ref) over the window

    def _push(self, x: np.ndarray) -> None:
        if self._ref is None:
            self._ref, self._sum, self._sumsq = x.copy(), np.zeros_like(x), np.zeros_like(x)
        i = self.count % self.window
        if self.count >= self.window:
            old = self.values[i] - self._ref
            self._sum -= old
            self._sumsq -= old * old
        self.values[i] = x
        d = x - self._ref
        self._sum += d
        self._sumsq += d * d
        self.count += 1
        if self.count % self.window == 0:   # recentre and recompute exactly once per window: no drift
            self._ref = self.values.mean(0)
            d = self.values - self._ref
            self._sum, self._sumsq = d.sum(0), (d * d).sum(0)

    def update(self, x, step: int) -> np.ndarray:
        x = np.asarray(x, dtype=float).reshape(-1)
        z = np.full(x.shape, np.nan)
        self.mean = self.std = z
        full = self.count >= self.window
        if full:
            n = self.window
            self.mean = self._ref + self._sum / n
            self.std = np.sqrt(np.maximum(self._sumsq - self._sum ** 2 / n, 0) / (n - 1))
            z = (x - self.mean) / np.maximum(self.std, 1e-12 * np.abs(self.mean) + 1e-300)  # constant: any rise
        high = (z >= self.threshold) | (np.isinf(x) & full)
        self.since = np.where(high, np.where(self.since < 0, step, self.since), -1)
        if np.isfinite(x).all():   # a non-finite value (a step AMP skipped) is not history
            self._push(x)
        return z


class Detector:
    """Spikes of the loss and of the total gradient norm, and which layers jumped, over recorded steps.

    ``check(step, grad_norm, loss, layer_norms, update_ratio)`` takes one recorded step's numbers (``loss``
    NaN when none was logged, ``update_ratio`` None without an optimizer, or when it is known only later:
    then ``add_ratio``) and returns the spikes found at that step (an empty list on a healthy step).
    """

    def __init__(self, layers: list[str], window: int = WINDOW, threshold: float = THRESHOLD):
        self.layers = list(layers)
        # column 0 the total gradient norm, then each layer's: one rolling window for all of them
        self.norms, self.loss = Rolling(window, threshold, 1 + len(layers)), Rolling(window, threshold)
        self.ratios = np.full((window, len(layers)), np.nan)
        self.n_ratios = 0

    def check(self, step: int, grad_norm: float, loss: float, layer_norms, update_ratio=None) -> list[Spike]:
        z_all = self.norms.update(np.concatenate([[grad_norm], np.asarray(layer_norms, dtype=float)]), step)
        found = []
        if not np.isnan(loss):
            z = self.loss.update([loss], step)[0]
            if self.loss.since[0] == step:   # the run above the threshold starts here: one alarm per run
                found.append(self._spike(step, "loss", loss, self.loss, z, z_all[1:]))
        if self.norms.since[0] == step:
            found.append(self._spike(step, "grad_norm", grad_norm, self.norms, z_all[0], z_all[1:]))
        if update_ratio is not None:
            self.add_ratio(update_ratio, found)
        return found

    def _spike(self, step: int, name: str, value: float, roll: Rolling, z: float, z_layer: np.ndarray) -> Spike:
        since = self.norms.since[1:]
        jumped = [i for i in np.argsort(-np.nan_to_num(z_layer, nan=-np.inf)) if since[i] >= 0]
        jumped.sort(key=lambda i: since[i])   # stable: by size within a step
        before = np.nanmedian(self.ratios[:self.n_ratios], 0) if self.n_ratios else None
        return Spike(step, name, float(value), float(roll.mean[0]), float(roll.std[0]), float(z),
                     [self.layers[i] for i in jumped], None, before)

    def add_ratio(self, update_ratio, spikes=()) -> None:
        """The update ratio of the step just checked (known only after its update): handed to that step's
        ``spikes`` and kept for the window's median."""
        for s in spikes:
            s.update_ratio = update_ratio
        if np.isfinite(update_ratio).all():
            self.ratios[self.n_ratios % len(self.ratios)] = update_ratio
            self.n_ratios += 1
