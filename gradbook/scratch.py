"""A NumPy MLP with a hand-written backward pass: the chain rule made visible.

Forward:  h_0 = x,  a_l = h_{l-1} W_l^T + b_l,  h_l = phi(a_l)  (the last layer is linear).
Backward: delta_L = dL/da_L,  dL/dW_l = delta_l^T h_{l-1},  delta_{l-1} = (delta_l W_l) * phi'(a_{l-1}).

Each backward step multiplies the gradient by one layer's Jacobian, W_l^T diag(phi'(a)): the product
of these Jacobians is why gradients vanish or explode with depth.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import activations as _acts
from . import init as _init
from ._checks import positive_int

__all__ = ["NumpyMLP", "Gradients"]


@dataclass
class Gradients:
    """What :meth:`NumpyMLP.backward` returns, one entry per layer from input to output."""

    weights: list[np.ndarray]      # dL/dW_l
    biases: list[np.ndarray]       # dL/db_l
    deltas: list[np.ndarray]       # dL/da_l, the back-propagated gradient at each pre-activation


class NumpyMLP:
    """An MLP in plain NumPy (float64) whose weights use the same named initializers as gradbook.

    Parameters
    ----------
    sizes : list of int
        Layer widths from input to output, e.g. ``[64, 32, 32, 10]``.
    activation : str
        Hidden activation (one of :func:`gradbook.activations.names`); the output layer is linear.
    init : str
        One of :func:`gradbook.init.names` (``"normal"`` is not offered here).
    rng : numpy.random.Generator
    """

    def __init__(self, sizes: list[int], activation: str = "sigmoid", init: str = "standard",
                 rng: np.random.Generator | None = None):
        if len(sizes) < 2:
            raise ValueError(f"sizes needs at least an input and an output size, got {sizes!r}")
        for s in sizes:
            positive_int("layer size", s)
        self.act = _acts.get(activation)
        rng = rng if rng is not None else np.random.default_rng()
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        fn = _init.get(init)
        self.weights = [fn(torch.empty(n_out, n_in, dtype=torch.float64), generator=gen).numpy()
                        for n_in, n_out in zip(sizes[:-1], sizes[1:])]
        self.biases = [np.zeros(n) for n in sizes[1:]]
        self._cache: list[tuple[np.ndarray, np.ndarray]] = []

    def forward(self, x: np.ndarray) -> np.ndarray:
        """The output for inputs ``x`` of shape (batch, sizes[0]); caches what backward needs."""
        self._cache = []
        h = np.asarray(x, dtype=float)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            a = h @ w.T + b
            self._cache.append((h, a))
            h = a if i == len(self.weights) - 1 else self.act(a)
        return h

    def backward(self, grad_output: np.ndarray) -> Gradients:
        """Back-propagate dL/d(output) through the cached forward pass."""
        if not self._cache:
            raise RuntimeError("call forward before backward")
        n = len(self.weights)
        gw, gb, deltas = [None] * n, [None] * n, [None] * n
        delta = np.asarray(grad_output, dtype=float)
        for i in reversed(range(n)):
            h_prev, _ = self._cache[i]
            deltas[i] = delta
            gw[i] = delta.T @ h_prev
            gb[i] = delta.sum(0)
            if i > 0:
                delta = (delta @ self.weights[i]) * self.act.derivative(self._cache[i - 1][1])
        return Gradients(gw, gb, deltas)

    @staticmethod
    def mse(output: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray]:
        """Mean squared error 1/(2B) sum ||output - target||^2 and its gradient with respect to output."""
        diff = output - target
        return 0.5 * float((diff**2).sum()) / len(diff), diff / len(diff)
