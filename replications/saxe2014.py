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
import math
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
def moments(variance_floor: float):
    """Whitened inputs' and centred targets' second moments, the optimum's loss and the target loss."""
    task = gb.data.digits()
    x = task.x_train.double()
    y = torch.nn.functional.one_hot(task.y_train, 10).double()
    x, y = x - x.mean(0), y - y.mean(0)
    n = len(x)
    evals, evecs = torch.linalg.eigh(x.T @ x / n)
    keep = evals > variance_floor * evals.max()
    x = x @ evecs[:, keep] / evals[keep].sqrt()               # whitened: x^T x / n = I
    syx, syy = y.T @ x / n, (y * y).sum(1).mean()
    best = 0.5 * (syy - (syx * syx).sum())                     # loss of the least-squares map syx
    return x.shape[1], syx, syy, float(best), float(0.5 * syy)


def steps_to_learn(weights, lr: float, syx, syy, target: float, max_steps: int) -> int | None:
    """Full-batch gradient descent on half the mean squared error (whitened inputs); the step at which the
    loss first reaches ``target``, or None: not within ``max_steps``, or unstable (the loss rose from one
    step to the next, which gradient descent does only when the rate is too large)."""
    weights = [w.clone().requires_grad_() for w in weights]
    previous = math.inf
    for step in range(max_steps + 1):
        product = functools.reduce(lambda acc, w: w @ acc, weights)
        loss = 0.5 * ((product * product).sum() - 2 * (syx * product).sum() + syy)
        value = loss.item()
        if not value <= previous:                  # rose, or not finite
            return None
        previous = value
        if value <= target:
            return step
        if step == max_steps:
            return None
        grads = torch.autograd.grad(loss, weights)
        with torch.no_grad():
            for w, g in zip(weights, grads):
                w -= lr * g
    return None


def initial_weights(init: str, depth: int, dim: int, generator) -> list[torch.Tensor]:
    dims = [dim] * depth + [10]
    weights = []
    for fan_in, fan_out in zip(dims[:-1], dims[1:]):
        w = torch.empty(fan_out, fan_in, dtype=torch.float64)
        if init == "gaussian":
            w.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=generator)
        else:
            torch.nn.init.orthogonal_(w, generator=generator)
        weights.append(w)
    return weights


def keys(config):
    return [f"{init}/{depth}/{seed}" for init in config["inits"] for depth in config["depths"]
            for seed in config["seeds"]]


def compute(config, key):
    init, depth, seed = key.split("/")
    dim, syx, syy, best, zero = moments(config["variance_floor"])
    target = zero - config["fraction"] * (zero - best)
    generator = torch.Generator().manual_seed(seed_for("saxe2014", key))
    weights = initial_weights(init, int(depth), dim, generator)
    fastest, fastest_lr = config["max_steps"], 0.0
    for lr in config["learning_rates"]:                  # a slower rate need only run as long as the fastest
        steps = steps_to_learn(weights, lr, syx, syy, target, min(fastest, config["max_steps"]))
        if steps is not None and (steps < fastest or fastest_lr == 0.0):
            fastest, fastest_lr = steps, lr
    return [fastest, fastest_lr, int(fastest_lr > 0)]


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main("saxe2014", CONFIG, keys, compute,
                  check_keys=["orthogonal/128/0", "orthogonal/8/1", "gaussian/8/0", "gaussian/12/1", "gaussian/16/2", "gaussian/64/0"],
                  rtol=0.02, atol=1.0,
                  about="Saxe, McClelland & Ganguli (2014): learning time of deep linear networks against depth"))
