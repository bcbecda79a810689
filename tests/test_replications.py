"""The replications too long for a chapter: each script in ``replications/`` re-runs a subset of its grid
(``--check``) and must match the results file the chapter reads (``gradbook/results/<name>.json``).

Marked ``replication`` (``pytest -m replication`` runs only these, ``-m "not replication"`` skips them);
they are part of the normal suite. Each check is kept to about 30 s on one core.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

import gradbook as gb

try:
    import tomllib
except ImportError:                      # Python 3.10
    import tomli as tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "replications").glob("*.py") if p.name != "common.py")


@pytest.mark.replication
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_replication_matches_its_results_file(script):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    run = subprocess.run([sys.executable, str(script), "--check"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_every_replication_ships_its_results(script):
    stored = gb.book.results(script.stem)
    assert stored["name"] == script.stem
    assert set(stored["check"]["keys"]) <= set(stored["results"])
    assert script.stem in gb.book.result_names()


def test_every_results_file_has_its_script():
    assert sorted(gb.book.result_names()) == sorted(p.stem for p in SCRIPTS)


def test_the_results_ship_with_the_package():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "results/*.json" in data["gradbook"]


def test_an_unknown_replication_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown replication 'no-such-paper'; allowed:"):
        gb.book.results("no-such-paper")
    for name in gb.book.result_names():
        assert json.dumps(gb.book.results(name))     # every file parses
