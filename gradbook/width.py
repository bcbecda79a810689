"""Width: the maximal-update parametrization (muP) of an MLP, and the coordinate check that tests it.

As a network is made wider, the size of every coordinate (entry) of its activations, and of their change
in one training step, should stay the same: otherwise a learning rate tuned on a narrow model is too
large or too small for a wide one. Yang & Hu (2021, "Tensor Programs IV") showed that the standard
parametrization (SP: weights of variance 1/fan_in, one learning rate) cannot do this, and derived the
parametrization that can, muP; Yang et al. (2022, "Tensor Programs V", Table 3) give it for SGD and Adam.
With the width n measured against a base width n0 (the multiplier m = n / n0, so that at n = n0 muP is
SP), the formulation used here is their Table 3, with no output multiplier:

================  ==========================  ==============  ================
weights           input layer and all biases  hidden layers   output layer
================  ==========================  ==============  ================
init. variance    1 / fan_in                  1 / fan_in      1 / (fan_in m)
SGD learn. rate   eta m                       eta             eta / m
Adam learn. rate  eta                         eta / m         eta / m
================  ==========================  ==============  ================

(SP: variance 1/fan_in and learning rate eta everywhere.) Biases start at zero in both; the read-out's
bias, whose fan_out is the number of outputs rather than n, keeps SGD's eta. The input layer's fan_in is
the data's dimension, which does not grow with n.

:func:`coordinate_check` trains models of several widths for a few steps on one fixed batch, in the
manner of the muP package's coordinate check (Yang et al. 2022), and records each layer's
coordinate size ``mean |h|`` and the size of its change since initialization, ``mean |h_t - h_0|``.
:mod:`gradbook.theory` (``width_exponents``) predicts how the changes scale with n.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._checks import choice, positive_int
from .data import Task

__all__ = ["MuMLP", "mup_mlp", "param_groups", "coordinate_check", "CoordinateCheck", "final_losses", "best_lr",
           "PARAMETRIZATIONS", "OPTIMIZERS", "ROLES"]

PARAMETRIZATIONS = ["sp", "mup"]
OPTIMIZERS = ["sgd", "adam"]
#: What each Linear layer of a :class:`MuMLP` is, in Table 3's terms.
ROLES = ["input", "hidden", "output"]

# Table 3 as exponents of m: (init-variance factor, SGD learning-rate factor, Adam learning-rate factor).
# A bias is an input weight whose fan_out is its layer's: the width n for the input and hidden layers (SGD
# learning rate eta m), a fixed number of outputs for the read-out (eta).
_TABLE = {"input": (0, 1, 0), "hidden": (0, 0, -1), "output": (-1, -1, -1), "bias": (0, 1, 0),
          "output bias": (0, 0, 0)}


class MuMLP(nn.Module):
    """A ReLU (or other) MLP in SP or muP: ``depth`` hidden layers of ``width`` units and a read-out.

    ``layers`` is an ``nn.ModuleList`` of ``nn.Linear``; ``roles[i]`` says which column of the module's
    table layer ``i`` belongs to. Use :func:`param_groups` for its per-layer learning rates.
    """

    def __init__(self, in_dim: int, width: int, out_dim: int, depth: int = 2, activation: str = "relu",
                 parametrization: str = "mup", base_width: int = 64):
        super().__init__()
        for name, v in [("in_dim", in_dim), ("width", width), ("out_dim", out_dim), ("depth", depth),
                        ("base_width", base_width)]:
            positive_int(name, v)
        self.parametrization = choice("parametrization", parametrization, PARAMETRIZATIONS)
        self.activation = choice("activation", activation, ["relu", "tanh"])
        self.width, self.base_width = width, base_width
        self.multiplier = width / base_width if parametrization == "mup" else 1.0
        dims = [in_dim] + [width] * depth + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.roles = ["input"] + ["hidden"] * (depth - 1) + ["output"]
        with torch.no_grad():
            for layer, role in zip(self.layers, self.roles):
                var = self.multiplier ** _TABLE[role][0] / layer.in_features
                layer.weight.normal_(0.0, math.sqrt(var))
                layer.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = torch.relu if self.activation == "relu" else torch.tanh
        for layer in self.layers[:-1]:
            x = act(layer(x))
        return self.layers[-1](x)


def mup_mlp(in_dim: int, width: int, out_dim: int, depth: int = 2, activation: str = "relu",
            parametrization: str = "mup", base_width: int = 64) -> MuMLP:
    """A :class:`MuMLP`: an MLP in muP (or SP, ``parametrization="sp"``), widths relative to ``base_width``."""
    return MuMLP(in_dim, width, out_dim, depth, activation, parametrization, base_width)


def param_groups(model: nn.Module, lr: float, optimizer: str) -> list[dict]:
    """The optimizer's parameter groups: Table 3's per-layer learning rates for a muP :class:`MuMLP`, one
    learning rate ``lr`` for everything else (SP, or any other model)."""
    choice("optimizer", optimizer, OPTIMIZERS)
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not 0 < lr < math.inf:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not isinstance(model, MuMLP) or model.parametrization == "sp":
        return [{"params": list(model.parameters()), "lr": lr}]
    column = OPTIMIZERS.index(optimizer) + 1
    groups = []
    for layer, role in zip(model.layers, model.roles):
        groups.append({"params": [layer.weight], "lr": lr * model.multiplier ** _TABLE[role][column]})
        bias = "output bias" if role == "output" else "bias"
        groups.append({"params": [layer.bias], "lr": lr * model.multiplier ** _TABLE[bias][column]})
    return groups


def _optimizer(model: nn.Module, lr: float, optimizer: str) -> torch.optim.Optimizer:
    groups = param_groups(model, lr, optimizer)
    return torch.optim.SGD(groups, lr=lr) if optimizer == "sgd" else torch.optim.Adam(groups, lr=lr)


def _loss(task: Task, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y) if task.kind == "classification" else F.mse_loss(out, y)


@dataclass
class CoordinateCheck:
    """What :func:`coordinate_check` recorded: arrays indexed (width, step, layer), averaged over seeds.

    ``size[w, t, l]`` is ``mean |h|`` of layer ``l``'s output (pre-activation; the logits for the read-out)
    after ``t`` training steps (t = 0: at initialization); ``change[w, t, l]`` is ``mean |h_t - h_0|``.
    """

    widths: np.ndarray
    layers: list[str]
    size: np.ndarray
    change: np.ndarray

    def slopes(self, step: int = 1, quantity: str = "change", min_width: int = 0) -> np.ndarray:
        """Per layer, the least-squares slope of log(quantity) against log(width) at ``step``, over the
        widths >= ``min_width``: the exponent a in quantity ~ width^a, to compare with
        :func:`gradbook.theory.width_exponents`."""
        choice("quantity", quantity, ["size", "change"])
        steps = self.size.shape[1] - 1
        if isinstance(step, bool) or not isinstance(step, int) or not (quantity == "change") <= step <= steps:
            low = 0 if quantity == "size" else 1
            raise ValueError(f"step must be an integer from {low} to {steps} for quantity {quantity!r}, got {step!r}")
        keep = self.widths >= min_width
        if keep.sum() < 2:
            raise ValueError(f"min_width must leave at least two widths, got {min_width!r} for widths "
                             f"{self.widths.tolist()}")
        values = getattr(self, quantity)[keep, step, :]
        return np.polyfit(np.log(self.widths[keep]), np.log(values), 1)[0]

    def records(self) -> list[dict]:
        """The tidy table: one dict per (width, step, layer) with its size and change."""
        return [{"width": int(w), "step": t, "layer": name, "size": float(self.size[i, t, j]),
                 "change": float(self.change[i, t, j])}
                for i, w in enumerate(self.widths) for t in range(self.size.shape[1])
                for j, name in enumerate(self.layers)]


def _check_widths(widths) -> list[int]:
    widths = list(widths) if isinstance(widths, (list, tuple, np.ndarray, range)) else None
    if not widths or len(widths) < 2:
        raise ValueError(f"widths must be a sequence of at least two positive integers, got {widths!r}")
    for w in widths:
        positive_int("each width", int(w) if isinstance(w, np.integer) else w)
    return [int(w) for w in widths]


def _run(model: nn.Module, x, y, task, steps, lr, optimizer) -> tuple[np.ndarray, np.ndarray]:
    """Train ``model`` ``steps`` times on (x, y); the (steps + 1, layers) sizes and changes of its Linear outputs."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    outs: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: outs.append(out.detach())) for m in linears]
    opt = _optimizer(model, lr, optimizer)
    sizes, changes, first = [], [], None
    try:
        for t in range(steps + 1):
            outs.clear()
            loss = _loss(task, model(x), y)
            first = first or list(outs)
            sizes.append([o.abs().mean().item() for o in outs])
            changes.append([(o - o0).abs().mean().item() for o, o0 in zip(outs, first)])
            if t < steps:
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        for h in hooks:
            h.remove()
    return np.array(sizes), np.array(changes)


