"""Interactive explorers: turn a dial, watch gradients vanish or explode.

Three explorers, each a row of ipywidgets dials above ONE figure that is redrawn in place:

* :func:`gradient_flow`: depth, width, activation, initialization (or sigma_w), normalization and
  residual connections of an MLP; per-layer back-propagated gradient norms on a log axis with the
  mean-field prediction (:mod:`gradbook.theory`) overlaid, and activation histograms per layer;
* :func:`recurrent`: largest singular value of W_rec, activation and sequence length of a vanilla RNN;
  ||dh_T/dh_{T-k}|| against the distance k (:func:`gradbook.measure.through_time`) with Pascanu et al.'s
  bound;
* :func:`clipping`: learning rate, clipping mode (none, by value, by norm) and threshold for gradient
  descent on the cliff of :func:`gradbook.toys.cliff`; loss curve and gradient norm before and after
  clipping.

In Jupyter (with a kernel)::

    import gradbook as gb
    gb.widgets.gradient_flow()          # displays the live explorer

How it stays responsive (median update well under 0.3 s on one core, ``benchmarks/widgets.py``): small
networks; every result cached by its dial values (``functools.lru_cache``); sliders report only when
released (``continuous_update=False``), so a dragged slider costs one update, not dozens; the figure is a
single :class:`matplotlib.figure.Figure` (never pyplot, so nothing stacks up in the notebook) rendered to
PNG and swapped into one ``Image`` widget, which replaces its picture without flicker. A setting that
cannot be computed is refused with a message in the widget, never a traceback.

Without a kernel (the book's website) live callbacks cannot run. :func:`static` precomputes the figures
for a small grid of one or two dials and links the controls to ``Stack`` widgets with ``jslink``, which
runs in the browser from the saved widget state: every control on the page works.
"""
from __future__ import annotations

import base64
import functools
import html
import io
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import activations as _acts
from . import init as _init
from . import measure as _measure
from . import nets as _nets
from . import theory as _theory

__all__ = ["Explorer", "Refused", "gradient_flow", "recurrent", "clipping", "static", "cliff_descent"]

#: The initialization dial's extra entry: weights N(0, sigma_w^2 / fan_in) with the sigma_w dial.
SIGMA_W = "sigma_w"
DPI = 80        # the figures' resolution: about 770 x 290 pixels for a two-panel explorer
NORMS = {"none": None, "batch": "batch", "layer": "layer"}
CLIP_MODES = ["none", "value", "norm"]


class Refused(ValueError):
    """A dial setting the explorer cannot show; its message is shown in the widget."""


@dataclass
class _Spec:
    title: str
    defaults: dict
    dials: Callable[[dict], dict]                  # values -> {name: widget}
    compute: Callable[..., dict]                   # values -> result (cached)
    draw: Callable                                 # (figure, result, values) -> None
    describe: Callable[[dict], str]                # values -> alt text
    figsize: tuple = (9.6, 3.6)
    notes: Callable[[dict, dict], str] = field(default=lambda result, values: "")


