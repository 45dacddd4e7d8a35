"""Tasks: what the shared engine needs to know about detection, segmentation, classification.

The trainer, hooks, checkpointer, KD mixin and pipeline runner are task-agnostic; a
:class:`~mdkd_det.tasks.base.Task` (chosen by ``MODEL.TASK``) supplies the input mapper, the
evaluation, the best-model metric and the metric columns of the results table.
"""

from .base import TASK_REGISTRY, Task, get_task
from . import classification, detection, segmentation  # noqa: F401  (register the built-in tasks)

__all__ = ["TASK_REGISTRY", "Task", "get_task"]
