"""Optimizers and per-iteration LR schedules built from ``SOLVER.*``."""

from .build import LR_SCHEDULERS, OPTIMIZERS, WarmupSchedule, build_lr_scheduler, build_optimizer

__all__ = ["build_optimizer", "build_lr_scheduler", "WarmupSchedule", "OPTIMIZERS", "LR_SCHEDULERS"]
