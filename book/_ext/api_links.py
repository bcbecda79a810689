"""Sphinx extension: inline code in the book that names a gradbook object links to the API reference.

A chapter's prose mentions the package as inline code: `gb.gradients`, `gb.measure.through_time(net, x)`,
`gradbook.theory`. Each such literal, when its dotted name (arguments ignored) is a module, function or
class that the API reference documents, becomes a link to that entry. The name is looked up as written
(``gb.`` read as ``gradbook.``) and, failing that, under the module that defines the object (``gb.mlp`` is
``gradbook.nets.mlp``). A name that resolves to nothing documented is a warning, so that with ``-W`` the
prose cannot mention a function the package lacks or the reference leaves out.

Literals inside titles, inside links already, and on the API page itself are left alone.
"""
from __future__ import annotations

import importlib
import inspect
import re

from docutils import nodes
from sphinx.util import logging

LOGGER = logging.getLogger(__name__)
_NAME = re.compile(r"(?:gb|gradbook)((?:\.[A-Za-z_]\w*)+)(?:\(.*\))?", re.S)


def _candidates(dotted: str) -> list[str]:
    """Full names under which the API reference may document ``gradbook<dotted>``."""
    names = ["gradbook" + dotted]
    try:
        obj = importlib.import_module("gradbook")
        for part in dotted.split(".")[1:]:
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return names
    if inspect.ismodule(obj):
        names.append(obj.__name__)
    elif getattr(obj, "__module__", None) and getattr(obj, "__qualname__", None):
        names.append(f"{obj.__module__}.{obj.__qualname__}")
    return names


def _target(domain, dotted: str):
    for name in _candidates(dotted):
        if name in domain.modules:
            entry = domain.modules[name]
            return entry.docname, entry.node_id
        if name in domain.objects:
            entry = domain.objects[name]
            return entry.docname, entry.node_id
    return None


def _link_names(app, doctree, docname):
    if app.builder.format != "html" or docname == app.config.api_links_page:
        return
    domain = app.env.get_domain("py")
    for literal in list(doctree.findall(nodes.literal)):
        if any(isinstance(a, (nodes.reference, nodes.title)) for a in _ancestors(literal)):
            continue
        text = literal.astext().strip()
        match = _NAME.fullmatch(text)
        if not match:
            continue
        target = _target(domain, match.group(1))
        if target is None:
            LOGGER.warning(f"`{text}` names no gradbook object documented in {app.config.api_links_page}",
                           location=literal, type="api_links")
            continue
        target_doc, node_id = target
        uri = app.builder.get_relative_uri(docname, target_doc) + ("#" + node_id if node_id else "")
        ref = nodes.reference("", "", internal=True, refuri=uri, reftitle=f"API reference: {text}",
                              classes=["api-link"])
        literal.replace_self(ref)
        ref.append(literal)


def _ancestors(node):
    node = node.parent
    while node is not None:
        yield node
        node = node.parent


def setup(app):
    app.add_config_value("api_links_page", "book/api", "env")
    app.connect("doctree-resolved", _link_names)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
