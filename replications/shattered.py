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

import sys

import torch

from gradbook import shattering
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


def compute(config, key):
    experiment, arch, depth, seed = key.split("/")
    depth = int(depth[1:])
    torch.manual_seed(seed_for("shattered", key))
    width = config["width"]
    if experiment == "grid":
        c = config["grid"]
        x = torch.linspace(c["low"], c["high"], c["points"], dtype=torch.float64).reshape(-1, 1)
        net = shattering.network("grid", arch, depth, width, 1).double()
        g = shattering.input_slopes(net, x).squeeze(1).numpy()
        return shattering.autocorrelation(g, c["max_lag"]).tolist()
    c = config["independent"]
    x = torch.randn(c["inputs"], c["dim"], dtype=torch.float64)
    net = shattering.network("independent", arch, depth, width, c["dim"]).double()
    return shattering.pair_correlation(shattering.input_slopes(net, x))


CHECK_KEYS = ["grid/plain_bn/L12/s0", "grid/resnet_bn/L16/s1", "grid/plain_udl/L24/s2",
              "independent/plain_bn/L4/s0", "independent/resnet_bn/L16/s0", "independent/plain_he/L8/s1"]

if __name__ == "__main__":
    sys.exit(main("shattered", CONFIG, keys, compute, check_keys=CHECK_KEYS, rtol=1e-6, atol=1e-9,
                  about="Balduzzi et al. (2017): gradient correlations against depth, plain and residual "
                        "ReLU networks at initialization"))
