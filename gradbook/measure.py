"""Measure gradients and activations of any ``torch.nn.Module``, layer by layer.

Two entry points:

* :func:`gradients` measures one batch and returns a :class:`Snapshot` of 1-D arrays;
* :func:`watch` is a context manager that records a :class:`Trace` on every N-th backward pass of a
  training loop, with no extra call in the loop.

What is measured, per *layer* (every Linear, Conv, RNN, Bilinear or Embedding module that has a
trainable parameter, in registration order):

* ``weight_grad_norm``: the norm of dL/dW over the layer's weight tensors (biases excluded), read from
  ``.grad`` when the backward pass ends;
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

import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from . import activations as _acts
from ._checks import choice, positive_int

__all__ = ["Snapshot", "Trace", "watch", "gradients", "activations", "capture", "stream", "Stream", "through_time", "layers", "activation_modules", "weight_tensors",
           "update_ratios", "LAYER_TYPES", "LEVELS"]

#: The module types measured as layers (those with a trainable parameter).
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


_SAFE = (1e-15, 1e15)   # float32 norms outside this range may have lost accuracy to under/overflow


def _norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of each tensor, accurate even for float32 gradients of 1e-20 or 1e20.

    torch's float32 norm squares entries in float32, so entries below ~1e-19 underflow (a vanishing
    gradient would read as 0) and entries above ~1e19 overflow. On the CPU, where checking a value costs
    nothing, norms are taken in the tensor's dtype and the few outside [1e-15, 1e15] are recomputed in
    float64; on an accelerator every norm is taken in float64, which avoids a synchronisation.
    """
    if len(tensors) == 1 and tensors[0].device.type == "cpu":   # the common case in a tensor hook
        n = torch.linalg.vector_norm(tensors[0])
        if tensors[0].dtype == torch.float64 or _SAFE[0] <= n.item() <= _SAFE[1]:
            return n.double().reshape(1)
        return torch.linalg.vector_norm(tensors[0], dtype=torch.float64).reshape(1)
    if tensors[0].device.type != "cpu":
        return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float64))
    raw = torch._foreach_norm(tensors)
    norms = (torch.stack(raw) if len({n.dtype for n in raw}) == 1 else torch.stack([n.double() for n in raw])).double()
    for i in torch.nonzero((norms < _SAFE[0]) | (norms > _SAFE[1]) | ~torch.isfinite(norms)).flatten().tolist():
        if tensors[i].dtype != torch.float64:
            norms[i] = torch.linalg.vector_norm(tensors[i], dtype=torch.float64)
    return norms


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
        self.weight: torch.Tensor | None = None                            # (L,) norms of .grad
        self.grad: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]   # ||dL/dy|| per call
        self.out: list[list[tuple]] = [[] for _ in range(n_acts)]      # (count, mean, var) per call
        self.sat: list[list[tuple]] = [[] for _ in range(n_acts)]      # (saturated count, count) per call
        self.alive: list[torch.Tensor | None] = [None] * n_acts        # max |phi'| of each unit so far


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
    gradients every step as usual). The per-layer hooks are attached only for recorded steps, so the
    steps in between cost one Python call. On exit all hooks are removed, even if the loop raised. A
    model can be watched by one ``watch`` at a time.

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
        self._weights = [weight_tensors(m) for _, m in self._layers]
        self._flat_weights = [p for ws in self._weights for p in ws]
        self._owner = [i for i, ws in enumerate(self._weights) for _ in ws]
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
            if len(self._steps) >= 64:
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
        y = _first_tensor(out)
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
        sq = _norms([g for g, _ in present]) ** 2
        idx = torch.tensor([i for _, i in present], device=sq.device)
        step.weight = sq.new_zeros(len(self._layers)).index_add_(0, idx, sq).sqrt()

    def _layer_hook(self, i: int):
        def hook(module, args, out):
            step = self._current
            y = _first_tensor(out)
            if step is None or y is None or not y.requires_grad:
                return None

            def on_grad(g):
                if self._attached:
                    step.grad[i].append(_norms([g.detach()])[0])
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
            y = _first_tensor(out)
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
        """One row of numbers per step. Each step's tensors are packed into one vector on the device
        (a few ops per step), all steps are moved to the CPU in one transfer, and the arithmetic
        that combines them is done in NumPy."""
        L, A = len(self._layers), len(self._acts)
        rows = np.full((len(steps), 2 * L + 4 * A), np.nan)
        packed, layouts = [], []
        for s in steps:
            scalars = [t for c in s.grad for t in c]
            scalars += [t for c in s.out for _, m, v in c for t in (m, v)]
            scalars += [k for c in s.sat for k, _ in c]
            alive = [a for a in s.alive if a is not None]
            parts = ([torch.stack(scalars).reshape(-1).double()] if scalars else []) + \
                    ([s.weight.double()] if s.weight is not None else []) + \
                    ([torch.cat(alive).double()] if alive else [])
            if parts:
                packed.append(torch.cat([p.to(parts[0].device) for p in parts]))
            layouts.append((len(scalars), s.weight is not None, [a.numel() if a is not None else 0 for a in s.alive],
                            sum(x.numel() for x in parts)))
        flat = torch.cat([p.to(packed[0].device) for p in packed]).cpu().numpy() if packed else np.zeros(0)
        pos = 0
        for r, s, (k, has_w, alive_sizes, size) in zip(rows, steps, layouts):
            vec, pos = flat[pos:pos + size], pos + size
            it = iter(vec[:k])
            for i, c in enumerate(s.grad):
                norms = np.array([next(it) for _ in c])
                if len(norms):
                    r[L + i] = np.sqrt((norms**2).sum())
            for j, c in enumerate(s.out):
                mv = np.array([(n, next(it), next(it)) for n, _, _ in c]).reshape(-1, 3)
                if len(mv):
                    n, means, vars_ = mv.T
                    mean = (n * means).sum() / n.sum()
                    r[2 * L + j] = mean
                    r[2 * L + A + j] = np.sqrt((n * (vars_ + (means - mean) ** 2)).sum() / n.sum())
            for j, c in enumerate(s.sat):
                counts = [next(it) for _ in c]
                if c:
                    r[2 * L + 2 * A + j] = sum(counts) / sum(n for _, n in c)
            rest = vec[k:]
            if has_w:
                r[:L], rest = rest[:L], rest[L:]
            for j, size_j in enumerate(alive_sizes):
                if size_j:
                    r[2 * L + 3 * A + j], rest = (rest[:size_j] == 0).mean(), rest[size_j:]
        return rows

    def _flush(self) -> None:
        """Convert the finished steps (all but the one in progress) and drop their tensors."""
        finished = [s for s in self._steps if s is not self._current]
        if finished:
            self._done_steps.extend(s.index for s in finished)
            self._done_rows.append(self._rows(finished))
        self._steps = [s for s in self._steps if s is self._current]

    def diagnose(self, lr: float | None = None):
        """A :class:`gradbook.diagnosis.Diagnosis` over the steps recorded so far (medians per layer).

        Needs ``level="full"``. See :func:`gradbook.diagnosis.from_trace`.
        """
        from .diagnosis import from_trace
        return from_trace(self.model, self.trace, lr=lr)

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


