"""The project's set-up stays honest: pins agree with ranges, environment.yml with pyproject, notebooks clean."""
import json
import pathlib
import re

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

import pytest
import yaml
from notebook_runner import book_script, toc_files
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _pyproject_requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    return {canonicalize_name(Requirement(r).name): Requirement(r) for r in reqs}


def _environment_requirements() -> dict[str, Requirement]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    return {canonicalize_name(Requirement(r).name): Requirement(r) for r in pip}


def _supported_pythons() -> list[str]:
    """The Python versions pyproject.toml's classifiers name (tests/test_install.py resolves each)."""
    classifiers = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["classifiers"]
    return [c.rsplit(" :: ", 1)[1] for c in classifiers if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)]


def _constraints(python: str | None = None) -> dict[str, str]:
    """constraints.txt's pins for a Python version (default: this one), its markers evaluated there."""
    import sys

    from packaging.requirements import Requirement as Pin

    python = python or "%d.%d" % sys.version_info[:2]
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            pin = Pin(line)
            specs = list(pin.specifier)
            assert len(specs) == 1 and specs[0].operator == "==", f"constraints.txt line {line!r} is not an exact pin"
            if pin.marker is None or pin.marker.evaluate({"python_version": python}):
                name = canonicalize_name(pin.name)
                assert name not in pins, f"constraints.txt pins {name} twice for Python {python}"
                pins[name] = specs[0].version
    return pins


def test_environment_yml_lists_the_same_dependencies_as_pyproject():
    py, env = _pyproject_requirements(), _environment_requirements()
    assert sorted(py) == sorted(env), f"only in pyproject: {set(py) - set(env)}; only in environment.yml: {set(env) - set(py)}"
    for name in py:
        assert (py[name].specifier, py[name].marker) == (env[name].specifier, env[name].marker), \
            f"{name}: pyproject says {py[name].specifier}, environment.yml says {env[name].specifier}"


def test_environment_yml_python_matches_requires_python():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert python.removeprefix("python") == requires


@pytest.mark.parametrize("python", _supported_pythons())
def test_constraints_pin_every_dependency_within_its_range(python):
    pins = _constraints(python)
    teach = {canonicalize_name(Requirement(r).name) for r in
             tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["teach"]}
    for name, req in _pyproject_requirements().items():
        if req.marker is not None and not req.marker.evaluate({"python_version": python}):
            continue   # not needed on this Python
        if name in teach and python == "3.10":
            continue   # nbgrader 0.9.6 needs Python 3.11 (README, tests/test_install.py)
        assert name in pins, f"{name} is a dependency but constraints.txt does not pin it for Python {python}"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"constraints.txt pins {name}=={pins[name]} for Python {python}, outside pyproject's range {req.specifier}"


def test_torch_is_pinned_to_the_cpu_build_version():
    assert _constraints()["torch"] == "2.13.0"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^\s*(make \w+)\s*$", readme, flags=re.M)
    assert commands[:2] == ["make book", "make test"], commands
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, flags=re.M)


def _notebooks():
    return sorted(p for p in (ROOT / "book").rglob("*.ipynb") if "_build" not in p.parts
                  and ".ipynb_checkpoints" not in p.parts)


def test_there_are_notebooks():
    assert _notebooks()


