"""Saxe, McClelland & Ganguli (2014): the learning time of deep linear networks against depth, with scaled
Gaussian and with random orthogonal initial weights.

Their result: at the best learning rate for each depth, a deep linear network started from random
orthogonal weights learns in a number of steps that does not grow with depth, while one started from
scaled Gaussian weights (variance 1/fan_in) takes longer the deeper it is. Their experiment trained on
MNIST; ours trains on scikit-learn's digits (shipped with the package, no download):

* inputs: the 64 standardized pixels, centred and whitened (their analysis assumes whitened inputs),
  keeping the 61 directions of non-negligible variance; targets: the one-hot labels, centred;
* the network: ``depth`` linear layers without biases, 61 -> 61 -> ... -> 61 -> 10;
* the loss: half the mean squared error over the whole training set, computed exactly from the data's
  second moments (the loss of a linear network depends on the data only through them), so each step is
  one step of full-batch gradient descent, that is, one epoch;
* the learning time: the steps until the loss has fallen 90% of the way from that of the zero map to
  the least-squares optimum, at the best learning rate of a grid of powers of 2 (the paper picked the
  best rate for each depth as well), capped at ``max_steps``.

One entry per (initialization, depth, seed): [steps, best learning rate, 1 if learned within the cap].

    python replications/saxe2014.py            # the full grid (a few minutes), gradbook/results/saxe2014.json
    python replications/saxe2014.py --check    # a few entries re-computed and compared
"""
from __future__ import annotations

import functools
import sys

import torch

import gradbook as gb
from common import main, seed_for

CONFIG = {
    "depths": [1, 2, 4, 6, 8, 12, 16, 24, 32, 64, 128],
    "inits": ["gaussian", "orthogonal"],
    "seeds": [0, 1, 2],
    "learning_rates": [2.0 ** -k for k in range(10)],       # 1, 1/2, ..., 1/512: tried largest first
    "max_steps": 1500,
    "fraction": 0.9,                                           # of the way from the zero map to the optimum
    "variance_floor": 1e-3,                                    # input directions kept: above this x the largest
}


@functools.lru_cache(maxsize=None)
def problem(variance_floor: float) -> gb.toys.Whitened:
    """The digits, whitened, against their centred one-hot labels (:func:`gradbook.toys.whitened`)."""
    return gb.toys.whitened(gb.data.digits(), variance_floor)


def keys(config):
    return [f"{init}/{depth}/{seed}" for init in config["inits"] for depth in config["depths"]
            for seed in config["seeds"]]


def compute(config, key):
    init, depth, seed = key.split("/")
    p = problem(config["variance_floor"])
    generator = torch.Generator().manual_seed(seed_for("saxe2014", key))
    weights = gb.toys.linear_chain(init, int(depth), p.dim, p.syx.shape[0], generator)
    steps, lr = gb.toys.learning_time(weights, p, config["fraction"], config["max_steps"], config["learning_rates"])
    return [steps, lr, int(lr > 0)]


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main("saxe2014", CONFIG, keys, compute,
                  check_keys=["orthogonal/128/0", "orthogonal/8/1", "gaussian/8/0", "gaussian/12/1", "gaussian/16/2", "gaussian/64/0"],
                  rtol=0.02, atol=1.0,
                  about="Saxe, McClelland & Ganguli (2014): learning time of deep linear networks against depth"))
