"""The always-on probe: :class:`watch` records a :class:`gradbook.records.Trace` during any training loop.

How it stays cheap. The root module's forward pre-hook counts steps; only on a recorded step are the
per-layer hooks attached, so the steps in between cost one Python call. Everything is computed as
tensors on the model's device inside the hooks, and many steps' tensors are moved to the CPU in one
transfer when the results are read, so probing does not force a synchronisation per tensor. Hooks are
forward hooks and tensor hooks (never full backward hooks), so in-place activations such as
``ReLU(inplace=True)`` are measured correctly: a tensor hook registered before an in-place change
receives the gradient with respect to the value before the change.
"""
from __future__ import annotations

import weakref

import numpy as np
import torch
from torch import nn

from . import activations as _acts
from ._checks import choice, positive_int
from .records import (ACTIVATION_FIELDS, Trace, activation_modules, layers, norms, output_tensor,
                      weight_tensors)

__all__ = ["watch", "LEVELS"]

#: ``"norms"``: per-layer weight-gradient norms only (cheap enough to leave on); ``"full"``: everything.
LEVELS = ["full", "norms"]
#: Recorded steps kept as tensors before they are converted to numbers in one transfer.
BATCH = 64


def _to_numpy(tensors: list[torch.Tensor]) -> list[np.ndarray]:
    """Each tensor as a float64 NumPy array, with one transfer from the device for all of them."""
    if not tensors:
        return []
    device = tensors[0].device
    flat = torch.cat([t.detach().reshape(-1).to(device, torch.float64) for t in tensors]).cpu().numpy()
    return np.split(flat, np.cumsum([t.numel() for t in tensors])[:-1])


class _Step:
    """What one recorded step has gathered so far, still as tensors on the model's device."""

    def __init__(self, index: int, n_layers: int, n_acts: int):
        self.index = index
        self.weight: torch.Tensor | None = None                          # (L,) norms of .grad
        self.grad: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]   # ||dL/dy|| per call
        self.out: list[list[tuple]] = [[] for _ in range(n_acts)]     # (count, mean, var) per call
        self.sat: list[list[tuple]] = [[] for _ in range(n_acts)]     # (saturated count, count) per call
        self.alive: list[torch.Tensor | None] = [None] * n_acts       # max |phi'| of each unit so far

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


_WATCHED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