class Explorer:
    """Dials and one figure. ``explorer.widget`` is the live ipywidgets view (built on first use);
    :meth:`render` draws any setting to PNG bytes without widgets.

    Attributes: ``values`` (the current dial values), ``figure`` (the matplotlib Figure, redrawn in
    place), ``result`` (the last computed data), ``dials`` / ``image`` / ``message`` (the widgets).
    """

    def __init__(self, spec: _Spec, values: dict):
        from matplotlib.figure import Figure

        unknown = set(values) - set(spec.defaults)
        if unknown:
            raise TypeError(f"unknown dial(s) {sorted(unknown)}; dials: {', '.join(spec.defaults)}")
        self.spec = spec
        self.values = {**spec.defaults, **values}
        self.figure = Figure(figsize=spec.figsize)
        self.figure.subplots_adjust(left=0.09, right=0.98, bottom=0.16, top=0.9, wspace=0.3)
        self.artists: dict = {}      # built on the first draw, then updated in place (set_data)
        self.result: dict | None = None
        self._shown = None
        self._widget = None

    # --- drawing, with or without widgets ---------------------------------------------------------
    def data(self, **changes) -> dict:
        """The numbers behind the figure for the current values with ``changes`` (cached; nothing drawn).

        Raises :class:`Refused` for a setting that cannot be computed.
        """
        try:
            return self.spec.compute(**{**self.values, **changes})
        except Refused:
            raise
        except (ValueError, RuntimeError, FloatingPointError, OverflowError) as e:
            raise Refused(str(e)) from None

    def render(self, **changes) -> bytes:
        """PNG bytes of the figure for the current values with ``changes``; raises :class:`Refused`.

        ``result`` then holds the numbers behind it.
        """
        self._draw(changes)
        buf = io.BytesIO()
        self.figure.savefig(buf, format="png", dpi=DPI)
        return buf.getvalue()

    def _draw(self, changes: dict) -> None:
        values = {**self.values, **changes}
        result = self.data(**changes)
        self.spec.draw(self.figure, self.artists, result, values)
        self.result = result

    def compact_png(self, colors: int = 64, **changes) -> bytes:
        """Like :meth:`render`, with a palette of ``colors`` colours: a third of the size, for pages that
        store many figures (:func:`static`)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from PIL import Image

        self._draw(changes)
        dpi = self.figure.dpi
        try:
            self.figure.set_dpi(DPI)
            canvas = FigureCanvasAgg(self.figure)
            canvas.draw()
            image = Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba(), "raw", "RGBA", 0, 1)
        finally:
            self.figure.set_dpi(dpi)
        image = image.convert("RGB").quantize(colors=colors, method=Image.Quantize.FASTOCTREE)
        buf = io.BytesIO()
        image.save(buf, format="PNG", optimize=True)
        return buf.getvalue()

    def describe(self, **changes) -> str:
        """Alt text for the figure of the current values with ``changes``."""
        return self.spec.describe({**self.values, **changes})

    # --- the live widget --------------------------------------------------------------------------
    @property
    def widget(self):
        """The ipywidgets view: dials, a message line and the figure."""
        if self._widget is None:
            import ipywidgets as w

            self.dials = self.spec.dials(self.values)
            for name, dial in self.dials.items():
                dial.observe(self._changed, names="value")
            self.message = w.HTML()
            self.image = w.Image(format="png", layout=w.Layout(max_width="100%", height="auto"))
            title = w.HTML(f"<b>{html.escape(self.spec.title)}</b>")
            boxes = w.GridBox(list(self.dials.values()),
                              layout=w.Layout(grid_template_columns="repeat(3, minmax(14em, 1fr))"))
            self._widget = w.VBox([title, boxes, self.message, self.image])
            self.update()
        return self._widget

    def _changed(self, change) -> None:
        self.values = {name: dial.value for name, dial in self.dials.items()}
        self.update()

    def update(self) -> None:
        """Redraw for the current dial values (nothing to do if they are the ones on show)."""
        self.widget  # noqa: B018 (builds the widgets on first use)
        key = tuple(sorted(self.values.items()))
        if key == self._shown:
            return
        try:
            png = self.render()
        except Exception as e:      # noqa: BLE001 (a reader's click must never end in a traceback)
            what = str(e) if isinstance(e, Refused) else f"{type(e).__name__}: {e}"
            self.message.value = (f'<span style="color:#D55E00">Cannot show this setting: {html.escape(what)}. '
                                  "The figure still shows the last setting that worked.</span>")
            return
        self.image.value = png
        self._shown = key
        note = self.spec.notes(self.result, self.values)
        self.message.value = f"<span>{html.escape(note)}</span>" if note else ""

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def close(self) -> None:
        """Close the widgets (the explorer can still :meth:`render`)."""
        if self._widget is not None:
            for d in [*self.dials.values(), self.message, self.image, self._widget]:
                d.close()
            self._widget = None


def _slider(kind, value, lo, hi, step, description, **kw):
    import ipywidgets as w

    cls = {"int": w.IntSlider, "float": w.FloatSlider, "log": w.FloatLogSlider}[kind]
    args = dict(base=10, min=lo, max=hi) if kind == "log" else dict(min=lo, max=hi)
    return cls(value=value, step=step, description=description, continuous_update=False,
               style={"description_width": "7em"}, **args, **kw)


def _dropdown(value, options, description):
    import ipywidgets as w

    return w.Dropdown(value=value, options=options, description=description, style={"description_width": "7em"})


def _checkbox(value, description):
    import ipywidgets as w

    return w.Checkbox(value=value, description=description, style={"description_width": "7em"})


def _positive(name, value):
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise Refused(f"{name} must be a number > 0, got {value!r}")


def _log_limits(*arrays, floor=None, ceil=None):
    """(low, high) for a log axis around the finite positive values of ``arrays``, padded a little."""
    vals = np.concatenate([np.asarray(a, dtype=float).ravel() for a in arrays])
    vals = vals[np.isfinite(vals) & (vals > 0)]
    lo, hi = (vals.min(), vals.max()) if vals.size else (0.1, 10.0)
    lo, hi = (lo if floor is None else min(lo, floor)), (hi if ceil is None else max(hi, ceil))
    if hi / lo < 10:
        mid = math.sqrt(lo * hi)
        lo, hi = mid / math.sqrt(10), mid * math.sqrt(10)
    return lo / 2, hi * 2


_SUPERSCRIPT = str.maketrans("-0123456789", "\u207b\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079")


def _power_of_ten(value, _pos=None) -> str:
    """A log-axis tick label such as 10⁻⁶ in plain Unicode (mathtext labels cost most of a redraw)."""
    if not value > 0:
        return ""
    exponent = math.log10(value)
    if abs(exponent - round(exponent)) < 1e-9:
        return "10" + str(int(round(exponent))).translate(_SUPERSCRIPT)
    return f"{value:.3g}"


def _log_axis(ax, which="y"):
    """Log scale with Unicode labels on the decades and none on the minor ticks."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    axis = ax.yaxis if which == "y" else ax.xaxis
    (ax.set_yscale if which == "y" else ax.set_xscale)("log")
    axis.set_major_formatter(FuncFormatter(_power_of_ten))
    axis.set_minor_formatter(NullFormatter())


