"""Conceptual drawings: the pictures a learner needs before the plots.

Each function draws one idea with matplotlib and returns the figure: backpropagation as a chain of
Jacobians through depth or through time (:func:`jacobian_chain`), saturation on the curves of the sigmoid
and tanh (:func:`saturation`), the variance of a fan-in sum (:func:`fan_in`), clipping by norm against
clipping by value (:func:`clipping`) and the two paths of a residual block (:func:`residual`). They are
drawn at a phone's width (about 6.4 by 3 inches, text of 11 points or more) and use no data.
"""
from __future__ import annotations

import numpy as np

from .activations import get

__all__ = ["jacobian_chain", "saturation", "fan_in", "clipping", "residual"]

FORWARD, BACKWARD, SKIP = "#0072B2", "#D55E00", "#009E73"
FONT = 11


def _canvas(width=6.4, height=3.0):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height))
    ax.set_axis_off()
    ax.set_aspect("equal")
    return fig, ax


def _box(ax, x, y, text, colour="white", w=0.9, h=0.6):
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.05", facecolor=colour,
                                edgecolor="0.2", linewidth=1.2))
    ax.text(x, y, text, ha="center", va="center", fontsize=FONT + 1)


def _arrow(ax, start, end, colour, text=None, offset=0.28, rad=0.0, style="-|>"):
    ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle=style, color=colour, lw=1.8,
                                                          connectionstyle=f"arc3,rad={rad}"))
    if text:
        mid = ((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + offset)
        ax.text(*mid, text, ha="center", va="center", fontsize=FONT, color=colour)


def jacobian_chain(through: str = "depth", n: int = 4):
    """Backpropagation as a product of Jacobians: ``through="depth"`` draws layers h_0 .. h_n of a
    feed-forward network, ``through="time"`` the states h_1 .. h_n of an unrolled recurrent network that
    share one matrix W. Forward arrows on top, the backward product J^T on the bottom."""
    if through not in ("depth", "time"):
        raise ValueError(f"through must be 'depth' or 'time', got {through!r}")
    fig, ax = _canvas()
    first = 0 if through == "depth" else 1
    xs = np.arange(n + 1) * 1.5
    names = [rf"$h_{{{k}}}$" for k in range(first, first + n)] + [r"$\mathcal{L}$"]
    for k, (x, name) in enumerate(zip(xs, names)):
        _box(ax, x, 0, name, colour="#f2f2f2" if k == n else "white")
        if through == "time" and k < n:
            _arrow(ax, (x, -0.9), (x, -0.35), "0.4")
            ax.text(x, -1.1, rf"$x_{{{k + 1}}}$", ha="center", va="center", fontsize=FONT)
    for k in range(n):
        label = rf"$W_{{{k + 1}}}$" if through == "depth" else "$W$"
        if k == n - 1:
            label = "loss"
        _arrow(ax, (xs[k] + 0.5, 0.12), (xs[k + 1] - 0.5, 0.12), FORWARD, label, offset=0.4)
        back = r"$J_{%d}^{\top}$" % (k + first + 1) if k < n - 1 else r"$\partial\mathcal{L}/\partial h$"
        _arrow(ax, (xs[k + 1] - 0.5, -0.12), (xs[k] + 0.5, -0.12), BACKWARD, back, offset=-0.42)
    title = ("through depth: each layer multiplies the gradient by its own Jacobian" if through == "depth" else
             "through time: every step multiplies by the same $W^{\\top}$, times $\\phi'$")
    ax.set_title(title, fontsize=FONT)
    ax.text(xs[-1] / 2, 1.05, "forward: activations", color=FORWARD, ha="center", fontsize=FONT)
    last = first + n - 1
    product = " ".join(r"J_{%d}^{\top}" % k for k in range(first + 1, last + 1))
    backward = rf"backward: $\partial\mathcal{{L}}/\partial h_{{{first}}} = {product}\,\partial\mathcal{{L}}/\partial h_{{{last}}}$"
    if through == "time":
        backward += r", each $J_t = \mathrm{diag}(\phi') W$"
    ax.text(xs[-1] / 2, -1.55 if through == "time" else -1.0, backward, color=BACKWARD, ha="center", fontsize=FONT)
    ax.set_xlim(-0.7, xs[-1] + 0.7)
    ax.set_ylim(-1.8 if through == "time" else -1.25, 1.3)
    return fig


def saturation():
    """The sigmoid and tanh with a tangent at 0 and one far out: the slope is what the gradient is
    multiplied by, and on the flat tails it is nearly zero."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.0), sharex=True)
    z = np.linspace(-6, 6, 400)
    for ax, name in zip(axes, ["sigmoid", "tanh"]):
        act = get(name)
        ax.plot(z, act(z), color="0.2", lw=2)
        for x0, colour in [(0.0, FORWARD), (3.5, BACKWARD)]:
            slope = float(act.derivative(np.array([x0]))[0])
            t = np.linspace(x0 - 1.6, x0 + 1.6, 2)
            ax.plot(t, act(np.array([x0]))[0] + slope * (t - x0), color=colour, lw=2)
            ax.plot([x0], act(np.array([x0])), "o", color=colour)
            ax.annotate(f"slope {slope:.2g}", (x0, act(np.array([x0]))[0]), xytext=(x0 - 0.3, -0.35 if
                        name == "tanh" and x0 == 0 else (0.2 if x0 == 0 else 0.55)), color=colour,
                        fontsize=FONT, textcoords="data", ha="center" if x0 else "left")
        for side in (-1, 1):
            ax.axvspan(side * 3, side * 6, color="0.9", zorder=0)
        ax.set_title(f"{name}: flat tails = saturated", fontsize=FONT)
        ax.set_xlabel("pre-activation $a$", fontsize=FONT)
    axes[0].set_ylabel(r"$\phi(a)$", fontsize=FONT)
    fig.tight_layout()
    return fig


def fan_in(n: int = 5):
    """One unit summing n weighted inputs: the variance of the sum is n Var(w) Var(x), so keeping it at
    Var(x) asks for Var(w) = 1/n (for the backward pass, the same with the fan-out)."""
    from matplotlib.patches import Circle

    fig, ax = _canvas(height=3.2)
    ys = np.linspace(1.2, -1.2, n)
    for k, y in enumerate(ys):
        ax.add_patch(Circle((0, y), 0.2, facecolor="white", edgecolor="0.2"))
        ax.text(-0.45, y, rf"$x_{{{k + 1}}}$", ha="right", va="center", fontsize=FONT)
        _arrow(ax, (0.22, y), (2.22, 0), FORWARD)
        ax.text(1.1, y * 0.62 + 0.1, rf"$w_{{{k + 1}}}$", fontsize=FONT - 1, color=FORWARD)
    _box(ax, 3.0, 0, r"$a=\sum_i w_i x_i$", w=1.4)
    ax.text(3.0, -0.75, r"$\mathrm{Var}(a) = n\,\mathrm{Var}(w)\,\mathrm{Var}(x)$", ha="center", fontsize=FONT)
    ax.text(3.0, -1.25, r"kept equal to $\mathrm{Var}(x)$ by $\mathrm{Var}(w) = 1/n$", ha="center",
            fontsize=FONT)
    ax.set_title(f"n = {n} inputs: each adds its own variance", fontsize=FONT)
    ax.set_xlim(-0.9, 4.6)
    ax.set_ylim(-1.6, 1.6)
    return fig


def clipping(g=(2.4, 0.6), c: float = 1.0):
    """A gradient g clipped by norm (same direction, length c: onto the circle) and by value (each entry
    into [-c, c]: onto the square), which turns it."""
    from matplotlib.patches import Circle, Rectangle

    fig, ax = _canvas(height=3.2)
    g = np.asarray(g, dtype=float)
    by_norm = g * min(1.0, c / np.linalg.norm(g))
    by_value = np.clip(g, -c, c)
    ax.add_patch(Circle((0, 0), c, fill=False, ls="--", color=FORWARD, lw=1.4))
    ax.add_patch(Rectangle((-c, -c), 2 * c, 2 * c, fill=False, ls=":", color=BACKWARD, lw=1.4))
    for vec, colour, text in [(g, "0.3", "$g$"), (by_norm, FORWARD, "by norm"), (by_value, BACKWARD, "by value")]:
        ax.annotate("", xy=vec, xytext=(0, 0), arrowprops=dict(arrowstyle="-|>", color=colour, lw=2.2))
        ax.text(vec[0] + 0.08, vec[1] + (0.12 if text != "by norm" else -0.3), text, color=colour, fontsize=FONT)
    ax.text(-2.9, 1.05, "circle: $\\|g\\| \\leq c$\nsame direction", color=FORWARD, fontsize=FONT, va="top")
    ax.text(-2.9, -0.3, "square: $|g_i| \\leq c$\nturned towards\nthe diagonal", color=BACKWARD, fontsize=FONT,
            va="top")
    ax.set_xlim(-3.0, 3.0)
    ax.set_ylim(-1.3, 1.4)
    ax.set_title("Clipping a long gradient: rescaled, or clamped entry by entry", fontsize=FONT)
    return fig


def residual(blocks: int = 3):
    """A stack of residual blocks h_l = h_{l-1} + F(h_{l-1}): every block has an identity path (the gradient
    passes unchanged) beside its branch (the gradient is multiplied by the branch's Jacobian)."""
    fig, ax = _canvas(height=2.8)
    xs = np.arange(blocks + 1) * 1.9
    for k, x in enumerate(xs):
        _box(ax, x, 0, rf"$h_{{{k}}}$", w=0.7)
    for k in range(blocks):
        mid = (xs[k] + xs[k + 1]) / 2
        _box(ax, mid, -0.95, "$F$", colour="#fde9d9", w=0.6, h=0.5)
        _arrow(ax, (xs[k] + 0.1, -0.35), (mid - 0.35, -0.95), BACKWARD)
        _arrow(ax, (mid + 0.35, -0.95), (xs[k + 1] - 0.1, -0.35), BACKWARD)
        _arrow(ax, (xs[k] + 0.4, 0.0), (xs[k + 1] - 0.4, 0.0), SKIP, "identity", offset=0.25)
        ax.text(xs[k + 1] - 0.42, -0.28, "+", fontsize=FONT + 3, ha="center")
    ax.text(xs[-1] / 2, 0.95, r"$\partial h_\ell / \partial h_{\ell-1} = I + \partial F / \partial h_{\ell-1}$",
            ha="center", fontsize=FONT)
    ax.text(xs[-1] / 2, -1.65, "the identity keeps a path whose gradient factor is exactly 1",
            ha="center", fontsize=FONT, color=SKIP)
    ax.set_xlim(-0.6, xs[-1] + 0.6)
    ax.set_ylim(-1.9, 1.25)
    return fig
