"""Evaluation: COCO bbox metrics (faster-coco-eval), FROC, inference loop, visualisation."""

from . import coco_evaluation
from .benchmark_eval import time_coco_eval
from .coco_evaluation import (
    COCO_BBOX_METRIC_NAMES,
    COCOEvaluator,
    coco_bbox_metrics,
    contiguous_to_dataset_ids,
    to_json_safe,
)
from .evaluator import inference_on_dataset, print_metrics_table
from .froc import DEFAULT_FPS_PER_IMAGE, froc, froc_key
from .visualize import draw_detections, save_visualizations

__all__ = [
    *coco_evaluation.__all__,
    "froc",
    "froc_key",
    "DEFAULT_FPS_PER_IMAGE",
    "inference_on_dataset",
    "print_metrics_table",
    "draw_detections",
    "save_visualizations",
    "time_coco_eval",
]
