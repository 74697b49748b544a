"""Distributed helpers that degrade to no-ops in a single process.

Every helper works without an initialised process group (world size 1), so the method code in
``sove.method`` never has to ask whether it runs under DDP.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a ``torch.distributed`` process group is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's global rank (0 in a single process)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes in the default group (1 in a single process)."""
    return dist.get_world_size() if is_distributed() else 1


@torch.no_grad()
def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, in rank order (no gradient).

    Args:
        x: tensor of shape (n, ...) with the same shape on every rank.

    Returns:
        Tensor of shape (world_size * n, ...); ``x`` itself in a single process.
    """
    if not is_distributed():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def all_gather_objects(obj: object) -> list:
    """``obj`` of every rank, in rank order (picklable objects; ``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
