"""Progress of a long call, shown only where someone is watching it.

A progress bar is for a person at a screen. Written where nobody watches (a notebook executed by
``jupyter nbconvert --execute``, nbgrader's autograder, nbval, pytest, a script whose output goes to a
file) it is noise at best, and at worst it changes the outcome: nbgrader gives no points to a graded cell
that writes to stderr, and an executed notebook saves every redraw of a text bar. So by default:

* in a Jupyter kernel driven by a person (JupyterLab, Notebook, VS Code, Colab), progress is one line of
  text, updated in place (an IPython display handle: one output, however many updates);
* in a terminal (stderr is a TTY), a tqdm bar on stderr;
* anywhere else, nothing.

A kernel is driven by a person when the request being executed allows input (``allow_stdin``): front
ends set it, while nbclient (nbconvert, nbgrader, Jupyter Book) and nbval execute with ``allow_stdin``
false, because nobody is there to answer. ``show=True`` or ``False`` overrides the choice.
"""
from __future__ import annotations

import sys
import time

__all__ = ["watched", "Progress"]

#: Seconds between two redraws of a notebook's progress line (each redraw is a message to the front end).
REDRAW = 0.25


def _kernel_request_allows_input() -> bool | None:
    """True or False inside a Jupyter kernel (whether the current request allows input), None outside one."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    shell = get_ipython()
    kernel = getattr(shell, "kernel", None)
    if kernel is None or not hasattr(kernel, "get_parent"):
        return None
    parent = kernel.get_parent() or {}
    return bool(parent.get("content", {}).get("allow_stdin", False))


def watched() -> bool:
    """Whether a person is likely watching this process's output (see the module's docstring)."""
    in_kernel = _kernel_request_allows_input()
    if in_kernel is not None:
        return in_kernel
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


class Progress:
    """``with Progress(total, "fit") as p: ... p.update(loss=0.3)``: a progress line where someone watches.

    ``show``: None (default) decides with :func:`watched`; True or False forces it. ``p.shown`` says
    whether anything is displayed.
    """

    def __init__(self, total: int, label: str, show: bool | None = None):
        self.total, self.label = total, label
        self.shown = watched() if show is None else bool(show)
        self.done = 0
        self._bar = self._handle = None
        self._last = 0.0
        self._postfix: dict = {}

    def __enter__(self) -> "Progress":
        if not self.shown:
            return self
        if _kernel_request_allows_input() is None:   # a terminal (or forced on outside a kernel): tqdm
            from tqdm import tqdm
            self._bar = tqdm(total=self.total, desc=self.label, leave=False)
        else:
            from IPython.display import display
            self._handle = display(self._text(), display_id=True)
        return self

    def _text(self) -> str:
        from IPython.display import Pretty

        post = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self._postfix.items())
        return Pretty(f"{self.label}: {self.done}/{self.total}" + (f" ({post})" if post else ""))

    def update(self, n: int = 1, **postfix) -> None:
        """Count ``n`` more units of work; ``postfix`` values (say ``loss=0.3``) are shown beside the count."""
        self.done += n
        self._postfix.update(postfix)
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(n)
        elif self._handle is not None and (time.monotonic() - self._last > REDRAW or self.done >= self.total):
            self._last = time.monotonic()
            self._handle.update(self._text())

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._handle is not None:
            self._handle.update(self._text())
