"""The correlation map of mean-field theory: how alike two inputs stay through a deep random network.

Two inputs send pre-activations (u1, u2) through each layer of a wide random MLP (weights of variance
sigma_w^2 / fan_in, biases of variance sigma_b^2) as a Gaussian pair of variance q* each and correlation
c_l (Poole et al. 2016). With (u1, u2) ~ N(0, q* [[1, c], [c, 1]]):

* the correlation map  c_{l+1} = (sigma_w^2 E[phi(u1) phi(u2)] + sigma_b^2) / q*,
* its slope at its stable point c*:  chi_c = sigma_w^2 E[phi'(u1) phi'(u2)],
* the correlation depth scale  xi_c = -1 / ln chi_c,

over which two inputs' correlation approaches c* (Schoenholz et al. 2017, eq. 9). In the ordered phase
c* = 1 and chi_c is the gradient factor chi of :mod:`gradbook.theory`; at the order-to-chaos boundary
chi_c = 1 and xi_c diverges. Schoenholz et al. found networks deeper than about six xi_c untrainable
(:data:`gradbook.theory.TRAINABLE_DEPTH_SCALES`). The two-dimensional expectations are taken by
Gauss-Hermite quadrature on a product grid.
"""
from __future__ import annotations

import math

import numpy as np

from . import activations as _acts
from ._checks import non_negative, positive_int
from .theory import fixed_point

__all__ = ["correlation_map", "fixed_correlation", "chi_c", "correlation_depth"]

#: Where the iteration of the correlation map starts, when it has settled, and how long it may take.
_C0, _TOL, _MAX_ITER = 0.5, 1e-13, 5000


class _Setting:
    """One network's numbers for the 2-D expectations: the activation, sigma_w^2, sigma_b^2, the length
    map's fixed point q* (:func:`gradbook.theory.fixed_point`) and a product Gauss-Hermite grid of standard
    normal nodes (z1, z2) with weights summing to 1."""

    def __init__(self, activation: str, sigma_w: float, sigma_b: float, nodes: int):
        self.act = _acts.get(activation)
        self.sw2, self.sb2 = non_negative("sigma_w", sigma_w) ** 2, non_negative("sigma_b", sigma_b) ** 2
        z, w = np.polynomial.hermite_e.hermegauss(positive_int("nodes", nodes))
        self.z1, self.z2 = np.meshgrid(z, z, indexing="ij")
        self.weight = np.outer(w, w) / w.sum() ** 2
        self.q = fixed_point(activation, sigma_w, sigma_b)

    def expect(self, f, c: float) -> float:
        """E[f(u1) f(u2)] for (u1, u2) of variance q* each and correlation c."""
        u1 = math.sqrt(self.q) * self.z1
        u2 = math.sqrt(self.q) * (c * self.z1 + math.sqrt(max(1.0 - c * c, 0.0)) * self.z2)
        return np.sum(self.weight * f(u1) * f(u2))

    def map(self, c: float) -> float:
        return min((self.sw2 * self.expect(self.act.fn, c) + self.sb2) / self.q, 1.0)

    def settle(self, c0: float, tol: float, max_iter: int) -> float:
        c = float(c0)
        for _ in range(positive_int("max_iter", max_iter)):
            new = self.map(c)
            if abs(new - c) < tol:
                return new
            c = new
        return c


def correlation_map(activation: str, c: float, sigma_w: float, sigma_b: float = 0.0, nodes: int = 80) -> float:
    """c' = (sigma_w^2 E[phi(u1) phi(u2)] + sigma_b^2) / q* for two inputs at correlation ``c`` (at most 1),
    each at the length map's fixed point q* (:func:`gradbook.theory.fixed_point`)."""
    setting = _Setting(activation, sigma_w, sigma_b, nodes)
    if not -1.0 <= float(c) <= 1.0:
        raise ValueError(f"c must be a correlation, between -1 and 1; got {c!r}")
    return setting.map(float(c))


def fixed_correlation(activation: str, sigma_w: float, sigma_b: float = 0.0, nodes: int = 80,
                      c0: float = _C0, tol: float = _TOL, max_iter: int = _MAX_ITER) -> float:
    """c*, the correlation the map settles at from ``c0``: 1 in the ordered phase, below 1 in the chaotic
    phase (two inputs decorrelate)."""
    return _Setting(activation, sigma_w, sigma_b, nodes).settle(c0, tol, max_iter)


def chi_c(activation: str, sigma_w: float, sigma_b: float = 0.0, nodes: int = 80) -> float:
    """chi_c = sigma_w^2 E[phi'(u1) phi'(u2)] at c* and q*: the slope of the correlation map at its stable
    point (Schoenholz et al. 2017, eq. 8)."""
    setting = _Setting(activation, sigma_w, sigma_b, nodes)
    c = setting.settle(_C0, _TOL, _MAX_ITER)
    return setting.sw2 * float(setting.expect(setting.act.derivative, c))


def correlation_depth(activation: str, sigma_w: float, sigma_b: float = 0.0, nodes: int = 80) -> float:
    """xi_c = -1 / ln chi_c, the number of layers over which two inputs' correlation approaches c*
    (Schoenholz et al. 2017, eq. 9); infinite where chi_c >= 1, at the order-to-chaos boundary."""
    c = chi_c(activation, sigma_w, sigma_b, nodes)
    return math.inf if c >= 1.0 else -1.0 / math.log(c)
