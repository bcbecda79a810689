"""Balduzzi et al. (2017), "The shattered gradients problem": how the gradients of a ReLU network at
different inputs decorrelate with depth, in plain and residual networks.

Two experiments, both at initialization, every network 200 units wide with He-initialized weights
(N(0, 2/fan_in)) and float64 arithmetic; each entry is one network with its own seed:

``grid/<arch>/L<depth>/s<seed>``
    The paper's Fig. 1 set-up: a scalar input x on a grid of 256 points in [-2, 2] (the grid is also the
    batch of the normalization layers), a scalar output f(x), and the derivative f'(x) at every grid
    point. The entry is the autocorrelation of f' over the grid at lags 0..32 (normalized to 1 at lag 0,
    the mean not removed, as in the paper's figure).
``independent/<arch>/L<depth>/s<seed>``
    The setting of the paper's theorems: inputs whose activation patterns are independent. 256 Gaussian
    inputs in 200 dimensions (nearly orthogonal); the entry is the mean over all pairs i != j of
    <g_i, g_j> divided by the mean of |g_i|^2, where g_i is the gradient of the scalar output with respect
    to input i. The theorems predict 2^-L for a plain network and a decay like 1/sqrt(L) for a residual one.

Architectures (``arch``), each ending in a linear read-out to one number:

``plain_bn``
    Linear -> BatchNorm -> ReLU per layer (the layers of ``gb.mlp(..., norm="batch")``).
``resnet_bn``
    The paper's residual block, h + W ReLU(BN(h)), after an input layer.
``resnet_bn_scaled``
    The same with every branch's weights multiplied by depth^(-1/2) (the scaling of Fixup, Zhang et al. 2019).
``plain_he``
    Linear -> ReLU per layer, zero biases (the layers of ``gb.mlp(..., "relu", "he")``).
``plain_udl``
    Weights and biases all N(0, 1/200) (the set-up of a widely used notebook that reports it could not
    replicate the paper), no normalization.

On the grid, every network but ``plain_udl`` starts with an input layer ReLU(w x + b) whose w and b are
drawn N(0, 1): with a scalar input and zero biases a ReLU network is positively homogeneous, f(x) = x f(1)
for x > 0, so f' would take two values and nothing could shatter; and batch normalization right after the
input would put every first-layer switch at the grid's mean. ``L<depth>`` counts that layer for the plain
networks (depth 1: the input layer alone) and counts the blocks after it for ``resnet_bn``. For the
independent inputs, the plain networks are ``depth`` layers of ``gb.mlp`` without biases and ``resnet_bn``
is a linear input layer and ``depth`` blocks.

Batch normalization uses the statistics of the whole batch (the grid, or the 256 inputs), frozen, so that
f'(x) is the derivative of the function the network computes at x.
"""
from __future__ import annotations

import math
import sys

import numpy as np
import torch
from torch import nn

import gradbook as gb
from common import main, seed_for

CONFIG = {
    "width": 200,
    "grid": {"points": 256, "low": -2.0, "high": 2.0, "max_lag": 32},
    "independent": {"inputs": 256, "dim": 200},
    "depths": [1, 2, 4, 8, 12, 16, 24, 32, 50],
    "seeds": 6,
    "grid_archs": ["plain_bn", "resnet_bn", "resnet_bn_scaled", "plain_he", "plain_udl"],
    "independent_archs": ["plain_bn", "resnet_bn", "resnet_bn_scaled", "plain_he"],
}


def keys(config):
    for experiment in ("grid", "independent"):
        for arch in config[f"{experiment}_archs"]:
            for depth in config["depths"]:
                for seed in range(config["seeds"]):
                    yield f"{experiment}/{arch}/L{depth}/s{seed}"


def he_linear(n_in: int, n_out: int, bias: bool = False) -> nn.Linear:
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
    """The grid networks' input layer: ReLU(w x + b), w and b drawn N(0, 1) (He's variance for the fan-in 2 of
    the input (x, 1)), so that each unit switches at -b/w, inside [-2, 2] for 70% of the units."""
    layer = nn.Linear(in_dim, width)
    nn.init.normal_(layer.weight, 0.0, 1.0)
    nn.init.normal_(layer.bias, 0.0, 1.0)
    return nn.Sequential(layer, nn.ReLU())


