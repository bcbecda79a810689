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

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import measure as _measure

__all__ = ["diagnose", "from_trace", "Diagnosis", "Remedy", "THRESHOLD", "VERDICTS", "CHAPTERS"]

#: Squared-norm change end to end, in depth scales, beyond which a profile vanishes or explodes.
THRESHOLD = 6.0
#: The verdicts :func:`diagnose` can give.
VERDICTS = ["vanishing", "exploding", "healthy"]
#: Fraction of an activation's inputs in saturation (phi' < 0.1 gamma) above which a layer is "saturated".
SATURATED = 0.5
#: Fraction of units dead on the whole batch above which a layer is "dying".
DEAD = 0.5

#: The book's chapters that the remedies point to (document names relative to the book's folder).
CHAPTERS = {
    "activations": "vanishing/activations",
    "initialization": "vanishing/initialization",
    "relu": "vanishing/relu",
    "xavier-he": "vanishing/xavier-he",
    "batch-norm": "vanishing/batch-norm",
    "depth-init": "exploding/depth-init",
    "rnn": "exploding/rnn",
    "clipping": "exploding/clipping",
    "recurrent-init": "exploding/recurrent-init",
    "regularization": "exploding/regularization",
    "architectures": "beyond/architectures",
    "theory": "beyond/theory",
}


@dataclass
class Remedy:
    """One suggested fix: what to do, why it fits this model, and the chapter that explains it."""

    action: str
    reason: str
    chapter: str

    def __str__(self) -> str:
        return f"{self.action} ({self.reason}; see {self.chapter})"


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
        """A readable text report: verdict, evidence per profile and per layer, remedies."""
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

    def plot(self, axes=None):
        """Draw the evidence: relative gradient per layer, activation std, saturation and dead fraction."""
        import matplotlib.pyplot as plt

        from .plot import PALETTE

        panels = 3 if self.time_grad is None else 4
        if axes is None:
            _, axes = plt.subplots(1, panels, figsize=(3.6 * panels, 3.2), constrained_layout=True)
        ax = axes[0]
        idx = np.arange(1, len(self.layers) + 1)
        ax.semilogy(idx, _positive(self.relative_grad), "o-", color=PALETTE[0], ms=3)
        ax.set(xlabel="layer (input to output)", ylabel="|dL/dW| / |W|", title="backward")
        ax = axes[1]
        if self.activations:
            ax.semilogy(np.arange(1, len(self.activations) + 1), _positive(self.act_std), "o-", color=PALETTE[1], ms=3)
        ax.set(xlabel="activation layer", ylabel="output std", title="forward")
        ax = axes[2]
        if self.activations:
            j = np.arange(1, len(self.activations) + 1)
            ax.plot(j, self.saturated, "o-", color=PALETTE[2], ms=3, label="saturated")
            ax.plot(j, self.dead, "s-", color=PALETTE[3], ms=3, label="dead")
            ax.legend()
        ax.set(xlabel="activation layer", ylabel="fraction", ylim=(-0.05, 1.05), title="units")
        if self.time_grad is not None:
            ax = axes[3]
            ax.semilogy(np.arange(1, len(self.time_grad) + 1), _positive(self.time_grad), "-", color=PALETTE[4])
            ax.set(xlabel="input time step", ylabel="|dL/dx_t|", title="through time")
        axes[0].figure.suptitle(f"verdict: {self.verdict}")
        return axes


def _positive(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=float)
    return np.where(np.isfinite(a) & (a > 0), a, np.nan)


def log_change(profile: np.ndarray) -> float:
    """ln(last / first) of a profile, from the Theil-Sen slope of its logarithm (robust to odd entries).

    Entries that are zero, negative or not finite are left out; with fewer than two left, returns 0.
    """
    y = np.asarray(profile, dtype=float)
    keep = np.isfinite(y) & (y > 0)
    x = np.arange(len(y))[keep]
    y = np.log(y[keep])
    if len(y) < 2:
        return 0.0
    i, j = np.triu_indices(len(y), k=1)
    slope = np.median((y[j] - y[i]) / (x[j] - x[i]))
    return float(slope * (x[-1] - x[0]))


