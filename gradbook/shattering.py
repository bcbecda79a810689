"""Shattered gradients (Balduzzi et al. 2017, "The shattered gradients problem"): the networks of their
experiments and the two measures of how the gradients at different inputs decorrelate with depth.

* :func:`network` builds one of the architectures of :data:`ARCHS` (plain ReLU layers with or without batch
  normalization, the paper's residual block ``h + W ReLU(BN(h))``, the same with its branches scaled by
  ``depth**-0.5``), for a scalar input on a line (``"grid"``, the paper's Fig. 1) or for inputs in many
  dimensions (``"independent"``, the setting of its theorems), each with a linear read-out to one number;
* :func:`input_slopes` is ``d f(x_i) / d x_i`` at every row of a batch, with batch normalization frozen at
  the statistics of that batch, so that it is the derivative of the function the network computes;
* :func:`autocorrelation` and :func:`pair_correlation` measure how alike those gradients are: along the
  line, and over pairs of independent inputs;
* :func:`residual_correlation` is the prediction for a residual network, from the recursion the
  architectures chapter derives: each block multiplies the covariance of two gradients by ``1 + a/2`` and
  their variance by ``1 + a``, ``a`` the branch's squared gain relative to the stream.

All weights are He-initialized (``N(0, 2/fan_in)``); on the line every network but ``"plain_udl"`` starts
with an input layer ``ReLU(w x + b)`` with ``w, b ~ N(0, 1)``: with zero biases a ReLU network of a scalar
input is positively homogeneous and ``f'`` would take only two values.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ._checks import choice
from .nets import mlp

__all__ = ["ARCHS", "Residual", "first_layer", "hidden", "readout", "network", "input_slopes", "autocorrelation",
           "pair_correlation", "residual_correlation"]

#: The architectures: plain with batch norm, the paper's resnet, the resnet with branches scaled by
#: depth^(-1/2) (Fixup's scaling), plain He without normalization, and all weights and biases N(0, 1/width)
#: (the set-up of a widely used notebook that reports it could not replicate the paper).
ARCHS = ["plain_bn", "resnet_bn", "resnet_bn_scaled", "plain_he", "plain_udl"]


def _he_linear(n_in: int, n_out: int, bias: bool = False) -> nn.Linear:
    layer = nn.Linear(n_in, n_out, bias=bias)
    nn.init.normal_(layer.weight, 0.0, math.sqrt(2.0 / n_in))
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


class Residual(nn.Module):
    """h + branch(h)."""

    def __init__(self, branch: nn.Module):
        super().__init__()
        self.branch = branch

    def forward(self, h):
        return h + self.branch(h)


def first_layer(in_dim: int, width: int) -> nn.Module:
    """The line networks' input layer: ReLU(w x + b), w and b drawn N(0, 1) (He's variance for the fan-in 2 of
    the input (x, 1)), so that each unit switches at -b/w, inside [-2, 2] for 70% of the units."""
    layer = nn.Linear(in_dim, width)
    nn.init.normal_(layer.weight, 0.0, 1.0)
    nn.init.normal_(layer.bias, 0.0, 1.0)
    return nn.Sequential(layer, nn.ReLU())


def hidden(arch: str, depth: int, width: int) -> list[nn.Module]:
    """``depth`` hidden layers (or residual blocks) of the architecture ``arch``."""
    if arch.startswith("resnet_bn"):
        blocks = [Residual(nn.Sequential(nn.BatchNorm1d(width), nn.ReLU(), _he_linear(width, width)))
                  for _ in range(depth)]
        if arch == "resnet_bn_scaled":           # every branch scaled by depth^(-1/2), as in Fixup
            with torch.no_grad():
                for block in blocks:
                    block.branch[2].weight.mul_(depth ** -0.5)
        return blocks
    if depth == 0:
        return []
    norm = {"plain_bn": "batch", "plain_he": None}[arch]
    return list(mlp(depth, width, "relu", "he", norm=norm).layers)


def readout(width: int) -> nn.Linear:
    """The linear read-out to one number, He-initialized, without bias."""
    return _he_linear(width, 1)


def network(experiment: str, arch: str, depth: int, width: int, in_dim: int) -> nn.Module:
    """The network of one experiment. ``"grid"``: a biased input layer and ``depth`` - 1 hidden layers (plain)
    or ``depth`` residual blocks; ``"independent"``: ``depth`` layers (plain) or a linear input layer and
    ``depth`` blocks, no biases. Then a linear read-out to one number."""
    choice("experiment", experiment, ["grid", "independent"])
    choice("arch", arch, ARCHS)
    if arch == "plain_udl":
        net = mlp(depth, width, "relu", "normal", in_dim=in_dim, out_dim=1, init_kwargs={"std": width ** -0.5})
        with torch.no_grad():
            for layer in [b.linear for b in net.layers] + [net.readout]:
                layer.bias.normal_(0.0, width ** -0.5)
        return net
    residual = arch.startswith("resnet_bn")
    if experiment == "grid":
        body = [first_layer(in_dim, width)] + hidden(arch, depth if residual else depth - 1, width)
    elif residual:
        body = [_he_linear(in_dim, width)] + hidden(arch, depth, width)
    else:
        norm = {"plain_bn": "batch", "plain_he": None}[arch]
        body = list(mlp(depth, width, "relu", "he", in_dim=in_dim, norm=norm).layers)
    return nn.Sequential(*body, readout(width))


def input_slopes(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """d f(x_i) / d x_i for every row x_i, with batch normalization frozen at the statistics of ``x``."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.momentum = None                 # a cumulative average: one batch gives its own statistics
            m.reset_running_stats()
    net.train()
    with torch.no_grad():
        net(x)
    net.eval()
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(net(x).sum(), x)
    return g


def autocorrelation(g, max_lag: int) -> np.ndarray:
    """sum_i g_i g_(i+k) / sum_i g_i^2 for k = 0..max_lag (lag 0 is 1; the mean is not removed, as in the
    paper's figure)."""
    g = np.asarray(g, dtype=float)
    return np.array([np.dot(g[:len(g) - k], g[k:]) / np.dot(g, g) for k in range(max_lag + 1)])


def pair_correlation(g: torch.Tensor) -> float:
    """Mean over pairs i != j of ``<g_i, g_j>``, over the mean of ``||g_i||^2`` (rows of ``g``: one input's
    gradient)."""
    gram = g @ g.T
    n = gram.shape[0]
    off = (gram.sum() - gram.diagonal().sum()) / (n * (n - 1))
    return float(off / gram.diagonal().mean())


def residual_correlation(depth: int, alpha2: float = 1.0, s0: float = 2.0) -> float:
    """The predicted gradient correlation of independent inputs after ``depth`` residual blocks: the product
    over blocks of (1 + a/2) / (1 + a), a = alpha2 / s, with the stream's second moment s growing by
    alpha2 (1 - 1/pi) per block from s0 (the architectures chapter's derivation, after Balduzzi et al. 2017)."""
    s = s0 + alpha2 * (1 - 1 / np.pi) * np.arange(depth)
    return float(np.prod((1 + alpha2 / (2 * s)) / (1 + alpha2 / s)))
