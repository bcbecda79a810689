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

from ._checks import choice, non_negative, positive_int
from .batches import default_loss, first_nonfinite
from .data import Task
from .measure import snapshot_weights, update_ratios
from .records import Trace, layers
from .transformers import lm_loss
from .watch import watch
from .progress import Progress

__all__ = ["fit", "evaluate", "make_optimizer", "lr_sweep", "Sweep", "History", "Divergence",
           "OPTIMIZERS"]

#: The optimizers :func:`fit` accepts by name.
OPTIMIZERS = ["sgd", "adam", "adamw"]
_LOSSES = {"regression": nn.functional.mse_loss, "language": lm_loss}   # by Task.kind; else default_loss


@dataclass
class Divergence:
    """Where a run stopped: the step, what went non-finite, and the first layer it showed up in.

    ``phase`` is ``"loss"`` (the forward pass produced a non-finite loss; ``layer`` is the first module, in
    forward order, whose output was non-finite, or the last module if only the loss itself overflowed),
    ``"gradient"`` (``layer`` is the one nearest the output whose weight gradient was non-finite, where the
    backward pass first met it) or ``"weights"`` (the previous update made a weight non-finite; found when
    that weight makes the next loss non-finite, or at the end of the run: this keeps ``fit`` cheap).
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
    trace : gradbook.records.Trace or None
        Per-layer records every ``every`` steps (None when ``every=0``).
    update_ratio : array (recorded steps, layers) or None
        ||Delta W|| / ||W|| of each layer's weights on the recorded steps.
    diverged : Divergence or None
    clipped : bool array (steps run,)
        Whether clipping changed each step's gradient (False on a step that diverged).
    callback_steps, callback_values : array, list
        When ``fit`` was given a ``callback``: the number of updates made before each call, and what
        each call returned.
    lr : array (steps run,)
        The learning rate of each step's update (after warm-up and schedule).
    """

    loss: np.ndarray
    grad_norm: np.ndarray
    trace: Trace | None = None
    update_ratio: np.ndarray | None = None
    diverged: Divergence | None = None
    clipped: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    callback_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    callback_values: list = field(default_factory=list)
    lr: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def steps_run(self) -> int:
        return len(self.loss)


def _kind(t: torch.Tensor) -> str:
    return "nan" if torch.isnan(t).any() else "inf"


def _forward_culprit(model: nn.Module, x: torch.Tensor, loss: float) -> tuple[str, str]:
    """The first module whose output is non-finite (:func:`gradbook.batches.first_nonfinite`) and what the
    loss went. If every output is finite, the loss itself overflowed (say, the square of a huge output):
    the module named is then the model's last leaf module, whose output fed the loss."""
    found = first_nonfinite(model, x)
    leaves = [n for n, m in model.named_modules() if n and not list(m.children())]
    name = found.rsplit(" (", 1)[0] if found else (leaves[-1] if leaves else type(model).__name__)
    return name, ("nan" if math.isnan(loss) else "inf")


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


def make_optimizer(name: str, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0, *,
                   betas: tuple[float, float] | None = None, eps: float | None = None) -> torch.optim.Optimizer:
    """The torch optimizer called ``name`` (one of :data:`OPTIMIZERS`) over ``params``.

    ``betas`` and ``eps`` are Adam's (Kingma & Ba 2015): the decay rates of the first- and second-moment
    estimates and the constant added to the root of the second moment; None keeps torch's defaults
    ((0.9, 0.999) and 1e-8). SGD has neither."""
    choice("optimizer", name, OPTIMIZERS)
    if name == "sgd":
        if betas is not None or eps is not None:
            raise ValueError(f"betas and eps are Adam's: optimizer 'sgd' takes neither, got betas={betas!r}, eps={eps!r}")
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    extra = {}
    if betas is not None:
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2
                and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        extra["betas"] = tuple(float(b) for b in betas)
    if eps is not None:
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
            raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
        extra["eps"] = float(eps)
    return {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name](params, lr=lr, weight_decay=weight_decay, **extra)