def _frozen(result: dict) -> dict:
    """Make a cached result's arrays read-only, so that no caller can change what the cache returns."""
    for value in result.values():
        for a in (value if isinstance(value, list) else [value]):
            if isinstance(a, np.ndarray):
                a.setflags(write=False)
    return result


def _finite_positive(a):
    a = np.asarray(a, dtype=float)
    return np.where(np.isfinite(a) & (a > 0), a, np.nan)


# --- 1. gradient flow through an MLP -----------------------------------------------------------------

@functools.lru_cache(maxsize=512)
def _flow(depth, width, activation, init, sigma_w, norm, residual, seed, batch=128):
    if not (isinstance(depth, int) and 1 <= depth <= 200):
        raise Refused(f"depth must be a whole number from 1 to 200, got {depth!r}")
    if not (isinstance(width, int) and 2 <= width <= 1024):
        raise Refused(f"width must be a whole number from 2 to 1024, got {width!r}")
    if init == SIGMA_W:
        _positive("sigma_w", sigma_w)
    if norm not in NORMS:
        raise Refused(f"normalization must be one of {', '.join(NORMS)}, got {norm!r}")
    if norm == "batch" and batch < 2:
        raise Refused("batch normalization needs a batch of at least 2")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        kw = dict(init="normal", init_kwargs={"std": sigma_w / math.sqrt(width)}) if init == SIGMA_W else dict(init=init)
        net = _nets.mlp(depth, width, activation, norm=NORMS[norm], residual=residual, **kw)
        x = torch.randn(batch, width)
        with torch.no_grad():
            hidden = net.hidden(x)
            direction = torch.randn_like(hidden[-1])
        # the loss <r, y> with a random direction r: the gradient arriving at the top is independent of
        # the weights, as mean-field theory assumes (a loss such as |y|^2 / 2 would correlate them)
        snap = _measure.gradients(net, x, loss_fn=lambda out, _t: (out * direction).sum())
        hidden = [h.flatten().numpy() for h in hidden]
    sw = sigma_w if init == SIGMA_W else _theory.init_sigma_w(init, width, width)
    grads = np.asarray(snap.grad_norm, dtype=float)   # ||dL/da_l|| at each Linear's output
    predicted, why_not = None, ""
    if norm != "none" or residual:
        why_not = "no mean-field prediction with normalization or residual connections"
    elif not np.all(np.isfinite(grads)) or grads[-1] <= 0:
        why_not = "the measured gradients are not finite"
    else:
        with np.errstate(all="ignore"):
            predicted = _theory.gradient_profile(activation, depth, sw, 0.0, q0=1.0, top=grads[-1])
        if not np.all(np.isfinite(predicted)):
            predicted, why_not = None, "the mean-field prediction overflows"
    shown = sorted({int(round(v)) for v in np.linspace(1, depth, min(depth, 4))})
    return _frozen({"grads": grads, "predicted": predicted, "why_not": why_not, "sigma_w": sw,
                    "layers": shown, "hidden": [hidden[i - 1] for i in shown]})


