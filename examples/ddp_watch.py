"""Keep gradbook's monitor on under torch.distributed: DDP (or FSDP's fully_shard), one record on rank 0.

Run with two CPU processes (the gloo backend; nothing beyond this machine)::

    torchrun --nproc_per_node 2 examples/ddp_watch.py --steps 20 --out trace.npz
    torchrun --nproc_per_node 2 examples/ddp_watch.py --fsdp        # shard with fully_shard instead

Each rank trains on its own share of every batch; DistributedDataParallel averages the gradients at the end
of the backward pass, and gradbook reads them when the optimizer steps, so the norms on rank 0 are those of
the whole batch, the same as one process would record. Rank 0 keeps the records and prints; other ranks
keep nothing and print nothing. ``--no-optimizer`` watches without an optimizer (a record per backward pass).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import gradbook as gb

BATCH, IN, OUT = 32, 16, 4


def make_model(seed: int = 0) -> nn.Module:
    """The same small MLP on every rank (and in a single-process check)."""
    torch.manual_seed(seed)
    return gb.mlp(depth=4, width=32, activation="tanh", init="xavier_normal", in_dim=IN, out_dim=OUT)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole batch of a step (every rank draws the same one, then takes its share)."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, IN, generator=g), torch.randn(BATCH, OUT, generator=g)


def share(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return t.chunk(world)[rank]


def train(model: nn.Module, steps: int, rank: int = 0, world: int = 1, use_optimizer: bool = True,
          lr: float = 0.05) -> gb.watch:
    """SGD on the mean squared error, each rank on its share of the batch, watched at level "norms"."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    w = gb.watch(model, level="norms", optimizer=opt if use_optimizer else None)
    with w:
        for step in range(steps):
            x, y = batch(step)
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(model(share(x, rank, world)), share(y, rank, world))
            w.log_loss(loss)   # before backward (the step closes there when no optimizer is given)
            loss.backward()
            opt.step()
    return w


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--fsdp", action="store_true", help="shard with torch.distributed.fsdp.fully_shard")
    parser.add_argument("--no-optimizer", action="store_true")
    parser.add_argument("--diagnose", action="store_true", help="then gb.diagnose the model on the last batch")
    parser.add_argument("--out", help="rank 0 saves the trace here (.npz)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        model = make_model()
        if args.fsdp:
            from torch.distributed.fsdp import fully_shard
            for block in model.layers:
                fully_shard(block)
            model = fully_shard(model)
        else:
            model = nn.parallel.DistributedDataParallel(model)
        w = train(model, args.steps, rank, world, use_optimizer=not args.no_optimizer)
        trace = w.trace
        diag = None
        if args.diagnose:   # every rank takes part (DDP averages the gradients across ranks)
            x, y = batch(args.steps)
            diag = gb.diagnose(model, share(x, rank, world), share(y, rank, world))
        if rank == 0:
            print(f"rank 0 of {world}: {len(trace)} steps recorded; total gradient norm "
                  f"{trace.total_grad_norm[0]:.4g} -> {trace.total_grad_norm[-1]:.4g}; {len(trace.spikes)} spikes"
                  + (f"; diagnosis: {diag.verdict}" if diag is not None else ""))
            if args.out:
                np.savez(args.out, steps=trace.steps, weight_grad_norm=trace.weight_grad_norm,
                         total_grad_norm=trace.total_grad_norm, loss=trace.loss,
                         update_ratio=np.zeros(0) if trace.update_ratio is None else trace.update_ratio,
                         diagnose=np.zeros(0) if diag is None else diag.weight_grad_norm)
        elif len(trace):
            raise AssertionError(f"rank {rank} kept {len(trace)} records")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