def _check_fit_args(steps, lr, weight_decay, every, optimizer, clip_norm, clip_value, callback_every, warmup,
                    schedule, monitor) -> None:
    positive_int("steps", steps)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a whole number of steps >= 0, got {warmup!r}")
    if schedule is not None and not callable(schedule):
        raise TypeError(f"schedule must be a function of the step, got {type(schedule).__name__}")
    if monitor is not None and not (isinstance(monitor, dict) and every):
        raise ValueError(f"monitor must be a dict of gradbook.watch keyword arguments, with every >= 1; got "
                         f"monitor={monitor!r}, every={every!r}")
    positive_int("callback_every", callback_every)
    non_negative("lr", lr)
    non_negative("weight_decay", weight_decay)
    non_negative("every", every)
    if not isinstance(optimizer, torch.optim.Optimizer):
        choice("optimizer", optimizer, OPTIMIZERS)
    if clip_norm is not None and clip_value is not None:
        raise ValueError("give clip_norm or clip_value, not both")
    for name, v in [("clip_norm", clip_norm), ("clip_value", clip_value)]:
        if v is not None and not v > 0:
            raise ValueError(f"{name} must be a number > 0, got {v!r}")


class _Run:
    """One training run of :func:`fit`: its state, one step at a time, and the :class:`History` it leaves."""

    def __init__(self, model, task, opt, loss_fn, batch_size, generator, clip_norm, clip_value, every, level,
                 callback, callback_every, factor=None, monitor=None):
        self.model, self.task, self.opt, self.loss_fn = model, task, opt, loss_fn
        self.sched = torch.optim.lr_scheduler.LambdaLR(opt, factor) if factor is not None else None
        self.monitored, self.lrs = monitor is not None, []
        self.batch_size, self.generator = batch_size, generator
        self.clip_norm, self.clip_value, self.every = clip_norm, clip_value, every
        self.callback, self.callback_every = callback, callback_every
        self.params = [p for g in opt.param_groups for p in g["params"]]
        self.layer_modules = [m for _, m in layers(model)]
        self.probe = None if not every else watch(model, every=every, level=level, **(
            {} if monitor is None else {"optimizer": opt, **monitor}))
        self.losses, self.norms, self.clipped, self.ratios = [], [], [], []
        self.cb_steps, self.cb_values = [], []
        self.diverged: Divergence | None = None

    def call_back(self, n_updates: int) -> None:
        if self.callback is not None and n_updates % self.callback_every == 0:
            with torch.no_grad():
                self.cb_values.append(self.callback(n_updates, self.model))
            self.cb_steps.append(n_updates)

    def step(self, step: int) -> bool:
        """One update; False (with :attr:`diverged` set) if something went non-finite."""
        x, y = self.task.batch(self.batch_size, self.generator)
        self.lrs.append(self.opt.param_groups[0]["lr"])
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(x), y)
        self.losses.append(loss.item())
        if not math.isfinite(self.losses[-1]):
            bad = _nonfinite_param(self.model, grads=False)   # did the previous update break a weight?
            self.diverged = Divergence(step, "weights", *bad) if bad else \
                Divergence(step, "loss", *_forward_culprit(self.model, x, self.losses[-1]))
            self.norms.append(float("nan"))
            self.clipped.append(False)
            return False
        loss.backward()
        norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None]).item()
        self.norms.append(norm)
        if not math.isfinite(norm):  # a non-finite gradient, or finite ones whose norm overflows
            self.diverged = Divergence(step, "gradient", *(_nonfinite_param(self.model, grads=True)
                                                           or (_largest_grad(self.model), "too large to represent")))
            self.clipped.append(False)
            return False
        self.clipped.append(self.clip(norm))
        if self.monitored:   # the monitor reads the gradient and the update at the optimizer's step
            self.probe.log_loss(loss)
        record = bool(self.every) and step % self.every == 0 and not self.monitored
        before = snapshot_weights(self.layer_modules) if record else None
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        if record:
            self.ratios.append(update_ratios(before, self.layer_modules))
        return True

    def clip(self, norm: float) -> bool:
        """Clip the gradient as asked; whether clipping changed it."""
        if self.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm)
            return norm > self.clip_norm
        if self.clip_value is not None:
            torch.nn.utils.clip_grad_value_(self.params, self.clip_value)
            return any(p.grad.abs().max() >= self.clip_value for p in self.params if p.grad is not None)
        return False

    def finish(self, steps: int) -> None:
        """After the last step: the last update has no forward pass after it, so check the weights here."""
        bad = _nonfinite_param(self.model, grads=False)
        if bad:
            self.diverged = Divergence(steps - 1, "weights", *bad)
        self.call_back(steps)

    def history(self) -> History:
        trace, d = (self.probe.trace if self.probe else None), self.diverged
        if trace is not None and d is not None and len(self.losses) == d.step + 1 \
                and not math.isfinite(self.losses[-1] if d.phase != "gradient" else self.norms[-1]):
            trace = trace.select(trace.steps < d.step)   # the failed step's records are partial
        ratios = (trace.update_ratio if self.monitored else np.array(self.ratios)) if self.every else None
        return History(np.array(self.losses), np.array(self.norms), trace, ratios, d,
                       np.array(self.clipped, dtype=bool), np.array(self.cb_steps, dtype=int), self.cb_values,
                       np.array(self.lrs, dtype=float))


