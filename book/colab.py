"""Keep every notebook ready to run where gradbook is not installed (Colab, Binder, a fresh Jupyter).

The first code cell of every notebook in book/ installs gradbook from the book's repository when
`import gradbook` fails, and does nothing where gradbook is installed (this project's own builds and tests
run it that way). The address and branch come from _config.yml (`repository.url`, `repository.branch`), the
same ones the site's launch buttons and repository button use, so that the three cannot disagree.

    python book/colab.py           insert the cell where it is missing, rewrite it where it is out of date
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


def install_source() -> str:
    url, branch = repository()
    return ("# On Colab, Binder or any Python without gradbook, this cell installs it from the book's repository;\n"
            "# where gradbook is installed it does nothing.\n"
            "try:\n"
            "    import gradbook\n"
            "except ImportError:\n"
            f'    %pip install --quiet "gradbook @ git+{url}@{branch}"')


def notebooks() -> list[pathlib.Path]:
    """Every notebook under book/ but the generated student versions (book/assignments/release/)."""
    return sorted(p for p in (ROOT / "book").rglob("*.ipynb")
                  if not {"_build", ".ipynb_checkpoints", "release"} & set(p.relative_to(ROOT).parts))


def _first_code(nb):
    return next((c for c in nb.cells if c.cell_type == "code"), None)


def up_to_date(nb) -> bool:
    cell = _first_code(nb)
    return (cell is not None and cell.source == install_source()
            and "remove-cell" in cell.metadata.get("tags", []))


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
        nb = nbformat.read(path, as_version=4)
        if up_to_date(nb):
            continue
        stale.append(path.relative_to(ROOT))
        if not check:
            stamp(nb)
            nbformat.write(nb, path)
    verb = "need" if check else "updated"
    print("\n".join(f"{verb}: {p}" for p in stale) or "every notebook starts with the install cell")
    return 1 if (check and stale) else 0


if __name__ == "__main__":
    sys.exit(main(check="--check" in sys.argv[1:]))