def hidden(arch: str, depth: int, width: int) -> list[nn.Module]:
    """``depth`` hidden layers (or residual blocks) of the architecture ``arch``."""
    if arch.startswith("resnet_bn"):
        blocks = [Residual(nn.Sequential(nn.BatchNorm1d(width), nn.ReLU(), he_linear(width, width)))
                  for _ in range(depth)]
        if arch == "resnet_bn_scaled":           # every branch scaled by depth^(-1/2), as in Fixup
            with torch.no_grad():
                for block in blocks:
                    block.branch[2].weight.mul_(depth ** -0.5)
        return blocks
    if depth == 0:
        return []
    norm = {"plain_bn": "batch", "plain_he": None}[arch]
    return list(gb.mlp(depth, width, "relu", "he", norm=norm).layers)


def network(experiment: str, arch: str, depth: int, width: int, in_dim: int) -> nn.Module:
    """The network of one entry. ``grid``: a biased input layer and ``depth`` - 1 hidden layers (plain) or
    ``depth`` residual blocks; ``independent``: ``depth`` layers (plain) or a linear input layer and ``depth``
    blocks, no biases. Then a linear read-out."""
    if arch == "plain_udl":
        net = gb.mlp(depth, width, "relu", "normal", in_dim=in_dim, out_dim=1,
                     init_kwargs={"std": width ** -0.5})
        with torch.no_grad():
            for layer in [b.linear for b in net.layers] + [net.readout]:
                layer.bias.normal_(0.0, width ** -0.5)
        return net
    residual = arch.startswith("resnet_bn")
    if experiment == "grid":
        body = [first_layer(in_dim, width)] + hidden(arch, depth if residual else depth - 1, width)
    elif residual:
        body = [he_linear(in_dim, width)] + hidden(arch, depth, width)
    else:
        norm = {"plain_bn": "batch", "plain_he": None}[arch]
        body = list(gb.mlp(depth, width, "relu", "he", in_dim=in_dim, norm=norm).layers)
    return nn.Sequential(*body, he_linear(width, 1))


def input_gradients(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
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


def autocorrelation(g: np.ndarray, max_lag: int) -> list[float]:
    """sum_i g_i g_(i+k) / sum_i g_i^2 for k = 0..max_lag (lag 0 is 1)."""
    g = np.asarray(g, dtype=float)
    return [float(np.dot(g[:len(g) - k], g[k:]) / np.dot(g, g)) for k in range(max_lag + 1)]


def pair_correlation(g: torch.Tensor) -> float:
    """Mean over pairs i != j of <g_i, g_j>, over the mean of |g_i|^2."""
    gram = g @ g.T
    n = gram.shape[0]
    off = (gram.sum() - gram.diagonal().sum()) / (n * (n - 1))
    return float(off / gram.diagonal().mean())


def compute(config, key):
    experiment, arch, depth, seed = key.split("/")
    depth = int(depth[1:])
    torch.manual_seed(seed_for("shattered", key))
    width = config["width"]
    if experiment == "grid":
        c = config["grid"]
        x = torch.linspace(c["low"], c["high"], c["points"], dtype=torch.float64).reshape(-1, 1)
        net = network("grid", arch, depth, width, 1).double()
        g = input_gradients(net, x).squeeze(1).numpy()
        return autocorrelation(g, c["max_lag"])
    c = config["independent"]
    x = torch.randn(c["inputs"], c["dim"], dtype=torch.float64)
    net = network("independent", arch, depth, width, c["dim"]).double()
    return pair_correlation(input_gradients(net, x))


CHECK_KEYS = ["grid/plain_bn/L12/s0", "grid/resnet_bn/L16/s1", "grid/plain_udl/L24/s2",
              "independent/plain_bn/L4/s0", "independent/resnet_bn/L16/s0", "independent/plain_he/L8/s1"]

if __name__ == "__main__":
    sys.exit(main("shattered", CONFIG, keys, compute, check_keys=CHECK_KEYS, rtol=1e-6, atol=1e-9,
                  about="Balduzzi et al. (2017): gradient correlations against depth, plain and residual "
                        "ReLU networks at initialization"))