def fit(model: nn.Module, task: Task, steps: int, lr: float = 0.1, *, optimizer="sgd", momentum: float = 0.0,
        batch_size: int = 64, weight_decay: float = 0.0, clip_norm: float | None = None,
        clip_value: float | None = None, every: int = 0, level: str = "full", loss_fn=None,
        generator: torch.Generator | None = None, callback: Callable[[int, nn.Module], object] | None = None,
        callback_every: int = 1, progress: bool | None = None, warmup: int = 0,
        schedule: Callable[[int], float] | None = None, betas: tuple[float, float] | None = None,
        eps: float | None = None, monitor: dict | None = None) -> History:
    """Train ``model`` on random batches of ``task`` for ``steps`` steps.

    Parameters
    ----------
    lr, optimizer, momentum, weight_decay, betas, eps
        ``optimizer`` is one of ``"sgd"``, ``"adam"``, ``"adamw"``; ``momentum`` applies to SGD;
        ``weight_decay`` is the L2 coefficient handed to the optimizer (decoupled for AdamW); ``betas`` and
        ``eps`` are Adam's (:func:`make_optimizer`). Or a ``torch.optim.Optimizer`` over the model's
        parameters, used as it is (the other five are then ignored): a ``callback`` can then reach it.
    warmup, schedule
        Step s (from 0) runs at ``lr`` times min(1, (s + 1) / ``warmup``) (a linear warm-up, Goyal et al.
        2017; none when 0) times ``schedule(s)`` (default 1), through ``torch.optim.lr_scheduler.LambdaLR``.
        The rate of each step is in ``History.lr``.
    clip_norm, clip_value : float, optional
        Clip the gradient by its total norm (``torch.nn.utils.clip_grad_norm_``; Pascanu et al. 2013)
        or each entry by value (``clip_grad_value_``). The norm before clipping is in
        ``History.grad_norm`` either way.
    every : int
        Record per-layer measurements (:class:`gradbook.watch.watch`, at ``level``) and update ratios every
        ``every`` steps; 0 records none.
    monitor : dict, optional
        Record through the monitor as an optimizer step (:class:`gradbook.watch.watch` given the optimizer
        and these keyword arguments, e.g. ``{"spikes": True, "window": 32}``): ``History.trace`` then also
        holds the loss, the update ratios of the optimizer's actual step and the spikes found, and its
        gradients are those the optimizer used (after clipping). Needs ``every`` >= 1.
    loss_fn : callable, optional
        ``loss_fn(output, target)``; default MSE for regression, :func:`gradbook.transformers.lm_loss`
        (without z-loss) for a language task, cross-entropy (:func:`gradbook.batches.default_loss`) else.
    generator : torch.Generator, optional
        Draws the batches; default the global torch generator (seeded by :func:`gradbook.setup`).
    callback : callable, optional
        ``callback(step, model)`` is called under ``torch.no_grad()`` after every ``callback_every``
        updates, counting from 0 (before training) to the end; its return values are kept in
        ``History.callback_values``. Use it to follow any quantity over training.
    progress : bool, optional
        Show progress (and print a divergence when it happens). By default only where a person watches
        (a Jupyter front end or a terminal; never nbconvert, nbgrader, nbval, pytest: :mod:`gradbook.progress`).
    """
    _check_fit_args(steps, lr, weight_decay, every, optimizer, clip_norm, clip_value, callback_every, warmup,
                    schedule, monitor)
    param = next(model.parameters())
    task = task.to(param.device, param.dtype)
    factor = None if not warmup and schedule is None else lambda s: (   # the warm-up times the schedule
        min(1.0, (s + 1) / warmup) if warmup else 1.0) * (1.0 if schedule is None else float(schedule(s)))
    if loss_fn is None:
        loss_fn = _LOSSES.get(task.kind, default_loss)
    opt = optimizer if isinstance(optimizer, torch.optim.Optimizer) else make_optimizer(
        optimizer, [p for p in model.parameters() if p.requires_grad], lr, momentum, weight_decay, betas=betas, eps=eps)
    run = _Run(model, task, opt, loss_fn, batch_size, generator, clip_norm, clip_value, every, level,
               callback, callback_every, factor, monitor)
    model.train()
    with Progress(steps, "gradbook.fit", show=progress) as bar:
        try:
            if run.probe:
                run.probe.attach()
            for step in range(steps):
                run.call_back(step)
                if not run.step(step):
                    break
                bar.update(1, loss=run.losses[-1])
            else:
                run.finish(steps)
        finally:
            if run.probe:
                run.probe.detach()
    if run.diverged is not None and bar.shown:
        print(f"gradbook.fit: {run.diverged}")
    return run.history()


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
    if task.kind != "regression":   # classification, or a language task's next tokens
        return {"loss": _LOSSES.get(task.kind, default_loss)(out, y).item(),
                "accuracy": (out.argmax(-1) == y).float().mean().item()}
    return {"loss": nn.functional.mse_loss(out, y).item()}


