"""More than one process: which model a wrapper holds, which process keeps the records, global norms.

Under ``torch.distributed`` every process runs the same loop. gradbook keeps its records on rank 0 only;
the other ranks take part in the collectives a global norm needs and keep nothing.

* ``DistributedDataParallel`` (DDP) replicates the model and *averages the gradients at the end of the
  backward pass*, in a callback of its own: a norm read earlier (in a hook during the backward pass) is
  the local gradient of this rank's share of the batch, a wrong number. gradbook reads gradients when the
  optimizer steps, after DDP's averaging, so every rank reads the same, global, gradient.
* FSDP (``torch.distributed.fsdp.fully_shard``) shards each parameter and its gradient across ranks as a
  DTensor; a norm is the square root of the sum, over ranks, of each shard's squared norm
  (:func:`squared_norms`).
"""
from __future__ import annotations

import torch
from torch import nn

from .records import eager, norms

__all__ = ["unwrap", "rank", "world_size", "is_main", "is_sharded", "local", "squared_norms"]

#: Wrappers whose ``.module`` is the model they run.
WRAPPERS = (nn.parallel.DistributedDataParallel, nn.DataParallel)


def _inner(model: nn.Module) -> nn.Module | None:
    if isinstance(model, WRAPPERS):
        return model.module
    compiled = eager(model)   # what a torch.compile wrapper runs
    return None if compiled is model else compiled


def unwrap(model: nn.Module) -> nn.Module:
    """The model a ``DistributedDataParallel``, ``DataParallel`` or ``torch.compile`` wrapper runs (the
    model itself if unwrapped). A model wrapped twice (DDP around DDP, say) is a mistake: ``ValueError``."""
    inner = _inner(model)
    if inner is None:
        return model
    if _inner(inner) is not None:
        raise ValueError(f"this model is wrapped twice ({type(model).__name__} around "
                         f"{type(inner).__name__}): wrap it once, and watch that wrapper")
    return inner


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    """This process's rank (0 without ``torch.distributed``)."""
    return torch.distributed.get_rank() if _initialized() else 0


def world_size() -> int:
    """The number of processes (1 without ``torch.distributed``)."""
    return torch.distributed.get_world_size() if _initialized() else 1


def is_main() -> bool:
    """Whether this process keeps the records and speaks (rank 0)."""
    return rank() == 0


#: Tensor types that are never a DTensor: checked first, as looking up a missing attribute costs microseconds.
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor split across ranks (FSDP's parameters and gradients)."""
    if type(t) in _PLAIN:
        return False
    placements = getattr(t, "placements", None)
    return placements is not None and any(p.is_shard() for p in placements)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (the tensor itself unless it is a DTensor)."""
    return t if type(t) in _PLAIN or not hasattr(t, "to_local") else t.to_local()


def squared_norms(tensors: list[torch.Tensor], sharded: list[bool] | None = None) -> torch.Tensor:
    """The squared 2-norm of each tensor (float64), over all ranks for sharded ones (``sharded``, by default
    :func:`is_sharded` of each): each rank's shard's squared norm, summed with an all-reduce. Every rank
    must call it at the same point of its loop."""
    sq = norms([local(t) for t in tensors]) ** 2
    flags = [is_sharded(t) for t in tensors] if sharded is None else sharded
    sharded = [i for i, f in enumerate(flags) if f]
    if sharded and world_size() > 1:
        part = sq[sharded].contiguous()
        torch.distributed.all_reduce(part)
        sq[sharded] = part
    return sq
