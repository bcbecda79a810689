"""What every replication script shares: the command line, the results file, and the check.

A replication too long to run inside a chapter lives here as a script, ``replications/<name>.py``. It
describes its experiment as a grid of independent *entries* (one per cell of the paper's figure: a depth,
an initialization, a seed, ...), each computed from the configuration and its own key alone, with its own
seed (:func:`seed_for`). That makes any subset of the grid re-computable exactly as the full run computed
it:

    python replications/<name>.py            # the full grid, written to gradbook/results/<name>.json
    python replications/<name>.py --check    # re-runs the check subset, compares it with the file

The results file ships inside the package, so a chapter reads it with ``gb.book.results("<name>")``
wherever gradbook is installed. ``--check`` exits with status 1 if the script's configuration differs from
the file's, or if a re-computed entry differs from the stored one by more than the script's stated
tolerance (``rtol``, ``atol``, as in ``numpy.allclose``; the tolerance absorbs floating-point differences
between machines, not differences between runs: on one machine a re-run is bit for bit the same).
``tests/test_replications.py`` runs every script's ``--check`` in the test suite.

A script calls :func:`main`::

    from common import main, seed_for

    CONFIG = {...}                          # everything the results depend on (JSON-serializable)

    def keys(config): ...                   # every entry's key (a string), in a fixed order
    def compute(config, key): ...           # one entry: a number, or a (nested) list of numbers

    if __name__ == "__main__":
        sys.exit(main("name", CONFIG, keys, compute, check_keys=[...], rtol=..., atol=...,
                      about="Paper (year): what is replicated"))
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time
import zlib

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "gradbook" / "results"


def seed_for(*parts) -> int:
    """A seed fixed by the entry's identity (its key and anything else), the same on every run and machine."""
    return zlib.crc32(json.dumps(parts, sort_keys=True).encode()) & 0x7FFFFFFF


def results_path(name: str) -> pathlib.Path:
    return RESULTS / f"{name}.json"


def _compute_all(config, keys, compute, log=print) -> dict:
    torch.set_num_threads(1)             # deterministic, and fastest for the small networks used here
    out = {}
    for key in keys:
        start = time.perf_counter()
        out[key] = compute(config, key)
        log(f"  {key}: {_short(out[key])}   ({time.perf_counter() - start:.1f} s)")
    return out


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) < 80 else text[:77] + "..."


def _close(new, old, rtol: float, atol: float) -> bool:
    new, old = np.asarray(new, dtype=float), np.asarray(old, dtype=float)
    return new.shape == old.shape and bool(np.allclose(new, old, rtol=rtol, atol=atol, equal_nan=True))


def check(name: str, config: dict, compute, check_keys, rtol: float, atol: float) -> list[str]:
    """Re-compute ``check_keys`` and compare with the stored file; the list of problems (empty: it matches)."""
    path = results_path(name)
    if not path.exists():
        return [f"{path} does not exist: run python replications/{name}.py"]
    stored = json.loads(path.read_text())
    if stored["config"] != json.loads(json.dumps(config)):
        return [f"the configuration in {path.name} is not the script's: run python replications/{name}.py again"]
    missing = [k for k in check_keys if k not in stored["results"]]
    if missing:
        return [f"check keys missing from {path.name}: {missing}"]
    fresh = _compute_all(config, check_keys, compute)
    return [f"{key}: re-computed {_short(fresh[key])}, stored {_short(stored['results'][key])} "
            f"(rtol={rtol}, atol={atol})"
            for key in check_keys if not _close(fresh[key], stored["results"][key], rtol, atol)]


def main(name: str, config: dict, keys, compute, check_keys, rtol: float, atol: float, about: str,
         argv=None) -> int:
    """The command line of a replication script (see the module's docstring); returns the exit status."""
    parser = argparse.ArgumentParser(description=about)
    parser.add_argument("--check", action="store_true",
                        help="re-run the check subset and compare it with the stored results (exit 1 on a mismatch)")
    args = parser.parse_args(argv)
    all_keys = list(keys(config))
    unknown = [k for k in check_keys if k not in all_keys]
    if unknown:
        raise ValueError(f"check_keys {unknown} are not keys of the grid")
    start = time.perf_counter()
    if args.check:
        problems = check(name, config, compute, check_keys, rtol, atol)
        for p in problems:
            print("MISMATCH", p)
        print(f"{name}: {len(check_keys)} of {len(all_keys)} entries re-computed in "
              f"{time.perf_counter() - start:.1f} s: {'MISMATCH' if problems else 'match'}")
        return 1 if problems else 0
    print(f"{name}: computing {len(all_keys)} entries")
    out = _compute_all(config, all_keys, compute)
    record = {
        "name": name,
        "about": about,
        "config": config,
        "results": out,
        "check": {"keys": list(check_keys), "rtol": rtol, "atol": atol},
        "made_with": {"python": platform.python_version(), "torch": torch.__version__,
                      "numpy": np.__version__, "seconds": round(time.perf_counter() - start, 1)},
    }
    RESULTS.mkdir(exist_ok=True)
    results_path(name).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {results_path(name)} in {record['made_with']['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit("run one of the replication scripts in this folder, not common.py")
