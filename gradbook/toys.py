"""Small models with a known answer, for seeing a phenomenon in two dimensions or in closed form.

:func:`cliff` is the one-unit recurrent network of Pascanu, Mikolov & Bengio (2013, fig. 6) whose loss
surface has a "cliff": a wall where the loss changes abruptly and the gradient is enormous;
:func:`descend` runs gradient descent on it, with or without clipping.

:func:`whitened` and :func:`learning_time` are the deep linear networks of Saxe, McClelland & Ganguli
(2014): on whitened inputs the squared error of a product of weight matrices depends on the data only
through the input-target correlation, so full-batch gradient descent runs exactly and fast; the learning
time is the number of steps to a given fraction of the way to the least-squares optimum.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from ._checks import choice, positive_int

__all__ = ["cliff", "cliff_wall", "descend", "Descent", "CLIP_MODES", "Whitened", "whitened", "linear_chain",
           "steps_to_target", "learning_time", "LINEAR_INITS"]

#: The initializations of :func:`linear_chain`: scaled Gaussian (variance 1/fan_in) or random orthogonal.
LINEAR_INITS = ["gaussian", "orthogonal"]


def _sigmoid(x):
    with np.errstate(over="ignore"):
        return 0.5 * (1.0 + np.tanh(0.5 * x))      # exact, and never overflows


def cliff(w, b, steps: int = 50, x0: float = 0.5, target: float = 0.7):
    """Loss and gradient of the one-unit RNN x_t = w sigmoid(x_{t-1}) + b, L = (sigmoid(x_steps) - target)^2.

    ``w`` and ``b`` may be numbers or arrays of the same shape (a grid, or many starting points); computed
    in float64 by back-propagation through time written out (dL/dx_t = dL/dx_{t+1} w s_t (1 - s_t), with
    s_t = sigmoid(x_{t-1})), which the tests check against autograd. Returns ``(loss, dL/dw, dL/db)`` as
    NumPy arrays of that shape.
    """
    positive_int("steps", steps)
    w, b = np.asarray(w, dtype=float), np.asarray(b, dtype=float)
    if w.shape != b.shape:
        raise ValueError(f"w and b must have the same shape, got {w.shape} and {b.shape}")
    s = []
    x = np.full(w.shape, float(x0))
    for _ in range(steps):
        s.append(_sigmoid(x))
        x = w * s[-1] + b
    out = _sigmoid(x)
    g = 2.0 * (out - target) * out * (1.0 - out)       # dL/dx_steps
    gw, gb = np.zeros(w.shape), np.zeros(w.shape)
    for st in reversed(s):
        gw += g * st
        gb += g
        g = g * w * st * (1.0 - st)
    return (out - target) ** 2, gw, gb


#: How :func:`descend` may clip: not at all, each entry of the gradient by value, or the whole gradient by norm.
CLIP_MODES = ["none", "value", "norm"]


@dataclass
class Descent:
    """A run of :func:`descend`. Arrays have the shape of the starting points after the leading axis.

    ``loss``, ``norm_before``, ``norm_after`` (steps, ...): the loss and the gradient norm before and after
    clipping at each step (NaN once a run has diverged); ``path`` (steps + 1, 2, ...): every (w, b);
    ``clipped`` (...): whether clipping changed any step; ``diverged`` (...): the step at which a run's loss
    or gradient stopped being finite (the run stops there, and the arrays end early when every run has),
    or -1.
    """

    loss: np.ndarray
    norm_before: np.ndarray
    norm_after: np.ndarray
    path: np.ndarray
    clipped: np.ndarray
    diverged: np.ndarray

    @property
    def final_loss(self) -> np.ndarray:
        """The loss where each run ended."""
        return cliff(self.path[-1, 0], self.path[-1, 1])[0]


def descend(w, b, lr: float, mode: str = "none", threshold=np.inf, steps: int = 300) -> Descent:
    """Gradient descent on :func:`cliff` from the starting point(s) (w, b), optionally clipped.

    ``mode`` is "none", "value" (each of dL/dw, dL/db clipped to [-threshold, threshold]) or "norm" (the
    gradient rescaled to norm ``threshold`` when longer: Pascanu, Mikolov & Bengio 2013, algorithm 1, which
    ``torch.nn.utils.clip_grad_norm_`` implements). ``w``, ``b`` and ``threshold`` may be arrays of one
    shape (many runs at once; ``threshold=np.inf`` is plain descent). The one loop behind the clipping
    chapter and its explorer.
    """
    choice("mode", mode, CLIP_MODES)
    positive_int("steps", steps)
    if not (np.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    c = np.asarray(threshold, dtype=float)
    if mode != "none" and not np.all(c > 0):
        raise ValueError(f"threshold must be > 0, got {threshold!r}")
    w, b = np.array(w, dtype=float), np.array(b, dtype=float)
    c = np.broadcast_to(c, w.shape)
    diverged, clipped = np.full(w.shape, -1), np.zeros(w.shape, dtype=bool)
    loss, before, after, path = [], [], [], [np.stack([w, b])]
    for step in range(steps):
        with np.errstate(all="ignore"):
            L, gw, gb = cliff(w, b)
            n = np.hypot(gw, gb)
        diverged[(diverged < 0) & ~(np.isfinite(L) & np.isfinite(n))] = step
        live = diverged < 0
        if not live.any():
            break
        if mode == "norm":
            scale = np.where(n > c, c / np.maximum(n, 1e-300), 1.0)
            gw, gb = gw * scale, gb * scale
        elif mode == "value":
            gw, gb = np.clip(gw, -c, c), np.clip(gb, -c, c)
        n_after = np.hypot(gw, gb)
        clipped |= live & (n_after < n)
        loss.append(np.where(live, L, np.nan))
        before.append(np.where(live, n, np.nan))
        after.append(np.where(live, n_after, np.nan))
        w, b = np.where(live, w - lr * gw, w), np.where(live, b - lr * gb, b)
        path.append(np.stack([w, b]))
    return Descent(np.array(loss), np.array(before), np.array(after), np.array(path), clipped, diverged)


def cliff_wall(w: float, b_low: float, b_high: float, steps: int = 50, x0: float = 0.5,
               target: float = 0.7, tol: float = 1e-12) -> float:
    """The bias b in [b_low, b_high] where the loss of :func:`cliff` jumps, found by bisection.

    The wall is a jump of the final state between two attractors; a regular grid almost always misses
    it, so it is located by bisection on which side of the midpoint x_steps lands. ``b_low`` and
    ``b_high`` must lie on different sides of the wall.
    """
    def final_state(b):
        x = x0
        for _ in range(steps):
            x = w / (1.0 + np.exp(-x)) + b
        return x

    lo, hi = float(b_low), float(b_high)
    x_lo, x_hi = final_state(lo), final_state(hi)
    mid_x = (x_lo + x_hi) / 2     # the final state lands on one side of this or the other
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if (final_state(mid) > mid_x) == (x_hi > mid_x):
            hi = mid
        else:
            lo = mid
    wall, h = (lo + hi) / 2, 1e-10
    steepness = abs(final_state(wall + h) - final_state(wall - h)) / (2 * h)
    if steepness < 100 * abs(x_hi - x_lo) / (float(b_high) - float(b_low)):   # no steeper than on average
        raise ValueError(f"no wall between b = {b_low} and b = {b_high}: the final state changes smoothly")
    return wall


@dataclass(frozen=True)
class Whitened:
    """A least-squares problem on whitened inputs (x^T x / n = I), by its second moments: ``syx`` (targets
    by inputs), ``syy`` (mean squared target norm); ``loss_zero`` and ``loss_best``: half the mean squared
    error of the zero map and of the optimum ``syx``."""

    syx: torch.Tensor
    syy: float
    loss_zero: float
    loss_best: float

    @property
    def dim(self) -> int:
        return self.syx.shape[1]

    def loss(self, product: torch.Tensor) -> torch.Tensor:
        """Half the mean squared error of the linear map ``product`` (out x dim), exactly:
        ``(||M||^2 - 2 tr(syx^T M) + syy) / 2``, since the inputs are white."""
        return 0.5 * ((product * product).sum() - 2 * (self.syx * product).sum() + self.syy)

    def target(self, fraction: float) -> float:
        """The loss ``fraction`` of the way from the zero map's to the optimum's."""
        return self.loss_zero - fraction * (self.loss_zero - self.loss_best)


def whitened(task, variance_floor: float = 1e-3) -> Whitened:
    """A classification task's inputs, centred and whitened (keeping the directions whose variance is above
    ``variance_floor`` times the largest), against its centred one-hot labels, in float64."""
    x = task.x_train.double()
    y = torch.nn.functional.one_hot(task.y_train, task.out_dim).double()
    x, y = x - x.mean(0), y - y.mean(0)
    evals, evecs = torch.linalg.eigh(x.T @ x / len(x))
    keep = evals > variance_floor * evals.max()
    x = x @ evecs[:, keep] / evals[keep].sqrt()
    syx, syy = y.T @ x / len(x), float((y * y).sum(1).mean())
    return Whitened(syx, syy, 0.5 * syy, float(0.5 * (syy - (syx * syx).sum())))


def linear_chain(kind: str, depth: int, dim: int, out_dim: int, generator: torch.Generator | None = None) -> list:
    """``depth`` float64 weight matrices dim -> dim -> ... -> dim -> out_dim, scaled Gaussian (variance
    1/fan_in) or random orthogonal (``torch.nn.init.orthogonal_``), as Saxe et al. (2014) compare them."""
    choice("kind", kind, LINEAR_INITS)
    dims = [dim] * positive_int("depth", depth) + [out_dim]
    weights = []
    for fan_in, fan_out in zip(dims[:-1], dims[1:]):
        w = torch.empty(fan_out, fan_in, dtype=torch.float64)
        if kind == "gaussian":
            w.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=generator)
        else:
            torch.nn.init.orthogonal_(w, generator=generator)
        weights.append(w)
    return weights


def steps_to_target(weights: list, lr: float, problem: Whitened, target: float, max_steps: int) -> int | None:
    """Full-batch gradient descent on ``problem`` from ``weights`` (left untouched): the step at which the
    loss first reaches ``target``, or None if not within ``max_steps`` or if the loss ever rises (which
    gradient descent does only when the rate is too large)."""
    weights = [w.clone().requires_grad_() for w in weights]
    previous = math.inf
    for step in range(max_steps + 1):
        loss = problem.loss(functools.reduce(lambda acc, w: w @ acc, weights))
        value = loss.item()
        if not value <= previous:                  # rose, or not finite
            return None
        if value <= target:
            return step
        previous = value
        if step < max_steps:
            grads = torch.autograd.grad(loss, weights)
            with torch.no_grad():
                for w, g in zip(weights, grads):
                    w -= lr * g
    return None


def learning_time(weights: list, problem: Whitened, fraction: float = 0.9, max_steps: int = 1000,
                  learning_rates=tuple(2.0 ** -k for k in range(8))) -> tuple[int, float]:
    """Saxe et al.'s learning time: the fewest steps to ``fraction`` of the way to the optimum over
    ``learning_rates`` (tried in order; a later rate need only run as long as the best so far), and the
    rate that took them; ``(max_steps, 0.0)`` if none gets there."""
    target = problem.target(fraction)
    fastest, fastest_lr = max_steps, 0.0
    for lr in learning_rates:
        steps = steps_to_target(weights, lr, problem, target, fastest)
        if steps is not None and (steps < fastest or fastest_lr == 0.0):
            fastest, fastest_lr = steps, lr
    return fastest, fastest_lr
