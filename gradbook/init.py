"""Named weight initializers, each stating its formula and its source.

All work in place on a weight tensor of shape ``(fan_out, fan_in, *kernel)`` (the layout of
``torch.nn.Linear`` and ``torch.nn.Conv*``) and return it. fan_in = ``shape[1] * prod(kernel)``,
fan_out = ``shape[0] * prod(kernel)``. :func:`variance` gives the variance each one draws with, in one
place, so that :mod:`gradbook.theory` and the tests share it.

========================  ===================================  ==========================================
name                      Var(W)                               source
========================  ===================================  ==========================================
``standard``              1 / (3 fan_in)                       Glorot & Bengio (2010), eq. 1
``xavier_uniform``        2 / (fan_in + fan_out)               Glorot & Bengio (2010), eq. 16
``xavier_normal``         2 / (fan_in + fan_out)               Glorot & Bengio (2010), eq. 12, Gaussian
``he``                    2 / fan_in                           He et al. (2015), eq. 10
``lecun``                 1 / fan_in                           LeCun et al. (1998), sect. 4.6
``orthogonal``            gain^2 / max(fan_in, fan_out)        Saxe et al. (2014)
``normal``                std^2                                a plain Gaussian, N(0, std^2)
========================  ===================================  ==========================================
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ._checks import choice

__all__ = ["standard", "xavier_uniform", "xavier_normal", "he", "lecun", "orthogonal", "normal",
           "names", "get", "variance", "fans", "torch_default_bias", "ENSEMBLES"]

#: Random-matrix ensembles for whole weight matrices: i.i.d. Gaussian entries, or a scaled orthogonal matrix.
ENSEMBLES = ["gaussian", "orthogonal"]


def fans(weight: torch.Tensor) -> tuple[int, int]:
    """(fan_in, fan_out) of a weight of shape ``(fan_out, fan_in, *kernel)``."""
    if weight.dim() < 2:
        raise ValueError(f"an initializer needs a weight with at least 2 dimensions, got shape {tuple(weight.shape)}")
    receptive = math.prod(weight.shape[2:])
    return weight.shape[1] * receptive, weight.shape[0] * receptive


def _uniform_(weight, var, generator):
    bound = math.sqrt(3.0 * var)  # U[-a, a] has variance a^2 / 3
    with torch.no_grad():
        return weight.uniform_(-bound, bound, generator=generator)


def _normal_(weight, var, generator):
    with torch.no_grad():
        return weight.normal_(0.0, math.sqrt(var), generator=generator)


def standard(weight: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The "standard" heuristic W ~ U[-1/sqrt(n), 1/sqrt(n)], n = fan_in, so n Var(W) = 1/3.

    Glorot & Bengio (2010), eq. 1. With it, tanh activations and back-propagated gradients shrink
    layer by layer, since each layer multiplies their variance by about n Var(W) = 1/3.
    """
    return _uniform_(weight, variance("standard", *fans(weight)), generator)


