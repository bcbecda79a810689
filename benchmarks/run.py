"""Benchmarks reported in the project's notes (not timed tests: this machine is shared and noisy).

    python benchmarks/run.py              # both parts
    python benchmarks/run.py --notebooks  # (a) each notebook's execution time
    python benchmarks/run.py --watch      # (b) overhead of gradbook.watch over a plain training step
    python benchmarks/run.py --diagnose   # (c) cost of one gradbook.diagnose call, in plain steps
    python benchmarks/run.py --watch-ddp  # (b') (b) under DistributedDataParallel, 2 CPU processes

(b) uses 20 Linear(256, 256) + ReLU layers, batch 128 (`--batch` to change it), one math thread, and times the arms interleaved
step by step (plain; the floor of any per-step monitor, one bare pass over the gradients with no gradbook
code; watch(level="norms") and watch(level="full") with the update ratio on every recorded
step (the default), on every 10th (ratios=10) and, for "norms", on none; watch(level="full", every=10); each
watch with its optimizer, spike detection, the loss logged and TensorBoard export), so that machine noise
hits every arm alike; it reports the median step time of each, its ratio to plain, and the memory the
monitor keeps per recorded step.

(c) times one gb.diagnose call against one plain training step of the same model and batch (the MLP of (b),
and a 4-layer pre-LN transformer on tokens), interleaved with the floor of any one-batch diagnosis by hooks
(the same pass with one norm per layer output and the statistics of each activation module, the weights and
their gradients read once, ``.grad`` left as it was; no gradbook code).
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


def _step(model, opt, w, x, y) -> None:
    """One training step as the monitor's users take it: the loss logged to the watch (if any) before the
    optimizer steps."""
    import torch

    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    if w is not None:
        w.log_loss(loss)
    opt.step()


class _Floor:
    """Not a monitor: the one thing any per-step gradient monitor must do, a pass over the gradients
    (``torch._foreach_norm``, no gradbook code), where the watch reads them (before the optimizer's step)."""

    trace, export = (), ()

    def __init__(self, model):
        self.params = [p for p in model.parameters() if p.requires_grad]

    def log_loss(self, loss) -> None:
        import torch

        torch._foreach_norm([p.grad for p in self.params])

    def attach(self):
        return self

    def detach(self) -> None:
        pass


def _watch_arms(base, tmp):
    """Each arm: a copy of the model, its optimizer, and its monitor (spikes and TensorBoard export on)."""
    import copy

    import torch

    import gradbook as gb

    arms = {}
    for name, kwargs in [("plain", None), ("floor: one bare pass over .grad", "floor"),
                         ("watch(level='norms')", dict(level="norms")),
                         ("watch(level='norms', ratios=10)", dict(level="norms", ratios=10)),
                         ("watch(level='norms', ratios=False)", dict(level="norms", ratios=False)),
                         ("watch(level='full')", dict(level="full")),
                         ("watch(level='full', ratios=10)", dict(level="full", ratios=10)),
                         ("watch(level='full', every=10)", dict(level="full", every=10))]:
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        w = None
        if kwargs == "floor":
            w = _Floor(model)
        elif kwargs is not None:
            export = gb.export.TensorBoard(f"{tmp}/{len(arms)}") if _has_tensorboard() else ()
            w = gb.watch(model, optimizer=opt, spikes=True, export=export, **kwargs)
        arms[name] = (model, opt, w)
    return arms


def _has_tensorboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def _memory_per_step(base, level: str, steps: int = 200) -> float:
    """Bytes the monitor keeps per recorded step (tracemalloc, after the steps are converted to numbers)."""
    import copy
    import tracemalloc

    import torch

    import gradbook as gb

    model = copy.deepcopy(base)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    x, y = torch.randn(8, 256), torch.randn(8, 256)
    with gb.watch(model, optimizer=opt, level=level) as w:
        def run(n):
            for _ in range(n):
                _step(model, opt, w, x, y)
            w.trace   # convert what is pending
        run(10)
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        run(steps)
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
    return (after - before) / steps


def watch_overhead(steps: int = 300, warmup: int = 20, batch: int = 128) -> None:
    """The monitor as it is meant to be left on: with its optimizer (update ratios), spike detection, the loss
    logged, and TensorBoard export (when tensorboard is installed), against plain steps of the same model."""
    import tempfile

    import torch

    import gradbook as gb

    gb.setup(0, style=False)
    base = gb.mlp(depth=20, width=256, activation="relu", init="he")
    x, y = torch.randn(batch, 256), torch.randn(batch, 256)
    with tempfile.TemporaryDirectory() as tmp:
        arms = _watch_arms(base, tmp)
        times: dict[str, list[float]] = {k: [] for k in arms}
        cpu: dict[str, list[float]] = {k: [] for k in arms}   # process time: what other processes cannot inflate
        for _, _, w in arms.values():
            if w is not None:
                w.attach()
        try:
            names = list(arms)
            for i in range(warmup + steps):
                order = names[i % len(names):] + names[:i % len(names)]   # rotate who goes first
                for k in order:
                    model, opt, w = arms[k]
                    t0, c0 = time.perf_counter(), time.process_time()
                    _step(model, opt, w, x, y)
                    if i >= warmup:
                        times[k].append(time.perf_counter() - t0)
                        cpu[k].append(time.process_time() - c0)
            recorded = {k: len(w.trace) for k, (_, _, w) in arms.items() if isinstance(w, gb.watch)}
        finally:
            for _, _, w in arms.values():
                if w is not None:
                    w.detach()
                    for sink in w.export:
                        sink.close()
    plain, plain_cpu = statistics.median(times["plain"]), statistics.median(cpu["plain"])
    export = "TensorBoard export" if _has_tensorboard() else "no export (tensorboard not installed)"
    print(f"(b) gradbook.watch overhead: 20 x Linear(256, 256)+ReLU, batch {batch}, median of {steps} interleaved "
          f"steps; optimizer hooks, update ratios, spike detection, {export}")
    for k, t in times.items():
        med, med_cpu = statistics.median(t), statistics.median(cpu[k])
        extra = f"  ({recorded[k]} steps recorded)" if k in recorded else ""
        print(f"    {k:36s} {1e3 * med:7.2f} ms   {med / plain:5.3f}x plain   "
              f"(CPU time {1e3 * med_cpu:6.2f} ms, {med_cpu / plain_cpu:5.3f}x){extra}")
    for level in ["norms", "full"]:
        print(f"    memory kept per recorded step, level={level!r}: {_memory_per_step(base, level):,.0f} bytes")


def _diagnose_models():
    """The benchmark models of (c): the 20 x 256 ReLU MLP of (b), and a 4-layer pre-LN transformer on tokens."""
    import torch
    from torch import nn

    import gradbook as gb

    mlp = gb.mlp(depth=20, width=256, activation="relu", init="he")
    yield "MLP 20 x 256, batch 128", mlp, torch.randn(128, 256), torch.randn(128, 256)

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(200, 64)
            layer = nn.TransformerEncoderLayer(64, 4, 256, dropout=0.0, batch_first=True, norm_first=True)
            self.enc = nn.TransformerEncoder(layer, 4, norm=nn.LayerNorm(64), enable_nested_tensor=False)
            self.out = nn.Linear(64, 200)

        def forward(self, x):
            return self.out(self.enc(self.emb(x)))
    yield "pre-LN transformer, 4 layers, batch 16 x 32 tokens", Tokens(), \
        torch.randint(0, 200, (16, 32)), torch.randint(0, 200, (16, 32))


def _diagnosis_floor(model, x, y) -> None:
    """Not a diagnosis: what any one-batch diagnosis by hooks must do, with no gradbook code. One forward and
    backward pass that reads each layer's output gradient (a tensor hook, one norm) and each activation
    module's output (its sum, norm, count of zeros and per-unit sums: mean, spread, saturated and dead
    ReLU units), then one pass over the weight gradients and one over the weights, leaving ``.grad`` as it was.
    It holds a second set of gradients beside the caller's while it runs (fresh memory: page faults);
    ``gb.diagnose`` reads each weight gradient as it arrives and lets it go, and can cost less than this."""
    import torch
    from torch import nn

    import gradbook as gb

    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    kept = []

    def layer(m, args, out):
        y = out[0] if isinstance(out, tuple) else out
        y.register_hook(lambda g: kept.append(torch.linalg.vector_norm(g).item()))

    def act(m, args, out):
        y = out.detach()
        kept.append((y.sum().item(), torch.linalg.vector_norm(y).item(), y.sign().sum().item(), y.sum(0)))
    handles = [m.register_forward_hook(layer) for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    handles += [m.register_forward_hook(act) for m in model.modules() if isinstance(m, (nn.ReLU, nn.GELU, nn.Tanh))]
    gb.batches.default_loss(model(x), y).backward()
    torch._foreach_norm([p.grad for p in params])
    torch._foreach_norm([p.detach() for p in params])
    for h in handles:
        h.remove()
    for p, g in zip(params, saved):
        p.grad = g


def diagnose_cost(repeats: int = 60) -> None:
    """One gb.diagnose call against one plain training step (forward, backward, SGD step) of the same model
    and batch, and the floor of any diagnosis by hooks (:func:`_diagnosis_floor`), interleaved call by
    call; the ratios of medians, in wall-clock and in CPU time (the latter less sensitive to other
    processes on a shared machine)."""
    import torch

    import gradbook as gb

    gb.setup(0, style=False)
    for name, model, x, y in _diagnose_models():
        opt = torch.optim.SGD(model.parameters(), lr=1e-6)

        def step():
            opt.zero_grad(set_to_none=True)
            gb.batches.default_loss(model(x), y).backward()
            opt.step()

        arms = {"plain": step, "floor": lambda: _diagnosis_floor(model, x, y), "diag": lambda: gb.diagnose(model, x, y)}
        wall, cpu = {k: [] for k in arms}, {k: [] for k in arms}
        for i in range(repeats + 3):
            for k, f in arms.items():
                t0, c0 = time.perf_counter(), time.process_time()
                f()
                if i >= 3:
                    wall[k].append(time.perf_counter() - t0)
                    cpu[k].append(time.process_time() - c0)
        (p, fl, d), (pc, flc, dc) = ([statistics.median(v[k]) for k in arms] for v in (wall, cpu))
        print(f"(c) gb.diagnose, {name}: {1e3 * d:7.2f} ms, {d / p:5.2f}x one plain step ({1e3 * p:.2f} ms); "
              f"CPU time {dc / pc:5.2f}x; the floor of any diagnosis by hooks {fl / p:5.2f}x (CPU time {flc / pc:5.2f}x)")


def watch_overhead_ddp(steps: int = 100, warmup: int = 10) -> None:
    """(b') The same arms under DistributedDataParallel, 2 CPU processes (gloo): run by
    ``python benchmarks/run.py --watch-ddp``, which starts itself under torchrun; rank 0 prints."""
    import subprocess
    import socket
    import sys

    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                        "127.0.0.1", "--master_port", str(port), __file__, "--watch-ddp", "--steps", str(steps)],
                       check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        return
    import copy

    import torch
    import torch.distributed as dist

    import gradbook as gb

    dist.init_process_group("gloo")
    gb.setup(0, style=False)
    base = gb.mlp(depth=20, width=256, activation="relu", init="he")
    x, y = torch.randn(64, 256), torch.randn(64, 256)   # each rank's half of a batch of 128
    arms = {}
    for name, kwargs in [("plain DDP", None), ("watch(level='norms')", dict(level="norms")),
                         ("watch(level='norms', ratios=10)", dict(level="norms", ratios=10)),
                         ("watch(level='norms', ratios=False)", dict(level="norms", ratios=False)),
                         ("watch(level='full')", dict(level="full")),
                         ("watch(level='full', ratios=10)", dict(level="full", ratios=10))]:
        model = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(base))
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        w = gb.watch(model, optimizer=opt, **kwargs).attach() if kwargs is not None else None
        arms[name] = (model, opt, w)
    times = {k: [] for k in arms}
    for i in range(warmup + steps):
        for k, (model, opt, w) in arms.items():
            dist.barrier()
            t0 = time.perf_counter()
            _step(model, opt, w, x, y)
            if i >= warmup:
                times[k].append(time.perf_counter() - t0)
    if dist.get_rank() == 0:
        plain = statistics.median(times["plain DDP"])
        print(f"(b') under DDP, 2 processes (gloo), median of {steps} interleaved steps, against plain DDP")
        for k, t in times.items():
            print(f"    {k:36s} {1e3 * statistics.median(t):7.2f} ms   {statistics.median(t) / plain:5.3f}x")
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--notebooks", action="store_true")
    parser.add_argument("--watch", action="store_true")
    parser.add_argument("--diagnose", action="store_true")
    parser.add_argument("--watch-ddp", action="store_true", help="(b') the watch's overhead under DDP, 2 processes")
    parser.add_argument("--steps", type=int, default=300, help="timed steps per arm in (b), at least 200 for the report")
    parser.add_argument("--batch", type=int, default=128,
                        help="batch of (b): the benchmark's is 128; larger ones show how the cost shrinks with work per weight")
    args = parser.parse_args()
    both = not (args.notebooks or args.watch or args.diagnose or args.watch_ddp)
    if args.watch_ddp:
        watch_overhead_ddp(args.steps)
    if args.watch or both:
        watch_overhead(args.steps, batch=args.batch)
    if args.diagnose or both:
        diagnose_cost()
    if args.notebooks or both:
        notebooks()
