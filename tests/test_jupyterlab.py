"""A learner opens a chapter in JupyterLab (the README's install): the MyST prose renders, and the hidden
assert cells are marked as the book's self-checks and collapsed.

A real `jupyter lab` on a free loopback port (with a token), serving a copy of the chapter (JupyterLab may
save what it opens), in headless Chromium driven by Playwright. Like the site's browser tests, skipped
without Chromium, except where GRADBOOK_REQUIRE_BROWSER=1 (CI). A screenshot goes to _build/screenshots/.
"""
import json
import os
import pathlib
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("GRADBOOK_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = ROOT / "_build" / "screenshots"
CHAPTER = "book/vanishing/activations.ipynb"   # glue roles, {doc}, {cite:t}, math, self-checks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """`jupyter lab` serving a copy of the chapter's folder; yields (url of the notebook, its source)."""
    if not pathlib.Path(CHROMIUM).exists():
        message = f"Chromium not found at {CHROMIUM} (apt-get install -y chromium, or set GRADBOOK_CHROMIUM)"
        if os.environ.get("GRADBOOK_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    tmp = tmp_path_factory.mktemp("lab")
    root = tmp / "root"
    shutil.copytree(ROOT / pathlib.Path(CHAPTER).parent, root / pathlib.Path(CHAPTER).parent,
                    ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    settings = tmp / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    # every cell in the page, not only those scrolled into view, so that all can be read at once
    notebook_settings = tmp / "settings" / "@jupyterlab" / "notebook-extension"
    notebook_settings.mkdir(parents=True)
    (notebook_settings / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp / "config"), JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp / "workspaces"), JUPYTERLAB_SETTINGS_DIR=str(tmp / "settings"))
    command = [pathlib.Path(sys.executable).with_name("jupyter"), "lab", "--no-browser", "--ip=127.0.0.1",
               f"--port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
               "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-root")
    log = open(tmp / "lab.log", "w")
    server = subprocess.Popen([str(c) for c in command], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp / "lab.log").read_text()[-3000:]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "jupyter lab did not start in 120 s"
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/lab/tree/{CHAPTER}?token={token}", json.loads((ROOT / CHAPTER).read_text())
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture(scope="module")
def chapter(lab):
    """The chapter open in JupyterLab: (rendered text of the notebook, per code cell: collapsed?, source)."""
    from playwright.sync_api import sync_playwright

    url, nb = lab
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.wait_for_selector(".jp-Notebook .jp-MarkdownCell .myst", timeout=120000)
            # every cell in the page, every markdown cell rendered by jupyterlab-myst (class myst)
            page.wait_for_function("""n => document.querySelectorAll('.jp-Notebook .jp-Cell').length === n &&
                document.querySelectorAll('.jp-Notebook .jp-MarkdownCell .myst').length ===
                document.querySelectorAll('.jp-Notebook .jp-MarkdownCell').length""",
                                   arg=len(nb["cells"]), timeout=60000)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(SCREENSHOTS / "jupyterlab_vanishing_activations.png"))
            prose = page.evaluate("""() => Array.from(document.querySelectorAll('.jp-Notebook .jp-MarkdownCell'))
                .map(c => c.querySelector('.myst') ? c.querySelector('.myst').innerText : null)""")
            code = page.evaluate("""() => Array.from(document.querySelectorAll('.jp-Notebook .jp-CodeCell'))
                .map(c => ({collapsed: !!c.querySelector('.jp-InputPlaceholder'),
                            editor: c.querySelector('.jp-InputArea-editor') && c.querySelector('.jp-InputArea-editor').offsetParent !== null,
                            placeholder: c.querySelector('.jp-InputPlaceholder') ? c.querySelector('.jp-InputPlaceholder').innerText : ''}))""")
            # a self-check opened by a click shows its marker line
            opened = None
            index = next((i for i, c in enumerate(code) if c["collapsed"]), None)
            if index is not None:
                cell = page.locator(".jp-Notebook .jp-CodeCell").nth(index)
                cell.scroll_into_view_if_needed()
                cell.locator(".jp-InputPlaceholder").click()
                page.wait_for_timeout(500)
                cell.locator(".jp-InputArea-editor").wait_for(state="visible", timeout=10000)
                opened = cell.locator(".jp-InputArea-editor").inner_text()
                cell.screenshot(path=str(SCREENSHOTS / "jupyterlab_self_check_opened.png"))
        finally:
            browser.close()
    return nb, prose, code, opened


def test_the_prose_renders_as_myst(chapter):
    """No raw MyST roles, fences or dollar math left: jupyterlab-myst rendered every markdown cell (the
    glue roles show the glued name, {doc} a link, {cite:t} the reference key, math MathJax)."""
    nb, prose, _, _ = chapter
    sources = [("".join(c["source"])) for c in nb["cells"] if c["cell_type"] == "markdown"]
    assert len(prose) == len(sources) and all(p is not None for p in prose), "markdown cells not rendered"
    text = "\n".join(prose)
    raw = re.findall(r"\{(?:glue:text|glue|doc|cite:t|cite:p|numref|ref|eq)\}`?|`\{|\$\$|:::\{|```\{", text)
    assert not raw, f"raw MyST shown to the reader: {raw[:10]}"
    glued = [m for s in sources for m in re.findall(r"\{glue:text\}`([^`:]+)", s)]
    assert glued and all(name in text for name in glued), "a glued number's name is missing from the prose"
    assert "glorot2010" in text                                   # {cite:t}
    assert "Why: activation functions" in text                    # the title, rendered as a heading


def test_self_checks_are_collapsed_and_marked(chapter):
    nb, _, code, opened = chapter
    sources = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert len(code) == len(sources)
    checks = [i for i, c in enumerate(sources) if "remove-cell" in c["metadata"].get("tags", [])
              and "assert" in "".join(c["source"]) and c.get("id") != "install-gradbook"]
    assert checks
    assert [i for i, c in enumerate(code) if c["collapsed"]] == checks, \
        "exactly the self-check cells open collapsed in JupyterLab"
    assert not any(code[i]["editor"] for i in checks)
    # collapsed, a cell shows its first line: the marker says what the hidden code is
    shown = [code[i]["placeholder"] for i in checks]
    assert all(t.lstrip().startswith("# Self-check:") for t in shown), shown
    assert opened is not None and opened.lstrip().startswith("# Self-check:"), opened
