"""gb.watch and gb.diagnose under torch.distributed (issue 21): two CPU processes, the gloo backend on
127.0.0.1, started with torchrun on a free port, running the book's recipe examples/ddp_watch.py. Each rank
trains on its own half of every batch; the norms recorded on rank 0 must equal those of one process on the
whole batch (a norm read before DDP's averaging would be one half's: 77% off here), and the other rank
keeps nothing and prints nothing."""
from __future__ import annotations

import importlib.util
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import gradbook as gb

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "ddp_watch.py"
STEPS = 6


def _recipe():
    spec = importlib.util.spec_from_file_location("ddp_watch", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path, *args) -> tuple[dict, str]:
    out = tmp_path / "trace.npz"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(RECIPE),
                           "--steps", str(STEPS), "--out", str(out), *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return dict(np.load(out)), proc.stdout


@pytest.fixture(scope="module")
def single():
    """One process on the whole batch: the numbers the ranks together must record."""
    torch.set_num_threads(1)
    recipe = _recipe()
    model = recipe.make_model()
    trace = recipe.train(model, STEPS).trace
    x, y = recipe.batch(STEPS)
    half = recipe.train(recipe.make_model(), STEPS, rank=0, world=2).trace   # what one rank alone sees
    return trace, gb.diagnose(model, x, y), half


def _check(got: dict, single, with_ratio=True):
    trace, _, half = single
    assert list(got["steps"]) == list(range(STEPS))
    np.testing.assert_allclose(got["weight_grad_norm"], trace.weight_grad_norm, rtol=1e-5)
    np.testing.assert_allclose(got["total_grad_norm"], trace.total_grad_norm, rtol=1e-5)
    np.testing.assert_allclose(got["loss"], trace.loss, rtol=1e-5)      # the mean over ranks
    if with_ratio:
        np.testing.assert_allclose(got["update_ratio"], trace.update_ratio, rtol=1e-4)
    assert not np.allclose(half.weight_grad_norm, trace.weight_grad_norm, rtol=1e-2)   # the check can fail


def _only_rank_0_printed(stdout: str) -> None:
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("rank 0 of 2:"), stdout


def test_ddp_records_the_global_norms_on_rank_0_only(tmp_path, single):
    got, stdout = _torchrun(tmp_path, "--diagnose")
    _check(got, single)
    _only_rank_0_printed(stdout)
    np.testing.assert_allclose(got["diagnose"], single[1].weight_grad_norm, rtol=1e-5)   # gb.diagnose too


def test_ddp_without_an_optimizer_reads_after_ddp_averages(tmp_path, single):
    got, _ = _torchrun(tmp_path, "--no-optimizer")
    _check(got, single, with_ratio=False)


def test_fsdp_fully_shard_records_the_global_norms(tmp_path, single):
    """FSDP2 (fully_shard) runs on CPU with gloo in this torch: each rank holds half of each weight and its
    gradient; the norms are summed over the shards."""
    pytest.importorskip("torch.distributed.fsdp")
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip(f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard")
    got, stdout = _torchrun(tmp_path, "--fsdp")
    _check(got, single)
    _only_rank_0_printed(stdout)
