"""Keep every notebook ready to run, and readable, outside the website (Colab, Binder, JupyterLab).

The first code cell of every notebook in book/ installs gradbook from the book's repository when
`import gradbook` fails, and does nothing where gradbook is installed (this project's own builds and tests
run it that way). It installs the release the notebooks were written for: the tag `v<version>` of
pyproject.toml's version (CHANGELOG.md records what each release changed; a test keeps the three in step),
not a moving branch. The address comes from _config.yml (`repository.url`), the same one the site's launch
buttons and repository button use, so that they cannot disagree.

The hidden cells that assert the prose's claims (tagged `remove-cell`: the website leaves them out) are
marked for a learner who opens a chapter in Jupyter: their first line says `# Self-check: ...`, and their
input starts collapsed in JupyterLab (cell metadata `jupyter.source_hidden`). The assignments' sources
(book/assignments/source/) are left alone: nbgrader owns their cells' metadata.

    python book/colab.py           insert the cell where it is missing, rewrite it where it is out of date,
                                   mark the self-check cells
    python book/colab.py --check   only list the notebooks that need it (exit status 1 if any)

The assignments' student versions get the cell from their sources (nbgrader copies it). The cell is tagged
`remove-cell`: the website's readers do not need it.
"""
from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
CELL_ID = "install-gradbook"


def repository() -> tuple[str, str]:
    """The book's repository (URL without .git) and branch, from _config.yml."""
    import yaml

    repo = yaml.safe_load((ROOT / "_config.yml").read_text()).get("repository") or {}
    url, branch = str(repo.get("url", "")).rstrip("/"), str(repo.get("branch", "main"))
    if not url.startswith("https://"):
        raise ValueError(f"_config.yml repository.url must be the book's https:// address, not {url!r}")
    return url.removesuffix(".git"), branch


def version() -> str:
    """The package's version, from pyproject.toml (the release the notebooks pin)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def release_tag() -> str:
    """The git tag of the release the notebooks install: v<version>."""
    return f"v{version()}"


def install_source() -> str:
    url, _ = repository()
    return ("# On Colab, Binder or any Python without gradbook, this cell installs the release of gradbook this\n"
            "# book was written for from the book's repository; where gradbook is installed it does nothing.\n"
            "try:\n"
            "    import gradbook\n"
            "except ImportError:\n"
            f'    %pip install --quiet "gradbook @ git+{url}@{release_tag()}"')


# The first line of every hidden assert cell of a chapter: what a learner who opens the notebook sees.
SELF_CHECK = "# Self-check:"
SELF_CHECK_LINE = (f"{SELF_CHECK} the book's own test of the claims made above (hidden on the website); "
                   "it raises if a number in the text is wrong.")


def self_check_cells(path: pathlib.Path, nb) -> list:
    """The hidden cells of a chapter that assert its claims (not the install cell, not the assignments)."""
    if "assignments" in path.relative_to(ROOT).parts:
        return []
    return [c for c in nb.cells if c.cell_type == "code" and c.get("id") != CELL_ID
            and "remove-cell" in c.metadata.get("tags", []) and "assert" in c.source]


def self_check_marked(cell) -> bool:
    return (cell.source.startswith(SELF_CHECK)
            and cell.metadata.get("jupyter", {}).get("source_hidden") is True)


def mark_self_check(cell) -> None:
    """Add the one-line `# Self-check:` comment (once) and collapse the input in JupyterLab."""
    if not cell.source.startswith(SELF_CHECK):
        cell.source = SELF_CHECK_LINE + "\n" + cell.source
    cell.metadata.setdefault("jupyter", {})["source_hidden"] = True


def notebooks() -> list[pathlib.Path]:
    """Every notebook under book/ but the generated student versions (book/assignments/release/)."""
    return sorted(p for p in (ROOT / "book").rglob("*.ipynb")
                  if not {"_build", ".ipynb_checkpoints", "release"} & set(p.relative_to(ROOT).parts))


def _first_code(nb):
    return next((c for c in nb.cells if c.cell_type == "code"), None)


def install_cell_up_to_date(nb) -> bool:
    cell = _first_code(nb)
    return (cell is not None and cell.source == install_source()
            and "remove-cell" in cell.metadata.get("tags", []))


def up_to_date(nb, path: pathlib.Path | None = None) -> bool:
    """The install cell is current and (given the notebook's path) every self-check cell is marked."""
    return install_cell_up_to_date(nb) and (
        path is None or all(self_check_marked(c) for c in self_check_cells(path, nb)))


def stamp(nb) -> None:
    """Put the install cell first among the code cells (after the title), replacing an older one."""
    import nbformat

    nb.cells = [c for c in nb.cells if c.get("id") != CELL_ID]
    first = next((i for i, c in enumerate(nb.cells) if c.cell_type == "code"), len(nb.cells))
    cell = nbformat.v4.new_code_cell(install_source(), metadata={"tags": ["remove-cell"]})
    cell["id"] = CELL_ID
    nb.cells.insert(first, cell)


def main(check: bool = False) -> int:
    import nbformat

    stale = []
    for path in notebooks():
        nb = nbformat.read(path, as_version=4)   # read, changed and written at once: others edit cells too
        if up_to_date(nb, path):
            continue
        stale.append(path.relative_to(ROOT))
        if not check:
            if not install_cell_up_to_date(nb):
                stamp(nb)
            for cell in self_check_cells(path, nb):
                mark_self_check(cell)
            nbformat.write(nb, path)
    verb = "need" if check else "updated"
    print("\n".join(f"{verb}: {p}" for p in stale)
          or "every notebook starts with the install cell and marks its self-checks")
    return 1 if (check and stale) else 0


if __name__ == "__main__":
    sys.exit(main(check="--check" in sys.argv[1:]))