def _draw_flow(fig, art, r, v):
    from matplotlib.ticker import MaxNLocator

    from .plot import PALETTE

    if not art:
        ax, hx = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.3, 1]})
        art.update(ax=ax, hx=hx, measured=ax.plot([], [], marker="o", color=PALETTE[0], label="measured")[0],
                   predicted=ax.plot([], [], "--", color="black", lw=1.5, label="mean-field prediction")[0],
                   hists=[hx.stairs([1.0], [0, 1], baseline=0.5, lw=1.5, color=PALETTE[(i + 1) % len(PALETTE)]) for i in range(4)])
        _log_axis(ax)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer (1 = nearest the input)")
        ax.set_ylabel(r"$\|\partial L/\partial a_\ell\|$")
        _log_axis(hx)
        hx.set_xlabel("activation value")
        hx.set_ylabel("count")
        hx.set_title("activations of a few layers", fontsize=10)
    ax, hx = art["ax"], art["hx"]
    layers = np.arange(1, len(r["grads"]) + 1)
    grads = _finite_positive(r["grads"])
    art["measured"].set_data(layers, grads)
    pred = r["predicted"] if r["predicted"] is not None else np.full(len(layers), np.nan)
    art["predicted"].set_data(layers, pred)
    art["predicted"].set_label("mean-field prediction" if r["predicted"] is not None else "_hidden")
    ax.set_xlim(0.5, len(layers) + 0.5)
    ax.set_ylim(*_log_limits(grads, pred))
    ax.set_title(f"{v['depth']} x {v['width']} {v['activation']}, sigma_w = {r['sigma_w']:.2f}", fontsize=10)
    ax.legend(fontsize=9, loc="best")
    finite = [h[np.isfinite(h)] for h in r["hidden"]]
    span = max((float(np.abs(h).max()) for h in finite if h.size), default=1.0) or 1.0
    edges = np.linspace(-span, span, 61) if any((h < 0).any() for h in finite) else np.linspace(0, span, 61)
    top = 1.0
    for i, stairs in enumerate(art["hists"]):
        if i < len(finite):
            counts = np.histogram(finite[i], bins=edges)[0].astype(float)
            top = max(top, counts.max())
            stairs.set_data(np.where(counts > 0, counts, 0.5), edges, baseline=0.5)
            stairs.set_label(f"layer {r['layers'][i]}")
            stairs.set_visible(True)
        else:
            stairs.set_visible(False)
            stairs.set_label("_hidden")
    hx.set_xlim(edges[0], edges[-1])
    hx.set_ylim(0.7, top * 40)     # room above the curves for the legend
    hx.legend(handles=[h for h in art["hists"] if h.get_visible()], fontsize=9, loc="upper center", ncol=2)


def _describe_flow(v):
    init = f"sigma_w = {v['sigma_w']}" if v["init"] == SIGMA_W else f"{v['init']} initialization"
    extra = "".join([f", {v['norm']} normalization" if v["norm"] != "none" else "",
                     ", residual connections" if v["residual"] else ""])
    return (f"Left: per-layer back-propagated gradient norms of a {v['depth']}-layer, {v['width']}-wide "
            f"{v['activation']} network with {init}{extra}, on a log axis, with the mean-field prediction dashed "
            "where it applies. Right: histograms of the activations of a few layers.")


def _flow_notes(r, v):
    g = r["grads"]
    ratio = g[0] / g[-1] if g[-1] > 0 else float("nan")
    text = f"layer 1 / layer {len(g)} gradient norm: {ratio:.3g}"
    return f"{text}; {r['why_not']}" if r["why_not"] else text


def _flow_compute(depth, width, activation, init, sigma_w, norm, residual, seed):
    return _flow(depth, width, activation, init, sigma_w if init == SIGMA_W else 0.0, norm, residual, seed)


