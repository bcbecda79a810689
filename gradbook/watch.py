"""The always-on probe: :class:`watch` records a :class:`gradbook.records.Trace` during any training loop.

How it stays cheap. The root module's forward pre-hook counts steps; only on a recorded step are the
per-layer hooks attached, so the steps in between cost one Python call. Everything is computed as
tensors on the model's device inside the hooks, and many steps' tensors are moved to the CPU in one
transfer when the results are read, so probing does not force a synchronisation per tensor. Hooks are
forward hooks and tensor hooks (never full backward hooks), so in-place activations such as
``ReLU(inplace=True)`` are measured correctly: a tensor hook registered before an in-place change
receives the gradient with respect to the value before the change.

With an optimizer (``watch(model, optimizer=opt)``) a step is an optimizer step: gradients are read in the
optimizer's step pre-hook (the accumulated gradient, after a GradScaler has unscaled it, after DDP has
averaged it), the update:weight ratio from the weights before and after the optimizer's actual step, and
the step is closed by the step post-hook (or by ``GradScaler.update``, which also sees the steps AMP
skipped). Closing a recorded step moves its few summary numbers to the CPU at once, so that a spike is
flagged the step it happens (:mod:`gradbook.spikes`) and exported (:mod:`gradbook.export`).
"""
from __future__ import annotations

import warnings
import weakref
import numpy as np
import torch
from torch import nn

from . import distributed as dist
from ._checks import choice, positive_int
from .probe import Step, StepHooks, StepRecord, WatchTrace, to_numpy
from .records import ACTIVATION_FIELDS, activation_modules, layers, output_tensors, weight_tensors
from .spikes import THRESHOLD, WINDOW, Detector, Spike, SpikeWarning

__all__ = ["watch", "LEVELS"]

