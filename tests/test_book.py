"""The book builds with zero warnings (`-W -n`), and the built pages carry what the chapters computed."""
import functools
import os
import pathlib
import re
import subprocess
import sys
from urllib.parse import unquote, urlsplit

import pytest
from notebook_runner import toc_files

ROOT = pathlib.Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"


def _run(*command) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], cwd=ROOT, env=dict(os.environ),
                          capture_output=True, text=True, timeout=1800)


def _jupyter_book_build() -> subprocess.CompletedProcess:
    """`jupyter-book build` as `make book` runs it."""
    return _run(pathlib.Path(sys.executable).with_name("jupyter-book"), "build", ROOT, "-W", "-n", "--keep-going")


@pytest.fixture(scope="module")
def build():
    """Build the book as `make book` does; cached notebooks are not re-run."""
    # the assignment pages are the generated student versions (make release)
    subprocess.run([sys.executable, str(ROOT / "book" / "assignments" / "release.py")], check=True, timeout=600)
    # the notebooks that changed run first, one per core, into the cache the build reads (book/execute.py)
    execute = _run(sys.executable, ROOT / "book" / "execute.py")
    assert execute.returncode == 0, (execute.stdout + execute.stderr)[-6000:]
    return _jupyter_book_build()


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


def test_the_build_executes_nothing_after_book_execute(build):
    """book/execute.py caches every notebook exactly as the build would: the build then runs none itself."""
    log = build.stdout + build.stderr
    assert build.returncode == 0, log[-3000:]
    executed = re.findall(r"(\S+\.ipynb): Executing notebook", log)
    assert not executed, f"the build executed notebooks that book/execute.py had run: {executed}"


def test_glued_numbers_reach_the_page(build):
    page = (HTML / "book" / "gradients-through-depth.html").read_text()
    assert 'class="pasted-text"' in page, "no computed number was pasted into the prose"


def test_no_assignment_solution_on_the_website(build):
    assert build.returncode == 0
    from test_assignments import check_site_has_no_solutions
    check_site_has_no_solutions(HTML)


def test_every_page_states_the_licences(build):
    """The footer of every page names the text's licence (CC BY 4.0) and the code's (MIT), as _config.yml
    says (tests/test_project.py checks that it agrees with LICENSE, LICENSE-TEXT and pyproject.toml)."""
    assert build.returncode == 0
    missing = [f for f in toc_files() if not all(
        s in (HTML / f"{f}.html").read_text()
        for s in ('href="https://creativecommons.org/licenses/by/4.0/">CC BY 4.0</a>', "MIT License"))]
    assert not missing, f"pages without the licence footer: {missing}"


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


def test_chapters_link_their_gradbook_names_to_the_api_reference(build):
    """Inline code naming a gradbook object links to its API entry (book/_ext/api_links.py; a name that
    resolves to nothing documented is a build warning); every chapter does so at least once."""
    assert build.returncode == 0
    chapters = [f for f in toc_files() if (ROOT / f"{f}.ipynb").exists() and "assignments" not in f]
    assert chapters
    for f in chapters:
        text = (HTML / f"{f}.html").read_text()
        links = re.findall(r'<a class="api-link reference internal" href="([^"]+)"', text)
        assert links, f"{f}: no gradbook name linked to the API reference"
        assert all(re.search(r"api\.html#(module-)?gradbook\.", h) for h in links), links


def test_launch_buttons_open_notebooks_the_repository_holds(build):
    """Every chapter notebook's page opens it in Colab and Binder from the configured repository (and its
    first cell installs gradbook there: tests/test_project.py); every Colab link names a file git tracks,
    so generated pages (the student versions) carry none; every page links to the repository."""
    import fnmatch

    import yaml

    assert build.returncode == 0
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    url, branch = config["repository"]["url"], config["repository"]["branch"]
    org_repo = url.removeprefix("https://github.com/")
    generated = config["sphinx"]["config"]["no_launch_buttons"]
    git = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    tracked = set(git.stdout.splitlines()) if git.returncode == 0 else None
    problems = []
    for f in toc_files():
        text = (HTML / f"{f}.html").read_text()
        colab = re.findall(r'href="https://colab\.research\.google\.com/github/([^"]+)"', text)
        binder = re.findall(r'href="https://mybinder\.org/v2/gh/([^"]+)"', text)
        if f'href="{url}"' not in text:
            problems.append(f"{f}: no link to the repository {url}")
        for link in colab:
            path = link.removeprefix(f"{org_repo}/blob/{branch}/")
            if tracked is not None and path not in tracked:
                problems.append(f"{f}: Colab opens {path}, which the repository does not hold")
        is_notebook = (ROOT / f"{f}.ipynb").exists()
        if is_notebook and not any(fnmatch.fnmatch(f, g) for g in generated):
            if colab != [f"{org_repo}/blob/{branch}/{f}.ipynb"]:
                problems.append(f"{f}: Colab button {colab}")
            if binder != [f"{org_repo}/{branch}?urlpath=lab/tree/{f}.ipynb"]:
                problems.append(f"{f}: Binder button {binder}")
        elif colab or binder:
            problems.append(f"{f}: launch buttons on a page the repository cannot open: {colab + binder}")
    assert not problems, "\n".join(problems)


# --- The built site in a real browser (headless Chromium driven by Playwright) ------------------------