def _crossing(profile: np.ndarray, sign: int) -> int | None:
    """Index of the first entry (walking the profile in order) more than e^{THRESHOLD/2} beyond the
    profile's healthy end: a norm change of e^3 is a squared-norm change of e^6, six depth scales.

    The reference is the robust line through the log-profile (Theil-Sen slope, median intercept) at
    the profile's first entry, so one odd first layer (a read-out) does not move it.
    """
    y = np.asarray(profile, dtype=float)
    keep = np.flatnonzero(np.isfinite(y) & (y > 0))
    if len(keep) < 2:
        return None
    logs = np.log(y[keep])
    i, j = np.triu_indices(len(keep), k=1)
    slope = np.median((logs[j] - logs[i]) / (keep[j] - keep[i]))
    ref = np.median(logs - slope * (keep - keep[0]))
    for k, v in zip(keep, logs):
        if sign * (v - ref) > THRESHOLD / 2:
            return int(k)
    steps = int(np.ceil(THRESHOLD / 2 / abs(slope))) if slope != 0 else len(y)   # where the line crosses
    return int(keep[0] + steps) if keep[0] + steps < len(y) else None


def _recurrent(model: nn.Module) -> list[nn.Module]:
    """The model's recurrent modules: torch's RNN/LSTM/GRU and anything with a ``states`` method."""
    return [m for m in model.modules() if isinstance(m, nn.RNNBase) or hasattr(m, "states")]


def _time_dim(model: nn.Module, inputs) -> int | None:
    """The time axis of a sequence model's input, or None for models that are not sequence models."""
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 3 or not inputs.is_floating_point():
        return None
    rnns = _recurrent(model)
    if not rnns:
        return None
    return 0 if any(isinstance(m, nn.RNNBase) and not m.batch_first for m in rnns) else 1


