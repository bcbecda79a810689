"""Benchmarks reported in the project's notes (not timed tests: this machine is shared and noisy).

    python benchmarks/run.py              # both parts
    python benchmarks/run.py --notebooks  # (a) each notebook's execution time
    python benchmarks/run.py --watch      # (b) overhead of gradbook.watch over a plain training step
    python benchmarks/run.py --diagnose   # (c) cost of one gradbook.diagnose call, in plain steps

(b) uses 20 Linear(256, 256) + ReLU layers, batch 128, one math thread, and times the arms interleaved
step by step (plain, watch(level="norms"), watch(level="full"), watch(level="full", every=10)), so that
machine noise hits every arm alike; it reports the median step time of each and its ratio to plain.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def notebooks() -> None:
    import nbformat
    from nbclient import NotebookClient

    # chapters and the instructor versions of the assignments (the generated student versions in
    # release/ stop at their first unimplemented function by design)
    paths = sorted(p for p in (ROOT / "book").rglob("*.ipynb")
                   if not {"_build", "release", ".ipynb_checkpoints"} & set(p.parts))
    print("(a) notebook execution time (fresh kernel each; kernel start-up excluded)")
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        client = NotebookClient(nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(path.parent)}})
        with client.setup_kernel():
            t0 = time.perf_counter()
            for i, cell in enumerate(nb.cells):
                client.execute_cell(cell, i)
            elapsed = time.perf_counter() - t0
        print(f"    {path.relative_to(ROOT)}: {elapsed:6.2f} s")


def watch_overhead(steps: int = 300, warmup: int = 20) -> None:
    import copy

    import torch

    import gradbook as gb

    gb.setup(0, style=False)
    base = gb.mlp(depth=20, width=256, activation="relu", init="he")
    x, y = torch.randn(128, 256), torch.randn(128, 256)
    arms = {
        "plain": (copy.deepcopy(base), None),
        "watch(level='norms')": (m := copy.deepcopy(base), gb.watch(m, level="norms")),
        "watch(level='full')": (m := copy.deepcopy(base), gb.watch(m, level="full")),
        "watch(level='full', every=10)": (m := copy.deepcopy(base), gb.watch(m, level="full", every=10)),
    }
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-4) for k, (m, _) in arms.items()}
    times: dict[str, list[float]] = {k: [] for k in arms}
    for _, w in arms.values():
        if w is not None:
            w.attach()
    try:
        names = list(arms)
        for i in range(warmup + steps):
            order = names[i % len(names):] + names[:i % len(names)]   # rotate who goes first
            for k in order:
                model, _ = arms[k]
                t0 = time.perf_counter()
                opts[k].zero_grad(set_to_none=True)
                torch.nn.functional.mse_loss(model(x), y).backward()
                opts[k].step()
                if i >= warmup:
                    times[k].append(time.perf_counter() - t0)
        recorded = {k: len(w.trace) for k, (_, w) in arms.items() if w is not None}
    finally:
        for _, w in arms.values():
            if w is not None:
                w.detach()
    plain = statistics.median(times["plain"])
    print(f"(b) gradbook.watch overhead: 20 x Linear(256, 256)+ReLU, batch 128, median of {steps} interleaved steps")
    for k, t in times.items():
        med = statistics.median(t)
        extra = f"  ({recorded[k]} steps recorded)" if k in recorded else ""
        print(f"    {k:32s} {1e3 * med:7.2f} ms   {med / plain:5.3f}x plain{extra}")


def diagnose_cost(repeats: int = 30) -> None:
    """One gb.diagnose call against one plain training step of the same model and batch."""
    import torch

    import gradbook as gb

    gb.setup(0, style=False)
    model = gb.mlp(depth=20, width=256, activation="relu", init="he")
    x, y = torch.randn(128, 256), torch.randn(128, 256)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    plain, diag = [], []
    for i in range(repeats + 3):
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        gb.diagnose(model, x, y)
        t2 = time.perf_counter()
        if i >= 3:
            plain.append(t1 - t0)
            diag.append(t2 - t1)
    p, d = statistics.median(plain), statistics.median(diag)
    print(f"(c) gb.diagnose on the same model: {1e3 * d:7.2f} ms, {d / p:5.2f}x one plain step ({1e3 * p:.2f} ms)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--notebooks", action="store_true")
    parser.add_argument("--watch", action="store_true")
    parser.add_argument("--diagnose", action="store_true")
    parser.add_argument("--steps", type=int, default=300, help="timed steps per arm in (b), at least 200 for the report")
    args = parser.parse_args()
    both = not (args.notebooks or args.watch or args.diagnose)
    if args.watch or both:
        watch_overhead(args.steps)
    if args.diagnose or both:
        diagnose_cost()
    if args.notebooks or both:
        notebooks()
