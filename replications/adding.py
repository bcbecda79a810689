"""Pascanu, Mikolov & Bengio (2013), "On the difficulty of training recurrent neural networks": gradient
clipping on the adding problem at a length where long-range memory is needed, T = 50.

The task is ``gb.data.adding_problem(50)``: sequences of 50 pairs (a number in [0, 1], a marker), the
markers on one step in each half; the target is the sum of the two marked numbers. Predicting the mean
gives a test MSE of 1/6; using only the number marked in the second half (the nearer one) gives 1/12.

The network and training are the clipping chapter's recipe at the longer length: ``gb.rnn(2, 32, 1)``
(a vanilla tanh RNN, orthogonal recurrent matrix, linear read-out of the last state), plain SGD, MSE,
batches of 64, with ``gb.fit``. Each entry is one run (``<arm>/s<seed>``), seeded by its key:

``clip``            learning rate 0.1, gradient clipped by norm at 1 (Pascanu et al.'s Algorithm 1)
``plain``           learning rate 0.1, no clipping
``plain_small_lr``  learning rate 0.03, no clipping (does a smaller step do what clipping does?)

An entry holds [test MSE (NaN if the run diverged), the step it diverged at (-1 if it did not), the
fraction of steps on which clipping acted, then the mean training loss of each window of ``window``
steps (NaN after a divergence)]. The ``check/<arm>/s<seed>`` entries are the first ``check_steps`` steps
of the same runs, so that a re-run of them, quick enough for the test suite, must reproduce the start of
the stored runs as well as their own stored values.
"""
from __future__ import annotations

import math
import sys

import numpy as np
import torch

import gradbook as gb
from common import main, seed_for

CONFIG = {
    "length": 50,
    "hidden": 32,
    "batch": 64,
    "steps": 5000,
    "window": 500,
    "check_steps": 500,
    "n_train": 10000,
    "n_test": 1000,
    "data_seed": 0,
    "seeds": {"clip": 8, "plain": 8, "plain_small_lr": 2},
    "arms": {"clip": {"lr": 0.1, "clip_norm": 1.0},
             "plain": {"lr": 0.1},
             "plain_small_lr": {"lr": 0.03}},
}


def keys(config):
    for arm in config["arms"]:
        for seed in range(config["seeds"][arm]):
            yield f"{arm}/s{seed}"
    for arm in ("clip", "plain"):
        yield f"check/{arm}/s0"


def run(config, arm: str, seed: int, steps: int) -> list[float]:
    task = gb.data.adding_problem(config["length"], n_train=config["n_train"], n_test=config["n_test"],
                                  seed=config["data_seed"])
    torch.manual_seed(seed_for("adding", arm, seed))
    net = gb.rnn(2, config["hidden"], 1, recurrent_init="orthogonal")
    batches = torch.Generator().manual_seed(seed_for("adding-batches", arm, seed))
    hist = gb.fit(net, task, steps=steps, batch_size=config["batch"], generator=batches, progress=False,
                  **config["arms"][arm])
    diverged = hist.diverged is not None
    test = math.nan if diverged else gb.evaluate(net, task)["loss"]
    loss = np.full(steps, np.nan)
    loss[:len(hist.loss)] = hist.loss
    if diverged:
        loss[hist.diverged.step:] = np.nan
    windows = loss.reshape(-1, config["window"]).mean(axis=1)
    return [test, hist.diverged.step if diverged else -1, float(np.mean(hist.clipped))] + windows.tolist()


def compute(config, key):
    parts = key.split("/")
    if parts[0] == "check":
        return run(config, parts[1], int(parts[2][1:]), config["check_steps"])
    return run(config, parts[0], int(parts[1][1:]), config["steps"])


if __name__ == "__main__":
    sys.exit(main("adding", CONFIG, keys, compute, check_keys=["check/clip/s0", "check/plain/s0"],
                  rtol=1e-4, atol=1e-7,
                  about="Pascanu, Mikolov & Bengio (2013): a vanilla RNN on the adding problem at T = 50, "
                        "with and without gradient clipping"))
