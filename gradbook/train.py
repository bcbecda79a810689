"""Train a network on a task and keep what happened: loss, gradient norm, per-layer records, divergence.

:func:`fit` never lets a NaN pass silently and never raises because training diverged: the first
non-finite loss, gradient or weight stops the run, and :attr:`History.diverged` says at which step,
in which layer, and what went non-finite.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import measure as _measure
from ._checks import choice, non_negative, positive_int
from .data import Task
from .progress import Progress

__all__ = ["fit", "evaluate", "History", "Divergence", "OPTIMIZERS"]

#: The optimizers :func:`fit` accepts by name.
OPTIMIZERS = ["sgd", "adam", "adamw"]


@dataclass
class Divergence:
    """Where a run stopped: the step, what went non-finite, and the first layer it showed up in.

    ``phase`` is ``"loss"`` (the forward pass produced a non-finite loss; ``layer`` is the first
    module, in forward order, whose output was non-finite, or the last module if only the loss itself
    overflowed), ``"gradient"`` (``layer`` is the one
    nearest the output whose weight gradient was non-finite, where the backward pass first met it) or
    ``"weights"`` (the previous update made a weight non-finite; found when that weight makes the next
    loss non-finite, or at the end of the run). Checking weights only then keeps ``fit`` cheap.
    """

    step: int
    phase: str
    layer: str
    value: str  # "nan", "inf", or "too large to represent" (finite entries whose norm overflows)

    def __str__(self) -> str:
        what = {"loss": "the forward pass", "gradient": "the gradient", "weights": "the weights"}[self.phase]
        return f"diverged at step {self.step}: {what} went {self.value} in {self.layer!r}"


@dataclass
class History:
    """What :func:`fit` saw, one entry per step run.

    Attributes
    ----------
    loss : array (steps run,)
        Training loss of each step's batch (the last one is non-finite if the run diverged there).
    grad_norm : array (steps run,)
        Total gradient norm of each step, before any clipping.
    trace : gradbook.measure.Trace or None
        Per-layer records every ``every`` steps (None when ``every=0``).
    update_ratio : array (recorded steps, layers) or None
        ||Delta W|| / ||W|| of each layer's weights on the recorded steps.
    diverged : Divergence or None
    clipped : bool array (steps run,)
        Whether clipping changed each step's gradient (False on a step that diverged).
    callback_steps, callback_values : array, list
        When ``fit`` was given a ``callback``: the number of updates made before each call, and what
        each call returned.
    """

    loss: np.ndarray
    grad_norm: np.ndarray
    trace: _measure.Trace | None = None
    update_ratio: np.ndarray | None = None
    diverged: Divergence | None = None
    clipped: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    callback_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    callback_values: list = field(default_factory=list)

    @property
    def steps_run(self) -> int:
        return len(self.loss)


def _kind(t: torch.Tensor) -> str:
    return "nan" if torch.isnan(t).any() else "inf"


def _forward_culprit(model: nn.Module, x: torch.Tensor, loss: float) -> tuple[str, str]:
    """Re-run the forward pass and name the first module whose output is non-finite.

    If every output is finite, the loss itself overflowed (say, the square of a huge output): the
    module named is then the last one the forward pass ran, whose output fed the loss.
    """
    found: list[tuple[str, str]] = []
    ran: list[str] = []
    handles = []
    for name, m in model.named_modules():
        if name and not list(m.children()):
            def hook(mod, args, out, name=name):
                ran.append(name)
                y = _measure._first_tensor(out)
                if not found and y is not None and not torch.isfinite(y).all():
                    found.append((name, _kind(y)))
            handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    if found:
        return found[0]
    return (ran[-1] if ran else type(model).__name__), ("nan" if math.isnan(loss) else "inf")


def _nonfinite_param(model: nn.Module, grads: bool) -> tuple[str, str] | None:
    """The parameter nearest the output (by module, weight before bias) whose value or gradient is non-finite."""
    for mod_name, m in reversed(list(model.named_modules())):
        for p_name, p in m.named_parameters(recurse=False):
            t = p.grad if grads else p
            if t is not None and not torch.isfinite(t).all():
                return (f"{mod_name}.{p_name}" if mod_name else p_name), _kind(t)
    return None


def _largest_grad(model: nn.Module) -> str:
    named = [(n, p.grad.abs().max().item()) for n, p in model.named_parameters() if p.grad is not None]
    return max(named, key=lambda t: t[1])[0] if named else "?"


def fit(model: nn.Module, task: Task, steps: int, lr: float = 0.1, *, optimizer: str = "sgd",
        momentum: float = 0.0, batch_size: int = 64, weight_decay: float = 0.0,
        clip_norm: float | None = None, clip_value: float | None = None, every: int = 0,
        level: str = "full", loss_fn=None, generator: torch.Generator | None = None,
        callback: Callable[[int, nn.Module], object] | None = None, callback_every: int = 1,
        progress: bool | None = None) -> History:
    """Train ``model`` on random batches of ``task`` for ``steps`` steps.

    Parameters
    ----------
    lr, optimizer, momentum, weight_decay
        ``optimizer`` is one of ``"sgd"``, ``"adam"``, ``"adamw"``; ``momentum`` applies to SGD;
        ``weight_decay`` is the L2 coefficient handed to the optimizer.
    clip_norm, clip_value : float, optional
        Clip the gradient by its total norm (``torch.nn.utils.clip_grad_norm_``; Pascanu et al. 2013)
        or each entry by value (``clip_grad_value_``). The norm before clipping is in
        ``History.grad_norm`` either way.
    every : int
        Record per-layer measurements (:class:`gradbook.measure.watch`, at ``level``) and update ratios every
        ``every`` steps; 0 records none.
    loss_fn : callable, optional
        ``loss_fn(output, target)``; default cross-entropy for classification, MSE for regression.
    generator : torch.Generator, optional
        Draws the batches; default the global torch generator (seeded by :func:`gradbook.setup`).
    callback : callable, optional
        ``callback(step, model)`` is called under ``torch.no_grad()`` after every ``callback_every``
        updates, counting from 0 (before training) to the end; its return values are kept in
        ``History.callback_values``. Use it to follow any quantity over training.
    progress : bool, optional
        Show progress (and print a divergence when it happens). By default only where a person watches:
        in a Jupyter front end or a terminal, never under nbconvert, nbgrader, nbval or pytest
        (:mod:`gradbook.progress`).
    """
    positive_int("steps", steps)
    positive_int("callback_every", callback_every)
    non_negative("lr", lr)
    non_negative("weight_decay", weight_decay)
    non_negative("every", every)
    choice("optimizer", optimizer, OPTIMIZERS)
    if clip_norm is not None and clip_value is not None:
        raise ValueError("give clip_norm or clip_value, not both")
    for name, v in [("clip_norm", clip_norm), ("clip_value", clip_value)]:
        if v is not None and not v > 0:
            raise ValueError(f"{name} must be a number > 0, got {v!r}")
    param = next(model.parameters())
    task = task.to(param.device, param.dtype)
    if loss_fn is None:
        loss_fn = nn.functional.cross_entropy if task.kind == "classification" else nn.functional.mse_loss
    params = [p for p in model.parameters() if p.requires_grad]
    opt = {"sgd": lambda: torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay),
           "adam": lambda: torch.optim.Adam(params, lr=lr, weight_decay=weight_decay),
           "adamw": lambda: torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)}[optimizer]()

    losses, norms, clipped, ratios = [], [], [], []
    cb_steps, cb_values = [], []

    def call_back(n_updates):
        if callback is not None and n_updates % callback_every == 0:
            with torch.no_grad():
                cb_values.append(callback(n_updates, model))
            cb_steps.append(n_updates)

    diverged = None
    layer_modules = [m for _, m in _measure.layers(model)]
    probe = _measure.watch(model, every=every, level=level) if every else None
    bar = Progress(steps, "gradbook.fit", show=progress).__enter__()
    model.train()
    try:
        if probe:
            probe.attach()
        for step in range(steps):
            call_back(step)
            x, y = task.batch(batch_size, generator)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                bad = _nonfinite_param(model, grads=False)   # did the previous update break a weight?
                diverged = Divergence(step, "weights", *bad) if bad else \
                    Divergence(step, "loss", *_forward_culprit(model, x, losses[-1]))
                norms.append(float("nan"))
                clipped.append(False)
                break
            loss.backward()
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]).item()
            norms.append(norm)
            if not math.isfinite(norm):  # a non-finite gradient, or finite ones whose norm overflows
                diverged = Divergence(step, "gradient", *(_nonfinite_param(model, grads=True)
                                                          or (_largest_grad(model), "too large to represent")))
                clipped.append(False)
                break
            if clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, clip_norm)
            elif clip_value is not None:
                torch.nn.utils.clip_grad_value_(params, clip_value)
            clipped.append((clip_norm is not None and norm > clip_norm) or
                           (clip_value is not None and any(p.grad.abs().max() >= clip_value for p in params
                                                           if p.grad is not None)))
            record = bool(every) and step % every == 0
            before = _measure.snapshot_weights(layer_modules) if record else None
            opt.step()
            if record:
                ratios.append(_measure.update_ratios(before, layer_modules))
            bar.update(1, loss=losses[-1])
        else:
            bad = _nonfinite_param(model, grads=False)       # the last update has no forward pass after it
            if bad:
                diverged = Divergence(steps - 1, "weights", *bad)
            call_back(steps)
    finally:
        bar.__exit__()
        if probe:
            probe.detach()
    if diverged is not None and bar.shown:
        print(f"gradbook.fit: {diverged}")
    trace = probe.trace if probe else None
    if trace is not None and diverged is not None and len(losses) == diverged.step + 1 \
            and not math.isfinite(losses[-1] if diverged.phase != "gradient" else norms[-1]):
        keep = trace.steps < diverged.step  # the failed step's records are partial
        trace = _measure.Trace(trace.layers, trace.activations, trace.steps[keep],
                               **{k: (None if getattr(trace, k) is None else getattr(trace, k)[keep])
                                  for k in _measure._ARRAYS})
    return History(np.array(losses), np.array(norms), trace, np.array(ratios) if every else None,
                   diverged, np.array(clipped, dtype=bool), np.array(cb_steps, dtype=int), cb_values)


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, split: str = "test") -> dict:
    """Loss (and accuracy, for classification) of ``model`` on the task's ``"train"`` or ``"test"`` split."""
    choice("split", split, ["train", "test"])
    param = next(model.parameters())
    task = task.to(param.device, param.dtype)
    x, y = (task.x_train, task.y_train) if split == "train" else (task.x_test, task.y_test)
    was_training = model.training
    model.eval()
    try:
        out = model(x)
    finally:
        model.train(was_training)
    if task.kind == "classification":
        return {"loss": nn.functional.cross_entropy(out, y).item(),
                "accuracy": (out.argmax(1) == y).float().mean().item()}
    return {"loss": nn.functional.mse_loss(out, y).item()}
