"""The book builds with zero warnings (`-W -n`), and the built pages carry what the chapters computed."""
import os
import pathlib
import re
import subprocess
import sys

import pytest
from notebook_runner import toc_files

ROOT = pathlib.Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"


@pytest.fixture(scope="module")
def build():
    """Build the book as `make book` does; cached notebooks are not re-run."""
    exe = pathlib.Path(sys.executable).with_name("jupyter-book")
    env = dict(os.environ, GRADBOOK_PROGRESS="0")
    proc = subprocess.run([str(exe), "build", str(ROOT), "-W", "-n", "--keep-going"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    return proc


def test_book_builds_without_warnings(build):
    log = build.stdout + build.stderr
    assert build.returncode == 0, log[-6000:]
    # Sphinx's own format, "path:line: WARNING: message" (the kernel's "[IPKernelApp] WARNING | ..." is not one)
    warnings = [line for line in log.splitlines() if re.search(r"\b(WARNING|ERROR|CRITICAL): ", line)]
    assert not warnings, "\n".join(warnings[:30])


def test_every_chapter_page_is_built(build):
    for name in ["intro", "gradients-through-depth", "bibliography"]:
        assert (HTML / "book" / f"{name}.html").exists(), f"{name}.html missing"
    assert (HTML / "index.html").exists()


def test_glued_numbers_reach_the_page(build):
    page = (HTML / "book" / "gradients-through-depth.html").read_text()
    assert 'class="pasted-text"' in page, "no computed number was pasted into the prose"


def test_citations_resolve_to_the_bibliography(build):
    page = (HTML / "book" / "gradients-through-depth.html").read_text()
    assert "bibliography.html#id" in page or "bibliography.html#" in page


def test_pages_load_no_script_or_stylesheet_from_another_site(build):
    """Math must render offline: MathJax (and anything else a page runs) is served by the site itself."""
    # the pages of the current table of contents (an old build may leave pages of removed chapters behind)
    pages = [HTML / f"{f}.html" for f in toc_files()] + [HTML / "search.html", HTML / "genindex.html"]
    assert all(p.exists() for p in pages), [str(p) for p in pages if not p.exists()]
    for page in pages:
        text = page.read_text()
        external = re.findall(r'<script[^>]+src="(https?:[^"]+)"', text)
        external += [h for h in re.findall(r'<link[^>]+href="(https?:[^"]+)"', text)
                     if re.search(r"\.(css|js)(\?|$)", h)]
        assert not external, f"{page.relative_to(HTML)} loads {external}"
    mathjax = re.search(r'<script[^>]+src="([^"]*mathjax[^"]*)"', (HTML / "book" / "gradients-through-depth.html").read_text())
    assert mathjax, "the chapter page does not load MathJax"
    assert (HTML / "book" / mathjax.group(1).split("?")[0]).resolve().is_file()
