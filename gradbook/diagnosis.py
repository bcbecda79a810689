"""A verdict on a model's gradients, with the evidence and the remedies: :func:`diagnose`.

The verdict is ``"vanishing"``, ``"exploding"`` or ``"healthy"``. It rests on three profiles, each a
sequence of numbers along the direction a signal travels, summarised by how much it changes end to end:

* **backward**: each layer's *relative gradient* ``||dL/dW|| / ||W||`` (the step plain SGD takes per
  unit learning rate, relative to the weights: ``lr`` times it is the layer's update:weight ratio),
  from the output layer back to the input layer;
* **forward**: the standard deviation of each activation layer's output, from the input side on (a
  forward signal that collapses or blows up takes every gradient with it, even when the backward
  profile is flat: He et al. 2015's 30-layer ReLU net with Xavier init);
* **through time** (sequence models only): ``||dL/dx_t||`` for each time step t of the input, from the
  last step back to the first.

The change end to end is ``exp(slope * (n - 1))``, with the slope of the log-profile estimated robustly
(the median of all pairwise slopes, Theil-Sen), so one odd layer, such as a read-out with another
shape, does not decide the verdict.

Threshold. Mean-field theory (Schoenholz et al. 2017) gives the squared gradient norm a factor chi per
layer, so ``depth`` layers scale it by ``chi**depth = exp(-depth / xi)`` with the depth scale
``xi = -1 / ln(chi)``; networks train when the depth is below about ``6 xi``. A profile whose squared
norm changes by more than ``e**6`` end to end (a norm ratio beyond ``e**3``, about 20) is therefore
deeper than six depth scales: that is the line drawn here, on the same footing for vanishing (a
decrease) and exploding (an increase). ``Diagnosis.depth_scales`` reports how many depth scales
each profile spans, so a reader can see how close to the line a model is. A non-finite loss or
gradient is always ``"exploding"``.

What is left out, and why (each one is said in ``Diagnosis.notes`` and the report):

* **Embeddings** (``nn.Embedding``, ``nn.EmbeddingBag``) are measured and reported but kept out of the
  backward profile: their gradient is sparse (only the rows of the tokens in the batch receive one) and
  their relative gradient follows their initial scale (std 1 or 0.02) and the vocabulary's size, not
  the depth the gradient has travelled. For a token model with a recurrent layer, the gradient through
  time is read at the embedding's output.
* **Attention.** ``nn.MultiheadAttention`` is a layer of its own, measured by its ``in_proj_weight``
  (queries, keys, values); its ``out_proj`` is a Linear layer whose weight the attention uses without
  calling it, so its ``|dL/dy|`` is not measured (n/a). The largest attention logit is reported
  (:mod:`gradbook.makeup`).
* **Activations gradbook does not know** (``nn.SiLU``, ``torch.sigmoid`` or ``F.relu`` called in a
  ``forward``) have no derivative in :mod:`gradbook.activations`, so no forward statistics: when no
  activation is measured there is no forward profile, and the report says which activations were seen
  and not measured instead of printing a flat one. Their names still reach the remedies.
* **A profile shorter than three points** shows no trend through depth: it is not used. A model with
  fewer than three layers besides its embeddings has no depth to vanish or explode through, and is
  healthy on that count; a deeper model whose layers mostly received no gradient (frozen or unused)
  gets the verdict ``"cannot tell"``, with the reason.

Before any verdict the batch is checked (:mod:`gradbook.batches`): non-finite inputs, an empty batch, a
NumPy array or mismatched batch sizes are errors that name the argument. A non-finite loss at
initialization is the verdict ``"non-finite"``, with the first module whose output was not finite.

Mixed precision. ``autocast=torch.bfloat16`` (or ``torch.float16``) runs the forward pass under
``torch.autocast``; the backward pass uses no loss scaling, so every gradient is unscaled by
construction (a ``GradScaler`` of the training loop is not involved). Parameters stay in their own dtype,
and so do their ``.grad``; with float16, gradients below about 6e-8 flush to zero inside the pass, and a
layer that received none is left out as unreached. A model compiled with ``torch.compile`` is diagnosed through the
module it compiled, in eager mode (:func:`gradbook.records.eager`): the same numbers, and no warnings.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from .batches import check_lr, first_nonfinite
from .profiles import crossing, log_change, log_points
from .makeup import Makeup, describe
from .measure import evidence
from .onepass import kept_buffers
from .records import LAYER_TYPES, Inventory, Trace, activation_modules, eager, layers, recurrent_modules, weight_norms
from .remedies import Remedy, cautions, prescribe
from .theory import TRAINABLE_DEPTH_SCALES as THRESHOLD

__all__ = ["diagnose", "from_trace", "Diagnosis", "VERDICTS", "MIN_POINTS"]

#: The verdicts :func:`diagnose` can give.
VERDICTS = ["vanishing", "exploding", "healthy", "cannot tell", "non-finite"]
#: A profile needs this many measured points to show a trend through depth.
MIN_POINTS = 3

@dataclass
class Diagnosis:
    """The result of :func:`diagnose`. Per-layer arrays run from the input side to the output side."""

    verdict: str
    layers: list[str]
    weight_grad_norm: np.ndarray
    weight_norm: np.ndarray
    relative_grad: np.ndarray
    grad_norm: np.ndarray
    activations: list[str]
    act_std: np.ndarray
    saturated: np.ndarray
    dead: np.ndarray
    time_grad: np.ndarray | None
    depth_scales: dict[str, float]
    start: str | None
    reason: str
    remedies: list[Remedy] = field(default_factory=list)
    lr: float | None = None
    nonfinite: str | None = None
    makeup: Makeup | None = None
    notes: list[str] = field(default_factory=list)
    loss: float | None = None
    cautions: list[Remedy] = field(default_factory=list)

    @property
    def change(self) -> dict[str, float]:
        """The factor by which each profile's norm changes end to end: exp(depth_scales / 2)."""
        return {k: float(np.exp(v / 2)) for k, v in self.depth_scales.items()}

    @property
    def update_ratio(self) -> np.ndarray | None:
        """``lr * ||dL/dW|| / ||W||`` per layer (the update:weight ratio of one plain SGD step), if ``lr`` was given."""
        return None if self.lr is None else self.lr * self.relative_grad

    def report(self) -> str:
        """A readable text report: verdict, evidence per profile and per layer, remedies. The figure of the
        same evidence is :func:`gradbook.plot.diagnosis`."""
        out = [f"Verdict: {self.verdict.upper()}. {self.reason}"]
        if self.start is not None:
            out.append(f"The trouble starts at: {self.start}")
        for name, ch in self.change.items():
            out.append(f"  {name:<8} profile changes {ch:.3g}x end to end "
                       f"({self.depth_scales[name]:+.1f} depth scales; the line is +-{THRESHOLD:g})")
        out.extend(f"  Note: {n}" for n in self.notes)
        out.append("")
        out.append(f"{'layer':<28}{'|dL/dW|':>11}{'|dL/dW|/|W|':>13}{'|dL/dy|':>11}"
                   + (f"{'update ratio':>14}" if self.lr is not None else ""))
        ratio = self.update_ratio
        for i, name in enumerate(self.layers):
            g = f"{self.grad_norm[i]:>11.3g}" if np.isfinite(self.grad_norm[i]) or self.nonfinite else f"{'n/a':>11}"
            row = f"{name[:27]:<28}{self.weight_grad_norm[i]:>11.3g}{self.relative_grad[i]:>13.3g}{g}"
            if ratio is not None:
                row += f"{ratio[i]:>14.3g}"
            out.append(row)
        if self.activations:
            out.append("")
            out.append(f"{'activation':<28}{'output std':>11}{'saturated':>11}{'dead':>8}")
            for j, name in enumerate(self.activations):
                out.append(f"{name[:27]:<28}{self.act_std[j]:>11.3g}{self.saturated[j]:>11.1%}{self.dead[j]:>8.1%}")
        if self.remedies:
            out.append("")
            out.append("Remedies, most promising first:")
            out.extend(f"  {k}. {r}" for k, r in enumerate(self.remedies, 1))
        if self.cautions:
            out.append("")
            out.append("Cautions (risks a gradient profile does not show):")
            out.extend(f"  - {r}" for r in self.cautions)
        return "\n".join(out)

    def __str__(self) -> str:
        return self.report()


