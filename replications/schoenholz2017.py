"""Schoenholz, Gilmer, Ganguli & Sohl-Dickstein (2017): which (sigma_w^2, depth) of a tanh network train,
against the predicted limit of about six depth scales, 6 xi.

Their figure: the training accuracy on MNIST after a fixed number of SGD steps, as a heatmap over the
weight variance sigma_w^2 and the depth L of fully connected tanh networks with sigma_b^2 = 0.05, with the
curve 6 xi_c drawn on it; networks far below the curve train, those above it do not, and only near the
order-to-chaos transition (sigma_w^2 = 1.76) do very deep ones train. Ours, smaller:

* the task: scikit-learn's digits (64 standardized pixels, 10 classes, 1347 training images), shipped with
  the package; the score is the accuracy on the whole training set, as theirs;
* the networks: ``gb.nets.mean_field_mlp`` (weights N(0, sigma_w^2 / 64), biases N(0, 0.05)), tanh, width
  64, a linear read-out;
* the training: ``steps`` steps of SGD with momentum 0.9, learning rate 0.005, batches of 64, for every
  cell alike (one network per cell, seeded by the cell);
* the curves: six times the depth scale of correlations, xi_c = -1 / ln chi_c, where chi_c is the slope of
  the correlation map at its stable fixed point c*:
  c_l = [sigma_w^2 E(phi(u1) phi(u2)) + sigma_b^2] / q*, u1 = sqrt(q*) z1, u2 = sqrt(q*)(c z1 + sqrt(1 - c^2) z2),
  chi_c = sigma_w^2 E[phi'(u1) phi'(u2)] at c = c* (``gradbook.correlation``). In the ordered phase c* = 1
  and xi_c equals the gradient's depth scale of ``gradbook.theory.depth_scale``; in the chaotic phase
  c* < 1 and xi_c is longer.

One entry per cell, ``"<sigma_w^2>/<depth>"``: the training accuracy; and one per sigma_w^2 of the curve,
``"xi_c/<sigma_w^2>"``: 6 xi_c.

    python replications/schoenholz2017.py            # the full grid (minutes), gradbook/results/schoenholz2017.json
    python replications/schoenholz2017.py --check    # three cells and the curve re-computed and compared
"""
from __future__ import annotations

import functools
import math
import sys

import numpy as np
import torch

import gradbook as gb
from gradbook import theory
from common import main, seed_for

CONFIG = {
    "activation": "tanh",
    "sigma_b2": 0.05,
    "width": 64,
    "sigma_w2": [1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0],
    "depths": [10, 20, 30, 40, 60, 80],
    "steps": 300,
    "lr": 0.005,
    "momentum": 0.9,
    "batch_size": 64,
    "curve_sigma_w2": [round(s, 3) for s in np.linspace(0.8, 4.4, 37).tolist()],
}


@functools.lru_cache(maxsize=None)
def task():
    return gb.data.digits()


def train_accuracy(config, sw2: float, depth: int, seed: int) -> float:
    """Train one network of the cell with ``gb.fit`` (SGD with momentum on random batches) and return its
    accuracy on the training set."""
    torch.manual_seed(seed)
    net = gb.nets.mean_field_mlp(depth, config["width"], config["activation"], math.sqrt(sw2),
                                 math.sqrt(config["sigma_b2"]), in_dim=64, out_dim=10)
    gb.fit(net, task(), config["steps"], config["lr"], momentum=config["momentum"], batch_size=config["batch_size"],
           generator=torch.Generator().manual_seed(seed + 1), progress=False)
    return gb.evaluate(net, task(), "train")["accuracy"]


def six_xi_c(activation: str, sw2: float, sb2: float) -> float:
    """6 xi_c (Schoenholz et al. 2017), from :func:`gradbook.correlation.correlation_depth`."""
    return theory.TRAINABLE_DEPTH_SCALES * gb.correlation.correlation_depth(activation, math.sqrt(sw2), math.sqrt(sb2))


def keys(config):
    cells = [f"{s}/{d}" for s in config["sigma_w2"] for d in config["depths"]]
    return cells + [f"xi_c/{s}" for s in config["curve_sigma_w2"]]


def compute(config, key):
    first, second = key.split("/")
    if first == "xi_c":
        value = six_xi_c(config["activation"], float(second), config["sigma_b2"])
        return min(value, 1e6)                             # JSON has no infinity: 1e6 stands for "diverges"
    return train_accuracy(config, float(first), int(second), seed_for("schoenholz2017", key))


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main("schoenholz2017", CONFIG, keys, compute,
                  check_keys=["1.0/20", "1.75/30", "4.0/20", "xi_c/1.0", "xi_c/1.8", "xi_c/4.0"],
                  rtol=1e-6, atol=0.02,
                  about="Schoenholz et al. (2017): trainability of tanh networks over (sigma_w^2, depth) against 6 xi_c"))
