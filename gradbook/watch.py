"""The always-on probe: :class:`watch` records a :class:`gradbook.records.Trace` during any training loop.

How it stays cheap. The root module's forward pre-hook counts steps; only on a recorded step are the
per-layer hooks attached, so the steps in between cost one Python call. Everything is computed as
tensors on the model's device inside the hooks (read as numbers at once on the CPU, where that costs
nothing), and many steps' tensors are moved to the CPU in one transfer when the results are read, so
probing does not force a synchronisation per tensor. Hooks are
forward hooks and tensor hooks (never full backward hooks), so in-place activations such as
``ReLU(inplace=True)`` are measured correctly: a tensor hook registered before an in-place change
receives the gradient with respect to the value before the change.

With an optimizer (``watch(model, optimizer=opt)``) a step is an optimizer step: gradients are read in the
optimizer's step pre-hook (the accumulated gradient, after a GradScaler has unscaled it, after DDP has
averaged it), the update:weight ratio from the weights before and after the optimizer's actual step, and
the step is closed by the step post-hook (or by ``GradScaler.update``, which also sees the steps AMP
skipped). A recorded step's summary numbers move to the CPU at once, in one transfer, so that a spike is
flagged the step it happens (:mod:`gradbook.spikes`) and exported (:mod:`gradbook.export`). The update ratio
costs a copy of the weights and three passes over them (about 15% of a plain step of the benchmark's MLP
on a CPU); ``ratios=k`` takes it on every k-th recorded step, and on each step with a spike (read before
the update for that).
"""
from __future__ import annotations

import numbers
import sys
import warnings
import weakref
import numpy as np
import torch
from torch import nn

from . import distributed as dist
from ._checks import choice, positive_int
from .probe import LEVELS, MEASURING, GradNorms, Step, StepHooks, StepRecord, Updates, WatchTrace
from .records import Inventory, eager, output_tensors, split_rows, to_numpy
from .spikes import THRESHOLD, WINDOW, Detector, SpikeWarning

__all__ = ["watch"]

#: Recorded steps kept as tensors before they are converted to numbers in one transfer.
BATCH = 64

_WATCHED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


