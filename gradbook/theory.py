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

Beyond the mean squared gradient, ``jacobian_spectrum`` predicts the spread of the squared singular
values of the input-output Jacobian, which separates Gaussian from orthogonal weights (Pennington,
Schoenholz & Ganguli 2017).

This module predicts; it never measures or builds a network. The measured counterparts are in
:mod:`gradbook.measure` (``measured_factors``, ``jacobian_singular_values``), and
:func:`gradbook.nets.mean_field_mlp` builds a network with exactly the weight and bias variances the
theory assumes.
"""
from __future__ import annotations

import math

import numpy as np

from . import activations as _acts
from . import init as _init
from ._checks import choice, non_negative, positive_int

__all__ = ["expect", "length_map", "chi", "q_path", "gradient_factors", "gradient_profile", "fixed_point",
           "critical_sigma_w", "critical_line", "depth_scale", "trainable_depth", "init_sigma_w", "rnn_bounds",
           "jacobian_spectrum", "residual_profile", "TRAINABLE_DEPTH_SCALES", "width_exponents",
           "ln_gradient_bound"]

# E[f(z)], z ~ N(0, 1), by Gauss-Legendre quadrature on [-12, 0] and [0, 12] separately: exact to ~1e-12
# for functions that are smooth on each side of 0, such as ELU's derivative, which has a kink there and
# defeats plain Gauss-Hermite quadrature (2% off at q = 10). The tails beyond 12 weigh below 1e-32.
_x, _w = np.polynomial.legendre.leggauss(160)
_NODES = np.concatenate([6.0 * (_x - 1.0), 6.0 * (_x + 1.0)])
_WEIGHTS = np.concatenate([6.0 * _w, 6.0 * _w]) * np.exp(-0.5 * _NODES**2) / math.sqrt(2.0 * math.pi)


def expect(f, q=1.0):
    """E[f(sqrt(q) z)] for z ~ N(0, 1), by Gauss-Legendre quadrature on each side of 0.

    ``q`` may be an array: then the result is an array of the same shape, computed in one matrix
    product (``f`` must then work elementwise on arrays), which makes grids of predictions cheap.
    """
    if np.ndim(q) == 0:
        return float(np.dot(_WEIGHTS, f(math.sqrt(max(float(q), 0.0)) * _NODES)))
    root = np.sqrt(np.maximum(np.asarray(q, dtype=float), 0.0))
    return f(root[..., None] * _NODES) @ _WEIGHTS


def _leaky_slope(name: str) -> float | None:
    return {"relu": 0.0, "leaky_relu": _acts.LEAKY_SLOPE, "linear": 1.0}.get(name)


def _second_moment(act, q):
    """E[phi(sqrt(q) z)^2], in closed form for the piecewise-linear activations."""
    a = _leaky_slope(act.name)
    if act.name == "linear":
        return q * 1.0
    if a is not None:
        return q * (1 + a * a) / 2
    return expect(lambda x: act.fn(x) ** 2, q)


def _derivative_moment(act, q, power: int = 2):
    """E[phi'(sqrt(q) z)^power], in closed form for the piecewise-linear activations."""
    a = _leaky_slope(act.name)
    if a is not None:
        value = 1.0 if act.name == "linear" else (1 + a**power) / 2
        return value if np.ndim(q) == 0 else np.full(np.shape(q), value)
    return expect(lambda x: act.derivative(x) ** power, q)


def length_map(activation: str, q, sigma_w, sigma_b=0.0):
    """q' = sigma_w^2 E[phi(sqrt(q) z)^2] + sigma_b^2: the next layer's pre-activation variance.

    Arrays of ``q``, ``sigma_w`` and ``sigma_b`` broadcast against each other.
    """
    act = _acts.get(activation)
    return sigma_w**2 * _second_moment(act, q) + sigma_b**2


def chi(activation: str, q, sigma_w):
    """chi = sigma_w^2 E[phi'(sqrt(q) z)^2]: the factor on the squared back-propagated gradient norm.

    Arrays of ``q`` and ``sigma_w`` broadcast against each other.
    """
    act = _acts.get(activation)
    return sigma_w**2 * _derivative_moment(act, q)


def q_path(activation: str, depth: int, sigma_w, sigma_b=0.0, q0: float = 1.0) -> np.ndarray:
    """[q_1, ..., q_depth]: each hidden layer's pre-activation variance, from an input of mean square q0.

    With arrays ``sigma_w`` and ``sigma_b`` (broadcast against each other) the result has shape
    ``broadcast_shape + (depth,)``.
    """
    positive_int("depth", depth)
    non_negative("q0", q0)
    sigma_w, sigma_b = np.broadcast_arrays(np.asarray(sigma_w, dtype=float), np.asarray(sigma_b, dtype=float))
    qs = [sigma_w**2 * q0 + sigma_b**2]
    with np.errstate(over="ignore", invalid="ignore"):
        for _ in range(depth - 1):
            qs.append(length_map(activation, qs[-1], sigma_w, sigma_b))
    return np.stack(qs, axis=-1)


def gradient_factors(activation: str, depth: int, sigma_w, sigma_b=0.0, q0: float = 1.0) -> np.ndarray:
    """[chi_1, ..., chi_depth] along the actual path of q (not only at the fixed point).

    ``factors[l - 1]`` predicts ||delta_l||^2 / ||delta_{l+1}||^2 for hidden layer l, where delta is the
    gradient at a layer's pre-activation (the output of its Linear map, ``grad_norm`` in
    :mod:`gradbook.measure`); the last entry assumes a layer with the same sigma_w above the last one.
    The product of ``factors[:k]`` predicts ||delta_1||^2 / ||delta_{k+1}||^2.

    ``sigma_w`` and ``sigma_b`` may be arrays (broadcast against each other); the result then has shape
    ``broadcast_shape + (depth,)``, computed layer by layer for the whole grid at once (a 40 x 40 grid of
    30-layer tanh predictions takes about a second).
    """
    sw = np.asarray(sigma_w, dtype=float)
    return chi(activation, q_path(activation, depth, sigma_w, sigma_b, q0), sw[..., None] if sw.ndim else sw)


def gradient_profile(activation: str, depth: int, sigma_w: float, sigma_b: float = 0.0, q0: float = 1.0,
                     top: float = 1.0) -> np.ndarray:
    """The predicted back-propagated gradient norms [||delta_1||, ..., ||delta_depth||], with
    ||delta_depth|| = ``top``.

    ||delta_l|| = top * sqrt(chi_l chi_{l+1} ... chi_{depth-1}) from :func:`gradient_factors`: the profile
    that :func:`gradbook.plot.gradient_flow` draws with ``predicted=`` beside a measured one (pass the
    measured top layer's norm as ``top`` to anchor it).
    """
    return top * np.sqrt(_products_above(gradient_factors(activation, depth, sigma_w, sigma_b, q0)[:-1]))


def _products_above(factors) -> np.ndarray:
    """[f_1 f_2 ... f_n, f_2 ... f_n, ..., f_n, 1]: for each of n + 1 layers, the product of the factors
    between it and the top (what the squared gradient gains on its way down to that layer)."""
    f = np.asarray(factors, dtype=float)
    return np.concatenate([np.cumprod(f[::-1])[::-1], [1.0]])


def residual_profile(activation: str, depth: int, sigma_w: float, sigma_b: float = 0.0,
                     q0: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Mean-field prediction for a residual stack h_l = h_{l-1} + phi(W_l h_{l-1} + b_l), as built by
    ``gradbook.nets.mlp(..., residual=True)``: ``(rms, grad)``, each of length ``depth``.

    The branch's output is taken as uncorrelated with its input, so mean squares add:
    s_l = s_{l-1} + E[phi(a_l)^2] with a_l ~ N(0, sigma_w^2 s_{l-1} + sigma_b^2) and s_0 = ``q0`` (the input's
    mean square); ``rms[l-1]`` = sqrt(s_l) is the predicted RMS of block l's output. Backwards, the cross term
    of ||(I + A_l^T) g||^2 averages to zero (exactly so for odd activations), leaving the factor 1 + chi_l
    per block; ``grad[l-1]`` = ||dL/dh_l|| / ||dL/dh_depth||, so ``grad[-1]`` is 1 and ``grad[0]`` is the
    end-to-end growth. Branches whose outputs share a sign (ReLU) add coherently and grow faster than this.
    """
    positive_int("depth", depth)
    non_negative("q0", q0)
    s, rms, factors = float(q0), [], []
    for _ in range(depth):
        q = sigma_w**2 * s + sigma_b**2                 # variance of the branch's pre-activation
        factors.append(1 + chi(activation, q, sigma_w))
        s = s + float(length_map(activation, q, 1.0))   # + E[phi(a)^2]
        rms.append(np.sqrt(s))
    # dL/dh_{l-1} = (1 + chi_l) dL/dh_l: block l's gradient carries the factors of blocks l+1, ..., depth
    return np.array(rms), np.sqrt(_products_above(factors[1:]))


def fixed_point(activation: str, sigma_w: float, sigma_b: float = 0.0, q0: float = 1.0,
                tol: float = 1e-12, max_iter: int = 200) -> float:
    """The fixed point q* of the length map reached from q0 (inf if q grows without bound).

    Iterates the map ``max_iter`` times, then, if it has not converged (near criticality it converges
    slowly, like 1/l for tanh at sigma_w = 1, sigma_b = 0), brackets the fixed point the iteration is
    heading for and solves q = length_map(q) with Brent's method. A map that heads for q = 0 with
    sigma_b = 0 returns 0.0.
    """
    from scipy.optimize import brentq

    def excess(q):
        return length_map(activation, q, sigma_w, sigma_b) - q

    q = float(q0)
    for _ in range(max_iter):
        new = length_map(activation, q, sigma_w, sigma_b)
        if not math.isfinite(new) or new > 1e12:
            return math.inf
        if abs(new - q) <= tol * max(1.0, q):
            return new
        q = new
    if excess(q) < 0:           # heading down: the fixed point lies between sigma_b^2 and q
        hi, lo = q, q / 2
        while excess(lo) < 0:
            if lo < 1e-300:
                return 0.0
            hi, lo = lo, lo / 2
    else:                       # heading up: search upwards for the first q where the map falls below q
        lo, hi = q, 2 * q
        while excess(hi) > 0:
            if hi > 1e12:
                return math.inf
            lo, hi = hi, hi * 2
    return float(brentq(excess, lo, hi, xtol=tol * max(1e-300, lo), rtol=4 * np.finfo(float).eps))


def critical_line(activation: str, q_star) -> tuple[np.ndarray, np.ndarray]:
    """The order-to-chaos boundary chi* = 1 in parametric form: (sigma_w, sigma_b) for each fixed point q*.

    Solving the two conditions for the weights and biases at a given q* (Poole et al. 2016, Fig. 2;
    Schoenholz et al. 2017, Fig. 1):

    * chi* = 1:              sigma_w^2 = 1 / E[phi'(sqrt(q*) z)^2],
    * q* is a fixed point:   sigma_b^2 = q* - sigma_w^2 E[phi(sqrt(q*) z)^2].

    ``q_star`` may be an array; entries where sigma_b^2 would be negative come back as NaN. For tanh
    q* -> 0 gives the point (1, 0) and q* = 0.05 ... 1 traces the curve of Schoenholz et al.'s phase
    diagram. (For the piecewise-linear activations chi does not depend on q*: the line is the single
    point sigma_w = sqrt(2 / (1 + a^2)), sigma_b = 0.)
    """
    act = _acts.get(activation)
    q_star = np.asarray(q_star, dtype=float)
    sw2 = 1.0 / _derivative_moment(act, q_star)
    sb2 = q_star - sw2 * _second_moment(act, q_star)
    with np.errstate(invalid="ignore"):
        sb = np.where(sb2 >= -1e-12 * np.maximum(1.0, q_star), np.sqrt(np.maximum(sb2, 0.0)), np.nan)
    return np.sqrt(sw2), sb


def critical_sigma_w(activation: str, sigma_b: float = 0.0) -> float:
    """The sigma_w on the order-to-chaos boundary, where chi = 1 at the fixed point q*.

    Below it gradients vanish with depth (ordered phase), above it they explode (chaotic phase). For
    tanh with sigma_b^2 = 0.05 it is sigma_w^2 = 1.761 (Schoenholz et al. 2017); for ReLU sigma_w^2 = 2
    whatever sigma_b (He et al. 2015).

    Computed without iterating the length map: with sigma_b = 0 and phi(0) = 0, q* = 0 is a fixed point
    with chi* = sigma_w^2 phi'(0)^2, so sigma_w = 1 / abs(phi'(0)) exactly (1 for tanh and ELU, 2 for
    GELU, whose slope at 0 is 1/2). Otherwise the q* on ``critical_line`` whose sigma_b matches is found
    by Brent's method.

    For GELU the fixed point on this line is unstable when sigma_b is small (the length map's slope
    there exceeds chi = 1), so a network fed inputs of finite variance can escape to large q, where GELU
    behaves like ReLU and chi tends to sigma_w^2 / 2: from inputs of unit variance, GELU gradients
    already grow for sigma_w^2 above about 2.35. Use :func:`gradient_factors` along the actual path of q
    for such cases.
    """
    from scipy.optimize import brentq

    act = _acts.get(activation)
    a = _leaky_slope(act.name)
    if a is not None:
        return 1.0 if act.name == "linear" else math.sqrt(2.0 / (1 + a * a))
    non_negative("sigma_b", sigma_b)
    phi0, slope0 = float(act.fn(np.array(0.0))), float(act.derivative(np.array(0.0)))
    if sigma_b == 0 and phi0 == 0 and slope0 != 0:
        return 1.0 / abs(slope0)

    def sb2_minus_target(log_q):   # sigma_b^2 on the critical line at q* = exp(log_q), minus the target
        q = np.exp(log_q)
        return q - _second_moment(act, q) / _derivative_moment(act, q) - sigma_b**2
    grid = np.linspace(math.log(1e-8), math.log(1e6), 141)
    above = np.nonzero(sb2_minus_target(grid) >= 0)[0]
    if len(above) == 0:
        raise ValueError(f"no critical point of {activation!r} with sigma_b = {sigma_b} for q* up to 1e6")
    k = above[0]
    if k == 0:
        return float(critical_line(activation, math.exp(grid[0]))[0])
    log_q = brentq(lambda t: float(sb2_minus_target(t)), grid[k - 1], grid[k], xtol=1e-13)
    return float(critical_line(activation, math.exp(log_q))[0])


def depth_scale(activation: str, sigma_w: float, sigma_b: float = 0.0) -> float:
    """xi = 1 / abs(ln chi*), the number of layers over which the squared gradient changes by a factor e
    at the fixed point; infinite at criticality (Schoenholz et al. 2017, with xi_nabla = -1/ln chi_1)."""
    q = fixed_point(activation, sigma_w, sigma_b)
    c = chi(activation, q, sigma_w) if math.isfinite(q) else math.inf
    return math.inf if c == 1 or not math.isfinite(c) else 1.0 / abs(math.log(c))


#: Depth scales a network can span and still train: Schoenholz et al. (2017) found networks deeper than
#: about 6 xi untrainable. :mod:`gradbook.diagnosis` draws its line here.
TRAINABLE_DEPTH_SCALES = 6.0


def trainable_depth(activation: str, sigma_w: float, sigma_b: float = 0.0) -> float:
    """About 6 xi (:data:`TRAINABLE_DEPTH_SCALES` depth scales): the depth beyond which Schoenholz et al.
    (2017) found networks untrainable."""
    return TRAINABLE_DEPTH_SCALES * depth_scale(activation, sigma_w, sigma_b)


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


def jacobian_spectrum(activation: str, depth: int, sigma_w: float, sigma_b: float = 0.0,
                      weights: str = "gaussian", q0: float = 1.0) -> dict:
    """Mean and spread of the squared singular values of the input-output Jacobian of a wide MLP.

    For J = D_L W_L ... D_1 W_1 (D_l = diag phi'(a_l)), the eigenvalues lambda of J J^T are the squared
    singular values of J. In the wide limit the factors are asymptotically free, and for free positive
    elements the normalized variance v = Var(lambda) / E[lambda]^2 adds up exactly (Pennington, Schoenholz
    & Ganguli 2017, in their notation s_1 = -v_W):

    * ``mean``      E[lambda] = prod_l chi_l (1 at criticality),
    * ``variance``  Var(lambda / E[lambda]) = L v_W + sum_l (mu_2,l / mu_1,l^2 - 1),

    with mu_k,l = E[phi'(sqrt(q_l) z)^(2k)] along the path q_l of :func:`q_path`, and v_W the normalized
    variance of W^T W: 1 for square Gaussian weights (Marchenko-Pastur), 0 for orthogonal ones.

    Hence: a linear network with orthogonal weights is an exact isometry (variance 0, Saxe et al. 2014);
    with Gaussian weights the variance is L, growing linearly with depth. A ReLU network at
    sigma_w^2 = 2 has mu_2 / mu_1^2 = 2, so variance 2L with Gaussian and L with orthogonal weights:
    neither achieves dynamical isometry. For tanh near criticality with small q*, mu_2 / mu_1^2 is close
    to 1, and orthogonal weights give a nearly flat spectrum.

    ``largest`` is the right edge of the normalized spectrum where it is known in closed form: for a
    linear network with Gaussian weights the spectrum is Fuss-Catalan with edge (L+1)^(L+1) / L^L
    (about e (L + 1)); with orthogonal weights every squared singular value equals the mean. Otherwise NaN.
    """
    positive_int("depth", depth)
    choice("weights", weights, _init.ENSEMBLES)
    act = _acts.get(activation)
    q = q_path(activation, depth, sigma_w, sigma_b, q0)
    mu1, mu2 = _derivative_moment(act, q, 2), _derivative_moment(act, q, 4)
    v_w = 1.0 if weights == "gaussian" else 0.0
    variance = float(depth * v_w + np.sum(mu2 / mu1**2 - 1.0))
    mean = float(np.prod(sigma_w**2 * mu1))
    if act.name == "linear":
        largest = (depth + 1) ** (depth + 1) / depth**depth if weights == "gaussian" else 1.0
    else:
        largest = math.nan
    return {"mean": mean, "variance": variance, "largest": largest}


def width_exponents(parametrization: str, optimizer: str) -> dict:
    """The exponent a in ``|h_1 - h_0| ~ n^a``: how the change in one step of an MLP's input-layer, hidden-layer
    and output (logit) coordinates grows with the width n at a fixed learning rate, by Yang & Hu's (2021)
    Tensor Programs IV argument (a sum of n terms correlated with each other is ~n, independent ones
    ~sqrt(n)). Standard parametrization (variance 1/fan_in, one learning rate): gradients at the hidden
    layers are ~n^-1/2 per entry, which SGD passes on and Adam normalizes to ~1. muP (Yang et al. 2022,
    Table 3; :mod:`gradbook.width`) sets every exponent to 0. The output's 1.5 under Adam needs a hidden
    layer before it (W_out's entries ~n^-1/2 summed over n changes ~n correlated with them)."""
    choice("parametrization", parametrization, ["sp", "mup"])
    choice("optimizer", optimizer, ["sgd", "adam"])
    if parametrization == "mup":
        return {"input": 0.0, "hidden": 0.0, "output": 0.0}
    return {"sgd": {"input": -0.5, "hidden": 0.5, "output": 1.0},
            "adam": {"input": 0.0, "hidden": 1.0, "output": 1.5}}[optimizer]


def ln_gradient_bound(depth: int, width: int, norm: str = "pre") -> float:
    """The order of Xiong et al.'s (2020, Theorem 1) bound on ``||dL/dW||_F`` of the last block's second
    feed-forward weight at initialization: d sqrt(ln d) for post-LN, whatever the depth L, and
    d sqrt(ln d / L) for pre-LN. Constants dropped: compare a measurement's change with depth, not its size."""
    positive_int("depth", depth)
    positive_int("width", width)
    bound = width * math.sqrt(math.log(width))
    return bound / math.sqrt(depth) if choice("norm", norm, ["pre", "post"]) == "pre" else bound
