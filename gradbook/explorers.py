"""The book's explorers: turn a dial, watch gradients vanish or explode.

Each is a row of dials above ONE figure that is redrawn in place (:mod:`gradbook.widgets`):

* :func:`gradient_flow`: depth, width, activation, initialization (or sigma_w), normalization and
  residual connections of an MLP; per-layer back-propagated gradient norms on a log axis with the
  mean-field prediction (:mod:`gradbook.theory`) overlaid, and activation histograms per layer;
* :func:`recurrent`: largest singular value of W_rec, activation and sequence length of a vanilla RNN;
  ||dh_T/dh_{T-k}|| against the distance k (:func:`gradbook.measure.through_time`) with Pascanu et al.'s
  bound;
* :func:`clipping`: learning rate, clipping mode (none, by value, by norm) and threshold for gradient
  descent on the cliff (:func:`gradbook.toys.descend`); loss curve, gradient norm before and after
  clipping, and the path over the loss surface;
* :func:`transformer` (from :mod:`gradbook.transformer_explorer`, the explorer of Part IV): each block's
  gradient and the residual stream's size against depth, pre-LN against post-LN.

In Jupyter (with a kernel)::

    import gradbook as gb
    gb.explorers.gradient_flow()          # displays the live explorer

and :func:`gradbook.widgets.static` turns any of them into controls that work on a page without a kernel.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from . import activations as _acts
from . import init as _init
from . import measure as _measure
from . import nets as _nets
from . import theory as _theory
from . import toys as _toys
from .plot import PALETTE, finite_positive, log_axis, log_limits
from .transformer_explorer import transformer
from .widgets import (Explorer, Refused, Spec, checkbox, dropdown, frozen, require_positive, slider,
                      toggle_buttons)

__all__ = ["gradient_flow", "recurrent", "clipping", "transformer", "SIGMA_W", "NORMS", "CLIFF_WINDOW"]

#: The initialization dial's extra entry: weights N(0, sigma_w^2 / fan_in) with the sigma_w dial.
SIGMA_W = "sigma_w"
NORMS = {"none": None, "batch": "batch", "layer": "layer"}


# --- 1. gradient flow through an MLP -----------------------------------------------------------------

@functools.lru_cache(maxsize=512)
def _flow(depth, width, activation, init, sigma_w, norm, residual, seed, batch=128):
    if not (isinstance(depth, int) and 1 <= depth <= 200):
        raise Refused(f"depth must be a whole number from 1 to 200, got {depth!r}")
    if not (isinstance(width, int) and 2 <= width <= 1024):
        raise Refused(f"width must be a whole number from 2 to 1024, got {width!r}")
    if init == SIGMA_W:
        require_positive("sigma_w", sigma_w)
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
            loss = _measure.random_direction(hidden[-1])   # as mean-field theory assumes
        snap = _measure.gradients(net, x, loss_fn=loss)
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
    return frozen({"grads": grads, "predicted": predicted, "why_not": why_not, "sigma_w": sw,
                    "layers": shown, "hidden": [hidden[i - 1] for i in shown]})


def _draw_flow(fig, art, r, v):
    from matplotlib.ticker import MaxNLocator

    if not art:
        ax, hx = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.3, 1]})
        art.update(ax=ax, hx=hx, measured=ax.plot([], [], marker="o", color=PALETTE[0], label="measured")[0],
                   predicted=ax.plot([], [], "--", color="black", lw=1.5, label="mean-field prediction")[0],
                   hists=[hx.stairs([1.0], [0, 1], baseline=0.5, lw=1.5, color=PALETTE[(i + 1) % len(PALETTE)]) for i in range(4)])
        log_axis(ax)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer (1 = nearest the input)")
        ax.set_ylabel(r"$\|\partial L/\partial a_\ell\|$")
        log_axis(hx)
        hx.set_xlabel("activation value")
        hx.set_ylabel("count")
        hx.set_title("activations of a few layers", fontsize=10)
    ax, hx = art["ax"], art["hx"]
    layers = np.arange(1, len(r["grads"]) + 1)
    grads = finite_positive(r["grads"])
    art["measured"].set_data(layers, grads)
    pred = r["predicted"] if r["predicted"] is not None else np.full(len(layers), np.nan)
    art["predicted"].set_data(layers, pred)
    art["predicted"].set_label("mean-field prediction" if r["predicted"] is not None else "_hidden")
    ax.set_xlim(0.5, len(layers) + 0.5)
    ax.set_ylim(*log_limits(grads, pred))
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
    dials = {"depth": slider("int", v["depth"], 1, 60, 1, "depth"),
            "width": slider("int", v["width"], 16, 256, 16, "width"),
            "activation": dropdown(v["activation"], _acts.names(), "activation"),
            "init": dropdown(v["init"], [n for n in _init.names() if n != "normal"] + [SIGMA_W], "init"),
            "sigma_w": slider("float", v["sigma_w"], 0.0, 4.0, 0.05, "sigma_w (if init = sigma_w)"),
            "norm": dropdown(v["norm"], list(NORMS), "normalization"),
            "residual": checkbox(v["residual"], "residual"),
            "seed": slider("int", v["seed"], 0, 9, 1, "seed")}
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
    normal vectors and the loss <r, y> of the last hidden layer's output y for a random Gaussian direction r
    (:func:`gradbook.measure.random_direction`, as mean-field theory assumes); the plot shows
    ||dL/da_l|| at every layer's pre-activation, the quantity :func:`gradbook.theory.gradient_profile`
    predicts (drawn dashed, anchored at the top layer, for plain networks).
    """
    spec = Spec("Gradient flow through an MLP at initialization",
                 dict(depth=20, width=64, activation="tanh", init=SIGMA_W, sigma_w=1.0, norm="none",
                      residual=False, seed=0),
                 _flow_dials, _flow_compute, _draw_flow, _describe_flow, notes=_flow_notes)
    return Explorer(spec, values)