class watch:
    """Record per-layer gradients and activations on every ``every``-th backward pass.

    Use it as a context manager around an ordinary training loop::

        with gb.watch(model, every=10) as w:
            for x, y in batches:
                opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
        w.trace.weight_grad_norm      # (recorded steps, layers)

    A *step* is a forward pass of ``model`` with gradients enabled, numbered from 0; steps 0, every,
    2 every, ... are recorded, through their backward pass. ``weight_grad_norm`` is the norm of each
    weight's ``.grad`` when that backward pass ends (the step's own gradient, when the loop zeroes
    gradients every step as usual). On exit all hooks are removed, even if the loop raised. A model can
    be watched by one ``watch`` at a time. What is measured: :data:`gradbook.records.FIELDS`; a
    diagnosis of the recorded window: :func:`gradbook.diagnosis.from_trace`.

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
        weights = [weight_tensors(m) for _, m in self._layers]
        self._flat_weights = [p for ws in weights for p in ws]
        self._owner = [i for i, ws in enumerate(weights) for _ in ws]
        self._handles: list = []        # for the whole watch
        self._step_handles: list = []   # only while a recorded step runs its forward pass
        self._steps: list[_Step] = []   # recorded steps not yet converted to numbers
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
        inside = any(m in _WATCHED for m in self.model.modules())
        around = any(self.model is m for other in list(_WATCHED) for m in other.modules())
        if inside or around:
            raise RuntimeError("this model (or a module inside it) is already watched by gradbook; "
                               "leave the other watch first")
        _WATCHED.add(self.model)
        self._attached = True
        self._handles.append(self.model.register_forward_pre_hook(self._on_root_forward))
        self._handles.append(self.model.register_forward_hook(self._on_root_output))
        return self

    def detach(self) -> None:
        """Remove every hook; safe to call twice."""
        self._remove_step_hooks()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._attached:
            _WATCHED.discard(self.model)
        self._attached = False
        self._current = None

    def _add_step_hooks(self) -> None:
        if self._step_handles or self.level != "full":
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

    def _remove_step_hooks(self) -> None:
        for h in self._step_handles:
            h.remove()
        self._step_handles.clear()

    # -- hooks -----------------------------------------------------------------------------------
    def _on_root_forward(self, module, args):
        if not torch.is_grad_enabled():
            return
        if self._count % self.every == 0:
            if len(self._steps) >= BATCH:
                self._current = None
                self._flush()
            self._current = _Step(self._count, len(self._layers), len(self._acts))
            self._steps.append(self._current)
            self._add_step_hooks()
        else:
            self._current = None
            self._remove_step_hooks()
        self._count += 1

    def _on_root_output(self, module, args, out):
        step = self._current
        y = output_tensor(out)
        if step is None or y is None or not y.requires_grad or not self._flat_weights:
            return None

        def queue(grad):  # runs as the backward pass starts; the callback runs when it ends
            torch.autograd.Variable._execution_engine.queue_callback(lambda: self._read_weight_grads(step))
        y.register_hook(queue)
        return None

    def _read_weight_grads(self, step: _Step) -> None:
        if not self._attached:
            return
        present = [(p.grad, i) for p, i in zip(self._flat_weights, self._owner) if p.grad is not None]
        if not present:
            return
        sq = norms([g for g, _ in present]) ** 2
        idx = torch.tensor([i for _, i in present], device=sq.device)
        step.weight = sq.new_zeros(len(self._layers)).index_add_(0, idx, sq).sqrt()

    def _layer_hook(self, i: int):
        def hook(module, args, out):
            step = self._current
            y = output_tensor(out)
            if step is None or y is None or not y.requires_grad:
                return None

            def on_grad(g):
                if self._attached:
                    step.grad[i].append(norms([g.detach()])[0])
            y.register_hook(on_grad)
            return None
        return hook

    def _input_stats(self, step: _Step, j: int, act: _acts.Activation, x: torch.Tensor) -> None:
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
            step = self._current
            if step is not None and torch.is_grad_enabled() and args and isinstance(args[0], torch.Tensor):
                self._input_stats(step, j, act, args[0])
            return None
        return hook

    def _act_output_hook(self, j: int, act: _acts.Activation | None):
        def hook(module, args, out):
            step = self._current
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

    # -- results ---------------------------------------------------------------------------------
    def _rows(self, steps: list[_Step]) -> np.ndarray:
        """One row of numbers per step, with one transfer from the device for all of them."""
        gathered = [s.tensors() for s in steps]
        values = iter(_to_numpy([t for ts in gathered for t in ts]))
        width = 2 * len(self._layers) + 4 * len(self._acts)
        return np.array([s.row(values) for s in steps]).reshape(len(steps), width)

    def _flush(self) -> None:
        """Convert the finished steps (all but the one in progress) and drop their tensors."""
        finished = [s for s in self._steps if s is not self._current]
        if finished:
            self._done_steps.extend(s.index for s in finished)
            self._done_rows.append(self._rows(finished))
        self._steps = [s for s in self._steps if s is self._current]

    @property
    def trace(self) -> Trace:
        """Everything recorded so far, as a :class:`gradbook.records.Trace` of NumPy arrays."""
        self._flush()
        L, A = len(self._layers), len(self._acts)
        rows = np.concatenate([*self._done_rows, self._rows(self._steps)])
        steps = np.array(self._done_steps + [s.index for s in self._steps], dtype=int)
        out = Trace([n for n, _ in self._layers], [n for n, _, _ in self._acts], steps)
        out.weight_grad_norm = rows[:, :L]                 # the layout of _Step.row
        if self.level == "full":
            out.grad_norm = rows[:, L:2 * L]
            stats = rows[:, 2 * L:].reshape(len(rows), len(ACTIVATION_FIELDS), A)
            for k, name in enumerate(ACTIVATION_FIELDS):
                setattr(out, name, stats[:, k])
        return out