class watch:
    """Record per-layer gradients and activations on every ``every``-th step, flag spikes, export.

    Use it as a context manager around an ordinary training loop::

        with gb.watch(model, every=10, optimizer=opt) as w:
            for x, y in batches:
                opt.zero_grad(); loss = loss_fn(model(x), y); loss.backward()
                w.log_loss(loss); opt.step()         # log_loss is optional: loss spikes too
        w.trace.weight_grad_norm      # (recorded steps, layers)

    Without ``optimizer`` a *step* is a forward pass of ``model`` with gradients enabled, recorded through
    its backward pass, whose ``.grad`` is read when that pass ends. With ``optimizer`` a step is an
    optimizer step: every forward and backward pass before it (gradient accumulation) belongs to it, and
    one record is kept per optimizer step, of the accumulated gradient the optimizer uses. Steps are
    numbered from 0; steps 0, every, 2 every, ... are recorded. On exit all hooks are removed, even if the
    loop raised. A model can be watched by one ``watch`` at a time. What is measured:
    :data:`gradbook.records.FIELDS` and :class:`gradbook.probe.WatchTrace`; a diagnosis of the recorded window:
    :func:`gradbook.diagnosis.from_trace`.

    Parameters
    ----------
    model : nn.Module
        Also a ``DistributedDataParallel`` or ``torch.compile`` wrapper, or a model sharded with FSDP's
        ``fully_shard`` (shard first, then watch): the norms are global, the records kept on rank 0
        (:mod:`gradbook.distributed`). Under more than one process, ``grad_norm`` and the activation
        statistics of ``level="full"`` are rank 0's share of the batch.
    every : int
        Record every ``every``-th step.
    level : "full" or "norms"
        ``"norms"`` records only per-layer weight-gradient norms (the cheapest probe); ``"full"`` also
        back-propagated gradient norms and activation statistics.
    optimizer : torch.optim.Optimizer, optional
        Count optimizer steps, read gradients as it steps, and record the update:weight ratio of its
        actual step (``ratios``).
    scaler : torch.amp.GradScaler, optional
        Under mixed precision: gradients are read after it unscales them, and the steps it skips are
        recorded (``skipped``, with their non-finite norm). Needs ``optimizer``.
    spikes : True, "warn" or False
        Flag loss and total-gradient-norm spikes (a rolling z-score over ``window`` recorded steps,
        ``threshold`` standard deviations; :mod:`gradbook.spikes`); "warn" also warns
        (:class:`gradbook.spikes.SpikeWarning`); ``on_spike(spike)`` is called for each.
    export : callable or list of callables
        Each is called with a :class:`gradbook.probe.StepRecord` when a recorded step closes (:mod:`gradbook.export`).
    all_ranks : bool
        Keep records on every rank, not only rank 0 (one-off measurements that every rank reads).
    ratios : bool or int
        With ``optimizer``: the update:weight ratio on every recorded step (True), on none (False), or on
        every k-th recorded step and on each step where a spike is flagged (an int k; NaN on the others in
        ``trace.update_ratio``). Each costs a copy of the weights and three passes over them.
    """

    def __init__(self, model: nn.Module, every: int = 1, level: str = "full", *, optimizer=None, scaler=None,
                 spikes=True, window: int = WINDOW, threshold: float = THRESHOLD, on_spike=None, export=(),
                 all_ranks: bool = False, ratios: bool | int = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"watch needs a torch.nn.Module, got {type(model).__name__}")
        self.model = dist.unwrap(model)
        inv = Inventory(self.model)   # one walk over the modules, shared below
        compiled = eager(model) is not model or inv.compiled
        self.every = positive_int("every", every)
        self.level = choice("level", level, LEVELS)
        self.spikes = choice("spikes", spikes, [True, False, "warn"])
        if scaler is not None and optimizer is None:
            raise ValueError("scaler needs optimizer: watch(model, optimizer=opt, scaler=scaler)")
        self.optimizer, self.scaler, self.on_spike, self.all_ranks = optimizer, scaler, on_spike, bool(all_ranks)
        if not isinstance(ratios, numbers.Integral) or ratios < 0:
            raise ValueError(f"ratios must be True, False or a positive int (every k-th recorded step), got {ratios!r}")
        self.ratios = int(ratios) if optimizer is not None else 0   # 0: none, k: every k-th recorded step
        self.export = [export] if callable(export) else list(export)
        self._layers = inv.layers
        self._names = [n for n, _ in self._layers]
        self._detector = Detector(self._names, window, threshold)
        self._acts = inv.acts if level == "full" else []
        weights = inv.weights
        flat_weights = [p for ws in weights for p in ws]
        owner = [i for i, ws in enumerate(weights) for _ in ws]
        self._updates = Updates(flat_weights, owner, len(self._layers))
        self._params = inv.params
        self._grad_norms = GradNorms.of_layers(weights, self._params)
        self._handles: list = []        # for the whole watch
        self._hooks = StepHooks(self._layers, self._acts, self._recording, lambda: self._attached, compiled)
        self._compiled, self._found, self._losses = compiled, [], []
        self._steps: list[Step] = []   # recorded steps not yet converted to numbers
        self._done_steps: list[int] = []
        self._done_rows: list[np.ndarray] = []
        self._extra: dict[int, tuple] = {}   # step: (total norm, loss, skipped, update ratios)
        self._count = 0
        self._current: Step | None = None
        self._attached = self._main = self._open = False   # _open: the step is not closed yet

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
        self._attached, self._main = True, self.all_ranks or dist.is_main()
        # hidden from torch.compile: run eagerly, never traced into a graph (no recompilation per step); not
        # needed, and not paid for (importing the compiler takes a second), while nothing has loaded it
        hide = torch.compiler.disable if self._compiled or "torch._dynamo" in sys.modules else (lambda f: f)
        self._handles.append(self.model.register_forward_pre_hook(hide(self._on_root_forward)))
        if self.optimizer is None:
            self._handles.append(self.model.register_forward_hook(hide(self._on_root_output)))
        else:
            self._handles.append(self.optimizer.register_step_pre_hook(self._on_optimizer_step))
            self._handles.append(self.optimizer.register_step_post_hook(self._after_optimizer_step))
        if self.scaler is not None:
            original = type(self.scaler).update.__get__(self.scaler)

            def update(*args, **kwargs):   # every step ends here, the skipped ones too
                self._on_scaler_update()
                return original(*args, **kwargs)
            self.scaler.update = update
        return self

    def detach(self) -> None:
        """Remove every hook; safe to call twice."""
        self._remove_step_hooks()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.scaler is not None:
            vars(self.scaler).pop("update", None)
        if self._attached:
            _WATCHED.discard(self.model)
        self._attached, self._current = False, None

    def _add_step_hooks(self) -> None:
        if self.level == "full" and self._main:
            self._hooks.add()

    def _remove_step_hooks(self) -> None:   # a compiled model keeps them: no recompilation
        if not self._compiled or not self._attached:
            self._hooks.remove()
    # -- steps -----------------------------------------------------------------------------------
    def _start(self, index: int) -> None:
        if len(self._steps) >= BATCH:
            self._current = None
            self._flush()
        self._current = Step(index, len(self._layers), len(self._acts))
        if self._main:
            self._steps.append(self._current)
        self._add_step_hooks()

    def _recording(self) -> Step | None:
        """The step the per-layer hooks add to: None during a one-off measurement of the model (:mod:`gradbook.onepass`)."""
        return None if self.model in MEASURING else self._current

    def _on_root_forward(self, module, args):
        if not torch.is_grad_enabled() or self.model in MEASURING:   # not a training step
            return
        self._open = True
        if self.optimizer is not None:   # all passes until the optimizer steps belong to one step
            if self._count % self.every == 0 and (self._current is None or self._current.index != self._count):
                self._start(self._count)
            return
        if self._count % self.every == 0:
            self._start(self._count)
        else:
            self._current = None
            self._remove_step_hooks()
        self._count += 1

    def _on_root_output(self, module, args, out):
        step = self._recording()
        ys = [y for y in output_tensors(out) if y.requires_grad]   # a tensor, a tuple, a dict, ...
        if step is None or not ys or not self._params:
            return None
        engine = torch.autograd.Variable._execution_engine
        pending = [False]   # one read per backward pass, whichever outputs the loss used

        def read():
            pending[0] = False
            if self._attached:
                self._read(step)
                self._close(step)

        def queue(grad):   # runs as the backward pass starts; the callbacks run when it ends, in order:
            # the second is queued after DDP's own end-of-backward averaging, so it reads averaged .grad
            if not pending[0]:
                pending[0] = True
                engine.queue_callback(lambda: engine.queue_callback(read))
        for y in ys:
            y.register_hook(queue)
        return None

    def _read(self, step: Step) -> None:
        """Norms of the gradients in ``.grad`` now: per layer (its weights) and in total (every parameter),
        from one pass over the gradients."""
        norms = self._grad_norms([p.grad for p in self._params])
        if norms is not None:
            step.total, step.weight = norms

    def _on_optimizer_step(self, optimizer, args, kwargs):
        self._open = True
        if self._count % self.every == 0 and self._current is None:   # no forward pass of the model seen
            self._start(self._count)   # (it runs inside a closure, or the loop calls a submodule, or rank > 0)
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)   # args[0] is the optimizer
        if self._count % self.every or not callable(closure):
            return self._before_update()
        # A closure (LBFGS, Lightning) runs the forward and backward passes inside step(): read after it.

        def read_after(*a, **k):
            out = closure(*a, **k)
            self._before_update()
            return out
        return args[:1], {**{k: v for k, v in kwargs.items() if k != "closure"}, "closure": read_after}

    def _before_update(self) -> None:
        """The optimizer is about to update: read the gradient it will use; keep the weights when this step's
        update ratio is wanted (every ``ratios``-th recorded step; with spikes, also a step with a spike)."""
        if self._count % self.every:
            return
        step = self._current
        self._read(step)
        if not self.ratios or step.total is None:
            return
        due = (self._count // self.every) % self.ratios == 0
        if self.ratios > 1 and self.spikes:   # the spikes of this step, before its update (every rank alike)
            self._summarize(step, self._main or dist.world_size() > 1)
        if due or step.found:
            self._updates.keep()

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        step = self._current if self._count % self.every == 0 else None
        if step is not None and self._updates.kept:
            step.ratio = self._updates.ratio()
        if self.scaler is None:
            self._close(step)

    def _on_scaler_update(self) -> None:
        step = self._current if self._count % self.every == 0 else None
        if step is not None and step.total is None:   # the optimizer did not step
            self._read(step)
            step.skipped = True
        self._close(step)

    def log_loss(self, loss: torch.Tensor | float) -> None:
        """Hand the loss of this step's forward pass to the monitor, before ``optimizer.step()`` (before
        ``loss.backward()`` without an optimizer; on every rank): it is recorded (the mean over a step's
        passes, and over ranks) and loss spikes flagged."""
        if not self._open:
            raise RuntimeError("log_loss(loss) after the step was closed: hand the loss over before "
                               "optimizer.step() (before loss.backward() when watching without an optimizer)")
        if (self._current is not None) if self.optimizer is None else self._count % self.every == 0:
            self._losses.append(torch.as_tensor(loss).detach().reshape(()).double())

    def _summarize(self, step: Step, detect: bool) -> None:
        """The step's total norm, loss and per-layer norms (and update ratio, if taken) to the CPU, with one
        transfer; with ``detect``, its spikes (:class:`gradbook.spikes.Detector`)."""
        loss = torch.stack(self._losses).mean() if self._losses else step.total.new_tensor(float("nan"))
        if self._losses and dist.world_size() > 1:
            torch.distributed.all_reduce(loss)
            loss /= dist.world_size()
        parts = [step.total, loss.reshape(1).to(step.total), step.weight]
        step.values = torch.cat(parts + ([step.ratio] if step.ratio is not None else [])).cpu().numpy()
        if detect and self.spikes and not step.skipped:
            L = len(self._layers)
            ratio = step.values[2 + L:] if step.ratio is not None else None
            step.found = self._detector.check(step.index, step.values[0], step.values[1], step.values[2:2 + L], ratio)

    def _close(self, step: Step | None) -> None:
        """The step is over: its summary numbers to the CPU at once; spikes; exporters."""
        if step is not None and step.total is not None:
            L = len(self._layers)
            if step.values is None:
                self._summarize(step, self._main)
                ratio = step.values[2 + L:] if step.ratio is not None else None
            else:   # summarized before the update: only the ratio is new
                ratio = step.ratio.cpu().numpy() if step.ratio is not None else None
                if self._main and ratio is not None:
                    self._detector.add_ratio(ratio, step.found)
            if self._main:
                self._keep(step, ratio)
        self._losses.clear()
        self._open = False
        if self.optimizer is not None:
            self._count += 1
            self._current = None
            if self._count % self.every:
                self._remove_step_hooks()

    def _keep(self, step: Step, ratio: np.ndarray | None) -> None:
        L = len(self._layers)
        total, loss, weight = step.values[0], step.values[1], step.values[2:2 + L]
        self._extra[step.index] = (total, loss, step.skipped, ratio)
        for s in step.found:
            self._found.append(s)
            if self.spikes == "warn":
                warnings.warn(str(s), SpikeWarning, stacklevel=4)
            if self.on_spike is not None:
                self.on_spike(s)
        if self.export:
            record = StepRecord(step.index, self._names, weight, float(total), ratio, float(loss), step.skipped,
                                step.found, [m for _, m in self._layers])
            for sink in self.export:
                sink(record)

    # -- results ---------------------------------------------------------------------------------
    def _rows(self, steps: list[Step]) -> np.ndarray:
        """One row of numbers per step, with one transfer from the device for all of them."""
        gathered = [s.tensors() for s in steps]
        values = iter(to_numpy([t for ts in gathered for t in ts]))
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
    def trace(self) -> WatchTrace:
        """Everything recorded so far, as a :class:`gradbook.probe.WatchTrace` of NumPy arrays (empty on ranks other than 0)."""
        self._flush()
        L, A = len(self._layers), len(self._acts)
        rows = np.concatenate([*self._done_rows, self._rows(self._steps)])
        steps = np.array(self._done_steps + [s.index for s in self._steps], dtype=int)
        out = WatchTrace([n for n, _ in self._layers], [n for n, _, _ in self._acts], steps)
        for name, value in split_rows(rows, L, A, self.level == "full").items():
            setattr(out, name, value)
        extra = [self._extra.get(int(i), (np.nan, np.nan, False, None)) for i in steps]
        out.total_grad_norm = np.array([e[0] for e in extra], dtype=float)
        out.loss = np.array([e[1] for e in extra], dtype=float)
        out.skipped = np.array([e[2] for e in extra], dtype=bool)
        if self.optimizer is not None:
            out.update_ratio = np.array([np.full(L, np.nan) if e[3] is None else e[3] for e in extra]).reshape(-1, L)
        out.spikes = list(self._found)
        return out
