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
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import measure as _measure
from .records import Trace, activation_modules, layers, recurrent_modules, weight_tensors
from .remedies import Remedy, prescribe
from .theory import TRAINABLE_DEPTH_SCALES as THRESHOLD

__all__ = ["diagnose", "from_trace", "Diagnosis", "VERDICTS", "log_change", "theil_sen"]

#: The verdicts :func:`diagnose` can give.
VERDICTS = ["vanishing", "exploding", "healthy"]

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
        out.append("")
        out.append(f"{'layer':<28}{'|dL/dW|':>11}{'|dL/dW|/|W|':>13}{'|dL/dy|':>11}"
                   + (f"{'update ratio':>14}" if self.lr is not None else ""))
        ratio = self.update_ratio
        for i, name in enumerate(self.layers):
            row = f"{name[:27]:<28}{self.weight_grad_norm[i]:>11.3g}{self.relative_grad[i]:>13.3g}{self.grad_norm[i]:>11.3g}"
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
        return "\n".join(out)

    def __str__(self) -> str:
        return self.report()


def theil_sen(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """The Theil-Sen line through the points (x, y): the median of all pairwise slopes, and the median
    intercept (Theil 1950; Sen 1968). Robust to a few odd points, such as a read-out layer of another shape."""
    i, j = np.triu_indices(len(x), k=1)
    slope = float(np.median((y[j] - y[i]) / (x[j] - x[i])))
    return slope, float(np.median(y - slope * x))


def _log_points(profile) -> tuple[np.ndarray, np.ndarray]:
    """(index, log value) of a profile's entries that are finite and positive."""
    y = np.asarray(profile, dtype=float)
    keep = np.flatnonzero(np.isfinite(y) & (y > 0))
    return keep, np.log(y[keep])


def log_change(profile: np.ndarray) -> float:
    """ln(last / first) of a profile, from the Theil-Sen slope of its logarithm (robust to odd entries).

    Entries that are zero, negative or not finite are left out; with fewer than two left, returns 0.
    """
    x, logs = _log_points(profile)
    if len(x) < 2:
        return 0.0
    return theil_sen(x, logs)[0] * float(x[-1] - x[0])


def _crossing(profile: np.ndarray, sign: int) -> int | None:
    """Index of the first entry (walking the profile in order) more than e^{THRESHOLD/2} beyond the
    profile's healthy end: a norm change of e^3 is a squared-norm change of e^6, six depth scales.

    The reference is the Theil-Sen line through the log-profile at the profile's first entry, so one odd
    first layer (a read-out) does not move it.
    """
    x, logs = _log_points(profile)
    if len(x) < 2:
        return None
    slope, intercept = theil_sen(x - x[0], logs)
    for k, v in zip(x, logs):
        if sign * (v - intercept) > THRESHOLD / 2:
            return int(k)
    steps = int(np.ceil(THRESHOLD / 2 / abs(slope))) if slope != 0 else len(profile)   # where the line crosses
    return int(x[0] + steps) if x[0] + steps < len(profile) else None


def _time_dim(model: nn.Module, inputs) -> int | None:
    """The time axis of a sequence model's input, or None for models that are not sequence models."""
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 3 or not inputs.is_floating_point():
        return None
    rnns = recurrent_modules(model)
    if not rnns:
        return None
    return 0 if any(isinstance(m, nn.RNNBase) and not m.batch_first for m in rnns) else 1


def diagnose(model: nn.Module, inputs, targets=None, loss_fn: Callable | None = None, *,
             lr: float | None = None, time_dim: int | None = None) -> "Diagnosis":
    """Measure one batch and say whether ``model``'s gradients vanish, explode, or are healthy.

    Parameters
    ----------
    model : nn.Module
        Any module: MLPs, convolutional nets, ``nn.RNN``/``nn.LSTM``/``nn.GRU``, transformer layers.
        Its parameters' ``.grad`` and its buffers (BatchNorm statistics) are left as they were.
    inputs, targets
        One batch. The loss is ``loss_fn(model(inputs), targets)``; by default cross-entropy for
        integer targets, mean squared error for float targets, ``sum(output^2)/2`` without targets.
    lr : float, optional
        The learning rate of plain SGD, to report update:weight ratios (``lr * ||dL/dW|| / ||W||``)
        against the rule of thumb of about 1e-3.
    time_dim : int, optional
        The time axis of a sequence model's input. By default 1 (or 0 when the model holds an
        ``nn.RNNBase`` with ``batch_first=False``) for 3-D float inputs of models with a recurrent
        layer; the gradient with respect to each input step is then measured too.

    Returns
    -------
    Diagnosis
        ``.verdict``, the per-layer evidence, ``.start`` (where the trouble starts), ``.remedies``
        (:mod:`gradbook.remedies`) and ``.report()``; :func:`gradbook.plot.diagnosis` draws it. The thresholds are explained in :mod:`gradbook.diagnosis`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"diagnose needs a torch.nn.Module, got {type(model).__name__}")
    if lr is not None and not (np.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if time_dim is not None and time_dim not in (0, 1):
        raise ValueError(f"time_dim must be 0 or 1 (the time axis of a (batch, time, features) input), got {time_dim!r}")
    named = layers(model)
    if not named:
        raise ValueError("the model has no trainable Linear, Conv, RNN or Embedding layer to diagnose")
    snap = _measure.gradients(model, inputs, targets, loss_fn)
    dim = time_dim if time_dim is not None else _time_dim(model, inputs)
    tgrad = _measure.input_gradients(model, inputs, targets, loss_fn, dim) if dim is not None else None
    return _from_evidence(model, named, snap.weight_grad_norm, snap.grad_norm, snap.act_std, snap.saturated,
                          snap.dead, tgrad, lr)


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
    return _from_evidence(model, named, wmed, med["grad_norm"], med["act_std"], med["saturated"], med["dead"], None, lr)


def _from_evidence(model, named, wgrad, gnorm, act_std, saturated, dead, tgrad, lr) -> Diagnosis:
    acts = activation_modules(model)
    wnorm = np.array([float(torch.sqrt(sum((w.detach().double() ** 2).sum() for w in weight_tensors(m))))
                      for _, m in named])
    wgrad = np.asarray(wgrad, dtype=float)
    reached = wgrad > 0   # frozen or unused layers have no gradient: leave them out of the profile
    rel = np.where(reached, wgrad / np.where(wnorm > 0, wnorm, np.nan), np.nan)
    act_std = np.asarray(act_std, dtype=float)
    profiles = {"backward": rel[::-1], "forward": act_std}
    if tgrad is not None:
        profiles["time"] = tgrad[::-1]
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
                     np.asarray(dead, dtype=float), tgrad, scales, None, "", lr=lr, nonfinite=nonfinite)
    _decide(diag, model, named, acts)
    return diag


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
                k = _crossing(d.relative_grad[::-1], sign)
                d.start = None if k is None else _label(named[len(d.layers) - 1 - k])
            elif worst == "forward":
                k = _crossing(d.act_std, sign)
                d.start = None if k is None else _label(acts[k])
            else:
                k = _crossing(d.time_grad[::-1], sign)
                d.start = None if k is None else f"input time step {len(d.time_grad) - 1 - k} (counting from 0)"
    d.remedies = prescribe(d, model)
