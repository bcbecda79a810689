"""Activation functions with their derivatives, derivative bounds and a saturation test.

Every function here accepts a NumPy array or a torch tensor and returns the same kind, so the
NumPy network of :mod:`gradbook.scratch` and the torch networks of :mod:`gradbook.nets` share one
definition.

>>> from gradbook import activations
>>> act = activations.get("sigmoid")
>>> act.gamma          # sup |phi'(x)|: sigmoid' peaks at 1/4
0.25
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy import special as _sp
from torch import nn

from ._checks import choice

__all__ = ["Activation", "get", "names", "from_module", "LinearActivation", "SATURATION_THRESHOLD"]

#: A unit is *saturated* at an input where its derivative is below this fraction of the bound gamma,
#: so it passes back less than 10% of the largest gradient the activation can pass.
SATURATION_THRESHOLD = 0.1

LEAKY_SLOPE = 0.01  # PyTorch's default negative slope, as in Maas et al. (2013)
ELU_ALPHA = 1.0


def _is_torch(x) -> bool:
    return isinstance(x, torch.Tensor)


def _exp(x):
    return torch.exp(x) if _is_torch(x) else np.exp(x)


def _tanh(x):
    return torch.tanh(x) if _is_torch(x) else np.tanh(x)


def _where(c, a, b):
    return torch.where(c, a, b) if _is_torch(c) else np.where(c, a, b)


def _erf(x):
    return torch.special.erf(x) if _is_torch(x) else _sp.erf(x)


def _sigmoid(x):
    return torch.sigmoid(x) if _is_torch(x) else _sp.expit(x)


def _step(x):
    """1 where x > 0, else 0, in x's floating type (on torch via sign, several times faster than a
    comparison, whose boolean result is slow to convert on the CPU)."""
    return torch.sign(x).clamp_min_(0) if _is_torch(x) else (x > 0).astype(float)


def _min0(x):
    """min(x, 0), so that exp never overflows on the side where it is not used."""
    return x.clamp_max(0) if _is_torch(x) else np.minimum(x, 0)


def _ones_like(x):
    return torch.ones_like(x) if _is_torch(x) else np.ones_like(x, dtype=float)


def _as_float(x):
    return x if _is_torch(x) else np.asarray(x, dtype=float)


_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


class LinearActivation(nn.Identity):
    """The identity used as an activation (``"linear"``), so that probes can tell it from a placeholder."""


@dataclass(frozen=True)
class Activation:
    """One activation function phi.

    Attributes
    ----------
    name : str
        Its name in :func:`names`.
    fn : callable
        phi(x), on a NumPy array or a torch tensor.
    derivative : callable
        phi'(x), same input types.
    gamma : float
        The bound sup over x of abs(phi'(x)), the gamma of Pascanu et al. (2013): 1/4 for sigmoid, 1 for tanh.
    module : callable
        Builds the matching ``torch.nn.Module``.
    """

    name: str
    fn: Callable
    derivative: Callable
    gamma: float
    module: Callable[[], nn.Module]

    def __call__(self, x):
        return self.fn(_as_float(x))

    def saturated(self, x, threshold: float = SATURATION_THRESHOLD):
        """True where phi'(x) < threshold * gamma: the unit passes back under 10% of the largest gradient.

        For sigmoid and tanh these are inputs far out on either side (abs(x) > 3.64 and abs(x) > 1.82 at the
        default threshold); for the ReLU family, the negative side; ``linear`` never saturates.
        """
        return self.derivative(_as_float(x)) < threshold * self.gamma


def _d_gelu(x):
    cdf = 0.5 * (1.0 + _erf(x / _SQRT2))
    return cdf + x * _INV_SQRT_2PI * _exp(-0.5 * x * x)


_REGISTRY: dict[str, Activation] = {
    a.name: a
    for a in [
        Activation("sigmoid", _sigmoid, lambda x: _sigmoid(x) * (1 - _sigmoid(x)), 0.25, nn.Sigmoid),
        Activation("tanh", _tanh, lambda x: 1 - _tanh(x) ** 2, 1.0, nn.Tanh),
        Activation("relu", lambda x: x * (x > 0), _step, 1.0, nn.ReLU),
        Activation(
            "leaky_relu",
            lambda x: _where(x > 0, x, LEAKY_SLOPE * x),
            lambda x: LEAKY_SLOPE + (1 - LEAKY_SLOPE) * _step(x),
            1.0,
            lambda: nn.LeakyReLU(LEAKY_SLOPE),
        ),
        Activation(
            "elu",
            lambda x: _where(x > 0, x, ELU_ALPHA * (_exp(_min0(x)) - 1)),
            lambda x: _where(x > 0, _ones_like(x), ELU_ALPHA * _exp(_min0(x))),
            1.0,
            lambda: nn.ELU(ELU_ALPHA),
        ),
        # exact GELU, x * Phi(x); its derivative peaks at Phi(sqrt 2) + sqrt(2) phi(sqrt 2) = 1.1289 at x = sqrt 2
        Activation("gelu", lambda x: 0.5 * x * (1.0 + _erf(x / _SQRT2)), _d_gelu, 1.1289041451851550, nn.GELU),
        Activation("linear", lambda x: x * 1.0, _ones_like, 1.0, LinearActivation),
    ]
}

_MODULE_TYPES = {
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.ReLU: "relu",
    nn.LeakyReLU: "leaky_relu",
    nn.ELU: "elu",
    nn.GELU: "gelu",
    LinearActivation: "linear",
}


def names() -> list[str]:
    """The names of the activations gradbook knows."""
    return list(_REGISTRY)


def get(name: str | Activation) -> Activation:
    """The :class:`Activation` called ``name``; ``ValueError`` naming the allowed names otherwise."""
    if isinstance(name, Activation):
        return name
    return _REGISTRY[choice("activation", name, _REGISTRY)]


def from_module(module: nn.Module) -> Activation | None:
    """The :class:`Activation` a torch module computes, or None if it is not one gradbook knows.

    Modules with non-default parameters (a LeakyReLU with another slope, an ELU with another alpha,
    GELU's tanh approximation) get an Activation built for those parameters.
    """
    name = _MODULE_TYPES.get(type(module))
    if name is None:
        return None
    if isinstance(module, nn.LeakyReLU) and module.negative_slope != LEAKY_SLOPE:
        s = module.negative_slope
        return Activation(
            f"leaky_relu({s})",
            lambda x: _where(x > 0, x, s * x),
            lambda x: s + (1 - s) * _step(x),
            max(1.0, abs(s)),
            lambda: nn.LeakyReLU(s),
        )
    if isinstance(module, nn.ELU) and module.alpha != ELU_ALPHA:
        a = module.alpha
        return Activation(
            f"elu({a})",
            lambda x: _where(x > 0, x, a * (_exp(_min0(x)) - 1)),
            lambda x: _where(x > 0, _ones_like(x), a * _exp(_min0(x))),
            max(1.0, a),
            lambda: nn.ELU(a),
        )
    if isinstance(module, nn.GELU) and module.approximate != "none":
        return None  # the tanh approximation differs slightly; don't pretend it is exact GELU
    return _REGISTRY[name]
