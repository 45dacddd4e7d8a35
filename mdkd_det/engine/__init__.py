"""Generic training engine (detectron2 style): trainer loop, hooks, events, checkpoints,
multi-process launch. Knows nothing about datasets or model families.

Config-driven glue (``DefaultTrainer``, CLI helpers) lives in :mod:`mdkd_det.engine.defaults`.
"""

from . import comm
from .checkpointer import Checkpointer, atomic_torch_save, atomic_write_text, export_model, unwrap_model
from .events import EventStorage, EventWriter, JSONWriter, ProgressWriter, TensorboardWriter, get_event_storage
from .hooks import (
    CallbackHook,
    EvalHook,
    HookBase,
    IterationTimer,
    LRScheduler,
    PeriodicCheckpointer,
    PeriodicWriter,
    default_writers,
    flatten_results,
)
from .launch import create_ddp_model, launch
from .trainer import SimpleTrainer, TrainerBase

__all__ = [
    "comm",
    "Checkpointer",
    "atomic_torch_save",
    "atomic_write_text",
    "export_model",
    "unwrap_model",
    "EventStorage",
    "EventWriter",
    "JSONWriter",
    "ProgressWriter",
    "TensorboardWriter",
    "get_event_storage",
    "HookBase",
    "CallbackHook",
    "IterationTimer",
    "LRScheduler",
    "PeriodicCheckpointer",
    "EvalHook",
    "PeriodicWriter",
    "default_writers",
    "flatten_results",
    "launch",
    "create_ddp_model",
    "TrainerBase",
    "SimpleTrainer",
]
