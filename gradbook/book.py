"""The package's link to its book: the website's address and pages, and :func:`glue`, which hands a
computed number to a chapter's prose so that the text cannot drift from the code.

The address is configured once, in the book's ``_config.yml`` (``html.baseurl``); :data:`SITE` repeats it
for code that runs outside the website (the remedies :func:`gradbook.diagnosis.diagnose` prints), and a test keeps
the two equal and checks that every page in :data:`PAGES` is in the book's table of contents.
"""
from __future__ import annotations

import json
import numbers
from importlib import resources

from ._checks import choice

__all__ = ["glue", "SITE", "PAGES", "page_url", "GLUE_PREFIX", "results", "result_names"]

#: The book's website (``html.baseurl`` of ``_config.yml``).
SITE = "https://gradbook.github.io/gradbook/"

#: The chapters the package refers readers to, by topic: each a document of the book (its path without
#: the extension).
PAGES = {
    "activations": "book/vanishing/activations",
    "initialization": "book/vanishing/initialization",
    "relu": "book/vanishing/relu",
    "xavier-he": "book/vanishing/xavier-he",
    "batch-norm": "book/vanishing/batch-norm",
    "depth-init": "book/exploding/depth-init",
    "rnn": "book/exploding/rnn",
    "clipping": "book/exploding/clipping",
    "recurrent-init": "book/exploding/recurrent-init",
    "regularization": "book/exploding/regularization",
    "architectures": "book/beyond/architectures",
    "theory": "book/beyond/theory",
    "transformers": "book/modern/transformers",
    "precision": "book/modern/precision",
    "spikes": "book/modern/spikes",
    "width": "book/modern/width",
    "diagnose": "book/diagnose",
}


def page_url(topic: str) -> str:
    """The full address of the book's page on ``topic`` (a key of :data:`PAGES`)."""
    return f"{SITE}{PAGES[choice('topic', topic, PAGES)]}.html"


def result_names() -> list[str]:
    """The names of the replications whose results ship with the package (``gradbook/results/*.json``)."""
    folder = resources.files(__package__) / "results"
    if not folder.is_dir():
        return []
    return sorted(f.name.removesuffix(".json") for f in folder.iterdir() if f.name.endswith(".json"))


def results(name: str) -> dict:
    """The stored results of the replication ``name``, as the dictionary its script wrote.

    A replication too long to run inside a chapter is a script, ``replications/<name>.py`` in the
    repository; it writes ``gradbook/results/<name>.json``, which ships inside the package so that a chapter
    reads it wherever gradbook is installed (Colab included). A marked test re-runs part of each script and
    checks the file (``tests/test_replications.py``). The dictionary holds the script's ``config``, its
    ``results`` (one entry per grid cell) and how the check compares them (``check``).
    """
    choice("replication", name, result_names())
    text = (resources.files(__package__) / "results" / f"{name}.json").read_text(encoding="utf-8")
    return json.loads(text)

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