@dataclass
class Sweep:
    """Final loss against learning rate (:func:`lr_sweep`): ``final_loss[i]``, the mean training loss of the
    last steps at ``lrs[i]``, is capped at ``initial``, the loss at initialization, which a diverged run
    counts as (Wortsman et al. 2023). ``histories`` holds each run's :class:`History`."""

    lrs: np.ndarray
    final_loss: np.ndarray
    initial: float
    diverged: np.ndarray
    histories: list = field(default_factory=list, repr=False)

    def band(self, margin: float) -> tuple[float, float]:
        """The smallest and the largest learning rate whose final loss is within ``margin`` of the best."""
        ok = self.final_loss <= self.final_loss.min() + non_negative("margin", margin)
        return float(self.lrs[ok].min()), float(self.lrs[ok].max())

    @property
    def sensitivity(self) -> float:
        """Wortsman et al.'s learning-rate sensitivity: the mean over the rates of final loss minus the best."""
        return float(np.mean(self.final_loss - self.final_loss.min()))


def lr_sweep(make_model: Callable[[], nn.Module], task: Task, lrs, steps: int, *, seed: int = 0, last: int = 10,
             **fit_kwargs) -> Sweep:
    """Train a fresh ``make_model()`` with :func:`fit` at each learning rate of ``lrs``; keep the final loss.

    Every run starts from ``torch.manual_seed(seed)`` (so every rate starts from the same weights) and draws
    its batches from a generator seeded with ``seed`` (the same batches): the curve shows the learning rate
    alone. ``last`` steps' losses are averaged; ``fit_kwargs`` go to :func:`fit` (``optimizer``, ``warmup``,
    ``loss_fn``, ...). The small-scale proxy of Wortsman et al. (2023) is this curve for a small model,
    with and without a fix.
    """
    lrs = np.asarray(lrs, dtype=float)
    if lrs.ndim != 1 or not len(lrs) or not (np.isfinite(lrs) & (lrs > 0)).all():
        raise ValueError(f"lrs must be a non-empty list of positive learning rates, got {lrs.tolist()!r}")
    if isinstance(make_model, nn.Module) or not callable(make_model):
        raise TypeError(f"make_model must be a function that returns a new model, got {type(make_model).__name__}")
    positive_int("last", last)
    runs = []
    for lr in lrs:
        torch.manual_seed(seed)
        runs.append(fit(make_model(), task, steps, float(lr), generator=torch.Generator().manual_seed(seed),
                        **fit_kwargs))
    initial = float(runs[0].loss[0])
    final = np.array([initial if h.diverged else np.fmin(h.loss[-last:].mean(), initial) for h in runs])
    return Sweep(lrs, final, initial, np.array([h.diverged is not None for h in runs]), runs)
