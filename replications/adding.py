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
``clip_omega``      as ``clip``, from the same initial weights and batches as ``clip`` with the same seed,
                    with Pascanu et al.'s regularizer Omega added to the loss with weight
                    ``omega`` (not tuned)

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
    "seeds": {"clip": 8, "plain": 8, "plain_small_lr": 2, "clip_omega": 8},
    "arms": {"clip": {"lr": 0.1, "clip_norm": 1.0},
             "plain": {"lr": 0.1},
             "plain_small_lr": {"lr": 0.03},
             "clip_omega": {"lr": 0.1, "clip_norm": 1.0, "omega": 1.0}},
}


def keys(config):
    for arm in config["arms"]:
        for seed in range(config["seeds"][arm]):
            yield f"{arm}/s{seed}"
    for arm in ("clip", "plain", "clip_omega"):
        yield f"check/{arm}/s0"


def omega(net, states, grads) -> torch.Tensor:
    """Pascanu et al.'s (2013) regularizer: the sum over k of (||g_(k+1) dh_(k+1)/dh_k|| / ||g_(k+1)|| - 1)^2, with
    g_(k+1) = dE/dh_(k+1) held constant, averaged over the batch (tanh units: dh_(k+1)/dh_k = diag(1 - h_(k+1)^2) W)."""
    total = torch.zeros(())
    for h_next, g in zip(states[1:], grads[1:]):
        back = (g * (1 - h_next ** 2)) @ net.recurrent.weight
        total = total + ((back.norm(dim=1) / g.norm(dim=1).clamp_min(1e-30) - 1) ** 2).mean()
    return total


def fit_omega(net, task, steps, batch, generator, lr, clip_norm, weight):
    """SGD with clipping by norm on the MSE plus ``weight`` * Omega; (losses, clipped, diverged step or None)."""
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    params = list(net.parameters())
    losses, clipped = [], []
    for step in range(steps):
        x, y = task.batch(batch, generator)
        states = net.states(x)
        loss = torch.nn.functional.mse_loss(net.readout(states[-1]), y)
        if not math.isfinite(loss.item()):
            return losses, clipped, step
        grads = torch.autograd.grad(loss, states, retain_graph=True)
        total = loss + weight * omega(net, states, [g.detach() for g in grads])
        opt.zero_grad()
        total.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, clip_norm).item()
        if not math.isfinite(norm):
            return losses + [loss.item()], clipped + [False], step
        losses.append(loss.item())
        clipped.append(norm > clip_norm)
        opt.step()
    return losses, clipped, None


def run(config, arm: str, seed: int, steps: int) -> list[float]:
    task = gb.data.adding_problem(config["length"], n_train=config["n_train"], n_test=config["n_test"],
                                  seed=config["data_seed"])
    kwargs = dict(config["arms"][arm])
    weight = kwargs.pop("omega", None)
    paired = "clip" if arm == "clip_omega" else arm       # the same initial weights and batches as "clip"
    torch.manual_seed(seed_for("adding", paired, seed))
    net = gb.rnn(2, config["hidden"], 1, recurrent_init="orthogonal")
    batches = torch.Generator().manual_seed(seed_for("adding-batches", paired, seed))
    if weight is None:
        hist = gb.fit(net, task, steps=steps, batch_size=config["batch"], generator=batches, progress=False,
                      **kwargs)
        losses, clipped = hist.loss, hist.clipped
        div_step = hist.diverged.step if hist.diverged is not None else None
    else:
        losses, clipped, div_step = fit_omega(net, task, steps, config["batch"], batches, weight=weight, **kwargs)
    test = math.nan if div_step is not None else gb.evaluate(net, task)["loss"]
    loss = np.full(steps, np.nan)
    loss[:len(losses)] = losses
    if div_step is not None:
        loss[div_step:] = np.nan
    windows = loss.reshape(-1, config["window"]).mean(axis=1)
    return [test, -1 if div_step is None else div_step, float(np.mean(clipped))] + windows.tolist()


def compute(config, key):
    parts = key.split("/")
    if parts[0] == "check":
        return run(config, parts[1], int(parts[2][1:]), config["check_steps"])
    return run(config, parts[0], int(parts[1][1:]), config["steps"])


if __name__ == "__main__":
    sys.exit(main("adding", CONFIG, keys, compute, check_keys=["check/clip/s0", "check/plain/s0", "check/clip_omega/s0"],
                  rtol=1e-4, atol=1e-7,
                  about="Pascanu, Mikolov & Bengio (2013): a vanilla RNN on the adding problem at T = 50, "
                        "with and without gradient clipping"))
