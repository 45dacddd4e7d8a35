"""Optimizer and learning-rate schedule from ``SOLVER.*`` (detectron2's ``solver/build.py`` role).

- :func:`build_optimizer`: ``torch.optim.AdamW`` or ``torch.optim.SGD`` over the trainable
  parameters of a module, or over any iterable of parameters / param-group dicts (later stages
  pass a subset, e.g. only the student or only a connector).
- :func:`build_lr_scheduler`: a ``torch.optim.lr_scheduler.LambdaLR`` whose multiplier is
  ``warmup(it) * schedule(it)``; the schedule is fvcore's ``CosineParamScheduler`` or
  ``MultiStepParamScheduler`` (the same building blocks detectron2 uses). The scheduler is
  stepped **once per iteration** (by :class:`mdkd_det.engine.hooks.LRScheduler`), so the LR used
  at iteration ``it`` (0-based) is ``BASE_LR * lr_factor(it)``.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, List, Sequence, Union

import torch
from fvcore.common.param_scheduler import CosineParamScheduler, MultiStepParamScheduler

from ..utils.errors import ConfigError

__all__ = ["build_optimizer", "build_lr_scheduler", "WarmupSchedule", "OPTIMIZERS", "LR_SCHEDULERS"]

logger = logging.getLogger(__name__)

#: Accepted values of ``SOLVER.OPTIMIZER`` (matched case-insensitively).
OPTIMIZERS = ("AdamW", "SGD")
#: Accepted values of ``SOLVER.LR_SCHEDULER_NAME``.
LR_SCHEDULERS = ("WarmupMultiStepLR", "WarmupCosineLR")


def _trainable_params(model_or_params: Union[torch.nn.Module, Iterable[Any]]) -> List[Any]:
    """Return a list of tensors or param-group dicts, keeping only ``requires_grad`` tensors.

    Duplicated tensors (shared weights, or the same tensor listed twice) are kept once.
    """
    if isinstance(model_or_params, torch.nn.Module):
        items: Iterable[Any] = model_or_params.parameters()
    elif isinstance(model_or_params, torch.Tensor):
        items = [model_or_params]
    else:
        items = model_or_params
    seen = set()
    out: List[Any] = []
    for item in items:
        if isinstance(item, dict):
            if "params" not in item:
                raise ConfigError(f"param group dict without a 'params' entry: keys {sorted(item)}")
            group_params = item["params"]
            if isinstance(group_params, torch.Tensor):
                group_params = [group_params]
            kept = []
            for p in group_params:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    kept.append(p)
            if kept:
                out.append({**item, "params": kept})
        elif isinstance(item, torch.Tensor):
            if item.requires_grad and id(item) not in seen:
                seen.add(id(item))
                out.append(item)
        else:
            raise ConfigError(
                f"build_optimizer: expected an nn.Module, tensors or param-group dicts, got {type(item).__name__}"
            )
    return out


def build_optimizer(cfg, model_or_params: Union[torch.nn.Module, Iterable[Any]]) -> torch.optim.Optimizer:
    """Build the optimizer named by ``SOLVER.OPTIMIZER``.

    Args:
        cfg: config with ``SOLVER.OPTIMIZER`` ("AdamW" or "SGD", case-insensitive),
            ``SOLVER.BASE_LR`` (initial LR before warmup scaling), ``SOLVER.WEIGHT_DECAY``
            (decoupled for AdamW, L2 for SGD), ``SOLVER.MOMENTUM`` (SGD only) and, when the
            config has it (detectron2's), ``SOLVER.NESTEROV`` (SGD only; default False).
        model_or_params: an ``nn.Module`` (its ``parameters()``), or an iterable of parameter
            tensors and/or torch param-group dicts (``{"params": [...], "lr": ...}``, e.g.
            detectron2's ``get_default_optimizer_params``: per-group LR and weight decay for
            norm layers and biases); only tensors with ``requires_grad=True`` are kept,
            duplicates once. THE one optimizer builder (detectron2's trainer wraps it:
            :func:`mdkd_det.d2.trainer.build_d2_optimizer`).

    Returns:
        ``torch.optim.AdamW`` or ``torch.optim.SGD`` (torch library classes).

    Raises:
        ConfigError: unknown ``SOLVER.OPTIMIZER`` (names the key and the valid values), or no
            trainable parameter at all (e.g. every layer frozen).
    """
    name = str(cfg.SOLVER.OPTIMIZER)
    params = _trainable_params(model_or_params)
    if not params:
        raise ConfigError(
            "build_optimizer: no parameter with requires_grad=True to optimize "
            "(check MODEL.BACKBONE.TRAINABLE_LAYERS / freezing of the model)"
        )
    lr = float(cfg.SOLVER.BASE_LR)
    wd = float(cfg.SOLVER.WEIGHT_DECAY)
    if name.lower() == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if name.lower() == "sgd":
        nesterov = bool(getattr(cfg.SOLVER, "NESTEROV", False))
        return torch.optim.SGD(params, lr=lr, momentum=float(cfg.SOLVER.MOMENTUM), weight_decay=wd,
                               nesterov=nesterov)
    raise ConfigError(f"SOLVER.OPTIMIZER: unknown optimizer '{name}'; expected one of {list(OPTIMIZERS)}")


class WarmupSchedule:
    """LR multiplier ``factor(it) = warmup(it) * schedule(min(it / max_iter, 1))``.

    - ``warmup(it) = warmup_factor + (1 - warmup_factor) * it / warmup_iters`` for
      ``it < warmup_iters`` (linear ramp from ``warmup_factor`` to 1), else 1.
    - ``schedule`` is fvcore's ``CosineParamScheduler(1, 0)`` (reaches 0 at ``max_iter``) or
      ``MultiStepParamScheduler`` with values ``[1, gamma, gamma**2, ...]`` at ``steps``
      (iterations).

    Source: detectron2's ``WarmupCosineLR`` / ``WarmupMultiStepLR`` definitions (linear warmup
    multiplied into the schedule); uses fvcore param schedulers.

    Args:
        name: "WarmupMultiStepLR" or "WarmupCosineLR".
        max_iter: total iterations (iter, > 0).
        steps: decay iterations (multistep only); values >= ``max_iter`` are ignored with a warning.
        gamma: multiplicative decay per step (multistep only).
        warmup_iters: warmup length (iter, >= 0).
        warmup_factor: multiplier at iteration 0, in [0, 1].

    Raises:
        ConfigError: unknown name or an invalid value, naming the ``SOLVER.*`` key.
    """

    def __init__(
        self,
        name: str,
        max_iter: int,
        steps: Sequence[int] = (),
        gamma: float = 0.1,
        warmup_iters: int = 0,
        warmup_factor: float = 1.0,
    ) -> None:
        if name not in LR_SCHEDULERS:
            raise ConfigError(
                f"SOLVER.LR_SCHEDULER_NAME: unknown LR scheduler '{name}'; expected one of {list(LR_SCHEDULERS)}"
            )
        if int(max_iter) <= 0:
            raise ConfigError(f"SOLVER.MAX_ITER must be > 0, got {max_iter}")
        if int(warmup_iters) < 0:
            raise ConfigError(f"SOLVER.WARMUP_ITERS must be >= 0, got {warmup_iters}")
        if not 0.0 <= float(warmup_factor) <= 1.0:
            raise ConfigError(f"SOLVER.WARMUP_FACTOR must be in [0, 1], got {warmup_factor}")
        self.name = name
        self.max_iter = int(max_iter)
        self.warmup_iters = int(warmup_iters)
        self.warmup_factor = float(warmup_factor)
        if name == "WarmupCosineLR":
            self._sched = CosineParamScheduler(1.0, 0.0)
        else:
            steps = [int(s) for s in steps]
            if list(steps) != sorted(steps) or len(set(steps)) != len(steps):
                raise ConfigError(f"SOLVER.STEPS must be strictly increasing, got {tuple(steps)}")
            if any(s <= 0 for s in steps):
                raise ConfigError(f"SOLVER.STEPS must be > 0, got {tuple(steps)}")
            kept = [s for s in steps if s < self.max_iter]
            if len(kept) != len(steps):
                logger.warning(
                    "SOLVER.STEPS %s: steps >= SOLVER.MAX_ITER=%d are ignored",
                    tuple(steps), self.max_iter,
                )
            if not float(gamma) > 0:
                raise ConfigError(f"SOLVER.GAMMA must be > 0, got {gamma}")
            values = [float(gamma) ** k for k in range(len(kept) + 1)]
            try:
                self._sched = MultiStepParamScheduler(values, num_updates=self.max_iter, milestones=kept)
            except ValueError as e:  # e.g. MAX_ITER smaller than the number of phases
                raise ConfigError(f"SOLVER.STEPS / SOLVER.MAX_ITER: {e}") from e

    def warmup(self, it: int) -> float:
        """Linear warmup multiplier at iteration ``it`` (1.0 after warmup)."""
        if it >= self.warmup_iters:
            return 1.0
        alpha = it / self.warmup_iters
        return self.warmup_factor * (1.0 - alpha) + alpha

    def __call__(self, it: int) -> float:
        """LR multiplier at iteration ``it`` (0-based; ``it >= max_iter`` is clamped)."""
        where = min(max(it, 0) / self.max_iter, 1.0)
        return self.warmup(it) * float(self._sched(where))


def build_lr_scheduler(cfg, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """Build the per-iteration LR schedule named by ``SOLVER.LR_SCHEDULER_NAME``.

    Uses ``SOLVER.MAX_ITER``, ``SOLVER.STEPS``, ``SOLVER.GAMMA``, ``SOLVER.WARMUP_ITERS`` and
    ``SOLVER.WARMUP_FACTOR`` (see :class:`WarmupSchedule` for the formula). The returned
    ``LambdaLR`` (torch) must be stepped once per iteration, after ``optimizer.step()``;
    ``scheduler.lr_lambdas[0].schedule`` is the :class:`WarmupSchedule`. The multiplier is a
    plain function,
    so ``LambdaLR.state_dict()`` stores only the iteration count and base LRs: on resume the
    schedule's shape comes from the (current) config, its position from the checkpoint.

    Raises:
        ConfigError: unknown ``SOLVER.LR_SCHEDULER_NAME`` or invalid ``SOLVER.*`` values.
    """
    sched = WarmupSchedule(
        str(cfg.SOLVER.LR_SCHEDULER_NAME),
        max_iter=int(cfg.SOLVER.MAX_ITER),
        steps=tuple(cfg.SOLVER.STEPS),
        gamma=float(cfg.SOLVER.GAMMA),
        warmup_iters=int(cfg.SOLVER.WARMUP_ITERS),
        warmup_factor=float(cfg.SOLVER.WARMUP_FACTOR),
    )

    def lr_lambda(it: int) -> float:  # a function (not an object): LambdaLR does not pickle it
        return sched(it)

    lr_lambda.schedule = sched  # type: ignore[attr-defined]  (not in the scheduler's state_dict)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)

