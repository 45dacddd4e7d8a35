"""Device helpers shared by the trainer and the evaluator."""

from __future__ import annotations

from typing import Any, Mapping

import torch


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the first parameter (or buffer) of ``model``; CPU for a stateless module."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def to_device(obj: Any, device: torch.device) -> Any:
    """Move tensors inside nested dicts/lists/tuples to ``device`` (other leaves unchanged)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj
