"""Toy model and deterministic loader for the engine tests (NOT a detector).

- :class:`ToyModel`: ``forward(images, targets) -> {"loss_reg", "loss_cls"}`` on 8-d "images".
- :func:`make_loader`: infinite, deterministic loader whose batch ``i`` depends only on
  (seed, rank, i) through its own ``torch.Generator``; ``start_iter`` rebuilds it mid-stream,
  as the resume contract of ``mdkd_det.engine.trainer`` requires.
"""

from __future__ import annotations

from typing import Iterator, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

IN_DIM = 8


class ToyModel(nn.Module):
    """Two-layer MLP with a regression and a 3-class head; optional dropout (uses the global RNG)."""

    def __init__(self, hidden: int = 16, dropout: float = 0.0, loss_scale: float = 1.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN_DIM, hidden)
        self.drop = nn.Dropout(dropout)
        self.reg = nn.Linear(hidden, 1)
        self.cls = nn.Linear(hidden, 3)
        self.loss_scale = loss_scale
        self.seen_autocast: List[Optional[torch.dtype]] = []

    def forward(self, images, targets):
        x = torch.stack([im.flatten() for im in images])
        h = self.drop(torch.relu(self.fc1(x)))
        self.seen_autocast.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        y = torch.stack([t["y"] for t in targets])
        c = torch.stack([t["c"] for t in targets])
        return {
            "loss_reg": self.loss_scale * F.mse_loss(self.reg(h).squeeze(1).float(), y),
            "loss_cls": self.loss_scale * F.cross_entropy(self.cls(h).float(), c),
        }


def make_batch(it: int, seed: int = 0, rank: int = 0, batch_size: int = 4):
    g = torch.Generator().manual_seed(seed * 1_000_003 + rank * 7_919 + it)
    return [
        {"image": torch.randn(IN_DIM, generator=g),
         "target": {"y": torch.randn((), generator=g), "c": torch.randint(0, 3, (), generator=g)}}
        for _ in range(batch_size)
    ]


def make_loader(start_iter: int = 0, seed: int = 0, rank: int = 0, batch_size: int = 4,
                crash_at: Optional[int] = None) -> Iterator[list]:
    """Infinite generator of batches starting at ``start_iter``; raises at ``crash_at``."""
    def gen():
        it = start_iter
        while True:
            if crash_at is not None and it == crash_at:
                raise RuntimeError(f"simulated crash at iteration {it}")
            yield make_batch(it, seed, rank, batch_size)
            it += 1
    return gen()


def solver_cfg(**overrides):
    """``get_cfg()`` with small SOLVER settings for the toy runs."""
    from mdkd_det.config import get_cfg

    cfg = get_cfg()
    cfg.SOLVER.OPTIMIZER = "AdamW"
    cfg.SOLVER.BASE_LR = 1e-2
    cfg.SOLVER.WEIGHT_DECAY = 1e-4
    cfg.SOLVER.MAX_ITER = 6
    cfg.SOLVER.LR_SCHEDULER_NAME = "WarmupCosineLR"
    cfg.SOLVER.WARMUP_ITERS = 2
    cfg.SOLVER.WARMUP_FACTOR = 0.1
    for k, v in overrides.items():
        node = cfg
        *parents, last = k.split(".")
        for p in parents:
            node = node[p]
        node[last] = v
    return cfg
