"""Small models with a known answer, for seeing a phenomenon in two dimensions.

:func:`cliff` is the one-unit recurrent network of Pascanu, Mikolov & Bengio (2013, fig. 6) whose loss
surface has a "cliff": a wall where the loss changes abruptly and the gradient is enormous.
"""
from __future__ import annotations

import numpy as np
import torch

from ._checks import positive_int

__all__ = ["cliff", "cliff_wall"]


def cliff(w, b, steps: int = 50, x0: float = 0.5, target: float = 0.7):
    """Loss and gradient of the one-unit RNN x_t = w sigmoid(x_{t-1}) + b, L = (sigmoid(x_steps) - target)^2.

    ``w`` and ``b`` may be numbers or arrays of the same shape (a grid); computed in float64 with
    autograd. Returns ``(loss, dL/dw, dL/db)`` as NumPy arrays of that shape.
    """
    positive_int("steps", steps)
    w = torch.as_tensor(np.asarray(w, dtype=float)).clone().requires_grad_(True)
    b = torch.as_tensor(np.asarray(b, dtype=float)).clone().requires_grad_(True)
    if w.shape != b.shape:
        raise ValueError(f"w and b must have the same shape, got {tuple(w.shape)} and {tuple(b.shape)}")
    x = torch.full_like(w, x0)
    for _ in range(steps):
        x = w * torch.sigmoid(x) + b
    loss = (torch.sigmoid(x) - target) ** 2
    gw, gb = torch.autograd.grad(loss.sum(), [w, b])
    return loss.detach().numpy(), gw.numpy(), gb.numpy()


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