def xavier_uniform(weight: torch.Tensor, gain: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Normalized initialization W ~ U[-a, a], a = gain sqrt(6 / (fan_in + fan_out)).

    Glorot & Bengio (2010), eq. 16: Var(W) = gain^2 * 2 / (fan_in + fan_out), the compromise between
    keeping forward variance (fan_in Var W = 1) and backward variance (fan_out Var W = 1).
    """
    return _uniform_(weight, variance("xavier_uniform", *fans(weight), gain=gain), generator)


def xavier_normal(weight: torch.Tensor, gain: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """W ~ N(0, gain^2 * 2 / (fan_in + fan_out)): Glorot & Bengio's (2010) eq. 12 variance, Gaussian."""
    return _normal_(weight, variance("xavier_normal", *fans(weight), gain=gain), generator)


def he(weight: torch.Tensor, mode: str = "fan_in", negative_slope: float = 0.0,
       generator: torch.Generator | None = None) -> torch.Tensor:
    """Kaiming/He initialization W ~ N(0, 2 / ((1 + a^2) n)), n = fan_in (or fan_out).

    He et al. (2015), eq. 10 (forward, n = fan_in) and eq. 13 (backward, n = fan_out); a is the
    negative slope of a leaky ReLU (0 for ReLU). It keeps the variance of ReLU activations constant
    through depth, since a ReLU halves the second moment of a symmetric input.
    """
    return _normal_(weight, variance("he", *fans(weight), mode=mode, negative_slope=negative_slope), generator)


def lecun(weight: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """LeCun initialization W ~ N(0, 1 / fan_in), so each unit's input has unit variance.

    LeCun, Bottou, Orr & Mueller (1998), "Efficient BackProp", sect. 4.6 (std = fan_in^-1/2).
    """
    return _normal_(weight, variance("lecun", *fans(weight)), generator)


def orthogonal(weight: torch.Tensor, gain: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """A (semi-)orthogonal matrix times ``gain``: all singular values equal ``gain``.

    Saxe, McClelland & Ganguli (2014): orthogonal weights make a deep linear network an isometry,
    so gradients neither vanish nor explode. Entries have variance gain^2 / max(fan_in, fan_out).
    Drawn as the Q factor of a Gaussian matrix with signs fixed (Mezzadri's recipe, as torch does).
    """
    rows = weight.shape[0]
    cols = weight.numel() // rows
    flat = torch.randn(max(rows, cols), min(rows, cols), generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(flat)
    q = q * torch.sign(torch.diagonal(r))
    if rows < cols:
        q = q.T
    with torch.no_grad():
        return weight.copy_((gain * q).reshape(weight.shape).to(device=weight.device, dtype=weight.dtype))


def normal(weight: torch.Tensor, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A plain Gaussian W ~ N(0, std^2), whatever the layer's size.

    With std = sigma_w / sqrt(fan_in) it is the mean-field convention of Poole et al. (2016) and
    Schoenholz et al. (2017): Var(W) = sigma_w^2 / fan_in.
    """
    return _normal_(weight, variance("normal", 1, 1, std=std), generator)   # no fan enters this variance


def torch_default_bias(bias: torch.Tensor, fan_in: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A bias drawn as ``torch.nn.Linear`` and ``Conv`` draw theirs by default: U[-1/sqrt(fan_in), 1/sqrt(fan_in)].

    gradbook's networks start their biases at zero; this is the bias a model built from plain
    ``nn.Linear`` layers starts with (variance 1 / (3 fan_in), as :func:`standard`'s weights).
    """
    bound = fan_in ** -0.5
    with torch.no_grad():
        return bias.uniform_(-bound, bound, generator=generator)


_INITS: dict[str, Callable] = {
    "standard": standard,
    "xavier_uniform": xavier_uniform,
    "xavier_normal": xavier_normal,
    "he": he,
    "lecun": lecun,
    "orthogonal": orthogonal,
    "normal": normal,
}


def names() -> list[str]:
    """The names of the initializers gradbook knows."""
    return list(_INITS)


def get(name: str) -> Callable:
    """The initializer called ``name``; ``ValueError`` naming the allowed names otherwise."""
    return _INITS[choice("init", name, _INITS)]


def variance(name: str, fan_in: int, fan_out: int, **kwargs) -> float:
    """The variance Var(W) that initializer ``name`` draws each weight with: every formula of the table at
    the top of this module, in one place (the initializers draw with it).

    ``kwargs`` are the initializer's own (``gain``, ``mode``, ``negative_slope``, ``std``).
    """
    choice("init", name, _INITS)
    gain = kwargs.get("gain", 1.0)
    if name == "standard":
        return 1.0 / (3.0 * fan_in)
    if name in ("xavier_uniform", "xavier_normal"):
        return gain**2 * 2.0 / (fan_in + fan_out)
    if name == "he":
        n = {"fan_in": fan_in, "fan_out": fan_out}[choice("mode", kwargs.get("mode", "fan_in"), ["fan_in", "fan_out"])]
        return 2.0 / ((1.0 + kwargs.get("negative_slope", 0.0) ** 2) * n)
    if name == "lecun":
        return 1.0 / fan_in
    if name == "orthogonal":
        return gain**2 / max(fan_in, fan_out)
    if "std" not in kwargs:
        raise ValueError("init 'normal' needs std=..., the standard deviation of the weights")
    if not kwargs["std"] >= 0:
        raise ValueError(f"std must be >= 0, got {kwargs['std']!r}")
    return float(kwargs["std"]) ** 2