def _through_time(model, inputs, targets, loss_fn, dim) -> np.ndarray:
    x = inputs.detach().clone().requires_grad_(True)
    with torch.enable_grad(), _measure._kept_buffers(model):   # grad w.r.t. x only: no parameter's .grad changes
        out = _measure._first_tensor(model(x))
        (g,) = torch.autograd.grad((loss_fn or _measure._default_loss)(out, targets), x)
    other = [d for d in range(3) if d != dim]
    return torch.linalg.vector_norm(g.double(), dim=other).cpu().numpy()


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
        ``.verdict``, the per-layer evidence, ``.start`` (where the trouble starts), ``.remedies``,
        ``.report()`` and ``.plot()``. The thresholds are explained in :mod:`gradbook.diagnosis`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"diagnose needs a torch.nn.Module, got {type(model).__name__}")
    if lr is not None and not (np.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if time_dim is not None and time_dim not in (0, 1):
        raise ValueError(f"time_dim must be 0 or 1 (the time axis of a (batch, time, features) input), got {time_dim!r}")
    named = _measure.layers(model)
    if not named:
        raise ValueError("the model has no trainable Linear, Conv, RNN or Embedding layer to diagnose")
    snap = _measure.gradients(model, inputs, targets, loss_fn)
    dim = time_dim if time_dim is not None else _time_dim(model, inputs)
    tgrad = _through_time(model, inputs, targets, loss_fn, dim) if dim is not None else None
    return _from_evidence(model, named, snap.weight_grad_norm, snap.grad_norm, snap.act_std, snap.saturated,
                          snap.dead, tgrad, lr)


def from_trace(model: nn.Module, trace: "_measure.Trace", lr: float | None = None) -> Diagnosis:
    """A :class:`Diagnosis` over a window of training steps recorded by :class:`gradbook.measure.watch`.

    Each per-layer quantity is the median over the recorded steps of ``trace`` (which must have been
    recorded with ``level="full"``), so one unusual batch does not decide the verdict; the weights'
    norms are the model's current ones. ``watch.diagnose()`` calls this for you.
    """
    if trace.act_std is None:
        raise ValueError("diagnosing a trace needs level='full' (it has only weight-gradient norms); "
                         "watch the model with level='full'")
    if len(trace) == 0:
        raise ValueError("the trace is empty: no step has been recorded yet")
    named = _measure.layers(model)
    if trace.layers != [n for n, _ in named]:
        raise ValueError("the trace was not recorded on this model (its layers differ)")
    import warnings
    with warnings.catch_warnings():   # all-NaN columns (layers never reached) stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        med = {k: np.nanmedian(getattr(trace, k), axis=0) for k in ("grad_norm", "act_std", "saturated", "dead")}
        wg = trace.weight_grad_norm
        # a non-finite weight gradient on any step of the window is reported, not averaged away
        wmed = np.where(np.isfinite(wg).all(axis=0), np.nanmedian(wg, axis=0), np.inf)
    return _from_evidence(model, named, wmed, med["grad_norm"], med["act_std"], med["saturated"], med["dead"], None, lr)


def _from_evidence(model, named, wgrad, gnorm, act_std, saturated, dead, tgrad, lr) -> Diagnosis:
    acts = _measure.activation_modules(model)
    wnorm = np.array([float(torch.sqrt(sum((w.detach().double() ** 2).sum() for w in _measure.weight_tensors(m))))
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
    measured layers and activation modules, as :func:`gradbook.measure.layers` and
    :func:`gradbook.measure.activation_modules` list them)."""
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
    d.remedies = _remedies(d, model)


def _remedies(d: Diagnosis, model: nn.Module) -> list[Remedy]:
    if d.verdict == "healthy":
        return []
    recurrent = bool(_recurrent(model))
    gated = any(isinstance(m, (nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell)) for m in model.modules())
    normed = any(isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)) for m in model.modules())
    acts = {type(m).__name__ for m in model.modules()}
    squashing = bool({"Sigmoid", "Tanh"} & acts)
    saturated = [d.activations[j] for j in range(len(d.activations)) if d.saturated[j] > SATURATED]
    dead = [d.activations[j] for j in range(len(d.activations)) if d.dead[j] > DEAD]
    relu_like = bool({"ReLU", "LeakyReLU", "ELU", "GELU"} & acts)
    C = CHAPTERS
    out: list[Remedy] = []
    if d.verdict == "exploding":
        if recurrent:
            out.append(Remedy("clip the gradient by its norm (torch.nn.utils.clip_grad_norm_)",
                              "a recurrent layer multiplies the gradient by W_rec at every step", C["clipping"]))
            out.append(Remedy("initialize W_rec orthogonal, or scale its largest singular value to about 1",
                              "growth through time needs gamma * sigma_max(W_rec) > 1", C["recurrent-init"]))
            if not gated:
                out.append(Remedy("use an LSTM or GRU", "gates give the gradient a path that neither explodes nor vanishes",
                                  C["architectures"]))
        else:
            out.append(Remedy("scale the initial weights down (He for ReLU, Xavier for tanh)",
                              "weights too large multiply the signal by more than one per layer", C["depth-init"]))
            out.append(Remedy("clip the gradient by its norm", "it bounds every step while the cause is fixed", C["clipping"]))
            if not normed:
                out.append(Remedy("add batch or layer normalization", "it resets the scale at every layer", C["batch-norm"]))
        out.append(Remedy("add weight decay", "it keeps the weights' norms, and with them the growth, in check",
                          C["regularization"]))
        return out
    # vanishing
    if d.time_grad is not None and d.depth_scales.get("time", 0) < -THRESHOLD:
        if not gated:
            out.append(Remedy("use an LSTM or GRU with a positive forget-gate bias",
                              "the gradient through time fades over the sequence", C["architectures"]))
        out.append(Remedy("initialize W_rec orthogonal (or identity-scaled) with singular values near 1",
                          "sigma_max(W_rec) < 1/gamma guarantees vanishing", C["recurrent-init"]))
    if saturated:
        span = saturated[0] if len(saturated) == 1 else f"{saturated[0]} ... {saturated[-1]}"
        out.append(Remedy("use ReLU (with He initialization) instead of sigmoid/tanh",
                          f"{len(saturated)} activation layer(s) saturate ({span})", C["relu"]))
        if not normed:
            out.append(Remedy("add batch normalization before the activations",
                              "it keeps the pre-activations out of saturation", C["batch-norm"]))
    if dead:
        out.append(Remedy("lower the learning rate, or use leaky ReLU / ELU",
                          f"{len(dead)} layer(s) have more than half their units dead ({dead[0]} ...)", C["relu"]))
    if relu_like and not saturated:
        out.append(Remedy("use He initialization (weights with variance 2/fan_in)",
                          "ReLU halves the signal's second moment; He's variance restores it per layer", C["xavier-he"]))
    if "Sigmoid" in acts and not saturated:
        out.append(Remedy("replace sigmoid by tanh (with Xavier initialization) or ReLU (with He initialization)",
                          "sigmoid's derivative is at most 1/4, so every sigmoid layer divides the gradient by 4 or more",
                          C["activations"]))
    elif squashing and not saturated:
        out.append(Remedy("use Xavier (Glorot) initialization",
                          "with variance 1/fan_in per layer the tanh signal keeps its scale", C["xavier-he"]))
    if not normed and not recurrent:
        out.append(Remedy("add batch or layer normalization", "it resets the scale at every layer", C["batch-norm"]))
    out.append(Remedy("add residual connections", "an identity path carries the gradient past every layer",
                      C["architectures"]))
    return out
