"""Generic training engine (detectron2 style): trainer loop, hooks, events, checkpoints,
multi-process launch. Knows nothing about datasets or model families.

Config-driven glue (``DefaultTrainer``, CLI helpers) lives in :mod:`mdkd_det.engine.defaults`,
``DefaultPredictor`` in :mod:`mdkd_det.engine.predictor`; both are importable from here
(``from mdkd_det.engine import DefaultTrainer, DefaultPredictor``), loaded on first use so that
importing the loop alone does not load the data, model and task layers.
"""

from ..utils import comm
from . import hooks
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
    *hooks.__all__,
    "launch",
    "create_ddp_model",
    "TrainerBase",
    "SimpleTrainer",
    "DefaultTrainer",
    "DefaultPredictor",
    "build_model",
    "do_test",
    "default_argument_parser",
    "default_setup",
]

_LAZY = {"DefaultTrainer": "defaults", "build_model": "defaults", "do_test": "defaults",
         "default_argument_parser": "defaults", "default_setup": "defaults",
         "DefaultPredictor": "predictor"}


def __getattr__(name):  # PEP 562: config-level glue, imported on first use
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