@pytest.mark.parametrize("path", _notebooks(), ids=lambda p: str(p.relative_to(ROOT)))
def test_notebook_is_committed_clean(path):
    nb = json.loads(path.read_text())
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert not cell.get("outputs"), f"{path.name} cell {i} carries outputs: clear them before committing"
            assert cell.get("execution_count") is None, f"{path.name} cell {i} carries an execution count"
    assert nb["metadata"]["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("path", _notebooks(), ids=lambda p: str(p.relative_to(ROOT)))
def test_notebook_asserts_its_claims_in_hidden_cells(path):
    nb = json.loads(path.read_text())
    hidden = [c for c in nb["cells"] if c["cell_type"] == "code" and "remove-cell" in c["metadata"].get("tags", [])]
    assert any("assert" in "".join(c["source"]) for c in hidden), f"{path.name} has no hidden test cell"


def test_every_toc_file_exists_and_every_book_page_is_in_the_toc():
    files = toc_files()
    for f in files:
        assert any((ROOT / f).with_suffix(s).exists() for s in (".md", ".ipynb")), f"{f} is in _toc.yml but missing"
    # the instructor versions of the assignments never go on the site (their student versions do)
    sources = ROOT / "book" / "assignments" / "source"
    pages = {str(p.relative_to(ROOT).with_suffix("")) for p in _notebooks() if not p.is_relative_to(sources)}
    pages |= {str(p.relative_to(ROOT).with_suffix("")) for p in (ROOT / "book").rglob("*.md")
              if "_build" not in p.parts}
    assert pages <= set(files), f"pages not in _toc.yml: {pages - set(files)}"


@pytest.mark.parametrize("path", _notebooks(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_figure_has_a_caption_and_alt_text(path):
    nb = json.loads(path.read_text())
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code" and "plt.show()" in "".join(cell["source"]):
            meta = cell["metadata"].get("mystnb", {})
            assert meta.get("figure", {}).get("caption"), f"{path.name} cell {i}: a figure without a caption"
            assert meta.get("figure", {}).get("name"), f"{path.name} cell {i}: a figure without a name"
            assert meta.get("image", {}).get("alt"), f"{path.name} cell {i}: a figure without alt text"


# Tags a chapter may use, and what for: tests are removed, distracting code is hidden (not removed).
ALLOWED_TAGS = {"remove-cell", "remove-input", "remove-output", "hide-input", "hide-output", "hide-cell",
                "raises-exception", "nbval-skip"}


# A figure cell is "drawing code" when more than this many of its lines are plotting calls: on the website
# its code is folded (hide-input) under the figure's toggle; a short one (gb.plot.gradient_flow(rec)) shows.
DRAWING_LINES = 6


def _plotting_lines(source: str) -> int:
    return sum(1 for line in source.splitlines()
               if line.strip() and re.search(r"\bax\w*\.|plt\.|fig\.|\.set_|legend|semilogy|loglog", line))


@pytest.mark.parametrize("path", _notebooks(), ids=lambda p: str(p.relative_to(ROOT)))
def test_notebook_tags_are_used_consistently(path):
    nb = json.loads(path.read_text())
    for i, cell in enumerate(nb["cells"]):
        tags = set(cell.get("metadata", {}).get("tags", []))
        source = "".join(cell["source"])
        assert tags <= ALLOWED_TAGS, f"{path.name} cell {i}: unknown tags {tags - ALLOWED_TAGS}"
        if cell["cell_type"] == "code" and source.lstrip().startswith(("# Checks", "# Self-check")):
            assert "remove-cell" in tags, f"{path.name} cell {i}: a test cell must be tagged remove-cell"
        if cell["cell_type"] == "code" and "assignments" not in path.parts and "plt.show()" in source:
            drawing = _plotting_lines(source) > DRAWING_LINES
            assert drawing == ("hide-input" in tags), (
                f"{path.name} cell {i}: a figure cell with {_plotting_lines(source)} lines of plotting calls "
                f"must {'' if drawing else 'not '}be tagged hide-input (more than {DRAWING_LINES}: folded)")


def test_every_notebook_has_the_same_kernel_spec():
    specs = {json.dumps(json.loads(p.read_text())["metadata"].get("kernelspec"), sort_keys=True) for p in _notebooks()}
    assert len(specs) == 1, specs


# --- Ready to run on Colab and Binder: the first code cell installs gradbook where it is missing ---------

def _colab():
    return book_script("colab")


# every notebook but the generated student versions, which get the cell from their sources
@pytest.mark.parametrize("path", _colab().notebooks(), ids=lambda p: str(p.relative_to(ROOT)))
def test_notebook_starts_with_the_install_cell(path):
    import nbformat

    colab = _colab()
    nb = nbformat.read(path, as_version=4)
    assert colab.install_cell_up_to_date(nb), (f"{path.relative_to(ROOT)}: the first code cell must install "
                                               "gradbook's release from _config.yml's repository (run `python book/colab.py`)")


@pytest.mark.parametrize("path", [p for p in _colab().notebooks() if "assignments" not in p.parts],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_hidden_assert_cells_are_marked_as_self_checks(path):
    """A learner who opens a chapter in JupyterLab sees each hidden assert cell collapsed, and its first
    line says what it is (`# Self-check:`); `python book/colab.py` marks them."""
    import nbformat

    colab = _colab()
    nb = nbformat.read(path, as_version=4)
    hidden = [c for c in nb.cells if c.cell_type == "code" and "remove-cell" in c.metadata.get("tags", [])
              and "assert" in c.source and c.get("id") != colab.CELL_ID]
    assert hidden == colab.self_check_cells(path, nb) and hidden
    unmarked = [i for i, c in enumerate(nb.cells) if c in hidden and not (
        c.source.splitlines()[0].startswith("# Self-check: ")
        and c.metadata.get("jupyter", {}).get("source_hidden") is True)]
    assert not unmarked, f"{path.relative_to(ROOT)}: cells {unmarked} are not marked (run `python book/colab.py`)"


def _run_install_cell(gradbook_importable: bool) -> list:
    """Run the install cell as IPython would (its %pip line transformed), recording the magics it calls."""
    import sys
    from IPython.core.inputtransformer2 import TransformerManager

    code = TransformerManager().transform_cell(_colab().install_source())
    calls = []

    class Shell:
        def run_line_magic(self, name, line, *args):
            calls.append((name, line))

    saved = sys.modules.get("gradbook")
    if not gradbook_importable:
        sys.modules["gradbook"] = None   # makes `import gradbook` raise ImportError
    try:
        exec(compile(code, "install-cell", "exec"), {"get_ipython": lambda: Shell()})
    finally:
        if saved is None:
            sys.modules.pop("gradbook", None)
        else:
            sys.modules["gradbook"] = saved
    return calls


def test_the_install_cell_does_nothing_where_gradbook_is_installed():
    assert _run_install_cell(gradbook_importable=True) == []


def _pyproject_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_the_install_cell_installs_the_release_from_the_repository_where_it_is_missing():
    calls = _run_install_cell(gradbook_importable=False)
    url = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    assert calls == [("pip", f'install --quiet "gradbook @ git+{url}@v{_pyproject_version()}"')], calls


# --- Releases: pyproject's version, the tag the notebooks install, the changelog ------------------------

def _changelog_versions() -> list[tuple[str, str]]:
    """(version, date or "unreleased") of each CHANGELOG.md entry, newest first."""
    text = (ROOT / "CHANGELOG.md").read_text()
    return re.findall(r"^## \[(\d+\.\d+\.\d+)\] - (\d{4}-\d{2}-\d{2}|unreleased)\s*$", text, flags=re.M)


def test_pyproject_the_install_cells_and_the_changelog_agree_on_the_version():
    from packaging.version import Version

    version = _pyproject_version()
    entries = _changelog_versions()
    assert entries, "CHANGELOG.md has no '## [x.y.z] - date' entry"
    assert entries[0][0] == version, f"CHANGELOG.md's newest entry is {entries[0][0]}, pyproject.toml says {version}"
    assert [Version(v) for v, _ in entries] == sorted((Version(v) for v, _ in entries), reverse=True)
    assert all(d != "unreleased" for _, d in entries[1:]), "only the newest entry may be unreleased"
    text = (ROOT / "CHANGELOG.md").read_text()
    for v, _ in entries:   # every entry links to its tag (or its comparison with the previous one)
        assert re.search(rf"^\[{re.escape(v)}\]: \S+v{re.escape(v)}\s*$", text, flags=re.M), f"no link for {v}"
    colab = _colab()
    assert colab.release_tag() == f"v{version}"
    stale = [str(p.relative_to(ROOT)) for p in colab.notebooks()
             if f"@v{version}\"" not in json.loads(p.read_text())["cells"][_first_code_index(p)]["source"][-1]]
    assert not stale, f"install cells not pinned to v{version}: {stale} (run `python book/colab.py`)"


def _first_code_index(path) -> int:
    cells = json.loads(path.read_text())["cells"]
    return next(i for i, c in enumerate(cells) if c["cell_type"] == "code")


def test_the_package_reports_the_version_of_pyproject():
    import gradbook

    assert gradbook.__version__ == _pyproject_version(), (
        f"gradbook.__version__ is {gradbook.__version__}, pyproject.toml says {_pyproject_version()}")


def test_released_versions_are_tagged_where_the_tags_are_known():
    """A dated entry of the changelog is a release: where git knows the repository's tags (a clone with
    tags; CI's checkout may have none, then there is nothing to compare), its tag exists."""
    import subprocess

    tags = subprocess.run(["git", "tag", "--list", "v*"], cwd=ROOT, capture_output=True, text=True)
    if tags.returncode != 0 or not tags.stdout.split():
        pytest.skip("no git tags in this checkout")
    released = [v for v, d in _changelog_versions() if d != "unreleased"]
    missing = [v for v in released if f"v{v}" not in tags.stdout.split()]
    assert not missing, f"released in CHANGELOG.md but not tagged: {missing}"


# --- Licences: the files, the package metadata and the site's footer agree ---------------------------

def test_licences_agree_everywhere():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    code = (ROOT / "LICENSE").read_text()
    text = (ROOT / "LICENSE-TEXT").read_text()
    assert code.startswith("MIT License") and "Permission is hereby granted, free of charge" in code
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert not [c for c in project.get("classifiers", []) if c.startswith("License ::")], \
        "a License classifier next to an SPDX license expression (PEP 639 forbids both)"
    assert "Creative Commons Attribution 4.0 International Public License" in text
    assert "https://creativecommons.org/licenses/by/4.0/" in text and "LICENSE" in text
    footer = yaml.safe_load((ROOT / "_config.yml").read_text())["html"]["extra_footer"]
    assert 'href="https://creativecommons.org/licenses/by/4.0/">CC BY 4.0</a>' in footer
    assert "MIT License" in footer
    readme = (ROOT / "README.md").read_text()
    assert "CC BY 4.0 (`LICENSE-TEXT`)" in readme and re.search(r"MIT\s+License \(`LICENSE`\)", readme)


def test_the_repository_address_is_the_same_everywhere():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    url = config["repository"]["url"]
    assert url.startswith("https://github.com/"), url   # the Colab and Binder links are built for GitHub
    urls = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]
    assert urls["Repository"] == url
    assert config["launch_buttons"]["colab_url"] and config["launch_buttons"]["binderhub_url"]
    assert config["html"]["use_repository_button"]


def test_the_api_reference_documents_every_public_name():
    """book/api.md lists, for each module, every name of its __all__ (the page is built from docstrings)."""
    import importlib

    text = (ROOT / "book" / "api.md").read_text()
    documented = {m: set(re.split(r",\s*", members.strip()))
                  for m, members in re.findall(r"automodule:: gradbook\.(\w+)\n\s+:members: ([^\n]+)", text)}
    documented["gradbook"] = set(re.findall(r"autofunction:: gradbook\.(\w+)\n", text))
    missing = {}
    modules = sorted(p.stem for p in (ROOT / "gradbook").glob("*.py") if not p.stem.startswith("_"))
    assert {"records", "watch", "measure", "remedies", "explorers"} <= set(modules)
    for module in modules:
        public = set(getattr(importlib.import_module(f"gradbook.{module}"), "__all__", []))
        assert public, f"gradbook.{module} has no __all__"
        if public - documented.get(module, set()):
            missing[module] = sorted(public - documented.get(module, set()))
    assert not missing, f"public names missing from book/api.md: {missing}"


def test_the_package_links_to_the_configured_site_and_pages_the_book_has():
    """gradbook.book.SITE is _config.yml's html.baseurl; every page the package links to is in the book."""
    import yaml

    import gradbook

    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert gradbook.book.SITE == config["html"]["baseurl"] and gradbook.book.SITE.endswith("/")
    assert set(gradbook.book.PAGES.values()) <= set(toc_files())
    topics = {rule.topic for rule in gradbook.remedies.RULES}
    assert topics <= set(gradbook.book.PAGES), topics - set(gradbook.book.PAGES)
    assert gradbook.book.page_url("clipping") == gradbook.book.SITE + "book/exploding/clipping.html"
