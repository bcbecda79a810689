"""Predictions of mean-field theory for the gradients gradbook measures.

A wide MLP with weights W_ij ~ (0, sigma_w^2 / fan_in) and biases b_i ~ (0, sigma_b^2) sends each
pre-activation a_l through a Gaussian of variance q_l, layer after layer (Poole et al. 2016; Schoenholz
et al. 2017). With z ~ N(0, 1):

* the length map       q_l = sigma_w^2 E[phi(sqrt(q_{l-1}) z)^2] + sigma_b^2,   q_1 = sigma_w^2 q_0 + sigma_b^2,
* the gradient factor  chi_l = sigma_w^2 E[phi'(sqrt(q_l) z)^2],

where q_0 is the mean square of the input's entries. chi_l is the factor by which the squared norm of
the back-propagated gradient delta = dL/da changes from layer l+1 down to layer l:
E||delta_l||^2 = chi_l E||delta_{l+1}||^2. Expectations have closed forms for the piecewise-linear
activations (ReLU: chi = sigma_w^2 / 2) and use numerical quadrature for the others.

The predictions hold for wide layers; at finite width the log of a gradient norm fluctuates with a
variance that grows like depth / width (Hanin 2018).
"""
from __future__ import annotations

import math

import numpy as np

from . import activations as _acts
from . import init as _init
from ._checks import non_negative, positive_int

__all__ = ["expect", "length_map", "chi", "q_path", "gradient_factors", "fixed_point", "critical_sigma_w",
           "depth_scale", "trainable_depth", "init_sigma_w", "rnn_bounds"]

# E[f(z)], z ~ N(0, 1), by Gauss-Legendre quadrature on [-12, 0] and [0, 12] separately: exact to ~1e-12
# for functions that are smooth on each side of 0, such as ELU's derivative, which has a kink there and
# defeats plain Gauss-Hermite quadrature (2% off at q = 10). The tails beyond 12 weigh below 1e-32.
_x, _w = np.polynomial.legendre.leggauss(160)
_NODES = np.concatenate([6.0 * (_x - 1.0), 6.0 * (_x + 1.0)])
_WEIGHTS = np.concatenate([6.0 * _w, 6.0 * _w]) * np.exp(-0.5 * _NODES**2) / math.sqrt(2.0 * math.pi)


def expect(f, q: float = 1.0) -> float:
    """E[f(sqrt(q) z)] for z ~ N(0, 1), by Gauss-Legendre quadrature on each side of 0."""
    return float(np.dot(_WEIGHTS, f(math.sqrt(max(q, 0.0)) * _NODES)))


def _leaky_slope(name: str) -> float | None:
    return {"relu": 0.0, "leaky_relu": _acts.LEAKY_SLOPE, "linear": 1.0}.get(name)


def length_map(activation: str, q: float, sigma_w: float, sigma_b: float = 0.0) -> float:
    """q' = sigma_w^2 E[phi(sqrt(q) z)^2] + sigma_b^2: the next layer's pre-activation variance."""
    act = _acts.get(activation)
    a = _leaky_slope(act.name)
    second = q * (1 + a * a) / 2 if a is not None and act.name != "linear" else \
        (q if act.name == "linear" else expect(lambda x: act.fn(x) ** 2, q))
    return sigma_w**2 * second + sigma_b**2


def chi(activation: str, q: float, sigma_w: float) -> float:
    """chi = sigma_w^2 E[phi'(sqrt(q) z)^2]: the factor on the squared back-propagated gradient norm."""
    act = _acts.get(activation)
    a = _leaky_slope(act.name)
    if a is not None:
        return sigma_w**2 * (1.0 if act.name == "linear" else (1 + a * a) / 2)
    return sigma_w**2 * expect(lambda x: act.derivative(x) ** 2, q)


def q_path(activation: str, depth: int, sigma_w: float, sigma_b: float = 0.0, q0: float = 1.0) -> np.ndarray:
    """[q_1, ..., q_depth]: each hidden layer's pre-activation variance, from an input of mean square q0."""
    positive_int("depth", depth)
    non_negative("q0", q0)
    qs = [sigma_w**2 * q0 + sigma_b**2]
    for _ in range(depth - 1):
        qs.append(length_map(activation, qs[-1], sigma_w, sigma_b))
    return np.array(qs)