def _time_dim(inv: Inventory, inputs) -> int | None:
    """The time axis of a sequence model's input (3-D float features, or 2-D integer tokens fed to an
    embedding), or None for models that are not sequence models (``inv``: the model's inventory)."""
    if not isinstance(inputs, torch.Tensor):
        return None
    tokens = inputs.dim() == 2 and not inputs.is_floating_point() and any(
        isinstance(m, nn.Embedding) for _, m in inv.modules)
    if not (tokens or (inputs.dim() == 3 and inputs.is_floating_point())):
        return None
    rnns = recurrent_modules(inv)
    if not rnns:
        return None
    return 0 if any(isinstance(m, nn.RNNBase) and not m.batch_first for m in rnns) else 1


def diagnose(model: nn.Module, inputs, targets=None, loss_fn: Callable | None = None, *,
             lr: float | None = None, time_dim: int | None = None,
             autocast: torch.dtype | None = None) -> "Diagnosis":
    """Measure one batch and say whether ``model``'s gradients vanish, explode, or are healthy.

    Parameters
    ----------
    model : nn.Module
        Any module: MLPs, convolutional nets, ``nn.RNN``/``nn.LSTM``/``nn.GRU``, transformers, token
        models with embeddings, models compiled with ``torch.compile``. Its parameters' ``.grad`` and its buffers
        (BatchNorm statistics) are left as they were.
    inputs, targets
        One batch. ``inputs`` is a tensor, a tuple of positional arguments or a dict of keyword arguments
        of ``model``. The loss is ``loss_fn(output, targets)`` on exactly what the model returned; by
        default cross-entropy for integer targets (class scores on axis 1 or on the last axis), mean
        squared error for float targets, ``sum(output^2)/2`` without targets. Both are checked first.
    lr : float, optional
        The learning rate of plain SGD, to report update:weight ratios (``lr * ||dL/dW|| / ||W||``)
        against the rule of thumb of about 1e-3.
    time_dim : int, optional
        The time axis of a sequence model's input. By default 1 (or 0 when the model holds an
        ``nn.RNNBase`` with ``batch_first=False``) for 3-D float inputs, or 2-D token inputs, of models
        with a recurrent layer; the gradient at each input step is then measured too.
    autocast : torch.dtype, optional
        Run the forward pass under ``torch.autocast`` in this dtype (mixed precision); see the module's notes.

    Returns
    -------
    Diagnosis
        ``.verdict`` (one of :data:`VERDICTS`), the per-layer evidence, ``.start`` (where the trouble
        starts), ``.notes`` (what was left out and why), ``.remedies`` and ``.report()``;
        :func:`gradbook.plot.diagnosis` draws it. The thresholds are explained in :mod:`gradbook.diagnosis`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"diagnose needs a torch.nn.Module, got {type(model).__name__}")
    lr = check_lr(lr)
    if time_dim is not None and time_dim not in (0, 1):
        raise ValueError(f"time_dim must be 0 or 1 (the time axis of a (batch, time, features) input), got {time_dim!r}")
    if autocast is not None and autocast not in (torch.bfloat16, torch.float16):
        raise ValueError(f"autocast must be None, torch.bfloat16 or torch.float16, got {autocast!r}")
    model = eager(model)
    inv = Inventory(model)
    named = inv.layers
    if not named:
        raise ValueError("the model has no trainable Linear, Conv, RNN, attention or Embedding layer to diagnose")
    dim = time_dim if time_dim is not None else _time_dim(inv, inputs)
    ev = evidence(model, inputs, targets, loss_fn, time_dim=dim, autocast=autocast, inventory=inv)
    if not np.isfinite(ev.loss):
        return _nonfinite_loss(model, named, inputs, ev, lr, autocast)
    snap = ev.snapshot
    return _from_evidence(model, named, snap.weight_grad_norm, snap.grad_norm, snap.act_std, snap.saturated,
                          snap.dead, ev.time_grad, lr, ev.makeup, ev.loss, ev.weight_norm, inv.acts)


def _nonfinite_loss(model, named, inputs, ev, lr, autocast) -> "Diagnosis":
    """The verdict "non-finite": the loss at initialization is NaN or inf; where it first appeared."""
    device = next(model.parameters()).device.type
    with kept_buffers(model), torch.autocast(device, dtype=autocast, enabled=autocast is not None):
        where = first_nonfinite(model, inputs) or "the loss function (every module's output is finite)"
    nan = np.full(len(named), np.nan)
    acts = [n for n, _, _ in activation_modules(model)]
    d = Diagnosis("non-finite", [n for n, _ in named], nan, ev.weight_norm, nan, nan, acts,
                  np.full(len(acts), np.nan), np.full(len(acts), np.nan), np.full(len(acts), np.nan), None, {},
                  where, f"the loss is {ev.loss} before any training step; it first turns non-finite in {where}",
                  lr=lr, nonfinite=where, makeup=ev.makeup, loss=ev.loss)
    d.remedies = prescribe(d, model, ev.makeup)
    return d


def from_trace(model: nn.Module, trace: Trace, lr: float | None = None) -> Diagnosis:
    """A :class:`Diagnosis` over a window of training steps recorded by :class:`gradbook.watch.watch`.

    Each per-layer quantity is the median over the recorded steps of ``trace`` (which must have been
    recorded with ``level="full"``), so one unusual batch does not decide the verdict; the weights'
    norms are the model's current ones. For a :class:`gradbook.watch.watch` ``w``:
    ``from_trace(model, w.trace)``.
    """
    if trace.act_std is None:
        raise ValueError("diagnosing a trace needs level='full' (it has only weight-gradient norms); "
                         "watch the model with level='full'")
    if len(trace) == 0:
        raise ValueError("the trace is empty: no step has been recorded yet")
    named = layers(model)
    if trace.layers != [n for n, _ in named]:
        raise ValueError("the trace was not recorded on this model (its layers differ)")
    with warnings.catch_warnings():   # all-NaN columns (layers never reached) stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        med = {k: np.nanmedian(getattr(trace, k), axis=0) for k in ("grad_norm", "act_std", "saturated", "dead")}
        wg = trace.weight_grad_norm
        # a non-finite weight gradient on any step of the window is reported, not averaged away
        wmed = np.where(np.isfinite(wg).all(axis=0), np.nanmedian(wg, axis=0), np.inf)
    diag = _from_evidence(model, named, wmed, med["grad_norm"], med["act_std"], med["saturated"], med["dead"], None,
                          check_lr(lr))
    skipped = getattr(trace, "skipped", ())   # a gradbook.watch trace records the steps AMP skipped
    diag.cautions = cautions(diag, model, diag.makeup, skipped if len(skipped) == len(trace) else ())
    return diag


def _profiles(named, rel, act_std, tgrad, makeup: Makeup) -> tuple[dict, list[str]]:
    """The profiles the verdict rests on (each with at least MIN_POINTS measured entries), and notes
    saying what was left out and why."""
    notes = []
    embedding = np.array([isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for _, m in named])
    if embedding.any():
        notes.append(f"{int(embedding.sum())} embedding layer(s) measured but left out of the backward profile: an "
                     "embedding's gradient is sparse and its size follows its initial scale, not depth")
    candidates = {"backward": np.where(embedding, np.nan, rel)[::-1], "forward": act_std}
    if tgrad is not None:
        candidates["time"] = tgrad[::-1]
    if len(act_std) == 0:
        why = makeup.unmeasured or "the model has no activation module gradbook knows"
        notes.append(f"no forward profile: {why}")
    elif makeup.unmeasured:
        notes.append(f"the forward profile leaves out {makeup.unmeasured}")
    if makeup.attention:
        notes.append("attention: in_proj_weight (queries, keys, values) is measured as its module's layer; "
                     "out_proj's |dL/dy| is n/a (its weight is used without calling it)"
                     + ("" if makeup.attention_logit is None else f"; largest attention logit {makeup.attention_logit:.3g}"))
    profiles = {}
    for k, v in candidates.items():
        n = len(log_points(v)[0])
        if n >= MIN_POINTS:
            profiles[k] = v
        elif len(v):
            notes.append(f"the {k} profile has {n} measured point(s), fewer than {MIN_POINTS}: it shows no trend and is not used")
    return profiles, notes


def _from_evidence(model, named, wgrad, gnorm, act_std, saturated, dead, tgrad, lr, makeup=None, loss=None,
                   wnorm=None, acts=None) -> Diagnosis:
    acts = activation_modules(model) if acts is None else acts
    wnorm = weight_norms(named) if wnorm is None else wnorm
    makeup = makeup or describe(model, wnorm)
    wgrad = np.asarray(wgrad, dtype=float)
    reached = wgrad > 0   # frozen or unused layers have no gradient: leave them out of the profile
    rel = np.where(reached, wgrad / np.where(wnorm > 0, wnorm, np.nan), np.nan)
    act_std = np.asarray(act_std, dtype=float)
    profiles, notes = _profiles(named, rel, act_std, tgrad, makeup)
    scales = {k: 2 * log_change(v) for k, v in profiles.items()}   # ln of the squared-norm change

    # A NaN in grad_norm can also mean "not measured" (a layer whose weights are used without calling
    # the module, like MultiheadAttention's out_proj), so non-finite values are read from the weight
    # gradients, which any non-finite back-propagated gradient reaches.
    nonfinite = None
    bad = ~np.isfinite(wgrad)
    if bad.any():
        nonfinite = _label(named[int(np.flatnonzero(bad)[-1])])
    diag = Diagnosis("healthy", [n for n, _ in named], wgrad, wnorm, rel, np.asarray(gnorm, dtype=float),
                     [n for n, _, _ in acts], act_std, np.asarray(saturated, dtype=float),
                     np.asarray(dead, dtype=float), tgrad, scales, None, "", lr=lr, nonfinite=nonfinite,
                     makeup=makeup, notes=notes, loss=loss)
    _decide(diag, model, named, acts)
    return diag


def _no_profile(d: Diagnosis, model: nn.Module) -> None:
    """Verdict and reason when no profile has enough points to show a trend."""
    deep = [m for m in model.modules() if isinstance(m, LAYER_TYPES) and not isinstance(m, (nn.Embedding, nn.EmbeddingBag))]
    reached = int(np.sum(np.isfinite(d.relative_grad) & (d.relative_grad > 0)))
    if len(deep) < MIN_POINTS:
        d.verdict = "healthy"
        d.reason = (f"the model has {len(deep)} layer(s) besides embeddings: too shallow for a gradient to vanish "
                    "or explode through depth")
    else:
        d.verdict = "cannot tell"
        d.reason = (f"only {reached} of the {len(deep)} layers received a gradient (frozen, unused or flushed to "
                    f"zero), fewer than the {MIN_POINTS} a trend through depth needs")


def _label(pair) -> str:
    """'name (Type)' for a (name, module, ...) tuple."""
    return f"{pair[0]} ({type(pair[1]).__name__})"


def _decide(d: Diagnosis, model: nn.Module, named: list, acts: list) -> None:
    """Fill verdict, reason, start and remedies from the evidence (``named``, ``acts``: the model's
    measured layers and activation modules, as :func:`gradbook.records.layers` and
    :func:`gradbook.records.activation_modules` list them)."""
    if d.nonfinite is not None:
        d.verdict, d.start = "exploding", d.nonfinite
        d.reason = f"the gradient is not finite (first seen from the output side in {d.nonfinite})"
    elif not d.depth_scales:
        _no_profile(d, model)
    else:
        worst = max(d.depth_scales, key=lambda k: abs(d.depth_scales[k]))
        s = d.depth_scales[worst]
        if abs(s) <= THRESHOLD:
            d.verdict = "healthy"
            d.reason = (f"every profile stays within {THRESHOLD:g} depth scales "
                        f"(the largest is the {worst} one, at {s:+.1f})")
        else:
            d.verdict = "vanishing" if s < 0 else "exploding"
            what = {"backward": "the relative weight gradient |dL/dW|/|W| from the output layer back to the input layer",
                    "forward": "the activations' standard deviation from the input side on",
                    "time": "the gradient with respect to the input from the last time step back to the first"}[worst]
            d.reason = f"{what} changes by {d.change[worst]:.3g}x ({s:+.1f} depth scales, beyond +-{THRESHOLD:g})"
            sign = 1 if s > 0 else -1
            if worst == "backward":
                k = crossing(d.relative_grad[::-1], sign)
                d.start = None if k is None else _label(named[len(d.layers) - 1 - k])
            elif worst == "forward":
                k = crossing(d.act_std, sign)
                d.start = None if k is None else _label(acts[k])
            else:
                k = crossing(d.time_grad[::-1], sign)
                d.start = None if k is None else f"input time step {len(d.time_grad) - 1 - k} (counting from 0)"
    d.remedies = prescribe(d, model, d.makeup)
    d.cautions = cautions(d, model, d.makeup)
