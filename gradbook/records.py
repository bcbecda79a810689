"""What gradbook measures on any ``torch.nn.Module``, and the records it keeps.

*Which modules.* A model's **layers** are its Linear, Conv, RNN, Bilinear, Embedding, EmbeddingBag and
MultiheadAttention modules that hold a trainable parameter of their own, in registration order; a layer's
**weights** are its parameters whose name contains ``weight`` (biases left out; for MultiheadAttention its
``in_proj_weight``, the queries', keys' and values' projection, whose ``out_proj`` is a Linear layer of its
own); its **activations** are the modules whose nonlinearity :mod:`gradbook.activations`
knows; its **recurrent** modules are torch's RNN/LSTM/GRU and anything with a ``states`` method
(:class:`gradbook.nets.ElmanRNN`, :class:`gradbook.nets.LSTM`).

*The records.* A :class:`Snapshot` holds one step's per-layer numbers, a :class:`Trace` the same numbers
stacked over recorded steps. Their fields, :data:`FIELDS`, are listed once, here.

*Reading values.* :func:`output_tensor` is the tensor a module's output stands for; :func:`norms` takes
2-norms that stay accurate for the tiny and huge gradients this book is about; :func:`to_numpy` reads many
tensors to the host at once, and :func:`split_rows` cuts rows of numbers into the fields.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch
from torch import nn

from . import activations as _acts

__all__ = ["LAYER_TYPES", "FIELDS", "Fields", "Snapshot", "Trace", "layers", "weight_tensors", "weight_norms", "activation_modules",
           "recurrent_modules", "is_layer", "is_recurrent", "output_tensor", "output_tensors", "norms", "eager",
           "Inventory", "to_numpy", "split_rows"]

#: The module types measured as layers (those with a trainable parameter).
LAYER_TYPES = (nn.Linear, nn.Bilinear, nn.Embedding, nn.EmbeddingBag, nn.MultiheadAttention, nn.RNNBase,
               nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

@dataclass(kw_only=True)
class Fields:
    """The per-layer quantities of a record, listed once (:data:`FIELDS`): two per layer, then four per
    activation module. Each is an array, or None when it was not measured (``level="norms"``).

    * ``weight_grad_norm``: ||dL/dW|| over the layer's weight tensors, read from ``.grad`` when the
      backward pass ends;
    * ``grad_norm``: ||dL/dy||, the back-propagated gradient at the layer's output y (the whole batch;
      for a module called several times in one pass, such as an RNN cell, all its calls together);
    * ``act_mean``, ``act_std``: mean and standard deviation of the activation's output, all entries;
    * ``saturated``: the fraction of entries whose input x has phi'(x) < 0.1 gamma
      (:meth:`gradbook.activations.Activation.saturated`);
    * ``dead``: the fraction of units (non-batch positions) whose derivative is exactly 0 for every example.
    """

    weight_grad_norm: np.ndarray | None = None
    grad_norm: np.ndarray | None = None
    act_mean: np.ndarray | None = None
    act_std: np.ndarray | None = None
    saturated: np.ndarray | None = None
    dead: np.ndarray | None = None


#: The names of the per-layer quantities, in the order of :class:`Fields`.
FIELDS = [f.name for f in fields(Fields)]
LAYER_FIELDS, ACTIVATION_FIELDS = FIELDS[:2], FIELDS[2:]


@dataclass
class Snapshot(Fields):
    """Per-layer measurements of one backward pass (:class:`Fields`); arrays run from the input side to the
    output side."""

    step: int
    layers: list[str]
    activations: list[str]


@dataclass
class Trace(Fields):
    """Snapshots stacked over the recorded steps: each array of :class:`Fields` has shape (recorded steps, layers)."""

    layers: list[str]
    activations: list[str]
    steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, i: int) -> Snapshot:
        i = range(len(self))[i]
        return Snapshot(int(self.steps[i]), self.layers, self.activations,
                        **{k: (None if getattr(self, k) is None else getattr(self, k)[i]) for k in FIELDS})

    def select(self, keep) -> "Trace":
        """The recorded steps picked by ``keep`` (a boolean mask or indices over the recorded steps)."""
        return replace(self, steps=self.steps[keep],
                       **{k: (None if getattr(self, k) is None else getattr(self, k)[keep]) for k in FIELDS})


def is_layer(module: nn.Module) -> bool:
    """Whether gradbook measures ``module`` as a layer: one of :data:`LAYER_TYPES` with a trainable parameter of its own."""
    return isinstance(module, LAYER_TYPES) and any(p.requires_grad for _, p in _own(module))


def _own(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """A module's own (name, parameter) pairs, as ``module.named_parameters(recurse=False)`` lists them, read
    from its parameter dictionary without a generator (a third of a walk's cost when done for every module)."""
    return [(n, p) for n, p in module._parameters.items() if p is not None] if module._parameters else []


class Inventory:
    """What gradbook reads of a model's structure, from one walk over its modules, for a caller that needs
    several of these lists (``gb.diagnose`` needs them all): on the 20-layer MLP of
    ``benchmarks/run.py``, one walk right after a training step (caches cold) takes about 0.15 ms, a
    hundredth of the step.

    ``modules``: ``model.named_modules()``; ``layers``: the (name, module) pairs of :func:`layers`;
    ``weights``: each layer's :func:`weight_tensors`; ``acts``: :func:`activation_modules`;
    ``named_params``: ``model.named_parameters()`` (each parameter once); ``params``: the trainable ones;
    ``buffers``: ``model.buffers()``; ``compiled``: whether a module inside was compiled on its own
    (``module.compile()``).
    It describes the model when it was made: make another after changing the model's modules or which
    parameters require gradients."""

    def __init__(self, model: nn.Module):
        self.modules = list(model.named_modules())
        self.named_params, self.buffers, self.layers, self.weights, self.acts = [], [], [], [], []
        seen = set()
        self.compiled = False
        for name, m in self.modules:
            self.compiled = self.compiled or getattr(m, "_compiled_call_impl", None) is not None
            for b in m._buffers.values() if m._buffers else ():
                if b is not None and id(b) not in seen:
                    seen.add(id(b))
                    self.buffers.append(b)
            own = _own(m)
            for n, p in own:
                if id(p) not in seen:
                    seen.add(id(p))
                    self.named_params.append((f"{name}.{n}" if name else n, p))
            if isinstance(m, LAYER_TYPES):
                trainable = [(n, p) for n, p in own if p.requires_grad]
                if trainable:
                    self.layers.append((name, m))
                    self.weights.append(_weights(trainable))
            elif (act := _acts.from_module(m)) is not None:
                self.acts.append((name, m, act))
        self.params = [p for _, p in self.named_params if p.requires_grad]


def _named(model) -> list:
    return list(model.named_modules()) if isinstance(model, nn.Module) else model


def layers(model) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs that gradbook measures as layers (:func:`is_layer`), in registration order.
    ``model``: a module, the list of its ``named_modules()`` or its :class:`Inventory` (one walk less)."""
    if isinstance(model, Inventory):
        return model.layers
    return [(n, m) for n, m in _named(model) if is_layer(m)]


def eager(model: nn.Module) -> nn.Module:
    """The module a model compiled with ``torch.compile`` wraps (measured in eager mode: the same numbers, and no
    graph breaks or recompilations caused by measuring hooks); any other module itself."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) and type(model).__name__ == "OptimizedModule" else model


def weight_tensors(module: nn.Module) -> list[torch.Tensor]:
    """A layer's trainable weight tensors (parameters whose name contains 'weight'; all if none)."""
    return _weights([(n, p) for n, p in _own(module) if p.requires_grad])


def _weights(own: list) -> list[torch.Tensor]:
    """The weights among a layer's own trainable (name, parameter) pairs: those named 'weight'; all if none."""
    return [p for n, p in own if "weight" in n] or [p for _, p in own]


def weight_norms(named, grads: bool = False, squared=None) -> np.ndarray:
    """||W|| of each layer of ``named`` ((name, module) pairs, as :func:`layers` lists them, or an
    :class:`Inventory`) over its :func:`weight_tensors`, from one pass over the weights (:func:`norms`:
    accurate for tiny and huge entries); 0 for a layer without weights. With ``grads``, ||dL/dW|| from
    their ``.grad`` (0 for a layer that received none). ``squared``: the function that takes the tensors'
    squared norms (default :func:`norms` squared; :func:`gradbook.distributed.squared_norms` sums FSDP's
    shards over the ranks)."""
    weights = named.weights if isinstance(named, Inventory) else [weight_tensors(m) for _, m in named]
    tensors = [(i, w.grad if grads else w.detach()) for i, ws in enumerate(weights) for w in ws
               if not grads or w.grad is not None]
    if not tensors:
        return np.zeros(len(weights))
    sq = squared([w for _, w in tensors]) if squared is not None else norms([w for _, w in tensors]) ** 2
    return np.sqrt(np.bincount([i for i, _ in tensors], weights=sq.cpu().numpy(), minlength=len(weights)))


def activation_modules(model) -> list[tuple[str, nn.Module, _acts.Activation]]:
    """The (name, module, Activation) triples of the activation modules gradbook knows, in order.
    ``model``: a module, the list of its ``named_modules()`` or its :class:`Inventory`."""
    if isinstance(model, Inventory):
        return model.acts
    out = []
    for n, m in _named(model):
        act = _acts.from_module(m)
        if act is not None:
            out.append((n, m, act))
    return out


def is_recurrent(module: nn.Module) -> bool:
    """Whether ``module`` is recurrent: torch's RNN/LSTM/GRU, or a module whose class has a ``states`` method."""
    return isinstance(module, nn.RNNBase) or callable(getattr(type(module), "states", None))


def recurrent_modules(model) -> list[nn.Module]:
    """The model's recurrent modules (:func:`is_recurrent`). ``model``: a module, the list of its
    ``named_modules()`` or its :class:`Inventory`."""
    return [m for _, m in (model.modules if isinstance(model, Inventory) else _named(model)) if is_recurrent(m)]


def output_tensor(out) -> torch.Tensor | None:
    """The tensor a module's output stands for: the output itself, or the first entry of a tuple or list
    (``nn.RNN`` returns ``(output, h_n)``); None if there is none."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def output_tensors(out) -> list[torch.Tensor]:
    """Every tensor in a model's output, however nested in tuples, lists and dicts (values in order): a
    probe that must see the backward pass start can hook the ones that require a gradient."""
    if isinstance(out, torch.Tensor):
        return [out]
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    return [t for item in items for t in output_tensors(item)]


#: float32 norms outside this range may have lost accuracy to underflow or overflow.
SAFE_RANGE = (1e-15, 1e15)


def _values(t: torch.Tensor) -> torch.Tensor:
    """The stored values of a sparse tensor, whose norm is the tensor's (duplicate COO entries summed first)."""
    if t.layout == torch.strided:
        return t
    return t.coalesce().values() if t.layout == torch.sparse_coo else t.values()


def norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of each tensor (float64, on the tensors' device), accurate even for float32 gradients
    of 1e-20 or 1e20.

    torch's float32 norm squares entries in float32, so entries below ~1e-19 underflow (a vanishing
    gradient would read as 0) and entries above ~1e19 overflow. On the CPU, where checking a value costs
    nothing, norms are taken in the tensor's dtype and the few outside ``SAFE_RANGE`` are recomputed
    in float64; on an accelerator every norm is taken in float64, which avoids a synchronisation.
    """
    lo, hi = SAFE_RANGE
    if any(t.layout != torch.strided for t in tensors):   # a sparse gradient (nn.Embedding(sparse=True)): its values
        tensors = [_values(t) for t in tensors]
    if torch.compiler.is_compiling():   # inside a torch.compile graph: no .item(), which would break it
        return torch.stack([torch.linalg.vector_norm(t, dtype=torch.float64) for t in tensors])
    if len(tensors) == 1 and tensors[0].device.type == "cpu":   # the common case in a tensor hook
        n = torch.linalg.vector_norm(tensors[0])
        if tensors[0].dtype == torch.float64 or lo <= n.item() <= hi:
            return n.double().reshape(1)
        return torch.linalg.vector_norm(tensors[0], dtype=torch.float64).reshape(1)
    if tensors[0].device.type != "cpu":
        return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float64))
    raw = torch._foreach_norm(tensors)
    values = (torch.stack(raw) if len({n.dtype for n in raw}) == 1 else torch.stack([n.double() for n in raw])).tolist()
    for i, v in enumerate(values):   # checked on the host: no tensor operation per check
        if not lo <= v <= hi and tensors[i].dtype != torch.float64:
            values[i] = torch.linalg.vector_norm(tensors[i], dtype=torch.float64).item()
    return torch.from_numpy(np.array(values, dtype=np.float64))


def to_numpy(tensors: list[torch.Tensor]) -> list[np.ndarray]:
    """Each tensor as a float64 NumPy array, with one transfer from the device for all of them (the
    tensors are grouped by dtype and shape class, a few stacking calls rather than one call per tensor).
    On the CPU each float32 or float64 tensor is read in place, with no stacking (a scalar as one element)."""
    if not tensors:
        return []
    if all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) for t in tensors):
        return [t.detach().numpy().astype(np.float64).reshape(-1) for t in tensors]
    device, groups = tensors[0].device, {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.dim() == 0), []).append(i)
    parts, order = [], []
    for (_, scalar), idx in groups.items():
        ts = [tensors[i].detach() for i in idx]
        parts.append((torch.stack(ts) if scalar else torch.cat([t.reshape(-1) for t in ts])).to(device, torch.float64))
        order += idx
    flat = (torch.cat(parts) if len(parts) > 1 else parts[0]).cpu().numpy()
    out: list = [None] * len(tensors)
    for i, piece in zip(order, np.split(flat, np.cumsum([tensors[i].numel() for i in order])[:-1])):
        out[i] = piece
    return out


def split_rows(rows: np.ndarray, n_layers: int, n_acts: int, full: bool) -> dict[str, np.ndarray | None]:
    """The fields (:data:`FIELDS`) of rows laid out by :meth:`gradbook.probe.Step.row`, each of shape
    (rows, layers or activations); without ``full`` (``level="norms"``) only the weight-gradient norms."""
    L, (weight, grad) = n_layers, LAYER_FIELDS
    out = dict.fromkeys(FIELDS)
    out[weight] = rows[:, :L]
    if full:
        out[grad] = rows[:, L:2 * L]
        stats = rows[:, 2 * L:].reshape(len(rows), len(ACTIVATION_FIELDS), n_acts)
        for k, name in enumerate(ACTIVATION_FIELDS):
            out[name] = stats[:, k]
    return out