# --- 2. gradients through time in a vanilla RNN ------------------------------------------------------

@functools.lru_cache(maxsize=512)
def _through_time(sigma_max, activation, length, seed, hidden=32, batch=8, input_std=0.01):
    require_positive("sigma_max", sigma_max)
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
    return frozen({"k": k, "norms": norms, "bound": bounds["bound"](k), "gamma": bounds["gamma"],
                    "sigma_max": bounds["sigma_max"]})


def _draw_recurrent(fig, art, r, v):
    if not art:
        ax = fig.subplots()
        art.update(ax=ax, measured=ax.plot([], [], color=PALETTE[0], label=r"measured $\|\partial h_T/\partial h_{T-k}\|$")[0],
                   bound=ax.plot([], [], "--", color="black", lw=1.5)[0])
        ax.axhline(1.0, color="grey", lw=1)
        log_axis(ax)
        ax.set_xlabel("distance in time k")
        ax.set_ylabel(r"$\|\partial h_T/\partial h_{T-k}\|$")
    ax = art["ax"]
    norms = finite_positive(r["norms"])
    lo, hi = log_limits(norms, floor=0.5, ceil=2.0)
    lo, hi = lo / 5, hi * 5
    art["measured"].set_data(r["k"], norms)
    art["bound"].set_data(r["k"], np.where(r["bound"] <= hi * 1e3, finite_positive(r["bound"]), np.nan))
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
    return {"sigma_max": slider("float", v["sigma_max"], 0.0, 2.0, 0.05, "sigma_max(W_rec)"),
            "activation": dropdown(v["activation"], ["tanh", "sigmoid", "relu", "linear"], "activation"),
            "length": slider("int", v["length"], 10, 200, 10, "length T"),
            "seed": slider("int", v["seed"], 0, 9, 1, "seed")}


