"""Thin helpers over ``torch.distributed`` (detectron2's ``utils/comm.py`` role).

Every function works without an initialised process group (single process): rank 0, world
size 1, and collectives become no-ops.
"""

from __future__ import annotations

import os
from typing import Any, List

import torch
import torch.distributed as dist

__all__ = [
    "get_world_size",
    "get_rank",
    "get_local_rank",
    "get_local_size",
    "is_main_process",
    "synchronize",
    "all_gather",
]

# Set by :func:`mdkd_det.engine.launch.launch` in each worker; ``None`` -> read ``LOCAL_RANK``.
_LOCAL_RANK: int | None = None
_LOCAL_SIZE: int | None = None


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    """Number of processes in the default group (1 when not distributed)."""
    return dist.get_world_size() if _dist_ready() else 1


def get_rank() -> int:
    """Global rank of this process (0 when not distributed)."""
    return dist.get_rank() if _dist_ready() else 0


def get_local_rank() -> int:
    """Rank within this machine: set by ``launch``, else ``$LOCAL_RANK`` (torchrun), else 0."""
    if _LOCAL_RANK is not None:
        return _LOCAL_RANK
    return int(os.environ.get("LOCAL_RANK", 0))


def get_local_size() -> int:
    """Processes on this machine: set by ``launch``, else ``$LOCAL_WORLD_SIZE``, else 1."""
    if _LOCAL_SIZE is not None:
        return _LOCAL_SIZE
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def is_main_process() -> bool:
    """True on global rank 0 (the process that writes checkpoints, metrics and logs)."""
    return get_rank() == 0


def synchronize() -> None:
    """Barrier across all processes; no-op with a single process."""
    if not _dist_ready() or get_world_size() == 1:
        return
    if dist.get_backend() == dist.Backend.NCCL and torch.cuda.is_available():
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_gather(data: Any) -> List[Any]:
    """Gather a picklable object from every rank (``torch.distributed.all_gather_object``).

    Returns:
        list of length world size, index = rank; ``[data]`` with a single process.
    """
    if get_world_size() == 1:
        return [data]
    out: List[Any] = [None] * get_world_size()
    dist.all_gather_object(out, data)
    return out
