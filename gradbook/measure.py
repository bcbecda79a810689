"""Measure gradients and activations of any ``torch.nn.Module``, layer by layer.

Two entry points:

* :func:`gradients` measures one batch and returns a :class:`Snapshot` of 1-D arrays;
* :func:`watch` is a context manager that records a :class:`Trace` on every N-th backward pass of a
  training loop, with no extra call in the loop.

What is measured, per *layer* (every Linear, Conv, RNN, Bilinear or Embedding module that has a
trainable parameter, in registration order):

* ``weight_grad_norm``: the norm of dL/dW over the layer's weight tensors (biases excluded), from this
  backward pass alone (not the accumulated ``.grad``);
* ``grad_norm``: the norm of the back-propagated gradient dL/dy with respect to the layer's output y
  (the whole batch; for a module called several times in one pass, such as an RNN cell, the norm of
  all its calls together);

and per *activation* module (sigmoid, tanh, ReLU, leaky ReLU, ELU, GELU, gradbook's linear):

* ``act_mean``, ``act_std``: mean and standard deviation of the activation's output over all entries;
* ``saturated``: the fraction of entries whose input x has phi'(x) < 0.1 gamma
  (:meth:`gradbook.activations.Activation.saturated`);
* ``dead``: the fraction of units (all non-batch positions) whose derivative is exactly 0 for every
  example in the batch: a dead ReLU passes no gradient at all.

Everything is computed as tensors on the model's device inside the hooks and moved to the CPU in one
transfer when the results are read, so probing does not force a synchronisation per tensor. Hooks
are forward hooks and tensor hooks (never full backward hooks), so in-place activations such as
``ReLU(inplace=True)`` are measured correctly: a tensor hook registered before an in-place change
receives the gradient with respect to the value before the change.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field, fields
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from . import activations as _acts
from ._checks import choice, positive_int

__all__ = ["Snapshot", "Trace", "watch", "gradients", "layers", "activation_modules", "weight_tensors",
           "update_ratios", "LAYER_TYPES", "LEVELS"]

LAYER_TYPES = (nn.Linear, nn.Bilinear, nn.Embedding, nn.RNNBase,
               nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
#: ``"norms"``: per-layer weight-gradient norms only (cheap enough to leave on); ``"full"``: everything.
LEVELS = ["full", "norms"]

_ARRAYS = ["weight_grad_norm", "grad_norm", "act_mean", "act_std", "saturated", "dead"]


@dataclass
class Snapshot:
    """Per-layer measurements of one backward pass; arrays run from the input side to the output side.

    Fields that were not measured (``level="norms"``) are None.
    """

    step: int
    layers: list[str]
    activations: list[str]
    weight_grad_norm: np.ndarray | None = None
    grad_norm: np.ndarray | None = None
    act_mean: np.ndarray | None = None
    act_std: np.ndarray | None = None
    saturated: np.ndarray | None = None
    dead: np.ndarray | None = None


@dataclass
class Trace:
    """Snapshots stacked over the recorded steps: each array has shape (recorded steps, layers)."""

    layers: list[str]
    activations: list[str]
    steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    weight_grad_norm: np.ndarray | None = None
    grad_norm: np.ndarray | None = None
    act_mean: np.ndarray | None = None
    act_std: np.ndarray | None = None
    saturated: np.ndarray | None = None
    dead: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, i: int) -> Snapshot:
        i = range(len(self))[i]
        return Snapshot(int(self.steps[i]), self.layers, self.activations,
                        **{k: (None if getattr(self, k) is None else getattr(self, k)[i]) for k in _ARRAYS})


def layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs that gradbook measures as layers, in registration order."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, LAYER_TYPES) and any(p.requires_grad for p in m.parameters(recurse=False))]


def weight_tensors(module: nn.Module) -> list[torch.Tensor]:
    """A layer's trainable weight tensors (parameters whose name starts with 'weight'; all if none)."""
    own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
    weights = [p for n, p in own if n.startswith("weight")]
    return weights or [p for _, p in own]


def activation_modules(model: nn.Module) -> list[tuple[str, nn.Module, _acts.Activation]]:
    """The (name, module, Activation) triples of the activation modules gradbook knows, in order."""
    out = []
    for n, m in model.named_modules():
        act = _acts.from_module(m)
        if act is not None:
            out.append((n, m, act))
    return out


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


class _Step:
    """What one recorded step has gathered so far, still as tensors on the model's device."""

    def __init__(self, index: int, n_layers: int, n_acts: int):
        self.index = index
        self.weight = None                                      # tensor (L,)
        self.grad_sq: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
        self.out_stats: list[list[tuple]] = [[] for _ in range(n_acts)]   # (count, mean, var) per call
        self.in_stats: list[list[tuple]] = [[] for _ in range(n_acts)]    # (saturated count, count, alive)


_WATCHED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