CHROMIUM = os.environ.get("GRADBOOK_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = ROOT / "_build" / "screenshots"


@pytest.fixture(scope="module")
def browser(build):
    """A headless Chromium on the built site, served over HTTP from _build/html.

    Without Chromium the browser tests are skipped on a workstation, but fail where
    GRADBOOK_REQUIRE_BROWSER=1 is set (CI sets it, and installs Chromium first).
    """
    if not pathlib.Path(CHROMIUM).exists():
        message = f"Chromium not found at {CHROMIUM} (apt-get install -y chromium, or set GRADBOOK_CHROMIUM)"
        if os.environ.get("GRADBOOK_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    import functools
    import http.server
    import threading

    from playwright.sync_api import sync_playwright

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(HTML)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield chromium, f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            chromium.close()
            server.shutdown()


def _open(browser, url, width=1280, height=900):
    """Load a page and wait for MathJax; returns (page, console errors, failed requests)."""
    chromium, _ = browser
    page = chromium.new_page(viewport={"width": width, "height": height})
    errors, failed = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: failed.append(f"{r.url} ({r.failure})"))
    page.on("response", lambda r: failed.append(f"{r.url} (HTTP {r.status})") if r.status >= 400 else None)
    page.goto(url, wait_until="networkidle")
    page.evaluate("() => (window.MathJax && MathJax.startup && MathJax.startup.promise) || null")
    return page, errors, failed


# Display equations whose content a reader cannot see: for each MathJax display equation, its rendered box
# is followed up the page; an ancestor that hides overflow and is narrower than the box cuts it off, an
# ancestor that scrolls (overflow auto/scroll) shows all of it (the reader scrolls), and the window is the
# last boundary. Returns "equation (n): x px of y cut off" descriptions.
_CLIPPED_MATH = """() => {
  const out = [];
  document.querySelectorAll('mjx-container[display="true"]').forEach((eq, k) => {
    const math = eq.querySelector('mjx-math') || eq;
    let box = math.getBoundingClientRect();
    const width = box.width;
    let cut = 0;
    for (let el = math.parentElement; el && el !== document.documentElement; el = el.parentElement) {
      const ox = getComputedStyle(el).overflowX;
      if (ox === 'visible') continue;
      const r = el.getBoundingClientRect();
      if (ox === 'auto' || ox === 'scroll') { box = r; continue; }      // scrolls: all of it can be seen
      cut = Math.max(cut, box.right - r.right, r.left - box.left);    // hidden or clip
    }
    cut = Math.max(cut, box.right - document.documentElement.clientWidth, -box.left);
    if (cut > 1) {
      const div = eq.closest('div.math');
      const no = div && div.querySelector('.eqno') ? div.querySelector('.eqno').innerText.trim() : '#' + (k + 1);
      out.push(`equation ${no}: ${Math.round(cut)} px of ${Math.round(width)} cut off`);
    }
  });
  return out;
}"""


def _site_pages():
    return [f"{f}.html" for f in toc_files()] + ["search.html", "genindex.html", "py-modindex.html"]


@pytest.fixture(scope="module")
def visited(browser):
    """Every page opened once in a fresh browser context: the problems found on it, the site's files it
    fetched, and the bytes of each (so that page weight and unread files can be reported from one visit)."""
    _, base = browser
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    problems, fetched, weights, clipped = [], set(), {}, []
    for rel in _site_pages():
        page, errors, failed = _open(browser, f"{base}/{rel}")
        try:
            clipped += [f"{rel}: {c}" for c in page.evaluate(_CLIPPED_MATH)]
            problems += [f"{rel}: console error: {e}" for e in errors]
            problems += [f"{rel}: failed request: {f}" for f in failed]
            source = (HTML / rel).read_text()
            if 'class="math' in source:
                rendered = page.locator("mjx-container").count()
                if rendered == 0:
                    problems.append(f"{rel}: math on the page but no MathJax output")
                text = page.locator("article").first.inner_text() if page.locator("article").count() else ""
                raw = re.findall(r"\\\(|\\\[|\\begin\{|\$\$", text)
                if raw:
                    problems.append(f"{rel}: raw TeX left on the page: {raw[:3]}")
            images = page.evaluate("""() => Array.from(document.images).map(i => ({
                src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0, alt: (i.getAttribute('alt') || '').trim()}))""")
            problems += [f"{rel}: image not loaded: {i['src']}" for i in images if not i["ok"]]
            problems += [f"{rel}: image without alt text: {i['src']}" for i in images if not i["alt"]]
            links = page.evaluate("""() => Array.from(document.querySelectorAll('.bd-sidebar-primary a[href]'))
                .map(a => a.href).filter(h => h.startsWith(location.origin))""")
            for href in links:
                target = HTML / href[len(base) + 1:].split("#")[0].split("?")[0]
                if target.is_dir():
                    target = target / "index.html"
                if not target.is_file():
                    problems.append(f"{rel}: sidebar link does not resolve: {href}")
            urls = page.evaluate("""() => [location.href.split('#')[0],
                ...performance.getEntriesByType('resource').map(e => e.name)]""")
            files = [HTML / unquote(urlsplit(u).path).lstrip("/") for u in urls if u.startswith(base + "/")]
            fetched.update(f for f in files if f.is_file())
            weights[rel] = [f for f in dict.fromkeys(files) if f.is_file()]
            if rel in ("book/intro.html", "book/gradients-through-depth.html", "book/summary.html",
                       "book/diagnose.html", "book/exploding/clipping.html"):
                page.screenshot(path=str(SCREENSHOTS / rel.replace("/", "_").replace(".html", ".png")), full_page=False)
        finally:
            page.close()
    return problems, fetched, weights, clipped


def test_every_page_in_a_browser(visited):
    """No console errors, no failed requests, math rendered, images loaded with alt text, sidebar links resolve."""
    problems, _, _, _ = visited
    assert not problems, "\n".join(problems[:40])


def test_display_math_is_never_cut_off(visited):
    """At 1280 px, every page's display equations are seen whole: a wide one scrolls inside itself
    (book/_static/gradbook.css) instead of being cut off at the article's edge. (At a phone's width:
    test_pages_fit_a_phone_screen.)"""
    _, _, _, clipped = visited
    assert not clipped, "\n".join(clipped)


def test_page_weight_is_reported(visited):
    """What each page makes a browser download (HTML, scripts, styles, fonts; raw and gzip-compressed, as
    most static hosts serve it), written to _build/page-weight.txt for the notes."""
    import gzip

    _, _, weights, _ = visited
    size = functools.cache(lambda f: (f.stat().st_size, len(gzip.compress(f.read_bytes(), 6))))
    lines = [f"{'page':58s} {'files':>5s} {'HTML KB':>8s} {'total KB':>9s} {'gzip KB':>8s}"]
    for rel, files in weights.items():
        raw, packed = sum(size(f)[0] for f in files), sum(size(f)[1] for f in files)
        lines.append(f"{rel:58s} {len(files):5d} {size(HTML / rel)[0] / 1024:8.0f} {raw / 1024:9.0f} {packed / 1024:8.0f}")
        assert HTML / rel in files, f"{rel}: the page itself is not among the files it fetched"
    site = sum(f.stat().st_size for f in HTML.rglob("*") if f.is_file())
    lines.append(f"whole site on disk: {site / 2**20:.1f} MB")
    (ROOT / "_build" / "page-weight.txt").write_text("\n".join(lines) + "\n")


# files that a page's own scripts load only when a reader asks for them: TeX packages MathJax loads when a
# formula uses one, and the accessibility explorer of MathJax's menu (with its speech rules)
ON_DEMAND = ("_static/mathjax/input/tex/extensions/", "_static/mathjax/a11y/", "_static/mathjax/sre/")


def test_the_site_ships_no_source_maps_or_unread_bundles(visited):
    """Every script and style sheet the site ships is fetched by some page (or is loaded on demand, above),
    and no source map, or comment pointing to one, is shipped."""
    _, fetched, _, _ = visited
    static = HTML / "_static"
    maps = [str(f.relative_to(HTML)) for f in static.rglob("*.map")]
    assert not maps, f"source maps shipped: {maps}"
    pointing = [str(f.relative_to(HTML)) for f in [*static.rglob("*.js"), *static.rglob("*.css")]
                if re.search(rb"sourceMappingURL=\S+\.map\s*(\*/)?\s*\Z", f.read_bytes())]
    assert not pointing, f"files still point to a source map: {pointing}"
    unread = [str(f.relative_to(HTML)) for f in [*static.rglob("*.js"), *static.rglob("*.css")]
              if f not in fetched and not str(f.relative_to(HTML)).startswith(ON_DEMAND)]
    assert not unread, f"shipped but fetched by no page: {unread}"


def test_pages_fit_a_phone_screen(browser):
    """At a phone's width (390 px) no page is wider than the screen: long inline code and API signatures
    wrap (book/_static/gradbook.css), code blocks and wide math scroll inside themselves, and no display
    equation is cut off."""
    _, base = browser
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    wide = []
    for rel in _site_pages():
        page, _, _ = _open(browser, f"{base}/{rel}", width=390, height=844)
        try:
            width, screen = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
            if width > screen:
                wide.append(f"{rel}: {width} px wide on a {screen} px screen")
            wide += [f"{rel} at {screen} px: {c}" for c in page.evaluate(_CLIPPED_MATH)]
            if rel == "book/vanishing/relu.html":
                page.screenshot(path=str(SCREENSHOTS / "phone_book_vanishing_relu.png"))
        finally:
            page.close()
    assert not wide, "\n".join(wide)


def test_search_finds_gradient_clipping(browser):
    _, base = browser
    page, errors, failed = _open(browser, f"{base}/search.html?q=gradient+clipping")
    try:
        page.wait_for_selector("#search-results li", timeout=20000)
        hits = page.evaluate("() => Array.from(document.querySelectorAll('#search-results li a')).map(a => a.href)")
        page.screenshot(path=str(SCREENSHOTS / "search.png"))
    finally:
        page.close()
    assert not errors and not failed, (errors, failed)
    assert any("exploding/clipping" in h for h in hits), hits


def test_internal_links_and_anchors_resolve(build):
    """Every relative link of every page points to a built file, and every #anchor to an id on it.
    External links are listed in _build/external-links.txt for a person to check, never fetched."""
    import html as _html
    from urllib.parse import unquote, urlsplit

    pages = [HTML / f"{f}.html" for f in toc_files()] + [HTML / "search.html", HTML / "genindex.html"]
    ids: dict[pathlib.Path, set] = {}
    broken, external = [], set()
    for page in pages:
        text = page.read_text()
        for href in re.findall(r'<a\s[^>]*href="([^"]+)"', text):
            href = _html.unescape(href)
            parts = urlsplit(href)
            if parts.scheme in ("http", "https"):
                external.add(href)
                continue
            if parts.scheme or href.startswith("//"):   # mailto:, javascript: and the like
                continue
            target = (page.parent / unquote(parts.path)).resolve() if parts.path else page
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                broken.append(f"{page.relative_to(HTML)}: {href} (no such file)")
                continue
            if parts.fragment and target.suffix == ".html":
                if target not in ids:
                    ids[target] = set(re.findall(r'\sid="([^"]+)"', target.read_text()))
                if unquote(parts.fragment) not in ids[target]:
                    broken.append(f"{page.relative_to(HTML)}: {href} (no such anchor)")
    (ROOT / "_build" / "external-links.txt").write_text("\n".join(sorted(external)) + "\n")
    assert not broken, "\n".join(broken[:30])


def test_a_rebuild_with_nothing_changed_executes_nothing(build):
    """execute_notebooks: cache: a second build reuses every notebook's outputs."""
    assert build.returncode == 0
    proc = _jupyter_book_build()
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    executed = re.findall(r"(\S+\.ipynb): Executing notebook", log)
    assert not executed, f"re-executed although nothing changed: {executed}"


_SHOWN = """() => Array.from(document.querySelectorAll('.widget-box img[src^="data:image/png"]'))
    .filter(i => i.offsetParent !== null).map(i => i.alt)"""


def test_explorer_controls_work_without_a_kernel(browser):
    """book/explore: the widget renderer loads from the site itself, and moving a slider or clicking a button
    switches the precomputed figure in the browser, with no kernel (the saved widget state's jslinks)."""
    assert "book/explore" in toc_files(), "book/explore is not in _toc.yml"
    _, base = browser
    page, errors, failed = _open(browser, f"{base}/book/explore.html")
    try:
        page.wait_for_selector('.widget-box img[src^="data:image/png"]', timeout=30000)
        before = page.evaluate(_SHOWN)
        assert len(before) == 4, before                         # one figure on show per explorer
        handle = page.locator(".noUi-handle").first             # the first explorer's slider
        handle.scroll_into_view_if_needed()
        handle.focus()
        page.keyboard.press("ArrowRight")
        page.wait_for_function(f"() => ({_SHOWN})()[0] !== {before[0]!r}", timeout=10000)
        moved = page.evaluate(_SHOWN)
        assert moved[1:] == before[1:], "moving one explorer's slider changed another explorer"
        page.locator(".widget-toggle-buttons").first.locator("button").nth(1).click()
        page.wait_for_function(f"() => ({_SHOWN})()[0] !== {moved[0]!r}", timeout=10000)
        page.locator(".widget-box").first.screenshot(path=str(SCREENSHOTS / "book_explore_widget.png"))
        handle = page.locator(".noUi-handle").last               # the Part IV explorer's depth slider
        handle.scroll_into_view_if_needed()
        handle.focus()
        page.keyboard.press("ArrowRight")
        page.wait_for_function(f"() => ({_SHOWN})()[3] !== {before[3]!r}", timeout=10000)
        assert "pre-LN and a post-LN transformer" in page.evaluate(_SHOWN)[3]
    finally:
        page.close()
    assert not errors and not failed, (errors, failed)
