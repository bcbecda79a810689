"""Execute the book's notebooks on every core before the build: `python book/execute.py` (`make book` runs it).

Jupyter Book 1.x executes a book's notebooks one after another while it reads them, so on a 2-core machine
one core idles through most of the build. This script fills the same cache the build reads
(`execute_notebooks: cache`, in _build/.jupyter_cache) with one notebook per core; the build that follows
finds every notebook cached and executes nothing. Only notebooks whose code changed since they were cached
are run, exactly as the build would choose them (the cache's own match on the code cells), and the executed
notebooks are stored exactly as the build stores them. A plain `jupyter-book build .` still works without it.

Options: --jobs N (default: the number of cores). A notebook that raises stops the script with its error.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

ROOT = pathlib.Path(__file__).resolve().parents[1]
CACHE = ROOT / "_build" / ".jupyter_cache"


def toc_files() -> list[str]:
    """Every page of _toc.yml (root, chapters and their sections), as paths without suffix."""
    import yaml

    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files, todo = [toc["root"]], [c for part in toc.get("parts", []) for c in part["chapters"]]
    while todo:
        entry = todo.pop(0)
        files.append(entry["file"])
        todo[:0] = entry.get("sections", [])
    return files


def executed_notebooks() -> list[pathlib.Path]:
    """The notebooks the build executes: those of the toc, less those whose metadata turns execution off
    (the assignments' student versions)."""
    import nbformat

    paths = [ROOT / f"{f}.ipynb" for f in toc_files() if (ROOT / f"{f}.ipynb").exists()]
    return [p for p in paths
            if nbformat.read(p, as_version=4).metadata.get("mystnb", {}).get("execution_mode") != "off"]


def _run(path: str, timeout: int) -> tuple[str, str, float, str | None]:
    """Worker: execute one notebook in its own folder, as the build does; returns it as JSON text."""
    import nbformat
    from jupyter_cache.executors.utils import single_nb_execution

    nb = nbformat.read(path, as_version=4)
    result = single_nb_execution(nb, cwd=str(pathlib.Path(path).parent), timeout=timeout,
                                 allow_errors=False, meta_override=True)
    return path, nbformat.writes(nb), result.time, result.exc_string if result.err is not None else None


def main(jobs: int | None = None) -> int:
    import nbformat
    import yaml
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn

    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    timeout = int(config.get("execute", {}).get("timeout", 300))
    cache = get_cache(str(CACHE))
    todo = []
    for path in executed_notebooks():
        try:
            cache.match_cache_notebook(nbformat.read(path, as_version=4))
        except KeyError:
            todo.append(path)
    if not todo:
        print("execute: every notebook is cached")
        return 0
    jobs = jobs or os.cpu_count() or 1
    print(f"execute: {len(todo)} notebook(s) on {min(jobs, len(todo))} process(es)", flush=True)
    start, failed = time.perf_counter(), []
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(_run, str(p), timeout) for p in todo]
        for future in as_completed(futures):
            path, text, seconds, error = future.result()
            name = pathlib.Path(path).relative_to(ROOT)
            if error is not None:
                failed.append(f"{name} raised:\n{error}")
                print(f"execute: {name} FAILED after {seconds:.1f} s", flush=True)
                continue
            record = cache.add_nb_to_project(path)
            cache.cache_notebook_bundle(CacheBundleIn(nbformat.reads(text, as_version=4), record.uri,
                                                      data={"execution_seconds": seconds}),
                                        check_validity=False, overwrite=True)
            print(f"execute: {name} {seconds:.1f} s", flush=True)
    print(f"execute: done in {time.perf_counter() - start:.1f} s", flush=True)
    for message in failed:
        print(message, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=None, help="processes (default: the number of cores)")
    sys.exit(main(parser.parse_args().jobs))