def _flow_dials(v):
    dials = {"depth": _slider("int", v["depth"], 1, 60, 1, "depth"),
            "width": _slider("int", v["width"], 16, 256, 16, "width"),
            "activation": _dropdown(v["activation"], _acts.names(), "activation"),
            "init": _dropdown(v["init"], [n for n in _init.names() if n != "normal"] + [SIGMA_W], "init"),
            "sigma_w": _slider("float", v["sigma_w"], 0.0, 4.0, 0.05, "sigma_w (if init = sigma_w)"),
            "norm": _dropdown(v["norm"], list(NORMS), "normalization"),
            "residual": _checkbox(v["residual"], "residual"),
            "seed": _slider("int", v["seed"], 0, 9, 1, "seed")}
    sigma = dials["sigma_w"]
    sigma.disabled = v["init"] != SIGMA_W
    dials["init"].observe(lambda change: setattr(sigma, "disabled", change["new"] != SIGMA_W), names="value")
    return dials


def gradient_flow(**values) -> Explorer:
    """The gradient-flow explorer: an MLP's per-layer gradient norms and activations at initialization.

    Dials (keyword arguments set their starting values): ``depth`` (20), ``width`` (64),
    ``activation`` ("tanh"), ``init`` (a name of :mod:`gradbook.init`, or ``"sigma_w"`` for weights
    N(0, sigma_w^2/width) with the ``sigma_w`` dial; default "sigma_w"), ``sigma_w`` (1.0), ``norm``
    ("none", "batch", "layer"), ``residual`` (False), ``seed`` (0). The input is a batch of 128 standard
    normal vectors and the loss sum(y^2)/2 of the last hidden layer's output y; the plot shows
    ||dL/da_l|| at every layer's pre-activation, the quantity :func:`gradbook.theory.gradient_profile`
    predicts (drawn dashed, anchored at the top layer, for plain networks).
    """
    spec = _Spec("Gradient flow through an MLP at initialization",
                 dict(depth=20, width=64, activation="tanh", init=SIGMA_W, sigma_w=1.0, norm="none",
                      residual=False, seed=0),
                 _flow_dials, _flow_compute, _draw_flow, _describe_flow, notes=_flow_notes)
    return Explorer(spec, values)


# --- 2. gradients through time in a vanilla RNN ------------------------------------------------------

@functools.lru_cache(maxsize=512)
def _through_time(sigma_max, activation, length, seed, hidden=32, batch=8, input_std=0.01):
    _positive("sigma_max", sigma_max)
    if not (isinstance(length, int) and 2 <= length <= 500):
        raise Refused(f"sequence length must be a whole number from 2 to 500, got {length!r}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = _nets.rnn(1, hidden, activation=activation, recurrent_init="orthogonal",
                        recurrent_gain=sigma_max).double()
        x = input_std * torch.randn(batch, length, 1, dtype=torch.float64)
        norms = _measure.through_time(net, x)
    bounds = _theory.rnn_bounds(net.recurrent.weight, activation)
    k = np.arange(length)
    return _frozen({"k": k, "norms": norms, "bound": bounds["bound"](k), "gamma": bounds["gamma"],
                    "sigma_max": bounds["sigma_max"]})


def _draw_recurrent(fig, art, r, v):
    from .plot import PALETTE

    if not art:
        ax = fig.subplots()
        art.update(ax=ax, measured=ax.plot([], [], color=PALETTE[0], label=r"measured $\|\partial h_T/\partial h_{T-k}\|$")[0],
                   bound=ax.plot([], [], "--", color="black", lw=1.5)[0])
        ax.axhline(1.0, color="grey", lw=1)
        _log_axis(ax)
        ax.set_xlabel("distance in time k")
        ax.set_ylabel(r"$\|\partial h_T/\partial h_{T-k}\|$")
    ax = art["ax"]
    norms = _finite_positive(r["norms"])
    lo, hi = _log_limits(norms, floor=0.5, ceil=2.0)
    lo, hi = lo / 5, hi * 5
    art["measured"].set_data(r["k"], norms)
    art["bound"].set_data(r["k"], np.where(r["bound"] <= hi * 1e3, _finite_positive(r["bound"]), np.nan))
    art["bound"].set_label(f"bound (\N{GREEK SMALL LETTER GAMMA} \N{GREEK SMALL LETTER SIGMA}_max)^k, "
                           f"\N{GREEK SMALL LETTER GAMMA} \N{GREEK SMALL LETTER SIGMA}_max = {r['gamma'] * r['sigma_max']:.2f}")
    ax.set_xlim(0, max(1, r["k"][-1]))
    ax.set_ylim(lo, hi)
    ax.set_title(f"{v['activation']} RNN, largest singular value of W_rec = {v['sigma_max']:.2f}", fontsize=10)
    ax.legend(fontsize=9, loc="best")