#: ``"norms"``: per-layer weight-gradient norms only (cheap enough to leave on); ``"full"``: everything.
LEVELS = ["full", "norms"]
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
        Count optimizer steps, read gradients as it steps, and (unless ``ratios=False``, which saves a
        copy of the weights per recorded step) record the update:weight ratio of its actual step.
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
    """

    def __init__(self, model: nn.Module, every: int = 1, level: str = "full", *, optimizer=None, scaler=None,
                 spikes=True, window: int = WINDOW, threshold: float = THRESHOLD, on_spike=None, export=(),
                 all_ranks: bool = False, ratios: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"watch needs a torch.nn.Module, got {type(model).__name__}")
        self.model = dist.unwrap(model)
        self.every = positive_int("every", every)
        self.level = choice("level", level, LEVELS)
        self.spikes = choice("spikes", spikes, [True, False, "warn"])
        if scaler is not None and optimizer is None:
            raise ValueError("scaler needs optimizer: watch(model, optimizer=opt, scaler=scaler)")
        self.optimizer, self.scaler, self.on_spike, self.all_ranks = optimizer, scaler, on_spike, bool(all_ranks)
        self.ratios, self._buffers = bool(ratios) and optimizer is not None, None
        self.export = [export] if callable(export) else list(export)
        self._layers = layers(self.model)
        self._detector = Detector([n for n, _ in self._layers], window, threshold)
        self._acts = activation_modules(self.model) if level == "full" else []
        weights = [weight_tensors(m) for _, m in self._layers]
        self._flat_weights = [p for ws in weights for p in ws]
        self._owner = [i for i, ws in enumerate(weights) for _ in ws]
        owner = {id(p): i for p, i in zip(self._flat_weights, self._owner)}
        self._params = [p for p in dict.fromkeys(self.model.parameters()) if p.requires_grad]
        self._param_owner = [owner.get(id(p), -1) for p in self._params]
        self._handles: list = []        # for the whole watch
        self._hooks = StepHooks(self._layers, self._acts, lambda: self._current, lambda: self._attached)
        self._steps: list[Step] = []   # recorded steps not yet converted to numbers
        self._done_steps: list[int] = []
        self._done_rows: list[np.ndarray] = []
        self._extra: dict[int, tuple] = {}   # step: (total norm, loss, skipped, update ratios)
        self._found: list[Spike] = []
        self._losses: list[torch.Tensor] = []
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
        self._handles.append(self.model.register_forward_pre_hook(self._on_root_forward))
        if self.optimizer is None:
            self._handles.append(self.model.register_forward_hook(self._on_root_output))
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
        self._attached = False
        self._current = None

    def _add_step_hooks(self) -> None:
        if self.level == "full" and self._main:
            self._hooks.add()

    def _remove_step_hooks(self) -> None:
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

    def _on_root_forward(self, module, args):
        if not torch.is_grad_enabled():
            return
        self._open = True
        if self.optimizer is not None:   # all passes until the optimizer steps belong to one step
            if self._count % self.every == 0 and (self._current is None or self._current.index != self._count):
                self._start(self._count)
            elif self._count % self.every:
                self._remove_step_hooks()
            return
        if self._count % self.every == 0:
            self._start(self._count)
        else:
            self._current = None
            self._remove_step_hooks()
        self._count += 1

    def _on_root_output(self, module, args, out):
        step = self._current
        ys = [y for y in output_tensors(out) if y.requires_grad]   # a tensor, a tuple, a dict, ...
        if step is None or not ys or not self._params:
            return None
        engine = torch.autograd.Variable._execution_engine
        pending = [False]   # one read per backward pass, whichever outputs the loss used

        def read():
            pending[0] = False
            self._read_and_close(step)

        def queue(grad):   # runs as the backward pass starts; the callbacks run when it ends, in order:
            # the second is queued after DDP's own end-of-backward averaging, so it reads averaged .grad
            if not pending[0]:
                pending[0] = True
                engine.queue_callback(lambda: engine.queue_callback(read))
        for y in ys:
            y.register_hook(queue)
        return None

    def _read_and_close(self, step: Step) -> None:
        if self._attached:
            self._read(step)
            self._close(step)

    def _read(self, step: Step) -> None:
        """Norms of the gradients in ``.grad`` now: per layer (its weights) and in total (every parameter)."""
        grads = [p.grad for p in self._params]
        keep = [k for k, g in enumerate(grads) if g is not None]
        if not keep:
            return
        sq = dist.squared_norms([grads[k] for k in keep])
        step.total = sq.sum().sqrt()
        key = (len(keep), sq.device)
        if getattr(self, "_read_key", None) != key or len(keep) != len(grads):   # cached when all are present
            owned = [(j, self._param_owner[k]) for j, k in enumerate(keep) if self._param_owner[k] >= 0]
            self._read_key = key if len(keep) == len(grads) else None
            self._read_idx = (torch.tensor([j for j, _ in owned], device=sq.device, dtype=torch.long),
                              torch.tensor([i for _, i in owned], device=sq.device, dtype=torch.long))
        rows, idx = self._read_idx
        step.weight = sq.new_zeros(len(self._layers)).index_add_(0, idx, sq[rows]).sqrt()

    def _owner_index(self, device) -> torch.Tensor:
        if getattr(self, "_owner_idx", None) is None or self._owner_idx.device != device:
            self._owner_idx = torch.tensor(self._owner, device=device)
        return self._owner_idx

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
        """The optimizer is about to update: read the gradient it will use, and keep the weights."""
        if self._count % self.every:
            return
        step = self._current
        self._read(step)
        if self.ratios:
            weights = [p.detach() for p in self._flat_weights]
            if self._buffers is None:   # kept between steps: no allocation per step
                self._buffers = [torch.empty_like(dist.local(w)) for w in weights]
            torch._foreach_copy_(self._buffers, [dist.local(w) for w in weights])
            step.before = self._buffers
            step.weight_sq = dist.squared_norms(weights)

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        step = self._current if self._count % self.every == 0 else None
        if step is not None and step.before is not None:
            torch._foreach_sub_(step.before, [dist.local(p.detach()) for p in self._flat_weights])
            sq = dist.squared_norms(step.before, [dist.is_sharded(p) for p in self._flat_weights])
            idx = self._owner_index(sq.device)
            per_layer = [sq.new_zeros(len(self._layers)).index_add_(0, idx, s) for s in (sq, step.weight_sq)]
            step.ratio, step.before = (per_layer[0] / per_layer[1].clamp_min(1e-300)).sqrt(), None
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

    def _close(self, step: Step | None) -> None:
        """The step is over: its summary numbers to the CPU at once; spikes; exporters."""
        if step is not None and step.total is not None:
            loss = torch.stack(self._losses).mean() if self._losses else step.total.new_tensor(float("nan"))
            if self._losses and dist.world_size() > 1:
                torch.distributed.all_reduce(loss)
                loss /= dist.world_size()
            parts = [step.total.reshape(1), loss.reshape(1).to(step.total), step.weight]
            values = torch.cat(parts + ([step.ratio] if step.ratio is not None else [])).cpu().numpy()
            if self._main:
                self._keep(step.index, values, step.ratio is not None, step.skipped)
        self._losses.clear()
        self._open = False
        if self.optimizer is not None:
            self._count += 1
            self._current = None
            self._remove_step_hooks()

    def _keep(self, index: int, values: np.ndarray, has_ratio: bool, skipped: bool) -> None:
        L = len(self._layers)
        total, loss, weight = values[0], values[1], values[2:2 + L]
        ratio = values[2 + L:] if has_ratio else None
        self._extra[index] = (total, loss, skipped, ratio)
        found = [] if (skipped or not self.spikes) else self._detector.check(index, total, loss, weight, ratio)
        for s in found:
            self._found.append(s)
            if self.spikes == "warn":
                warnings.warn(str(s), SpikeWarning, stacklevel=4)
            if self.on_spike is not None:
                self.on_spike(s)
        if self.export:
            record = StepRecord(index, [n for n, _ in self._layers], weight, float(total), ratio, float(loss),
                                skipped, found, [m for _, m in self._layers])
            for sink in self.export:
                sink(record)

    # -- per-layer hooks (level="full") ----------------------------------------------------------
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
        out.weight_grad_norm = rows[:, :L]                 # the layout of Step.row
        if self.level == "full":
            out.grad_norm = rows[:, L:2 * L]
            stats = rows[:, 2 * L:].reshape(len(rows), len(ACTIVATION_FIELDS), A)
            for k, name in enumerate(ACTIVATION_FIELDS):
                setattr(out, name, stats[:, k])
        extra = [self._extra.get(int(i), (np.nan, np.nan, False, None)) for i in steps]
        out.total_grad_norm = np.array([e[0] for e in extra], dtype=float)
        out.loss = np.array([e[1] for e in extra], dtype=float)
        out.skipped = np.array([e[2] for e in extra], dtype=bool)
        if self.optimizer is not None:
            out.update_ratio = np.array([np.full(L, np.nan) if e[3] is None else e[3] for e in extra]).reshape(-1, L)
        out.spikes = list(self._found)
        return out
