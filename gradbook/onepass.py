"""One measured pass outside a training loop: :func:`run` measures one forward (and backward) pass of a
batch with the per-layer hooks of a recorded step and leaves the model as it found it.

It is what :mod:`gradbook.measure` and :func:`gradbook.diagnosis.diagnose` measure with. The hooks and
the numbers are those of a step recorded by :class:`gradbook.watch.watch` (the hooks of
:class:`gradbook.probe.StepHooks`; each layer's weight-gradient norm), without a training loop's machinery:
no step counting, no optimizer or scaler hooks, no spike detection, no exporters, no trace of many steps,
no norm over every parameter. On a small model that machinery costs more than the hooks themselves (about
1 ms of the 20 ms a diagnosis took on the benchmark's MLP).

The weight gradients are read as the backward pass accumulates them and let go at once, so that the pass
never holds a second set of gradients beside its caller's (under DDP or FSDP, or in several processes,
they are read after the backward pass, FSDP's shards summed over the ranks by
:func:`gradbook.distributed.squared_norms`).

A watch attached to the same model ignores the pass: the model is listed in
:data:`gradbook.probe.MEASURING` while it runs, so a diagnosis in the middle of a watched training run
neither counts as a training step nor adds to the step being recorded.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import distributed as dist
from ._checks import choice
from .batches import call, loss_of
from .probe import LEVELS, MEASURING, Step, StepHooks
from .records import Inventory, Snapshot, norms, split_rows, to_numpy, weight_norms

__all__ = ["run", "kept_buffers"]


class kept_buffers:
    """Restore every buffer of ``model`` (BatchNorm running statistics, counters) on exit, so that a
    measurement pass in training mode leaves the model exactly as it found it. ``model``: a module or
    its :class:`gradbook.records.Inventory`."""

    def __init__(self, model: nn.Module | Inventory):
        self.model = model

    def __enter__(self):
        buffers = self.model.buffers() if isinstance(self.model, nn.Module) else self.model.buffers
        self.saved = [(b, b.detach().clone()) for b in buffers]

    def __exit__(self, *exc):
        with torch.no_grad():
            for b, old in self.saved:
                b.copy_(old)


class _Taken:
    """Each layer weight's gradient norm read as the backward pass accumulates it (still in cache), and the
    gradient let go at once: a pass that holds a second set of gradients beside its caller's takes fresh
    memory from the system (on the benchmark's MLP, about a thousand page faults per pass). ``weights``:
    each layer's weight tensors; empty under DDP or FSDP (their gradients are final only after their own
    hooks) or several processes, where every norm is read after the backward pass."""

    def __init__(self, weights: list[list[torch.Tensor]]):
        self.got: list[tuple[int, torch.Tensor]] = []   # (layer, norm)
        owners: dict[int, tuple[torch.Tensor, list[int]]] = {}   # a weight tied between layers counts in each
        for i, ws in enumerate(weights):
            for w in ws:
                owners.setdefault(id(w), (w, []))[1].append(i)
        self.handles = [w.register_post_accumulate_grad_hook(self._hook(layers))
                        for w, layers in owners.values() if not dist.is_sharded(w)]

    def _hook(self, layers: list[int]):
        def hook(w: torch.Tensor) -> None:
            n = norms([w.grad.detach()])[0]
            self.got += [(i, n) for i in layers]
            w.grad = None
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def squared(self, n: int) -> np.ndarray:
        """The sum of the squared norms taken, per layer (0 where none was)."""
        if not self.got:
            return np.zeros(n)
        values = torch.stack([v for _, v in self.got]).cpu().numpy() ** 2
        return np.bincount([i for i, _ in self.got], weights=values, minlength=n)


def run(model: nn.Module, inputs, targets=None, loss_fn: Callable | None = None, *, level: str = "full",
        backward: bool = True, autocast: torch.dtype | None = None, seen=None,
        inventory: Inventory | None = None) -> tuple[Snapshot, float]:
    """Measure one pass of ``model`` on a batch: its :class:`gradbook.records.Snapshot` and the loss.

    ``level``: ``"full"`` (every field) or ``"norms"`` (weight-gradient norms only). With ``backward``,
    the loss ``loss_fn(output, targets)`` (:func:`gradbook.batches.loss_of`) is back-propagated when it is
    finite (a non-finite loss is returned, not back-propagated: weight-gradient norms 0); without, only the
    forward pass runs (the gradient fields are None, the loss NaN). ``autocast``: the forward pass's dtype
    under ``torch.autocast``. ``seen``: a context entered around the forward pass (a
    :class:`gradbook.makeup.observe`; the loss function is not part of the model it describes).
    ``inventory``: the :class:`gradbook.records.Inventory` of ``model`` (or of the model a DDP or
    ``torch.compile`` wrapper runs), if the caller has it: one walk over the modules less. The parameters'
    ``.grad`` and the buffers are left as they were. Hooks go on the modules of the model a DDP or
    ``torch.compile`` wrapper runs; the pass runs ``model``.
    """
    choice("level", level, LEVELS)
    inner = dist.unwrap(model)
    inv = inventory or Inventory(inner)
    named, params = inv.layers, inv.params
    acts = inv.acts if level == "full" else []
    if backward and not params:
        raise ValueError("the model has no trainable parameters: there is no gradient to measure")
    step, on = Step(0, len(named), len(acts)), [True]
    hooks = StepHooks(named, acts, lambda: step if on[0] else None, lambda: on[0], inv.compiled)
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    device = params[0].device.type if params else "cpu"
    value = float("nan")
    MEASURING.add(inner)
    try:
        if level == "full":
            hooks.add()
        with torch.enable_grad(), kept_buffers(inv):
            with torch.autocast(device, dtype=autocast) if autocast is not None else nullcontext():
                with seen or nullcontext():   # the model's forward pass, not the loss function's
                    out = call(model, inputs)
                loss = loss_of(out, targets, loss_fn) if backward else None
            if backward:
                value = float(loss.detach())
                if np.isfinite(value):
                    taken = _Taken(inv.weights if inner is model and dist.world_size() == 1 else [])
                    try:
                        loss.backward()
                    finally:
                        taken.remove()
                    later = weight_norms(inv, grads=True, squared=dist.squared_norms)   # those not taken
                    step.weight = torch.from_numpy(np.sqrt(later ** 2 + taken.squared(len(named))))
                else:
                    step.weight = torch.zeros(len(named), dtype=torch.float64)
    finally:
        on[0] = False
        hooks.remove()
        MEASURING.discard(inner)
        for p, g in zip(params, saved):
            p.grad = g
    row = step.row(iter(to_numpy(step.tensors())))[None]
    fields = split_rows(row, len(named), len(acts), level == "full")
    if not backward:
        fields["weight_grad_norm"] = fields["grad_norm"] = None
    return Snapshot(0, [n for n, _ in named], [n for n, _, _ in acts], **{k: v[0] if v is not None else None
                                                                          for k, v in fields.items()}), value