def coordinate_check(make_model: Callable[[int], nn.Module], widths: Sequence[int], task: Task, steps: int = 3,
                     lr: float | Callable[[int], float] = 1e-3, optimizer: str = "adam", batch_size: int = 64,
                     seeds: int = 1, seed: int = 0) -> CoordinateCheck:
    """Train ``make_model(width)`` for each width ``steps`` steps on one fixed batch of ``task`` and record
    every ``nn.Linear``'s output size and its change at each step (Yang et al. 2022).

    The optimizer (``"sgd"`` or ``"adam"``) uses :func:`param_groups`, so a muP :class:`MuMLP` gets Table
    3's per-layer learning rates. ``lr`` is a number, or a function of the width (to try, say, SP with a
    learning rate falling like 1/width). Each width is run for ``seeds`` initializations (torch seeds
    ``seed``, ``seed + 1``, ...) and the sizes are averaged; the batch is drawn once, from ``seed``.
    """
    if not callable(make_model):
        raise TypeError(f"make_model must be a callable taking a width, got {make_model!r}")
    widths = _check_widths(widths)
    if not isinstance(task, Task):
        raise TypeError(f"task must be a gradbook.data.Task, got {type(task).__name__}")
    for name, v in [("steps", steps), ("batch_size", batch_size), ("seeds", seeds)]:
        positive_int(name, v)
    choice("optimizer", optimizer, OPTIMIZERS)
    x, y = task.batch(batch_size, generator=torch.Generator().manual_seed(seed))
    size, change, layers = [], [], None
    for width in widths:
        runs = []
        for s in range(seeds):
            torch.manual_seed(seed + s)
            model = make_model(width)
            runs.append(_run(model, x, y, task, steps, lr(width) if callable(lr) else lr, optimizer))
        layers = layers or [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        size.append(np.mean([r[0] for r in runs], axis=0))
        change.append(np.mean([r[1] for r in runs], axis=0))
    return CoordinateCheck(np.array(widths), layers, np.array(size), np.array(change))


def final_losses(make_model: Callable[[int], nn.Module], widths: Sequence[int], lrs: Sequence[float], task: Task,
                 steps: int = 50, optimizer: str = "adam", batch_size: int = 32, n_eval: int = 512,
                 seed: int = 0) -> np.ndarray:
    """A learning-rate sweep: the training loss after ``steps`` steps, on the first ``n_eval`` training
    examples, for each width and learning rate, as an array (widths, lrs); inf where training diverged.

    Every run of a width starts from the same initialization and sees the same batches (from ``seed``).
    """
    widths = _check_widths(widths)
    lrs = list(lrs)
    for name, v in [("steps", steps), ("batch_size", batch_size), ("n_eval", n_eval)]:
        positive_int(name, v)
    choice("optimizer", optimizer, OPTIMIZERS)
    x_eval, y_eval = task.x_train[:n_eval], task.y_train[:n_eval]
    out = np.full((len(widths), len(lrs)), np.inf)
    for i, width in enumerate(widths):
        torch.manual_seed(seed)
        state = make_model(width).state_dict()
        for j, lr in enumerate(lrs):
            model = make_model(width)
            model.load_state_dict(state)
            opt = _optimizer(model, lr, optimizer)
            g = torch.Generator().manual_seed(seed)
            for _ in range(steps):
                x, y = task.batch(batch_size, generator=g)
                opt.zero_grad()
                _loss(task, model(x), y).backward()
                opt.step()
            with torch.no_grad():
                loss = _loss(task, model(x_eval), y_eval).item()
            out[i, j] = loss if math.isfinite(loss) else np.inf
    return out


def best_lr(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """The learning rate of lowest loss, refined between grid points: the vertex of the parabola through
    log(loss) at the grid's best point and its two neighbours, on a log-lr axis (the grid point itself
    where it lies at an end of the grid). ``lrs`` must be increasing."""
    lrs, losses = np.asarray(lrs, dtype=float), np.asarray(losses, dtype=float)
    if lrs.ndim != 1 or lrs.shape != losses.shape or len(lrs) < 3 or np.any(lrs <= 0) or np.any(np.diff(lrs) <= 0):
        raise ValueError(f"lrs must be >= 3 increasing positive numbers, one per loss; got lrs={lrs!r}, "
                         f"losses={losses!r}")
    i = int(np.argmin(losses))
    if i in (0, len(lrs) - 1) or not np.all(np.isfinite(losses[i - 1:i + 2])):
        return float(lrs[i])
    x, y = np.log(lrs[i - 1:i + 2]), np.log(losses[i - 1:i + 2])
    a, b, _ = np.polyfit(x, y, 2)
    return float(np.exp(np.clip(-b / (2 * a), x[0], x[2]))) if a > 0 else float(lrs[i])
