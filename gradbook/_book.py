"""Hand a computed number to the book's prose, so the text cannot drift from the code."""
from __future__ import annotations

import numbers

# myst-nb reads glued values from display outputs whose MIME types carry this prefix, with the name in
# the output's "scrapbook" metadata (myst_nb.ext.glue). Writing the output directly spares every notebook
# the import of myst_nb, about 3 s.
GLUE_PREFIX = "application/papermill.record/"


def glue(name: str, value):
    """Make ``value`` available to the page's text as ``{glue:text}`name:.2f``` and return it.

    Inside a Jupyter kernel this emits the same hidden output as myst-nb's ``glue(name, value,
    display=False)``: nothing is shown in the cell, and a Jupyter Book build pastes the value into the
    prose. Outside a kernel (a plain Python script) it only returns the value.
    """
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = int(value) if isinstance(value, numbers.Integral) else float(value)
    try:
        from IPython import get_ipython
    except ImportError:
        return value
    if get_ipython() is None:
        return value
    from IPython.core.formatters import format_display_data
    from IPython.display import display

    bundle, metadata = format_display_data(value)
    metadata["scrapbook"] = dict(name=name, mime_prefix=GLUE_PREFIX)
    display({GLUE_PREFIX + k: v for k, v in bundle.items()}, raw=True, metadata=metadata)
    return value