class _kept_buffers:
    """Restore every buffer of ``model`` (BatchNorm running statistics, counters) on exit, so that a
    measurement pass in training mode leaves the model exactly as it found it."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.saved = [(b, b.detach().clone()) for b in self.model.buffers()]

    def __exit__(self, *exc):
        with torch.no_grad():
            for b, old in self.saved:
                b.copy_(old)


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
    parameters' ``.grad`` and the model's buffers (BatchNorm running statistics) are left as they were
    before the call.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        with torch.enable_grad(), _kept_buffers(model), watch(model, every=1, level=level) as w:
            out = model(inputs)
            out = _first_tensor(out)
            loss = (loss_fn or _default_loss)(out, targets)
            loss.backward()
        trace = w.trace
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    return trace[-1]


def activations(model: nn.Module, inputs) -> Snapshot:
    """Activation statistics of one forward pass, with no backward pass.

    Returns a :class:`Snapshot` whose ``act_mean``, ``act_std``, ``saturated`` and ``dead`` are filled
    (the gradient fields are None). Pass a whole data set to find units that are dead on every input.
    The model runs in its current mode (a batch-norm layer in training mode normalizes with this batch's
    statistics); its running statistics are left untouched.
    """
    with torch.enable_grad(), _kept_buffers(model), watch(model, every=1, level="full") as w:
        model(inputs)
    snap = w.trace[-1]
    snap.weight_grad_norm = snap.grad_norm = None
    return snap


def capture(model: nn.Module, inputs, module: nn.Module, what: str = "input") -> torch.Tensor:
    """The tensor entering (``what="input"``) or leaving (``"output"``) ``module`` when ``model`` runs on
    ``inputs``, detached; for instance the pre-activations of one sigmoid layer. Runs without gradients,
    in the model's current mode, and leaves its buffers (BatchNorm running statistics) untouched.
    """
    choice("what", what, ["input", "output"])
    if not any(m is module for m in model.modules()):
        raise ValueError("module is not part of model")
    seen: list[torch.Tensor] = []

    def hook(mod, args, out):
        t = args[0] if what == "input" else _first_tensor(out)
        if not seen:
            seen.append(t.detach().clone())
    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad(), _kept_buffers(model):
            model(inputs)
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError("module was not called in the forward pass")
    return seen[0]


@dataclass
class Stream:
    """What flows along a stack of blocks: per block output h_l, its size and the gradient it receives.

    ``names``: the blocks; ``rms``: the root mean square of the entries of h_l (whole batch);
    ``grad_norm``: ||dL/dh_l|| (whole batch). In a residual network h_l is the residual stream, the sum of
    the skip path and the branch: the quantity whose gradient the skip connections carry.
    """
    names: list[str]
    rms: np.ndarray
    grad_norm: np.ndarray


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    if isinstance(model, nn.Sequential):
        return list(model.named_children())
    stack = getattr(model, "layers", None)
    if isinstance(stack, (nn.ModuleList, nn.Sequential)):
        return [(f"layers.{n}", m) for n, m in stack.named_children()]
    raise TypeError(f"stream() cannot tell which modules of a {type(model).__name__} are its blocks: pass "
                    "blocks=[...] (for instance a ResNet's residual blocks); by default it takes an "
                    "nn.Sequential's children or a model's `layers` ModuleList (gradbook.nets.mlp)")


def stream(model: nn.Module, inputs, targets=None, loss_fn: Callable | None = None,
           blocks: Iterable[nn.Module] | None = None) -> Stream:
    """Measure the output h_l of every block of ``model`` and the gradient dL/dh_l it receives.

    :func:`gradients` measures each layer's linear output a_l; in a residual network the gradient that the
    skip path carries is the one at the block's output h_l = h_{l-1} + F_l(h_{l-1}), which this measures
    (compare :func:`gradbook.theory.residual_profile`). ``blocks`` are modules of ``model``, each called
    once per forward pass; by default an ``nn.Sequential``'s children or the model's ``layers`` ModuleList.
    The loss is as in :func:`gradients`. Parameters' ``.grad`` and the model's buffers are left untouched.
    """
    if blocks is None:
        named = _blocks(model)
    else:
        names = {id(m): n for n, m in model.named_modules()}
        named = [(names.get(id(m)), m) for m in blocks]
        missing = [type(m).__name__ for n, m in named if n is None]
        if missing:
            raise ValueError(f"blocks must be modules of the model; not part of it: {missing}")
    if not named:
        raise ValueError("the model has no blocks to measure")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: there is no gradient to measure")
    rms: list[list[torch.Tensor]] = [[] for _ in named]
    grads: list[torch.Tensor | None] = [None] * len(named)

    def hook(i):
        def record(mod, args, out):
            h = _first_tensor(out)
            rms[i].append(h.detach().pow(2).mean().sqrt())
            if h.requires_grad:
                # a tensor hook sees dL/dh for this value even if a later operation changes h in place
                h.register_hook(lambda g: grads.__setitem__(i, g.detach().norm()))
        return record

    handles = [m.register_forward_hook(hook(i)) for i, (_, m) in enumerate(named)]
    try:
        with torch.enable_grad(), _kept_buffers(model):
            out = _first_tensor(model(inputs))
            calls = {named[i][0]: len(v) for i, v in enumerate(rms) if len(v) != 1}
            if calls:
                raise ValueError(f"each block must run once per forward pass; calls: {calls}")
            loss = (loss_fn or _default_loss)(out, targets)
            torch.autograd.grad(loss, params, allow_unused=True)   # fills grads; no .grad is touched
    finally:
        for h in handles:
            h.remove()
    zero = torch.zeros((), dtype=rms[0][0].dtype, device=rms[0][0].device)
    return Stream([n for n, _ in named], torch.stack([r[0] for r in rms]).cpu().numpy(),
                  torch.stack([zero if g is None else g.to(zero) for g in grads]).cpu().numpy())


def through_time(model, inputs: torch.Tensor, h0: torch.Tensor | None = None, **states_kwargs) -> np.ndarray:
    """||dh_T / dh_{T-k}|| for k = 0, ..., T-1: how much the last hidden state depends on earlier ones.

    ``model`` is a :class:`gradbook.nets.ElmanRNN` or :class:`gradbook.nets.LSTM` (anything with a
    ``states(inputs, h0)`` method that returns the list of states; for the LSTM, its cell states). Entry k is the spectral norm of the Jacobian of h_T with respect
    to h_{T-k}, averaged over the batch: Pascanu, Mikolov & Bengio's (2013) measure of how a gradient
    grows or vanishes through time. Computed exactly, by one batched backward pass per hidden unit.
    Extra keyword arguments go to ``states``: ``which="hidden"`` measures an LSTM's h_t instead of c_t.
    """
    if not hasattr(model, "states"):
        raise TypeError("through_time needs a gradbook.nets.ElmanRNN or LSTM (a model with a states() method); "
                        f"got {type(model).__name__}")
    with torch.enable_grad():
        hs = model.states(inputs, h0, **states_kwargs)
        last = hs[-1]
        batch, width = last.shape
        eye = torch.eye(width, dtype=last.dtype, device=last.device)
        basis = eye[:, None, :].expand(width, batch, width)   # one unit vector of h_T per backward pass
        rows = torch.autograd.grad(last, hs, grad_outputs=basis, is_grads_batched=True, allow_unused=True)
    out = []
    for t in reversed(range(len(hs))):               # k = 0 is h_T itself
        r = rows[t]
        if r is None:
            out.append(torch.zeros((), dtype=last.dtype))
            continue
        jac = r.permute(1, 0, 2)                      # (batch, unit of h_T, unit of h_t)
        out.append(torch.linalg.matrix_norm(jac, ord=2).mean())
    return torch.stack(out).detach().cpu().numpy().astype(float)


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
