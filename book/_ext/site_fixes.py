"""Sphinx extension: a fix to the default Jupyter Book theme, so that its pages log no errors.

sphinx-thebe registers an inline configuration script (``const THEBE_JS_URL = ...``) that reaches
each page twice (once registered with no file name, ``None``, once as an empty one, ``''``), so the
browser reported "Identifier 'THEBE_JS_URL' has already been declared" on every page. Identical
scripts are kept once.
"""


def _key(js):
    if isinstance(js, str):
        return (js, ())
    attrs = getattr(js, "attributes", {})
    return (getattr(js, "filename", None) or "", tuple(sorted((k, str(v)) for k, v in attrs.items())))


def _dedupe_page(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files")
    if not isinstance(scripts, list):
        return
    seen, kept = set(), []
    for js in scripts:
        if _key(js) not in seen:
            seen.add(_key(js))
            kept.append(js)
    scripts[:] = kept


def setup(app):
    # early, because html-page-context stops at the first handler that returns a template name
    app.connect("html-page-context", _dedupe_page, priority=100)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