def _describe_recurrent(v):
    return (f"The norm of dh_T/dh_(T-k) against the distance k for a {v['activation']} RNN whose W_rec has "
            f"largest singular value {v['sigma_max']}, over {v['length']} steps, on a log axis, with Pascanu's "
            "bound dashed.")


def _recurrent_notes(r, v):
    return f"at the largest distance k = {r['k'][-1]}: {r['norms'][-1]:.3g}"


def _recurrent_dials(v):
    return {"sigma_max": _slider("float", v["sigma_max"], 0.0, 2.0, 0.05, "sigma_max(W_rec)"),
            "activation": _dropdown(v["activation"], ["tanh", "sigmoid", "relu", "linear"], "activation"),
            "length": _slider("int", v["length"], 10, 200, 10, "length T"),
            "seed": _slider("int", v["seed"], 0, 9, 1, "seed")}


def recurrent(**values) -> Explorer:
    """The recurrent explorer: how ||dh_T/dh_{T-k}|| changes with the distance k in a vanilla RNN.

    Dials: ``sigma_max`` (1.0; W_rec is orthogonal times sigma_max, so every singular value equals it),
    ``activation`` ("tanh"), ``length`` (100), ``seed`` (0). 32 hidden units, float64, inputs
    N(0, 0.01^2); the dashed line is the bound (gamma sigma_max)^k of Pascanu et al. (2013)
    (:func:`gradbook.theory.rnn_bounds`).
    """
    spec = _Spec("Gradients through time in a vanilla RNN", dict(sigma_max=1.0, activation="tanh", length=100, seed=0),
                 _recurrent_dials, _through_time, _draw_recurrent, _describe_recurrent, figsize=(7.2, 3.6),
                 notes=_recurrent_notes)
    return Explorer(spec, values)


# --- 3. clipping on the cliff ------------------------------------------------------------------------

def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _cliff_grad(w, b, steps=50, x0=0.5, target=0.7):
    """Loss and gradient of :func:`gradbook.toys.cliff` at one point, in plain floats (fast)."""
    s = []
    x = x0
    for _ in range(steps):
        st = _sigmoid(x)
        s.append(st)
        x = w * st + b
    out = _sigmoid(x)
    g = 2.0 * (out - target) * out * (1.0 - out)        # dL/dx_T
    gw = gb = 0.0
    for st in reversed(s):                                # x_t = w s_t + b, s_t = sigmoid(x_{t-1})
        gw += g * st
        gb += g
        g *= w * st * (1.0 - st)
    return (out - target) ** 2, gw, gb


@functools.lru_cache(maxsize=512)
def cliff_descent(lr: float, mode: str = "none", threshold: float = 1.0, steps: int = 300,
                  start: tuple = (6.0, -3.0)) -> dict:
    """Gradient descent on the cliff of :func:`gradbook.toys.cliff`, optionally clipped.

    ``mode`` is "none", "value" (each of dL/dw, dL/db clipped to [-threshold, threshold]) or "norm"
    (the gradient rescaled to norm ``threshold`` when longer, Pascanu et al. 2013, algorithm 1).
    Returns arrays ``loss``, ``norm_before``, ``norm_after`` (per step), ``path`` (steps + 1, 2) and
    ``diverged`` (the step at which w, b or the loss stopped being finite, or None). Results are cached
    by their arguments; the arrays are read-only.
    """
    _positive("learning rate", lr)
    if mode not in CLIP_MODES:
        raise Refused(f"clipping mode must be one of {', '.join(CLIP_MODES)}, got {mode!r}")
    if mode != "none":
        _positive("threshold", threshold)
    w, b = map(float, start)
    loss, before, after, path, diverged = [], [], [], [(w, b)], None
    for step in range(steps):
        try:
            L, gw, gb = _cliff_grad(w, b)
        except OverflowError:
            L, gw, gb = math.nan, math.nan, math.nan
        n = math.hypot(gw, gb)
        if not (math.isfinite(L) and math.isfinite(n)):
            diverged = step
            break
        if mode == "norm" and n > threshold:
            gw, gb = gw * threshold / n, gb * threshold / n
        elif mode == "value":
            gw, gb = max(-threshold, min(threshold, gw)), max(-threshold, min(threshold, gb))
        loss.append(L)
        before.append(n)
        after.append(math.hypot(gw, gb))
        w, b = w - lr * gw, b - lr * gb
        path.append((w, b))
    return _frozen({"loss": np.array(loss), "norm_before": np.array(before), "norm_after": np.array(after),
                    "path": np.array(path), "diverged": diverged})


