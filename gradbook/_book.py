"""Hand a computed number to the book's prose, so the text cannot drift from the code."""
from __future__ import annotations

import numbers


def glue(name: str, value):
    """Make ``value`` available to the page's text as ``{glue:text}`name:.2f``` and return it.

    In a Jupyter Book build this is myst-nb's ``glue`` (nothing is shown in the cell). Outside a book
    build (Colab, plain Jupyter without myst-nb) it only returns the value.
    """
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = int(value) if isinstance(value, numbers.Integral) else float(value)
    try:
        from myst_nb import glue as _glue
    except ImportError:
        return value
    _glue(name, value, display=False)
    return value
