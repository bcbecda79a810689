"""Reduced precision: what a floating-point format can hold, what a cast to it loses, which updates it
swallows, and when dynamic loss scaling has collapsed.

A format with ``m`` explicit mantissa bits has ``eps = 2**-m`` (the gap between 1 and the next number), a
largest finite number ``max``, a smallest *normal* number ``smallest_normal`` (full precision) and, below
it, subnormal numbers down to ``smallest_normal * eps``; anything smaller rounds to 0, anything larger than
``max`` (by more than half a gap) to infinity. float16 keeps 10 mantissa bits and 5 exponent bits, so its
numbers span only about 12 decades (6e-8 to 65504); bfloat16 keeps float32's 8 exponent bits (about 83
decades) and only 7 mantissa bits. Mixed-precision training keeps float32 *master weights*, runs the
forward and backward passes in 16 bits and, for float16, scales the loss so that small gradients stay
representable (Micikevicius et al. 2018, "Mixed precision training", ICLR; Kalamkar et al. 2019, "A study
of BFLOAT16 for deep learning training", arXiv:1905.12322). Loss scaling itself is ``torch.amp.GradScaler``;
:class:`gradbook.watch.watch` records the steps it skips, and :func:`skips` reads that record.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ._checks import positive_int
from .batches import call, check_batch, loss_of
from .records import eager, layers, weight_tensors

__all__ = ["FORMATS", "COLLAPSE_RUN", "Range", "ranges", "dtype_of", "Cast", "underflow", "layer_gradients",
           "lost_updates", "Skips", "skips"]

#: The formats of :func:`ranges` by default: the two 16-bit formats of mixed precision and float32.
FORMATS = ("float16", "bfloat16", "float32")
#: Consecutive skipped steps that :func:`skips` calls a collapse: the loss scale has halved 16 times, from
#: GradScaler's default initial scale 2**16 to 1, without a step being taken.
COLLAPSE_RUN = 16


def dtype_of(what: str, value) -> torch.dtype:
    """``value`` as a floating-point ``torch.dtype`` (a dtype, or its name such as ``"bfloat16"``), else a
    ``TypeError`` naming ``what``, the value given and what is allowed."""
    dtype = getattr(torch, value, None) if isinstance(value, str) else value
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{what} must be a floating-point torch dtype or its name (such as torch.float16 or "
                        f"'bfloat16'), got {value!r}")
    return dtype


@dataclass(frozen=True)
class Range:
    """What one floating-point format can hold (from ``torch.finfo``)."""

    name: str
    bits: int
    mantissa: int               #: explicit mantissa (fraction) bits
    max: float                  #: the largest finite number
    smallest_normal: float      #: the smallest number with full precision
    smallest_subnormal: float   #: the smallest number above 0: ``smallest_normal * eps``
    eps: float                  #: the gap between 1 and the next number, ``2**-mantissa``

    @property
    def decades(self) -> float:
        """log10(max / smallest_subnormal): how many orders of magnitude the format spans."""
        return math.log10(self.max / self.smallest_subnormal)


def ranges(dtypes: Sequence = FORMATS) -> list[Range]:
    """One :class:`Range` per floating-point dtype (or dtype name) in ``dtypes``, read from ``torch.finfo``."""
    if isinstance(dtypes, (str, torch.dtype)):
        dtypes = [dtypes]
    out = []
    for value in dtypes:
        dtype = dtype_of("dtypes", value)
        f = torch.finfo(dtype)
        out.append(Range(str(dtype).removeprefix("torch."), f.bits, round(-math.log2(f.eps)), float(f.max),
                         float(f.smallest_normal), float(f.smallest_normal) * float(f.eps), float(f.eps)))
    return out


@dataclass
class Cast:
    """What casting (or computing) tensors in a format did to their entries, one number per tensor. Each is a
    fraction of the entries that are non-zero and finite in the reference."""

    dtype: str
    count: np.ndarray       #: entries non-zero and finite in the reference
    zero: np.ndarray        #: flushed to exactly 0
    subnormal: np.ndarray   #: non-zero but below the smallest normal number (precision partly lost)
    overflow: np.ndarray    #: became infinite or NaN

    @property
    def lost(self) -> np.ndarray:
        """Flushed to zero or overflowed: the entries whose value is gone."""
        return self.zero + self.overflow


def _tensor_list(what: str, value) -> list[torch.Tensor]:
    items = [value] if isinstance(value, torch.Tensor) else value
    try:
        items = list(items)
    except TypeError:
        items = None
    if not items or not all(isinstance(t, torch.Tensor) for t in items):
        raise TypeError(f"{what} must be a tensor or a non-empty sequence of tensors, got {type(value).__name__}")
    return items


def underflow(tensors, dtype, reference=None) -> Cast:
    """The fraction of entries of each tensor that a format flushes to zero, leaves subnormal, or overflows.

    Without ``reference``, ``tensors`` (a tensor or a sequence of them) are cast to ``dtype``: what a format
    does to exact values. With ``reference`` (the same tensors computed in higher precision, e.g. float32
    gradients beside ones computed under float16 autocast), ``tensors`` are taken as they are, already
    computed, and compared entry by entry: a value lost anywhere in the computation counts, and one saved
    by loss scaling does not. Either way only entries non-zero and finite in the reference count; an entry
    is subnormal if it is non-zero and below ``dtype``'s smallest normal number.
    """
    dtype = dtype_of("dtype", dtype)
    items = _tensor_list("tensors", tensors)
    refs = items if reference is None else _tensor_list("reference", reference)
    if len(refs) != len(items):
        raise ValueError(f"reference has {len(refs)} tensors but tensors has {len(items)}")
    tiny = torch.finfo(dtype).smallest_normal
    rows = []
    for t, r in zip(items, refs):
        if t.shape != r.shape:
            raise ValueError(f"a tensor of shape {tuple(t.shape)} has a reference of shape {tuple(r.shape)}")
        c, r = (t.detach().to(dtype) if reference is None else t.detach()).double(), r.detach().double()
        keep = (r != 0) & torch.isfinite(r)
        n = int(keep.sum())
        c = c[keep]
        counts = [(c == 0).sum(), ((c != 0) & (c.abs() < tiny)).sum(), (~torch.isfinite(c)).sum()]
        rows.append([n] + [int(k) / n if n else float("nan") for k in counts])
    a = np.array(rows, dtype=float).reshape(-1, 4)
    return Cast(str(dtype).removeprefix("torch."), a[:, 0].astype(int), a[:, 1], a[:, 2], a[:, 3])


def layer_gradients(model: nn.Module, inputs, targets=None, loss_fn: Callable | None = None, *,
                    autocast=None, scale: float = 1.0) -> list[torch.Tensor]:
    """Each layer's weight gradient (its weight tensors flattened into one), from one forward pass under
    ``torch.autocast(dtype=autocast)`` (None: none) and the backward pass of ``scale`` times the loss, then
    divided by ``scale`` in float32 (exact for a power of 2), as a loss scaler's unscaling is. Layers are
    :func:`gradbook.records.layers`, from the input side; ``.grad`` and the buffers are left as they were."""
    model = eager(model)
    check_batch(inputs, targets, default_loss=loss_fn is None)
    dtype = None if autocast is None else dtype_of("autocast", autocast)
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    saved, buffers = [p.grad for p in params], [(b, b.detach().clone()) for b in model.buffers()]
    for p in params:
        p.grad = None
    try:
        device = params[0].device.type if params else "cpu"
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            loss = loss_of(call(model, inputs), targets, loss_fn)
        (loss.float() * scale).backward()
        out = []
        for _, m in layers(model):
            grads = [torch.zeros_like(w) if w.grad is None else w.grad for w in weight_tensors(m)]
            out.append(torch.cat([g.detach().float().reshape(-1) for g in grads]) / scale)
        return out
    finally:
        with torch.no_grad():
            for b, old in buffers:
                b.copy_(old)
        for p, g in zip(params, saved):
            p.grad = g


def lost_updates(param: torch.Tensor, update: torch.Tensor, dtype) -> float:
    """The fraction of a weight tensor's entries whose update does not change it when stored in ``dtype``.

    The weights ``param`` are rounded to ``dtype``, ``update`` (the step the optimizer adds, e.g. ``-lr * g``)
    is added exactly and the sum rounded to ``dtype``; an entry is lost when the stored weight is the same as
    before. Only entries with a non-zero update count (NaN if there are none). An update is lost when it is
    below half the gap between the weight and its neighbours, about ``eps / 2`` of the weight's size
    (:class:`Range`): in bfloat16, ``|update| / |w|`` below about 2**-8 to 2**-9.
    """
    dtype = dtype_of("dtype", dtype)
    for what, t in (("param", param), ("update", update)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what} must be a tensor, got {type(t).__name__}")
    if param.shape != update.shape:
        raise ValueError(f"update has shape {tuple(update.shape)} but param has shape {tuple(param.shape)}")
    w, u = param.detach().to(dtype), update.detach().double()
    moved = u != 0
    n = int(moved.sum())
    if n == 0:
        return float("nan")
    same = (w.double() + u).to(dtype) == w
    return int((same & moved).sum()) / n


@dataclass
class Skips:
    """The steps a loss scaler skipped: how many, the longest run of them, and whether it collapsed."""

    fraction: float
    longest_run: int
    collapsed: bool

    def __str__(self) -> str:
        what = "loss-scale collapse" if self.collapsed else "healthy"
        return f"{what}: {self.fraction:.1%} of steps skipped, longest run {self.longest_run}"


def skips(skipped, run: int = COLLAPSE_RUN) -> Skips:
    """Read a loss scaler's skipped steps: ``skipped`` is a boolean array over steps, or anything with a
    ``skipped`` attribute (the :class:`gradbook.probe.WatchTrace` of ``gb.watch(..., scaler=scaler)``).

    Healthy dynamic loss scaling skips isolated steps: the scale grows until a gradient overflows, halves,
    and the next step fits again. Every skip halves the scale, so ``run`` skips in a row mean the scale fell
    by ``2**run`` without a step being taken: the overflow is not in the scaled gradient but in the forward
    pass or the unscaled gradient itself, and no scale can fix it. That is a *collapse*. A trace recorded
    with ``every > 1`` holds every ``every``-th step, and the run counts recorded steps.
    """
    run = positive_int("run", run)
    values = getattr(skipped, "skipped", skipped)
    a = np.asarray(values)
    if a.ndim != 1 or a.size == 0 or not (a.dtype == bool or np.isin(a, (0, 1)).all()):
        raise ValueError(f"skipped must be a non-empty 1-d boolean array over steps, got {values!r}")
    a = a.astype(bool)
    longest = current = 0
    for s in a:
        current = current + 1 if s else 0
        longest = max(longest, current)
    return Skips(float(a.mean()), longest, longest >= run)
