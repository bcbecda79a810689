"""What one recorded step of :class:`gradbook.watch.watch` gathers, as tensors on the model's device, and
the per-layer hooks of ``level="full"`` that gather it (back-propagated gradient norms, activation
statistics); :meth:`Step.row` turns it into one row of numbers (the layout of
:data:`gradbook.records.FIELDS`), with one transfer from the device for many steps
(:func:`gradbook.records.to_numpy`).
What the steps become: a :class:`WatchTrace`, and for each exporter a :class:`StepRecord` per step.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import activations as _acts
from . import distributed as dist
from .records import SAFE_RANGE, Trace, norms, output_tensor
from .spikes import Spike

__all__ = ["LEVELS", "MEASURING", "Step", "StepHooks", "GradNorms", "Updates", "WatchTrace",
           "StepRecord"]

#: ``"norms"``: per-layer weight-gradient norms only (cheap enough to leave on); ``"full"``: everything.
LEVELS = ["full", "norms"]
#: Models inside a one-off measurement (:func:`gradbook.onepass.run`): a watch on them ignores that pass.
MEASURING: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _value(t: torch.Tensor):
    """A one-element statistic: a Python float on the CPU (where reading it costs nothing), else the tensor
    (read later, with the step's other tensors, in one transfer)."""
    return t.item() if t.device.type == "cpu" else t


def _moments(y: torch.Tensor, total: torch.Tensor | None = None) -> tuple:
    """(mean, ||y - mean||) over all entries of ``y``, exact to float rounding (``total``: their sum, if the
    caller has it). On the CPU, in float32 or float64, from one pass (the sum and the norm, no temporary)
    when that loses no accuracy (the variance is at least a quarter of the mean square, so subtracting the
    squared mean cancels less than 2 bits); else, and elsewhere, from two passes."""
    if y.device.type == "cpu" and y.dtype in (torch.float32, torch.float64):
        n = y.numel()
        mean = (y.sum() if total is None else total).item() / n
        square = torch.linalg.vector_norm(y).item() ** 2 / n
        var = square - mean * mean
        if var >= 0.25 * square and math.isfinite(var):
            return mean, math.sqrt(var * n)
    mean = y.mean()
    return _value(mean), _value(torch.linalg.vector_norm(y - mean))


def _norm(g: torch.Tensor):
    """||g||, accurate for tiny and huge float32 gradients (:func:`gradbook.records.norms`), as a number on the CPU."""
    if g.device.type != "cpu":
        return norms([g])[0]
    n = torch.linalg.vector_norm(g).item()
    return n if g.dtype == torch.float64 or SAFE_RANGE[0] <= n <= SAFE_RANGE[1] else norms([g])[0].item()


def _per_unit(y: torch.Tensor) -> torch.Tensor:
    """``y`` as (examples, units): axis 0 is the batch, every other axis a unit (a channel at a position)."""
    return y.reshape(y.shape[0], -1) if y.dim() > 1 else y.reshape(-1, 1)


class Step:
    """What one recorded step has gathered so far: statistics as Python floats on the CPU (where reading a
    number costs nothing), as tensors on the model's device elsewhere."""

    def __init__(self, index: int, n_layers: int, n_acts: int):
        self.index = index
        self.weight: torch.Tensor | None = None                          # (L,) norms of .grad
        self.grad: list[list] = [[] for _ in range(n_layers)]            # ||dL/dy|| per call
        self.out: list[list[tuple]] = [[] for _ in range(n_acts)]     # (count, mean, ||y - mean||) per call
        self.sat: list[list[tuple]] = [[] for _ in range(n_acts)]     # (saturated count, count) per call
        self.alive: list[torch.Tensor | None] = [None] * n_acts       # max |phi'| of each unit so far
        self.total: torch.Tensor | None = None      # the norm over every trainable parameter
        self.ratio: torch.Tensor | None = None      # (L,) update:weight ratio of the optimizer's step
        self.skipped = False                        # AMP's scaler skipped the optimizer's step
        self.values: np.ndarray | None = None       # [total, loss, weight...] once read to the host
        self.found: list[Spike] = []                # spikes flagged at this step

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor gathered, in the order :meth:`row` reads them back."""
        out = [] if self.weight is None else [self.weight]
        out += [t for calls in self.grad for t in calls if isinstance(t, torch.Tensor)]
        out += [t for calls in self.out for _, mean, var in calls for t in (mean, var) if isinstance(t, torch.Tensor)]
        out += [k for calls in self.sat for k, _ in calls if isinstance(k, torch.Tensor)]
        return out + [a for a in self.alive if a is not None]

    def row(self, values) -> np.ndarray:
        """One row of numbers (the layout of :data:`gradbook.records.FIELDS`) from ``values``, an iterator
        over the arrays of :meth:`tensors`, in that order."""
        L, A = len(self.grad), len(self.out)
        row = np.full(2 * L + 4 * A, np.nan)
        weight, grad, act = row[:L], row[L:2 * L], row[2 * L:].reshape(4, A)

        def number(v):
            return next(values)[0] if isinstance(v, torch.Tensor) else v
        if self.weight is not None:
            weight[:] = next(values)
        for i, calls in enumerate(self.grad):
            if calls:   # a module called several times: the norm of all its calls together
                grad[i] = number(calls[0]) if len(calls) == 1 else np.sqrt(sum(number(c) ** 2 for c in calls))
        for j, calls in enumerate(self.out):
            if len(calls) == 1:
                n, m, d = calls[0]
                act[0, j], act[1, j] = number(m), number(d) / math.sqrt(n)
            elif calls:   # exact mean and variance of all calls from each call's own (parallel algorithm)
                n = np.array([c[0] for c in calls], dtype=float)
                mv = np.array([[number(m), number(d)] for _, m, d in calls])
                mean, var = (n * mv[:, 0]).sum() / n.sum(), mv[:, 1] ** 2 / n
                act[0, j], act[1, j] = mean, np.sqrt((n * (var + (mv[:, 0] - mean) ** 2)).sum() / n.sum())
        for j, calls in enumerate(self.sat):
            if calls:
                act[2, j] = sum(number(k) for k, _ in calls) / sum(n for _, n in calls)
        for j, alive in enumerate(self.alive):
            if alive is not None:
                v = next(values)
                act[3, j] = np.count_nonzero(v == 0) / v.size
        return row


class StepHooks:
    """The forward hooks of ``level="full"`` on ``layers`` ((name, module) pairs) and ``acts`` ((name, module,
    Activation) triples), attached only while recorded steps run (``add()``, ``remove()``). Each adds
    to ``current()``, the step being recorded (None: nothing), while ``active()`` is true.

    The statistics are computed with torch's function overrides off (a ``TorchFunctionMode`` watching the
    same pass, such as :class:`gradbook.makeup.observe`, does not see them), in few kernels; with
    ``compiled``, each hook is hidden from ``torch.compile`` (``torch.compiler.disable``), which runs it
    eagerly instead of tracing it into the graph and recompiling when the recorded step changes."""

    def __init__(self, layers: list, acts: list, current: Callable[[], "Step | None"], active: Callable[[], bool],
                 compiled: bool = False):
        self._layers, self._acts = layers, acts
        self._current, self._active = current, active
        self._compiled = compiled
        self._wrap = torch.compiler.disable if compiled else (lambda f: f)
        self._step_handles: list = []

    def add(self) -> None:
        if self._step_handles:
            return
        pre, post, modules = {}, {}, {}   # id(module) -> its hooks; id(module) -> module
        for i, (_, m) in enumerate(self._layers):
            modules[id(m)] = m
            post.setdefault(id(m), []).append(self._layer_hook(i))
        for j, (_, m, act) in enumerate(self._acts):
            modules[id(m)] = m
            if getattr(m, "inplace", False) and act.name != "relu":   # its input is overwritten: read it before
                pre.setdefault(id(m), []).append(self._act_input_hook(j, act))
            post.setdefault(id(m), []).append(self._act_output_hook(j, None if id(m) in pre else act))
        if self._compiled:   # hooks on each module, which torch.compile sees and runs eagerly
            wrap = self._wrap
            self._step_handles += [modules[k].register_forward_pre_hook(wrap(_chain(h))) for k, h in pre.items()]
            self._step_handles += [modules[k].register_forward_hook(wrap(_chain(h))) for k, h in post.items()]
            return
        # else one global hook each, passing over other modules: registering and removing a hook on each
        # of the benchmark MLP's 40 measured modules costs more than calling one on all its 81 modules
        for register, hooks in ((nn.modules.module.register_module_forward_pre_hook, pre),
                                (nn.modules.module.register_module_forward_hook, post)):
            if hooks:
                self._step_handles.append(register(_dispatch({k: _chain(h) for k, h in hooks.items()})))

    def remove(self) -> None:
        for h in self._step_handles:
            h.remove()
        self._step_handles.clear()

    def _layer_hook(self, i: int):
        wrap, active = self._wrap, self._active

        def hook(module, args, out):
            step = self._current()
            if step is None:
                return None
            with torch._C.DisableTorchFunction():   # nothing here for a function mode to see (nor its cost)
                y = output_tensor(out)
                if y is None or not y.requires_grad:
                    return None
                calls = step.grad[i]

                def on_grad(g):
                    if active():
                        with torch._C.DisableTorchFunction():   # on detached tensors: no graph is recorded
                            calls.append(_norm(g.detach()))
                y.register_hook(wrap(on_grad))
            return None
        return hook

    @staticmethod
    def _input_stats(step: Step, j: int, act: _acts.Activation, x: torch.Tensor) -> None:
        # Only floating-point ops: on the CPU, comparisons producing booleans are several times slower.
        d = act.derivative(x.detach())
        below = (_acts.SATURATION_THRESHOLD * act.gamma - d).sign_().clamp_min_(0).sum()  # count of d < thr
        step.sat[j].append((_value(below), d.numel()))
        StepHooks._keep_peak(step, j, _per_unit(d.abs()).amax(0))  # 10x faster than an inf-norm

    @staticmethod
    def _keep_peak(step: Step, j: int, peak: torch.Tensor) -> None:
        """Keep ``peak``, each unit's largest |phi'| over the batch (or a non-negative number that is 0 exactly
        where that is 0), and its largest over calls."""
        prev = step.alive[j]
        step.alive[j] = peak if prev is None else (torch.maximum(prev, peak) if prev.shape == peak.shape else prev)

    @staticmethod
    def _relu_stats(step: Step, j: int, y: torch.Tensor) -> torch.Tensor:
        """ReLU's saturation and dead units read from its output y = max(x, 0), and the sum of y: phi'(x) = 1
        where y > 0 and 0 elsewhere, so the count below the threshold is the count of zeros; as y >= 0, a
        unit's sum over the batch is 0 exactly where the unit is 0 for every example, so it stands for the
        unit's largest phi' in :meth:`_keep_peak` (three passes over y, and right for ``inplace=True``). Counts
        are summed in float32 (float64 for float64): exact up to 2^24 entries, where bfloat16 would round them."""
        positive = y.sign().sum(dtype=torch.float64 if y.dtype == torch.float64 else torch.float32)
        step.sat[j].append((y.numel() - _value(positive), y.numel()))
        per_unit = _per_unit(y).sum(0)
        StepHooks._keep_peak(step, j, per_unit)
        return per_unit.sum()

    def _act_input_hook(self, j: int, act: _acts.Activation):
        def hook(module, args):
            step = self._current()
            if step is not None and torch.is_grad_enabled() and args and isinstance(args[0], torch.Tensor):
                with torch._C.DisableTorchFunction():   # on detached tensors: no graph is recorded
                    self._input_stats(step, j, act, args[0])
            return None
        return hook

    def _act_output_hook(self, j: int, act: _acts.Activation | None):
        relu = act is not None and act.name == "relu"

        def hook(module, args, out):
            step = self._current()
            if step is None or not torch.is_grad_enabled():   # not an evaluation pass
                return None
            with torch._C.DisableTorchFunction():   # on detached tensors: no graph is recorded
                y = output_tensor(out)
                if y is None:
                    return None
                y = y.detach()
                total = self._relu_stats(step, j, y) if relu else None
                if not relu and act is not None and args and isinstance(args[0], torch.Tensor):
                    self._input_stats(step, j, act, args[0])
                step.out[j].append((y.numel(), *_moments(y, total)))
            return None
        return hook


def _chain(hooks: list[Callable]) -> Callable:
    """One module hook that calls ``hooks`` in order (they return None)."""
    if len(hooks) == 1:
        return hooks[0]

    def hook(*args):
        for h in hooks:
            h(*args)
    return hook


def _dispatch(hooks: dict[int, Callable]) -> Callable:
    """A global module hook that calls ``hooks[id(module)]``, if any (it returns None)."""
    get = hooks.get

    def hook(module, *args):
        h = get(id(module))
        if h is not None:
            h(module, *args)
    return hook


#: Gradients in no layer up to this many entries are measured together by :class:`GradNorms`.
SMALL = 1 << 16


class GradNorms:
    """The total norm and each layer's norm of a list of gradients (None for a parameter without one), from
    one pass: ``owner[k]`` is the layer of gradient k (-1: in no layer, such as a bias). Small gradients in
    no layer (up to ``SMALL`` entries) count only in the total, so they are measured together, one norm of
    all of them, not one by one (on a CPU each norm costs microseconds however small its tensor).
    Returns (total of shape (1,), per-layer norms of shape (L,)), float64 tensors, or None without gradients.
    """

    def __init__(self, owner: list[int], n_layers: int):
        self.owner, self.n_layers = owner, n_layers
        self._key = None

    @classmethod
    def of_layers(cls, weights: list[list[torch.Tensor]], params: list[torch.Tensor]) -> "GradNorms":
        """For the gradients of ``params``, with each layer's norm over its weight tensors ``weights[i]``
        (:func:`gradbook.records.weight_tensors`, as :class:`gradbook.records.Inventory` lists them)."""
        owned = {id(w): i for i, ws in enumerate(weights) for w in ws}
        return cls([owned.get(id(p), -1) for p in params], len(weights))

    def _plan(self, grads: list, keep: list[int]) -> None:
        alone = [k for k in keep if self.owner[k] >= 0 or dist.is_sharded(grads[k]) or grads[k].numel() > SMALL]
        alone_set = set(alone)
        rest = [k for k in keep if k not in alone_set]
        kinds = {(grads[k].dtype, grads[k].device, grads[k].layout) for k in rest}
        if len(kinds) > 1 or any(layout != torch.strided for _, _, layout in kinds):
            alone, rest = keep, []
        self._alone, self._rest = alone, rest
        self._sharded = [dist.is_sharded(grads[k]) for k in alone] + [False] * bool(rest)
        sums = np.zeros((1 + self.n_layers, len(alone) + bool(rest)))
        sums[0] = 1   # row 0: every gradient; row 1 + i: layer i's
        for j, k in enumerate(alone):
            if self.owner[k] >= 0:
                sums[1 + self.owner[k], j] = 1
        self._sums = torch.from_numpy(sums).to(grads[keep[0]].device)

    def __call__(self, grads: list) -> tuple[torch.Tensor, torch.Tensor] | None:
        keep = [k for k, g in enumerate(grads) if g is not None]
        if not keep:
            return None
        key = (len(keep), grads[keep[0]].device)
        if self._key != key or len(keep) != len(grads):   # kept while every gradient is present
            self._plan(grads, keep)
            self._key = key if len(keep) == len(grads) else None
        tensors = [grads[k] for k in self._alone]
        if self._rest:
            tensors.append(torch.cat([grads[k].reshape(-1) for k in self._rest]))
        sq = dist.squared_norms(tensors, self._sharded)
        return (self._sums.to(sq.device) @ sq).sqrt_().split([1, self.n_layers])


class Updates:
    """The update:weight ratio ||W_after - W_before|| / ||W_before|| of each layer for one optimizer step,
    from the optimizer's actual update: ``keep()`` copies ``weights`` (each layer's weight tensors,
    ``owner[k]`` the layer of tensor k) before the step, into buffers kept between steps; ``ratio()``
    after it. Under FSDP each rank copies its shards and the norms are summed over ranks."""

    def __init__(self, weights: list[torch.Tensor], owner: list[int], n_layers: int):
        self.weights, self.owner, self.n_layers = weights, owner, n_layers
        self._buffers: list[torch.Tensor] | None = None
        self._weight_sq: torch.Tensor | None = None
        self._index: torch.Tensor | None = None

    @property
    def kept(self) -> bool:
        return self._weight_sq is not None

    def keep(self) -> None:
        weights = [p.detach() for p in self.weights]
        local = [dist.local(w) for w in weights]
        if self._buffers is None:   # kept between steps: no allocation per step
            self._buffers = [torch.empty_like(w) for w in local]
        torch._foreach_copy_(self._buffers, local)
        self._weight_sq = dist.squared_norms(weights)

    def ratio(self) -> torch.Tensor:
        """(L,) ratios of the step that ran since ``keep()``."""
        torch._foreach_sub_(self._buffers, [dist.local(p.detach()) for p in self.weights])
        sq = dist.squared_norms(self._buffers, [dist.is_sharded(p) for p in self.weights])
        if self._index is None or self._index.device != sq.device:
            self._index = torch.tensor(self.owner, device=sq.device)
        per_layer = [sq.new_zeros(self.n_layers).index_add_(0, self._index, s) for s in (sq, self._weight_sq)]
        self._weight_sq = None
        return (per_layer[0] / per_layer[1].clamp_min(1e-300)).sqrt()


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
