"""How much a profile changes end to end: a robust line through its logarithm.

A *profile* is a sequence of positive numbers along the direction a signal travels (a relative weight
gradient per layer, an activation's standard deviation per layer, a gradient per time step). Its change
end to end is ``exp(slope * (n - 1))``, with the slope of the log-profile estimated robustly, as the median
of all pairwise slopes (Theil-Sen), so one odd layer, such as a read-out with another shape, does not
decide a verdict. :func:`crossing` finds where a profile first strays beyond the trainability line of
:mod:`gradbook.theory` (six depth scales).
"""
from __future__ import annotations

import functools

import numpy as np

from .theory import TRAINABLE_DEPTH_SCALES as THRESHOLD

__all__ = ["theil_sen", "log_points", "log_change", "crossing"]


@functools.lru_cache(maxsize=64)
def _pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(n, k=1)


def _median(a: np.ndarray) -> float:
    """The median of the finite array ``a`` (``np.median`` without its checks, a quarter of its cost)."""
    h = len(a) // 2
    if len(a) % 2:
        return float(np.partition(a, h)[h])
    low, high = np.partition(a, [h - 1, h])[h - 1:h + 1]
    return float((low + high) / 2)


def _slope(x: np.ndarray, y: np.ndarray) -> float:
    i, j = _pairs(len(x))
    return _median((y[j] - y[i]) / (x[j] - x[i]))


def theil_sen(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """The Theil-Sen line through the points (x, y): the median of all pairwise slopes, and the median
    intercept (Theil 1950; Sen 1968). Robust to a few odd points, such as a read-out layer of another shape."""
    slope = _slope(x, y)
    return slope, float(np.median(y - slope * x))


def log_points(profile) -> tuple[np.ndarray, np.ndarray]:
    """(index, log value) of a profile's entries that are finite and positive."""
    y = np.asarray(profile, dtype=float)
    keep = np.flatnonzero(np.isfinite(y) & (y > 0))
    return keep, np.log(y[keep])


def log_change(profile: np.ndarray) -> float:
    """ln(last / first) of a profile, from the Theil-Sen slope of its logarithm (robust to odd entries).

    Entries that are zero, negative or not finite are left out; with fewer than two left, returns 0.
    """
    x, logs = log_points(profile)
    if len(x) < 2:
        return 0.0
    return _slope(x, logs) * float(x[-1] - x[0])


def crossing(profile: np.ndarray, sign: int) -> int | None:
    """Index of the first entry (walking the profile in order) more than e^{THRESHOLD/2} beyond the
    profile's healthy end: a norm change of e^3 is a squared-norm change of e^6, six depth scales.

    The reference is the Theil-Sen line through the log-profile at the profile's first entry, so one odd
    first layer (a read-out) does not move it.
    """
    x, logs = log_points(profile)
    if len(x) < 2:
        return None
    slope, intercept = theil_sen(x - x[0], logs)
    for k, v in zip(x, logs):
        if sign * (v - intercept) > THRESHOLD / 2:
            return int(k)
    steps = int(np.ceil(THRESHOLD / 2 / abs(slope))) if slope != 0 else len(profile)   # where the line crosses
    return int(x[0] + steps) if x[0] + steps < len(profile) else None
