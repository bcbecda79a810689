"""The explorer framework: dials above one figure, live in Jupyter and precomputed for the website.

An :class:`Explorer` is made from a :class:`Spec`: its dials, a cached function from dial values to
numbers, a function that draws them into one figure, and alt text. The explorers themselves are in
:mod:`gradbook.explorers`.

How it stays responsive (median update well under 0.3 s on one core, ``benchmarks/widgets.py``): every
result cached by its dial values (the spec's ``compute``); sliders report only when released
(``continuous_update=False``), so a dragged slider costs one update, not dozens; the figure is a single
:class:`matplotlib.figure.Figure` (never pyplot, so nothing stacks up in the notebook) rendered to PNG and
swapped into one ``Image`` widget, which replaces its picture without flicker. A setting that cannot be
computed is refused with a message in the widget, never a traceback.

Without a kernel (the book's website) live callbacks cannot run. :func:`static` precomputes the figures
for a small grid of one or two dials and links the controls to ``Stack`` widgets with ``jslink``, which
runs in the browser from the saved widget state: every control on the page works.

The live widgets need ipywidgets, which the ``book`` extra installs (``pip install "gradbook[book]"``);
drawing to PNG (:meth:`Explorer.render`) needs only matplotlib.
"""
from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

__all__ = ["Explorer", "Spec", "Refused", "static", "ipywidgets", "slider", "dropdown", "checkbox",
           "toggle_buttons", "require_positive", "frozen", "DPI"]

DPI = 80        # the figures' resolution: about 770 x 290 pixels for a two-panel explorer


def ipywidgets():
    """The ipywidgets module, or an ImportError that says which extra installs it."""
    try:
        import ipywidgets as w
    except ImportError:
        raise ImportError('the live explorers need ipywidgets, which gradbook\'s "book" extra installs: '
                          'pip install "gradbook[book]" (or pip install ipywidgets)') from None
    return w


class Refused(ValueError):
    """A dial setting the explorer cannot show; its message is shown in the widget."""


@dataclass
class Spec:
    """What makes an explorer: title, dial defaults, dials, a cached compute, draw, alt text, notes."""

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

    def __init__(self, spec: Spec, values: dict):
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
            w = ipywidgets()

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


def slider(kind, value, lo, hi, step, description, **kw):
    """A dial that reports when released: ``kind`` is "int", "float" or "log" (lo, hi: powers of ten)."""
    w = ipywidgets()

    cls = {"int": w.IntSlider, "float": w.FloatSlider, "log": w.FloatLogSlider}[kind]
    args = dict(base=10, min=lo, max=hi) if kind == "log" else dict(min=lo, max=hi)
    return cls(value=value, step=step, description=description, continuous_update=False,
               style={"description_width": "7em"}, **args, **kw)


def dropdown(value, options, description):
    """A drop-down dial."""
    w = ipywidgets()

    return w.Dropdown(value=value, options=options, description=description, style={"description_width": "7em"})


def checkbox(value, description):
    """A check-box dial."""
    w = ipywidgets()

    return w.Checkbox(value=value, description=description, style={"description_width": "7em"})


def require_positive(name, value):
    """Refuse a dial value that is not a finite number > 0."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise Refused(f"{name} must be a number > 0, got {value!r}")


def toggle_buttons(value, options, description):
    """A row of buttons, one of which is on."""
    w = ipywidgets()
    return w.ToggleButtons(value=value, options=options, description=description,
                           style={"description_width": "7em", "button_width": "5em"})


def frozen(result: dict) -> dict:
    """Make a cached result's arrays read-only, so that no caller can change what the cache returns."""
    for value in result.values():
        for a in (value if isinstance(value, list) else [value]):
            if isinstance(a, np.ndarray):
                a.setflags(write=False)
    return result


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
    w = ipywidgets()

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
