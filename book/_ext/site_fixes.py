"""Sphinx extension: fixes to the default Jupyter Book theme, so that its pages log no errors and the
site ships only what readers' browsers use.

sphinx-thebe registers an inline configuration script (``const THEBE_JS_URL = ...``) that reaches
each page twice (once registered with no file name, ``None``, once as an empty one, ``''``), so the
browser reported "Identifier 'THEBE_JS_URL' has already been declared" on every page. Identical
scripts are kept once.

The themes copy files into ``_static`` that no browser reads: source maps (``*.map``, 3.4 MB, fetched
only by a developer's tools) and the theme's message catalogues (``locales/``, used by Sphinx at build
time from the theme's own package, not from the site), and sphinx-copybutton's ``copybutton_funcs.js``
(its functions are pasted into ``copybutton.js`` when the site is built; the separate module is never
loaded). When the build finishes they are removed, with the ``sourceMappingURL`` comments that point to
the maps. A browser test checks that every script and style sheet left is fetched by some page.

Launch buttons (Colab, Binder) open a page's notebook from the book's repository. Pages built from
generated notebooks that the repository does not hold (the assignments' student versions) would open a
missing file, so pages whose source matches ``no_launch_buttons`` (glob patterns, in _config.yml) lose
them; their download buttons stay.
"""
import fnmatch
import pathlib
import re
import shutil

# the comment a bundler appends as a file's last line (not the strings inside a bundle that mention one)
_MAP_COMMENT = re.compile(rb"\n?(//# sourceMappingURL=[^\n]*|/\*# sourceMappingURL=[^*\n]*\*/)\s*\Z")


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


def _drop_unread_files(app, exception):
    static = pathlib.Path(app.outdir) / "_static"
    if exception is not None or not static.is_dir():
        return
    for source_map in static.rglob("*.map"):
        source_map.unlink()
    shutil.rmtree(static / "locales", ignore_errors=True)
    (static / "copybutton_funcs.js").unlink(missing_ok=True)
    for path in [*static.rglob("*.js"), *static.rglob("*.css")]:
        text = path.read_bytes()
        if b"sourceMappingURL=" in text:
            path.write_bytes(_MAP_COMMENT.sub(b"", text))


def _drop_launch_buttons(app, pagename, templatename, context, doctree):
    if not any(fnmatch.fnmatch(pagename, pattern) for pattern in app.config.no_launch_buttons):
        return
    buttons = context.get("header_buttons")
    if isinstance(buttons, list):
        buttons[:] = [b for b in buttons if not (isinstance(b, dict) and b.get("label") == "launch-buttons")]


def setup(app):
    app.add_config_value("no_launch_buttons", [], "html")
    # after sphinx-book-theme adds the buttons (its handler runs at priority 501)
    app.connect("html-page-context", _drop_launch_buttons, priority=600)
    # early, because html-page-context stops at the first handler that returns a template name
    app.connect("html-page-context", _dedupe_page, priority=100)
    app.connect("build-finished", _drop_unread_files)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
