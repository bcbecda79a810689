"""What one recorded step of :class:`gradbook.watch.watch` gathers, as tensors on the model's device, and
the per-layer hooks of ``level="full"`` that gather it (back-propagated gradient norms, activation
statistics); :meth:`Step.row` turns it into one row of numbers (the layout of
:data:`gradbook.records.FIELDS`), with one transfer from the device for many steps (:func:`to_numpy`).
What the steps become: a :class:`WatchTrace`, and for each exporter a :class:`StepRecord` per step.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import activations as _acts
from .records import Trace, norms, output_tensor
from .spikes import Spike

__all__ = ["Step", "StepHooks", "to_numpy", "WatchTrace", "StepRecord"]


def to_numpy(tensors: list[torch.Tensor]) -> list[np.ndarray]:
    """Each tensor as a float64 NumPy array, with one transfer from the device for all of them."""
    if not tensors:
        return []
    device = tensors[0].device
    flat = torch.cat([t.detach().reshape(-1).to(device, torch.float64) for t in tensors]).cpu().numpy()
    return np.split(flat, np.cumsum([t.numel() for t in tensors])[:-1])


class Step:
    """What one recorded step has gathered so far, still as tensors on the model's device."""

    def __init__(self, index: int, n_layers: int, n_acts: int):
        self.index = index
        self.weight: torch.Tensor | None = None                          # (L,) norms of .grad
        self.grad: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]   # ||dL/dy|| per call
        self.out: list[list[tuple]] = [[] for _ in range(n_acts)]     # (count, mean, var) per call
        self.sat: list[list[tuple]] = [[] for _ in range(n_acts)]     # (saturated count, count) per call
        self.alive: list[torch.Tensor | None] = [None] * n_acts       # max |phi'| of each unit so far
        self.total: torch.Tensor | None = None      # the norm over every trainable parameter
        self.before: list[torch.Tensor] | None = None   # the weights before the optimizer's step
        self.weight_sq: torch.Tensor | None = None  # their squared norms
        self.ratio: torch.Tensor | None = None      # (L,) update:weight ratio of the optimizer's step
        self.skipped = False                        # AMP's scaler skipped the optimizer's step

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor gathered, in the order :meth:`row` reads them back."""
        out = [] if self.weight is None else [self.weight]
        out += [t for calls in self.grad for t in calls]
        out += [t for calls in self.out for _, mean, var in calls for t in (mean, var)]
        out += [k for calls in self.sat for k, _ in calls]
        return out + [a for a in self.alive if a is not None]

    def row(self, values) -> np.ndarray:
        """One row of numbers (the layout of :data:`gradbook.records.FIELDS`) from ``values``, an iterator
        over the arrays of :meth:`tensors`, in that order."""
        L, A = len(self.grad), len(self.out)
        row = np.full(2 * L + 4 * A, np.nan)
        weight, grad, act = row[:L], row[L:2 * L], row[2 * L:].reshape(4, A)
        if self.weight is not None:
            weight[:] = next(values)
        for i, calls in enumerate(self.grad):
            if calls:   # a module called several times: the norm of all its calls together
                grad[i] = np.sqrt(sum(next(values)[0] ** 2 for _ in calls))
        for j, calls in enumerate(self.out):
            if calls:   # exact mean and variance of all calls from each call's own (parallel algorithm)
                n = np.array([c[0] for c in calls], dtype=float)
                mv = np.array([[next(values)[0], next(values)[0]] for _ in calls])
                mean = (n * mv[:, 0]).sum() / n.sum()
                act[0, j], act[1, j] = mean, np.sqrt((n * (mv[:, 1] + (mv[:, 0] - mean) ** 2)).sum() / n.sum())
        for j, calls in enumerate(self.sat):
            if calls:
                act[2, j] = sum(next(values)[0] for _ in calls) / sum(n for _, n in calls)
        for j, alive in enumerate(self.alive):
            if alive is not None:
                act[3, j] = (next(values) == 0).mean()
        return row


class StepHooks:
    """The forward hooks of ``level="full"`` on ``layers`` ((name, module) pairs) and ``acts`` ((name, module,
    Activation) triples), attached only while a recorded step runs (``add()``, ``remove()``). Each adds
    to ``current()``, the step being recorded (None: nothing), while ``active()`` is true."""

    def __init__(self, layers: list, acts: list, current: Callable[[], "Step | None"], active: Callable[[], bool]):
        self._layers, self._acts = layers, acts
        self._current, self._active = current, active
        self._step_handles: list = []

    def add(self) -> None:
        if self._step_handles:
            return
        add = self._step_handles.append
        for i, (_, m) in enumerate(self._layers):
            add(m.register_forward_hook(self._layer_hook(i)))
        for j, (_, m, act) in enumerate(self._acts):
            if getattr(m, "inplace", False):   # its input is overwritten: read it before the forward
                add(m.register_forward_pre_hook(self._act_input_hook(j, act)))
                add(m.register_forward_hook(self._act_output_hook(j, None)))
            else:
                add(m.register_forward_hook(self._act_output_hook(j, act)))

    def remove(self) -> None:
        for h in self._step_handles:
            h.remove()
        self._step_handles.clear()

    def _layer_hook(self, i: int):
        def hook(module, args, out):
            step = self._current()
            y = output_tensor(out)
            if step is None or y is None or not y.requires_grad:
                return None

            def on_grad(g):
                if self._active():
                    step.grad[i].append(norms([g.detach()])[0])
            y.register_hook(on_grad)
            return None
        return hook

    def _input_stats(self, step: Step, j: int, act: _acts.Activation, x: torch.Tensor) -> None:
        # Only floating-point ops: on the CPU, comparisons producing booleans are several times slower.
        with torch.no_grad():
            d = act.derivative(x.detach())
            below = (_acts.SATURATION_THRESHOLD * act.gamma - d).sign_().clamp_min_(0).sum()  # count of d < thr
            step.sat[j].append((below, d.numel()))
            flat = d.reshape(x.shape[0], -1) if x.dim() > 1 else d.reshape(-1, 1)
            peak = flat.abs().amax(0)   # max |phi'| of each unit (10x faster than an inf-norm over dim 0)
            prev = step.alive[j]
            step.alive[j] = peak if prev is None else \
                (torch.maximum(prev, peak) if prev.shape == peak.shape else prev)

    def _act_input_hook(self, j: int, act: _acts.Activation):
        def hook(module, args):
            step = self._current()
            if step is not None and torch.is_grad_enabled() and args and isinstance(args[0], torch.Tensor):
                self._input_stats(step, j, act, args[0])
            return None
        return hook

    def _act_output_hook(self, j: int, act: _acts.Activation | None):
        def hook(module, args, out):
            step = self._current()
            y = output_tensor(out)
            if step is None or y is None or not torch.is_grad_enabled():   # not an evaluation pass
                return None
            if act is not None and args and isinstance(args[0], torch.Tensor):
                self._input_stats(step, j, act, args[0])
            with torch.no_grad():   # two passes, exact; several times faster than torch.var_mean here
                y = y.detach()
                mean = y.mean()
                step.out[j].append((y.numel(), mean, torch.linalg.vector_norm(y - mean) ** 2 / y.numel()))
            return None
        return hook


@dataclass
class WatchTrace(Trace):
    """A :class:`gradbook.records.Trace` with what the monitor adds, per recorded step: ``total_grad_norm``
    (over every trainable parameter), ``update_ratio`` (recorded steps, layers: ||Delta W|| / ||W|| of the
    optimizer's actual step; None without an optimizer), ``loss`` (the mean of the losses handed to
    :meth:`gradbook.watch.watch.log_loss` in that step; NaN if none), ``skipped`` (a step AMP's GradScaler skipped because
    its gradient was not finite) and ``spikes`` (:class:`gradbook.spikes.Spike`, in step order)."""

    total_grad_norm: np.ndarray = field(default_factory=lambda: np.zeros(0))
    update_ratio: np.ndarray | None = None
    loss: np.ndarray = field(default_factory=lambda: np.zeros(0))
    skipped: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    spikes: list = field(default_factory=list)

    def select(self, keep) -> "WatchTrace":
        out = super().select(keep)
        kept = set(out.steps.tolist())
        return replace(out, total_grad_norm=self.total_grad_norm[keep], loss=self.loss[keep],
                       skipped=self.skipped[keep], spikes=[s for s in self.spikes if s.step in kept],
                       update_ratio=None if self.update_ratio is None else self.update_ratio[keep])


@dataclass
class StepRecord:
    """What one recorded step hands to each exporter (on rank 0 only), when the step is closed: the
    numbers of :class:`WatchTrace` for that step, the spikes found at it, and the layer modules (whose
    ``.grad`` still holds the step's gradient, for histograms)."""

    step: int
    layers: list[str]
    weight_grad_norm: np.ndarray
    total_grad_norm: float
    update_ratio: np.ndarray | None
    loss: float
    skipped: bool
    spikes: list[Spike]
    modules: list[nn.Module]
