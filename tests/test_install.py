"""Installing works as the README says: on every Python version it names, with PyTorch's CPU build.

Resolution (pip's `--dry-run`, run by each Python version's own interpreter, so that constraints.txt's
`python_version` markers are evaluated for that version) is tested for every version found on this
machine; a version that is not installed is skipped, or fails where GRADBOOK_REQUIRE_ALL_PYTHONS=1.
A full install into a fresh virtual environment per version is slow (PyTorch and about 170 packages) and
runs only where GRADBOOK_FULL_INSTALL=1 (it is not part of `make test`).
"""
import glob
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# the teach extra (nbgrader 0.9.6) needs Python 3.11 or newer; the README and pyproject.toml say so
NEEDS_311 = {"teach"}


def supported_versions() -> list[str]:
    """The Python versions pyproject.toml's classifiers name (the README names the same ones: a test)."""
    return [c.rsplit(" :: ", 1)[1] for c in PYPROJECT["classifiers"]
            if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)]


def interpreter(version: str) -> str | None:
    """A Python of that version on this machine: pythonX.Y on PATH, or pyenv's."""
    found = shutil.which(f"python{version}")
    candidates = [found] if found else []
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates += sorted(glob.glob(f"{root}/versions/{version}.*/bin/python"), reverse=True)
    for c in candidates:
        out = subprocess.run([c, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip() == version:
            return c
    return None


def _python_or_skip(version: str) -> str:
    python = interpreter(version)
    if python is None:
        message = f"no Python {version} on this machine"
        if os.environ.get("GRADBOOK_REQUIRE_ALL_PYTHONS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return python


def extras_for(version: str) -> list[str]:
    major, minor = map(int, version.split("."))
    return [e for e in PYPROJECT["optional-dependencies"] if (major, minor) >= (3, 11) or e not in NEEDS_311]


def requirements_for(version: str) -> list[str]:
    """The package's requirements with the extras that install on that version (what `.[extras]` asks)."""
    reqs = list(PYPROJECT["dependencies"])
    for extra in extras_for(version):
        reqs += PYPROJECT["optional-dependencies"][extra]
    return reqs


def pins_for(version: str) -> dict[str, str]:
    """constraints.txt's pins that apply on that Python version (its markers evaluated there)."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"python_version": version}):
                (spec,) = req.specifier
                assert spec.operator == "==", line
                pins[canonicalize_name(req.name)] = spec.version
    return pins


def test_the_readme_names_the_supported_python_versions():
    versions = supported_versions()
    assert versions, "pyproject.toml names no Python version in its classifiers"
    assert PYPROJECT["requires-python"] == f">={versions[0]}", PYPROJECT["requires-python"]
    readme = (ROOT / "README.md").read_text()
    named = ", ".join(versions[:-1]) + f" or {versions[-1]}"
    assert f"Python {named}" in readme, f"the README must name the versions it supports: Python {named}"
    assert "3.11" in readme and "teach" in readme   # and which parts need which version


@pytest.fixture(scope="module")
def resolutions(tmp_path_factory):
    """pip's dry run on every supported version this machine has, all at once (each takes one to two
    minutes, mostly waiting for the package index): {version: (exit status, stderr, report path)}."""
    tmp = tmp_path_factory.mktemp("resolve")
    running = {}
    for version in supported_versions():
        python = interpreter(version)
        if python is None:
            continue
        report, err = tmp / f"report-{version}.json", open(tmp / f"stderr-{version}.txt", "w+")
        running[version] = (subprocess.Popen(
            [sys.executable, "-m", "pip", "--python", python, "install", "--dry-run", "--ignore-installed",
             "--only-binary=:all:", "--quiet", "--disable-pip-version-check", "--report", str(report),
             "-c", str(ROOT / "constraints.txt"), *requirements_for(version)],
            stdout=subprocess.DEVNULL, stderr=err), err, report)
    results = {}
    for version, (proc, err, report) in running.items():
        proc.wait(timeout=1200)
        err.seek(0)
        results[version] = (proc.returncode, err.read(), report)
        err.close()
    return results


@pytest.mark.parametrize("version", supported_versions())
def test_constraints_resolve_on_every_supported_python(version, resolutions):
    """pip, run by that version's interpreter, resolves the package and its extras under constraints.txt
    (binary wheels only: nothing to compile on a user's machine), and every package it would install is
    pinned for that version, except the CUDA libraries of PyPI's Linux torch (this machine cannot reach
    PyTorch's CPU index) and the packaging tools that `pip freeze` leaves out (setuptools, wheel)."""
    _python_or_skip(version)
    returncode, stderr, report = resolutions[version]
    assert returncode == 0, f"Python {version}:\n{stderr[-4000:]}"
    installed = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"]
                 for i in json.loads(report.read_text())["install"]}
    pins = pins_for(version)
    not_pinned = re.compile(r"nvidia-.*|cuda-.*|triton|setuptools|wheel|pip")
    unpinned = sorted(n for n in installed if n not in pins and not not_pinned.fullmatch(n))
    assert not unpinned, f"Python {version}: constraints.txt does not pin {unpinned}"
    assert installed["torch"].split("+")[0] == pins["torch"]
    assert all(installed[n].split("+")[0] == pins[n] for n in installed if n in pins)


def test_teach_extra_needs_python_311():
    """The claim the README makes: nbgrader, the teach extra, does not resolve on Python 3.10 (if it ever
    does, the README, the Makefile's check and NEEDS_311 should change)."""
    python = _python_or_skip("3.10")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--dry-run", "--ignore-installed",
         "--no-deps", "--only-binary=:all:", "--quiet", "--disable-pip-version-check",
         *PYPROJECT["optional-dependencies"]["teach"]], capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "Requires-Python" in proc.stderr + proc.stdout, proc.stderr[-2000:]


def test_the_makefile_installs_torch_from_the_cpu_index_by_default():
    """`make` installs torch first with PyTorch's CPU wheel index as an extra index; TORCH_INDEX= drops it.
    (That the index serves the +cpu wheel cannot be tried here: download.pytorch.org is not reachable.)"""
    def recipe(*args):
        out = subprocess.run(["make", "-n", "-B", ".venv/.installed", *args], cwd=ROOT,
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return [line for line in out.stdout.splitlines() if "pip install" in line]

    default = recipe()
    assert len(default) == 2 and default[0].rstrip().endswith(" torch"), default
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in default[0]
    assert "-c constraints.txt" in default[0] and "download.pytorch.org" not in default[1]
    plain = recipe("TORCH_INDEX=")
    assert not any("--extra-index-url" in line for line in plain), plain
    cuda = recipe("TORCH_INDEX=https://download.pytorch.org/whl/cu128")
    assert "--extra-index-url https://download.pytorch.org/whl/cu128" in cuda[0]


def test_this_environment_runs_the_cpu_build_of_torch():
    """Where the book is built and tested, torch is the CPU build the constraints mean."""
    import torch

    assert torch.version.cuda is None, f"torch {torch.__version__} is a CUDA build"
    assert torch.__version__.split("+")[0] == pins_for("%d.%d" % sys.version_info[:2])["torch"]


@pytest.mark.skipif(os.environ.get("GRADBOOK_FULL_INSTALL") != "1",
                    reason="a full install per Python version takes minutes: set GRADBOOK_FULL_INSTALL=1")
@pytest.mark.parametrize("version", supported_versions())
def test_full_install_on_every_supported_python(version, tmp_path):
    """A fresh virtual environment per version, installed as the Makefile does (torch first, with
    TORCH_INDEX), then the package, imported with its book extra's JupyterLab extension."""
    python = _python_or_skip(version)
    venv = tmp_path / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
           "-c", str(ROOT / "constraints.txt")]
    index = os.environ.get("TORCH_INDEX", "https://download.pytorch.org/whl/cpu")
    subprocess.run(pip + (["--extra-index-url", index, "--retries", "0"] if index else []) + ["torch"],
                   check=True, timeout=3600)
    subprocess.run(pip + [f"{ROOT}[{','.join(extras_for(version))}]"], check=True, timeout=3600)
    check = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import gradbook, jupyterlab_myst, torch; print(torch.__version__)"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert check.returncode == 0, check.stderr