def _clip(lr, mode, threshold, steps):
    if not (isinstance(steps, int) and 1 <= steps <= 5000):
        raise Refused(f"steps must be a whole number from 1 to 5000, got {steps!r}")
    return cliff_descent(lr, mode, threshold, steps)


#: The window of the (w, b) plane that the clipping explorer's third panel shows.
CLIFF_WINDOW = (2.0, 9.0, -4.0, 2.0)


@functools.lru_cache(maxsize=1)
def _cliff_surface(n=160):
    from . import toys as _toys

    w0, w1, b0, b1 = CLIFF_WINDOW
    ww, bb = np.meshgrid(np.linspace(w0, w1, n), np.linspace(b0, b1, n))
    return _toys.cliff(ww, bb)[0]


def _draw_clipping(fig, art, r, v):
    from .plot import PALETTE

    if not art:
        lx, gx, px = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 0.9]})
        art.update(lx=lx, gx=gx, px=px, loss=lx.plot([], [], color=PALETTE[0])[0],
                   before=gx.plot([], [], color=PALETTE[1], label="before clipping")[0],
                   after=gx.plot([], [], ":", color=PALETTE[2], lw=2.5, label="after clipping")[0],
                   threshold=gx.axhline(1.0, color="grey", lw=1, label="threshold"))
        for ax in (lx, gx):
            _log_axis(ax)
            ax.set_xlabel("step")
        lx.set_ylabel("loss")
        gx.set_ylabel("gradient norm")
        px.imshow(np.log10(_cliff_surface() + 1e-12), origin="lower", extent=CLIFF_WINDOW, aspect="auto",
                  cmap="Greys", vmin=-6, vmax=0, interpolation="nearest")
        art["path"] = px.plot([], [], ".-", color=PALETTE[1], lw=1, ms=3)[0]
        art["start"] = px.plot([], [], "o", color=PALETTE[0], ms=6)[0]
        px.set_xlim(CLIFF_WINDOW[0], CLIFF_WINDOW[1])
        px.set_ylim(CLIFF_WINDOW[2], CLIFF_WINDOW[3])
        px.set_xlabel("w")
        px.set_ylabel("b")
        px.grid(False)
        px.set_title("path over the loss (light = low)", fontsize=10)
    steps = np.arange(len(r["loss"]))
    loss, before, after = (_finite_positive(r[k]) for k in ("loss", "norm_before", "norm_after"))
    art["loss"].set_data(steps, loss)
    art["before"].set_data(steps, before)
    art["after"].set_data(steps, after)
    art["path"].set_data(r["path"][:, 0], r["path"][:, 1])
    art["start"].set_data(r["path"][:1, 0], r["path"][:1, 1])
    shown = v["mode"] == "norm"
    art["threshold"].set_ydata([v["threshold"]] * 2)
    art["threshold"].set_visible(shown)
    art["threshold"].set_label("threshold" if shown else "_hidden")
    for ax in (art["lx"], art["gx"]):
        ax.set_xlim(0, max(1, len(steps) - 1))
    art["lx"].set_ylim(*_log_limits(loss))
    art["gx"].set_ylim(*_log_limits(before, after, *([v["threshold"]] if shown else [])))
    art["lx"].set_title(f"cliff, lr = {v['lr']:.3g}, clipping: {v['mode']}", fontsize=10)
    art["gx"].legend(fontsize=9, loc="best")


def _describe_clipping(v):
    clip = "without clipping" if v["mode"] == "none" else f"clipping by {v['mode']} at {v['threshold']}"
    return (f"Loss, gradient norm before and after clipping (log axes), and the path in the (w, b) plane over "
            f"{v['steps']} steps of gradient descent on the cliff with learning rate {v['lr']}, {clip}.")