def recurrent(**values) -> Explorer:
    """The recurrent explorer: how ||dh_T/dh_{T-k}|| changes with the distance k in a vanilla RNN.

    Dials: ``sigma_max`` (1.0; W_rec is orthogonal times sigma_max, so every singular value equals it),
    ``activation`` ("tanh"), ``length`` (100), ``seed`` (0). 32 hidden units, float64, inputs
    N(0, 0.01^2); the dashed line is the bound (gamma sigma_max)^k of Pascanu et al. (2013)
    (:func:`gradbook.theory.rnn_bounds`).
    """
    spec = Spec("Gradients through time in a vanilla RNN", dict(sigma_max=1.0, activation="tanh", length=100, seed=0),
                 _recurrent_dials, _through_time, _draw_recurrent, _describe_recurrent, figsize=(7.2, 3.6),
                 notes=_recurrent_notes)
    return Explorer(spec, values)


# --- 3. clipping on the cliff ------------------------------------------------------------------------

#: Where the clipping explorer starts: a short way from the wall where the gradient jumps to ~1e5.
CLIFF_START = (6.0, -3.0)


@functools.lru_cache(maxsize=512)
def _clip(lr, mode, threshold, steps):
    require_positive("learning rate", lr)
    if mode not in _toys.CLIP_MODES:
        raise Refused(f"clipping mode must be one of {', '.join(_toys.CLIP_MODES)}, got {mode!r}")
    if mode != "none":
        require_positive("threshold", threshold)
    if not (isinstance(steps, int) and 1 <= steps <= 5000):
        raise Refused(f"steps must be a whole number from 1 to 5000, got {steps!r}")
    run = _toys.descend(*CLIFF_START, lr, mode, threshold if mode != "none" else np.inf, steps)
    diverged = int(run.diverged)
    return frozen({"loss": run.loss, "norm_before": run.norm_before, "norm_after": run.norm_after,
                   "path": run.path, "diverged": None if diverged < 0 else diverged})


#: The window of the (w, b) plane that the clipping explorer's third panel shows.
CLIFF_WINDOW = (2.0, 9.0, -4.0, 2.0)


@functools.lru_cache(maxsize=1)
def _cliff_surface(n=160):
    w0, w1, b0, b1 = CLIFF_WINDOW
    ww, bb = np.meshgrid(np.linspace(w0, w1, n), np.linspace(b0, b1, n))
    return _toys.cliff(ww, bb)[0]


def _draw_clipping(fig, art, r, v):
    if not art:
        lx, gx, px = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 0.9]})
        art.update(lx=lx, gx=gx, px=px, loss=lx.plot([], [], color=PALETTE[0])[0],
                   before=gx.plot([], [], color=PALETTE[1], label="before clipping")[0],
                   after=gx.plot([], [], ":", color=PALETTE[2], lw=2.5, label="after clipping")[0],
                   threshold=gx.axhline(1.0, color="grey", lw=1, label="threshold"))
        for ax in (lx, gx):
            log_axis(ax)
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
    loss, before, after = (finite_positive(r[k]) for k in ("loss", "norm_before", "norm_after"))
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
    art["lx"].set_ylim(*log_limits(loss))
    art["gx"].set_ylim(*log_limits(before, after, *([v["threshold"]] if shown else [])))
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
    return {"lr": slider("log", v["lr"], -2, 1, 0.1, "learning rate"),
            "mode": toggle_buttons(v["mode"], _toys.CLIP_MODES, "clipping"),
            "threshold": slider("log", v["threshold"], -2, 2, 0.1, "threshold"),
            "steps": slider("int", v["steps"], 50, 1000, 50, "steps")}


def clipping(**values) -> Explorer:
    """The clipping explorer: gradient descent on the cliff of :func:`gradbook.toys.cliff`.

    Dials: ``lr`` (1.0), ``mode`` ("none", "value", "norm"; default "norm"), ``threshold`` (1.0),
    ``steps`` (300). Starts at (w, b) = (6, -3), a short way from the wall where the gradient jumps to
    ~1e5 (Pascanu, Mikolov & Bengio 2013, fig. 6).
    """
    spec = Spec("Gradient clipping on the cliff", dict(lr=1.0, mode="norm", threshold=1.0, steps=300),
                 _clipping_dials, _clip, _draw_clipping, _describe_clipping, figsize=(11.5, 3.6),
                 notes=_clipping_notes)
    return Explorer(spec, values)