def gradient_factors(activation: str, depth: int, sigma_w: float, sigma_b: float = 0.0,
                     q0: float = 1.0) -> np.ndarray:
    """[chi_1, ..., chi_depth] along the actual path of q (not only at the fixed point).

    ``factors[l - 1]`` predicts ||delta_l||^2 / ||delta_{l+1}||^2 for hidden layer l, where delta is the
    gradient at a layer's pre-activation (the output of its Linear map, ``grad_norm`` in
    :mod:`gradbook.measure`); the last entry assumes a layer with the same sigma_w above the last one.
    The product of ``factors[:k]`` predicts ||delta_1||^2 / ||delta_{k+1}||^2.
    """
    return np.array([chi(activation, q, sigma_w) for q in q_path(activation, depth, sigma_w, sigma_b, q0)])


def fixed_point(activation: str, sigma_w: float, sigma_b: float = 0.0, q0: float = 1.0,
                tol: float = 1e-12, max_iter: int = 100_000) -> float:
    """The fixed point q* of the length map reached from q0 (inf if q grows without bound)."""
    q = q0
    for _ in range(max_iter):
        new = length_map(activation, q, sigma_w, sigma_b)
        if not math.isfinite(new) or new > 1e12:
            return math.inf
        if abs(new - q) <= tol * max(1.0, q):
            return new
        q = new
    return q


def critical_sigma_w(activation: str, sigma_b: float = 0.0) -> float:
    """The sigma_w on the order-to-chaos boundary, where chi = 1 at the fixed point q*.

    Below it gradients vanish with depth (ordered phase), above it they explode (chaotic phase). For
    tanh with sigma_b^2 = 0.05 it is sigma_w^2 = 1.761 (Schoenholz et al. 2017); for ReLU sigma_w^2 = 2
    whatever sigma_b (He et al. 2015).
    """
    from scipy.optimize import brentq

    act = _acts.get(activation)
    a = _leaky_slope(act.name)
    if a is not None:
        return 1.0 if act.name == "linear" else math.sqrt(2.0 / (1 + a * a))

    def excess(sw):
        q = fixed_point(activation, sw, sigma_b)
        return chi(activation, q, sw) - 1.0 if math.isfinite(q) else 1.0
    return float(brentq(excess, 0.05, 20.0, xtol=1e-12))


def depth_scale(activation: str, sigma_w: float, sigma_b: float = 0.0) -> float:
    """xi = 1 / abs(ln chi*), the number of layers over which the squared gradient changes by a factor e
    at the fixed point; infinite at criticality (Schoenholz et al. 2017, with xi_nabla = -1/ln chi_1)."""
    q = fixed_point(activation, sigma_w, sigma_b)
    c = chi(activation, q, sigma_w) if math.isfinite(q) else math.inf
    return math.inf if c == 1 or not math.isfinite(c) else 1.0 / abs(math.log(c))


def trainable_depth(activation: str, sigma_w: float, sigma_b: float = 0.0) -> float:
    """About 6 xi: the depth beyond which Schoenholz et al. (2017) found networks untrainable."""
    return 6.0 * depth_scale(activation, sigma_w, sigma_b)


def init_sigma_w(init: str, fan_in: int, fan_out: int, **kwargs) -> float:
    """The mean-field sigma_w of a named initializer: sqrt(fan_in Var(W)), e.g. 1/sqrt(3) for "standard",
    sqrt(2) for "he", and sqrt(2 fan_in / (fan_in + fan_out)) for the Xavier pair."""
    return math.sqrt(fan_in * _init.variance(init, fan_in, fan_out, **kwargs))


def rnn_bounds(w_rec, activation: str) -> dict:
    """Pascanu, Mikolov & Bengio's (2013) conditions for a vanilla RNN h_t = phi(W_rec h_{t-1} + ...).

    With gamma = sup abs(phi') and s = the largest singular value of W_rec:

    * ``vanishing_sufficient``: s < 1/gamma guarantees that ||dh_T/dh_t|| -> 0 exponentially;
    * ``exploding_necessary``: s > 1/gamma must hold for it to grow;
    * ``bound(k)``: ||dh_T/dh_{T-k}|| <= (gamma s)^k, the bound behind both.
    """
    act = _acts.get(activation)
    w = np.asarray(w_rec.detach().cpu() if hasattr(w_rec, "detach") else w_rec, dtype=float)
    s = float(np.linalg.norm(w, ord=2))
    rate = act.gamma * s
    return {"gamma": act.gamma, "sigma_max": s, "threshold": 1.0 / act.gamma,
            "vanishing_sufficient": rate < 1.0, "exploding_necessary": rate > 1.0,
            "bound": lambda k: rate ** np.asarray(k, dtype=float)}
