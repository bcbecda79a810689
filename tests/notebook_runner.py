"""Run a book notebook top to bottom in a fresh kernel under a given GRADBOOK_SEED."""
import functools
import importlib.util
import os
import pathlib

import nbformat
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]


@functools.cache
def book_script(name: str):
    """One of the book's build scripts (book/<name>.py: execute, colab), loaded as a module."""
    spec = importlib.util.spec_from_file_location(f"book_{name}", ROOT / "book" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def toc_files() -> list[str]:
    """Every page of _toc.yml (root, chapters and their sections), as paths without suffix."""
    return book_script("execute").toc_files()


def chapters() -> list[pathlib.Path]:
    """Every chapter notebook of the book (not the assignments, which have tests of their own)."""
    return sorted(p for p in (ROOT / "book").rglob("*.ipynb")
                  if not {"_build", ".ipynb_checkpoints", "assignments"} & set(p.parts))


def run(path: pathlib.Path, seed: int) -> None:
    """Execute every cell, hidden test cells included; a failing assertion raises CellExecutionError."""
    old = {k: os.environ.get(k) for k in ("GRADBOOK_SEED",)}
    os.environ.update(GRADBOOK_SEED=str(seed))   # the kernel inherits it
    try:
        nb = nbformat.read(path, as_version=4)
        NotebookClient(nb, kernel_name="python3", timeout=600,
                       resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
