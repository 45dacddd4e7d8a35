"""``Task``: the task-specific hooks of the shared engine, and ``TASK_REGISTRY``.

A task (``MODEL.TASK``) answers four questions for the task-agnostic parts of mdkd_det:

1. how a dataset record becomes a model input (:meth:`Task.build_mapper`);
2. how a model is evaluated on one test dataset (:meth:`Task.evaluate`), returning
   ``{result_key: {metric: value}, ...}``;
3. which metric selects the best checkpoint (``result_key/primary_metric``, higher is better);
4. which metrics are the columns of the pipeline's results table (``row_metrics``), with their
   titles and the paper's reference numbers (:meth:`Task.paper_reference`).

New tasks register a subclass in :data:`TASK_REGISTRY` (entry-point group ``mdkd_det.tasks``
for plugins). Detection is :mod:`mdkd_det.tasks.detection`.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch

from ..modeling.registry import Registry

TASK_REGISTRY = Registry("TASK", entry_point_group="mdkd_det.tasks")


class Task:
    """Base class of a task. Subclasses set the class attributes and implement the methods.

    Attributes:
        name: registry name (``MODEL.TASK``).
        result_key: key of this task's metrics in :meth:`evaluate`'s result (``"bbox"``, ...).
        primary_metric: metric (in ``result_key``) that picks ``model_best.pth``; higher is
            better.
        row_metrics: metrics written to each ``results.json`` row, in column order.
        metric_titles: column title of each row metric in ``results.md`` (units included).
    """

    name: str = ""
    result_key: str = ""
    primary_metric: str = ""
    row_metrics: Tuple[str, ...] = ()
    metric_titles: Mapping[str, str] = {}

    @property
    def best_metric(self) -> str:
        """``"<result_key>/<primary_metric>"``: the key :class:`EvalHook` tracks."""
        return f"{self.result_key}/{self.primary_metric}"

    def build_mapper(self, cfg, is_train: bool) -> Callable:
        """``mapper(record, seed=None) -> dict`` producing one model input; the engine hands it
        to the data loaders. A ``num_classes_key`` attribute on the mapper (config key of the
        model's class count) makes the train loader check the records' ``category_id``."""
        raise NotImplementedError

    def check_dataset(self, cfg, dataset_name: str) -> None:
        """Raise :class:`~mdkd_det.utils.errors.ConfigError` when ``dataset_name`` does not fit
        the model config (e.g. class count). Default: no check."""

    def evaluate(self, cfg, model: torch.nn.Module, dataset_name: str, records: List[dict],
                 output_dir: str) -> Dict[str, dict]:
        """Evaluate ``model`` on ``records`` of ``dataset_name``; write files under
        ``output_dir``; return ``{result_key: {metric: value}, ...}``."""
        raise NotImplementedError

    def configure_stage(self, cfg, stage: str, source: Optional[str] = None) -> None:
        """Task-specific delta of one pipeline stage's config (unfrozen ``cfg``, edited in
        place), applied by :class:`~mdkd_det.pipeline.PipelineRunner` after its own delta.
        ``stage`` is a pipeline stage name (``"source_teacher"`` with ``source`` for Stage 1).
        Default: nothing (detection)."""

    def metrics_table(self, results: Mapping[str, dict]) -> str:
        """Plain-text ``| metric | value |`` table of the ``result_key`` group of one
        :meth:`evaluate` result, for the log (floats with 2 decimals, in the task's units)."""
        m = results.get(self.result_key, {})
        return "\n".join(["| metric | value |", "|---|---|"] +
                         [f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |"
                          for k, v in m.items() if not isinstance(v, (list, dict))])

    def paper_reference(self, cfg, target: str) -> Tuple[str, Dict[str, Tuple[float, ...]]]:
        """``(caption, {row: values in row_metrics order})`` of the paper's table for this task,
        architecture and target dataset, or ``("", {})`` when the paper has none."""
        return "", {}


def get_task(cfg_or_name) -> Task:
    """The :class:`Task` named by ``cfg.MODEL.TASK`` (or by a string).

    Raises:
        RegistryError: unknown task name (lists the registered tasks).
    """
    name = cfg_or_name if isinstance(cfg_or_name, str) else cfg_or_name.MODEL.TASK
    return TASK_REGISTRY.get(name)()


def row_values(task: Task, metrics: Optional[Mapping[str, float]]) -> Dict[str, Optional[float]]:
    """``{metric: value or None}`` for the task's ``row_metrics`` from an evaluation result."""
    metrics = metrics or {}
    return {m: metrics.get(m) for m in task.row_metrics}