class watch:
    """Record per-layer gradients and activations on every ``every``-th backward pass.

    Use it as a context manager around an ordinary training loop::

        with gb.watch(model, every=10) as w:
            for x, y in batches:
                opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
        w.trace.weight_grad_norm      # (recorded steps, layers)

    A *step* is a forward pass of ``model`` with gradients enabled, numbered from 0; steps 0, every,
    2 every, ... are recorded, by their backward pass. On exit all hooks are removed, even if the loop
    raised. A model can be watched by one ``watch`` at a time.

    Parameters
    ----------
    model : nn.Module
    every : int
        Record every ``every``-th step.
    level : "full" or "norms"
        ``"norms"`` records only per-layer weight-gradient norms (the cheapest probe); ``"full"`` also
        back-propagated gradient norms and activation statistics.
    """

    def __init__(self, model: nn.Module, every: int = 1, level: str = "full"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"watch needs a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.every = positive_int("every", every)
        self.level = choice("level", level, LEVELS)
        self._layers = layers(model)
        self._acts = activation_modules(model) if level == "full" else []
        self._handles: list = []
        self._steps: list[_Step] = []          # recorded steps not yet converted to numbers
        self._done_steps: list[int] = []
        self._done_rows: list[np.ndarray] = []
        self._count = 0
        self._current: _Step | None = None
        self._attached = False

    # -- attaching -------------------------------------------------------------------------------
    def __enter__(self) -> "watch":
        self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def attach(self) -> "watch":
        """Register the hooks (``with watch(...)`` does this for you)."""
        if self._attached:
            raise RuntimeError("this watch is already attached")
        clash = next((m for m in self.model.modules() if m in _WATCHED), None)
        if clash is not None:
            raise RuntimeError("this model (or a module inside it) is already watched by gradbook; "
                               "leave the other watch first")
        _WATCHED.add(self.model)
        self._attached = True
        self._handles.append(self.model.register_forward_pre_hook(self._on_root_forward))
        tensors, owner = [], []
        for i, (_, m) in enumerate(self._layers):
            for p in weight_tensors(m):
                tensors.append(p)
                owner.append(i)
            if self.level == "full":
                self._handles.append(m.register_forward_hook(self._layer_hook(i)))
        if tensors:
            self._owner = torch.tensor(owner)
            self._handles.append(torch.autograd.graph.register_multi_grad_hook(tensors, self._on_weight_grads))
        for j, (_, m, act) in enumerate(self._acts):
            self._handles.append(m.register_forward_pre_hook(self._act_pre_hook(j, act)))
            self._handles.append(m.register_forward_hook(self._act_hook(j)))
        return self

    def detach(self) -> None:
        """Remove every hook; safe to call twice."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._attached:
            _WATCHED.discard(self.model)
        self._attached = False
        self._current = None

    # -- hooks -----------------------------------------------------------------------------------
    def _on_root_forward(self, module, args):
        if not torch.is_grad_enabled():
            return
        if self._count % self.every == 0:
            self._current = _Step(self._count, len(self._layers), len(self._acts))
            self._steps.append(self._current)
            if len(self._steps) > 64:
                self._flush()
        else:
            self._current = None
        self._count += 1

    def _on_weight_grads(self, grads):
        step = self._current
        if step is None or not self._attached:
            return
        present = [(g, i) for g, i in zip(grads, self._owner.tolist()) if g is not None]
        if not present:
            return
        norms = torch._foreach_norm([g.detach() for g, _ in present])
        sq = torch.stack([n.float() for n in norms]) ** 2
        idx = torch.tensor([i for _, i in present], device=sq.device)
        total = torch.zeros(len(self._layers), device=sq.device).index_add_(0, idx, sq)
        step.weight = total if step.weight is None else step.weight + total

    def _layer_hook(self, i: int):
        def hook(module, args, out):
            step = self._current
            y = _first_tensor(out)
            if step is None or y is None or not y.requires_grad:
                return None

            def on_grad(g):
                if self._attached:
                    step.grad_sq[i].append(g.detach().float().pow(2).sum())
            y.register_hook(on_grad)
            return None
        return hook

    def _act_pre_hook(self, j: int, act: _acts.Activation):
        threshold = _acts.SATURATION_THRESHOLD * act.gamma

        def hook(module, args):
            step = self._current
            if step is None or not args or not isinstance(args[0], torch.Tensor):
                return None
            with torch.no_grad():
                x = args[0].detach()
                d = act.derivative(x)
                alive = (d != 0).reshape(x.shape[0], -1).any(0) if x.dim() > 1 else (d != 0).any().reshape(1)
                step.in_stats[j].append(((d < threshold).sum(), d.numel(), alive))
            return None
        return hook

    def _act_hook(self, j: int):
        def hook(module, args, out):
            step = self._current
            y = _first_tensor(out)
            if step is None or y is None:
                return None
            with torch.no_grad():
                var, mean = torch.var_mean(y.detach().float(), correction=0)
                step.out_stats[j].append((y.numel(), mean, var))
            return None
        return hook

    # -- results ---------------------------------------------------------------------------------
    def _rows(self, steps: list[_Step]) -> np.ndarray:
        """One row of numbers per step, with a single device-to-host transfer for all of them."""
        L, A = len(self._layers), len(self._acts)
        if not steps:
            return np.zeros((0, 2 * L + 4 * A))
        param = next(self.model.parameters(), None)
        nan = torch.tensor(float("nan"), device=param.device if param is not None else "cpu")
        rows = []
        for s in steps:
            w = s.weight.sqrt() if s.weight is not None else nan.expand(L)
            g = [torch.stack(c).sum().sqrt() if c else nan for c in s.grad_sq]
            a = [self._act_summary(s.out_stats[j], s.in_stats[j], nan) for j in range(A)]
            by_kind = [x for k in range(4) for x in (stat[k] for stat in a)]  # mean.., std.., sat.., dead..
            rows.append(torch.stack([*w.float().unbind(0), *(x.float() for x in g), *(x.float() for x in by_kind)])
                        if (L or A) else nan.expand(0))
        return torch.stack(rows).cpu().numpy().astype(float).reshape(len(steps), 2 * L + 4 * A)

    def _flush(self) -> None:
        """Convert the finished steps (all but the one in progress) and drop their tensors."""
        finished = [s for s in self._steps if s is not self._current]
        if finished:
            self._done_steps.extend(s.index for s in finished)
            self._done_rows.append(self._rows(finished))
        self._steps = [s for s in self._steps if s is self._current]

    @staticmethod
    def _act_summary(out_stats, in_stats, nan):
        if not out_stats:
            return [nan, nan, nan, nan]
        n = torch.tensor([float(c) for c, _, _ in out_stats], device=nan.device)
        means = torch.stack([m for _, m, _ in out_stats]).to(nan.device)
        vars_ = torch.stack([v for _, _, v in out_stats]).to(nan.device)
        mean = (n * means).sum() / n.sum()
        var = (n * (vars_ + (means - mean) ** 2)).sum() / n.sum()   # pooled over calls
        if not in_stats:
            return [mean, var.sqrt(), nan, nan]
        sat = torch.stack([s.float() for s, _, _ in in_stats]).sum() / sum(c for _, c, _ in in_stats)
        masks = [a for _, _, a in in_stats]
        if all(m.shape == masks[0].shape for m in masks):
            alive = torch.stack(masks).any(0)
            dead = 1.0 - alive.float().mean()
        else:
            dead = nan
        return [mean, var.sqrt(), sat.to(nan.device), dead.to(nan.device)]

    @property
    def trace(self) -> Trace:
        """Everything recorded so far, as a :class:`Trace` of NumPy arrays."""
        self._flush()
        L, A = len(self._layers), len(self._acts)
        rows = np.concatenate([*self._done_rows, self._rows(self._steps)])
        steps = np.array(self._done_steps + [s.index for s in self._steps], dtype=int)
        out = Trace([n for n, _ in self._layers], [n for n, _, _ in self._acts], steps)
        out.weight_grad_norm = rows[:, :L]
        if self.level == "full":
            out.grad_norm = rows[:, L:2 * L]
            a = rows[:, 2 * L:].reshape(len(rows), 4, A)
            out.act_mean, out.act_std, out.saturated, out.dead = a[:, 0], a[:, 1], a[:, 2], a[:, 3]
        return out


def _default_loss(output: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    if target is None:
        return output.pow(2).sum() / 2
    if not target.is_floating_point():
        return nn.functional.cross_entropy(output, target)
    return nn.functional.mse_loss(output, target)


def gradients(model: nn.Module, inputs, targets=None, loss_fn: Callable | None = None,
              level: str = "full") -> Snapshot:
    """Measure one forward and backward pass of ``model`` on a batch.

    The loss is ``loss_fn(model(inputs), targets)``; by default cross-entropy for integer targets,
    mean squared error for float targets, and ``sum(output^2)/2`` when there are no targets. The
    parameters' ``.grad`` are left as they were before the call.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        with torch.enable_grad(), watch(model, every=1, level=level) as w:
            out = model(inputs)
            out = _first_tensor(out)
            loss = (loss_fn or _default_loss)(out, targets)
            loss.backward()
        trace = w.trace
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    return trace[-1]


def update_ratios(before: list[torch.Tensor], model_layers: Iterable[nn.Module]) -> np.ndarray:
    """||W_after - W_before|| / ||W_before|| per layer, from copies taken with :func:`weight_tensors`."""
    out = []
    for old, m in zip(before, model_layers):
        new = torch.cat([p.detach().reshape(-1) for p in weight_tensors(m)])
        out.append(torch.linalg.vector_norm(new - old) / torch.linalg.vector_norm(old).clamp_min(1e-300))
    return torch.stack(out).cpu().numpy().astype(float) if out else np.zeros(0)


def snapshot_weights(model_layers: Iterable[nn.Module]) -> list[torch.Tensor]:
    """Flat copies of each layer's weights, for :func:`update_ratios`."""
    return [torch.cat([p.detach().reshape(-1) for p in weight_tensors(m)]).clone() for m in model_layers]