def _clipping_notes(r, v):
    text = f"final loss {r['loss'][-1]:.3g}; largest gradient norm {r['norm_before'].max():.3g}, " \
           f"largest step {v['lr'] * r['norm_after'].max():.3g}" if len(r["loss"]) else ""
    if r["diverged"] is not None:
        text += f"; diverged (non-finite) at step {r['diverged']}"
    return text


def _clipping_dials(v):
    import ipywidgets as w

    return {"lr": _slider("log", v["lr"], -2, 1, 0.1, "learning rate"),
            "mode": w.ToggleButtons(value=v["mode"], options=CLIP_MODES, description="clipping",
                                    style={"description_width": "7em", "button_width": "5em"}),
            "threshold": _slider("log", v["threshold"], -2, 2, 0.1, "threshold"),
            "steps": _slider("int", v["steps"], 50, 1000, 50, "steps")}


def clipping(**values) -> Explorer:
    """The clipping explorer: gradient descent on the cliff of :func:`gradbook.toys.cliff`.

    Dials: ``lr`` (1.0), ``mode`` ("none", "value", "norm"; default "norm"), ``threshold`` (1.0),
    ``steps`` (300). Starts at (w, b) = (6, -3), a short way from the wall where the gradient jumps to
    ~1e5 (Pascanu, Mikolov & Bengio 2013, fig. 6).
    """
    spec = _Spec("Gradient clipping on the cliff", dict(lr=1.0, mode="norm", threshold=1.0, steps=300),
                 _clipping_dials, _clip, _draw_clipping, _describe_clipping, figsize=(11.5, 3.6),
                 notes=_clipping_notes)
    return Explorer(spec, values)


# --- static pages: a precomputed grid linked in the browser -------------------------------------------

def _label(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def static(explorer: Explorer, slider: tuple[str, list], buttons: tuple[str, list] | None = None):
    """Precompute ``explorer``'s figures for a grid of one or two dials; controls that work without a kernel.

    ``slider = (dial, values)`` becomes a ``SelectionSlider`` and ``buttons = (dial, values)`` a row of
    ``ToggleButtons``; each figure is an ``<img>`` with alt text in an ``HTML`` widget, and the controls
    choose among them through ``Stack`` widgets linked with ``jslink``, so a saved notebook (and the book's
    website) keeps them working in the browser. Costs one render per grid point (about 0.1 s each).
    Returns the widget (a ``VBox``; its ``links`` attribute holds the ``jslink`` objects).
    """
    import ipywidgets as w

    def panel(fixed):
        pictures = []
        for value in slider[1]:
            changes = {**fixed, slider[0]: value}
            png = base64.b64encode(explorer.compact_png(**changes)).decode()
            alt = html.escape(explorer.describe(**changes), quote=True)
            pictures.append(w.HTML(f'<img src="data:image/png;base64,{png}" alt="{alt}" style="max-width:100%">'))
        return w.Stack(pictures, selected_index=0)

    # the controls carry no ``description``: the widget renderer would typeset it with MathJax 2's API
    # (MathJax.Hub), which the site's MathJax 3 lacks; a label beside each control says the same
    def labelled(name, control):
        return w.HBox([w.HTML(f"<code>{html.escape(name)}</code>", layout=w.Layout(width="7em")), control])

    pick = w.SelectionSlider(options=[_label(v) for v in slider[1]], layout=w.Layout(width="26em"))
    if buttons is None:
        stacks = [panel({})]
        outer, controls = stacks[0], [labelled(slider[0], pick)]
    else:
        stacks = [panel({buttons[0]: b}) for b in buttons[1]]
        outer = w.Stack(stacks, selected_index=0)
        choose = w.ToggleButtons(options=[_label(b) for b in buttons[1]])
        links = [w.jslink((choose, "index"), (outer, "selected_index"))]
        controls = [labelled(buttons[0], choose), labelled(slider[0], pick)]
    links = ([] if buttons is None else links) + [w.jslink((pick, "index"), (s, "selected_index")) for s in stacks]
    title = w.HTML(f"<b>{html.escape(explorer.spec.title)}</b> (precomputed: move the controls)")
    box = w.VBox([title, *controls, outer])
    box.links = links       # the jslink objects, kept for inspection (the browser runs them)
    return box
