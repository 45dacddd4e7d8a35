"""Detection task: COCO bbox + FROC evaluation, the torchvision-style input mapper.

Source: COCO metrics via faster-coco-eval (:class:`~mdkd_det.evaluation.COCOEvaluator`, tested
equal to pycocotools); FROC/CPM (:mod:`mdkd_det.evaluation.froc`); paper Table 16 (17 for RF-DETR) for the
reference rows of the Faster R-CNN pipeline.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Tuple

import torch

from ..data.catalog import MetadataCatalog
from ..data.mapper import DatasetMapper
from ..utils import comm
from ..utils.errors import ConfigError
from .base import TASK_REGISTRY, Task

logger = logging.getLogger(__name__)

#: Paper Table 16 (Faster R-CNN), mAP@[.5:.95] / mAP@.5 in percent, full data on a GPU.
PAPER_TABLE16 = {
    "LungCT": {"multi_head": (44.52, 80.73), "dataset_specific": (47.23, 83.20),
               "joint_teacher": (49.31, 87.34), "student": (47.89, 85.53)},
    "LungPet": {"multi_head": (63.83, 97.45), "dataset_specific": (66.72, 99.05),
                "joint_teacher": (65.74, 99.51), "student": (65.61, 99.28)},
    "DeepLesion": {"multi_head": (38.33, 70.68), "dataset_specific": (41.20, 73.91),
                   "joint_teacher": (49.94, 86.40), "student": (45.03, 80.46)},
}
#: Paper Table 17 (RF-DETR; the paper calls the dataset-specific row "Baseline").
PAPER_TABLE17 = {
    "LungCT": {"multi_head": (61.88, 90.17), "dataset_specific": (64.69, 93.84),
               "joint_teacher": (66.78, 94.22), "student": (65.83, 94.04)},
    "LungPet": {"multi_head": (70.26, 96.15), "dataset_specific": (73.45, 98.96),
                "joint_teacher": (72.89, 98.74), "student": (72.71, 98.72)},
    "DeepLesion": {"multi_head": (47.72, 78.54), "dataset_specific": (50.89, 80.13),
                   "joint_teacher": (52.78, 83.95), "student": (51.84, 82.46)},
}
#: paper table per ``MODEL.META_ARCHITECTURE``: (caption, {paper dataset key: rows}).
PAPER_TABLES = {"faster_rcnn": ("paper Table 16 (full data, GPU)", PAPER_TABLE16),
                "rfdetr": ("paper Table 17 (RF-DETR, full data, GPU)", PAPER_TABLE17)}


def paper_dataset_key(target: str) -> str:
    """The paper's name of a target dataset (``"LungCT"``, ``"LungPet"``, ``"DeepLesion"``) or ""."""
    t = target.lower()
    if t.startswith("lungct"):
        return "LungCT"
    if t.startswith("lung_pet_ct_dx"):
        return "LungPet"
    if t.startswith("deeplesion"):
        return "DeepLesion"
    return ""


def check_num_classes(cfg, dataset_name: str) -> None:
    """Raise ConfigError if the dataset's class count differs from MODEL.ROI_HEADS.NUM_CLASSES."""
    classes = MetadataCatalog.get(dataset_name).get("thing_classes")
    if classes is not None and len(classes) != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
        raise ConfigError(
            f"dataset '{dataset_name}' has {len(classes)} classes {classes} but "
            f"MODEL.ROI_HEADS.NUM_CLASSES is {cfg.MODEL.ROI_HEADS.NUM_CLASSES}"
        )


@TASK_REGISTRY.register("detection")
class DetectionTask(Task):
    """Boxes: inputs from :class:`DatasetMapper`; metrics AP/AP50/... in percent (COCO) and
    FROC sensitivities/CPM; ``model_best.pth`` by ``bbox/AP``."""

    name = "detection"
    result_key = "bbox"
    primary_metric = "AP"
    row_metrics = ("AP", "AP50")
    metric_titles = {"AP": "mAP@[.5:.95]", "AP50": "mAP@.5"}

    def build_mapper(self, cfg, is_train: bool) -> DatasetMapper:
        """:class:`DatasetMapper` (image [C, H, W] in [0, 1], boxes xyxy px, labels 1..K)."""
        return DatasetMapper(cfg, is_train=is_train)

    def check_dataset(self, cfg, dataset_name: str) -> None:
        """:func:`check_num_classes`."""
        check_num_classes(cfg, dataset_name)

    def evaluate(self, cfg, model: torch.nn.Module, dataset_name: str, records: List[dict],
                 output_dir: str) -> Dict[str, dict]:
        """COCO bbox + FROC on ``records``; writes ``coco_instances_results.json``,
        ``metrics.json`` and ``TEST.VIS_NUM`` prediction PNGs under ``output_dir``.

        Returns:
            ``{"bbox": {"AP", "AP50", ...} (percent), "froc": {...}}``.
        """
        from ..data.build import build_detection_test_loader
        from ..evaluation import COCOEvaluator, inference_on_dataset
        from ..evaluation.visualize import save_visualizations

        loader = build_detection_test_loader(cfg, dataset_name, records=records,
                                             mapper=self.build_mapper(cfg, is_train=False))
        evaluator = COCOEvaluator(
            dataset_name, records, MetadataCatalog.get(dataset_name), output_dir=output_dir,
            froc_fps=tuple(cfg.TEST.FROC_FPS), froc_hit=cfg.TEST.FROC_HIT, froc_iou=cfg.TEST.FROC_IOU,
            froc_per_scan=bool(cfg.TEST.FROC_PER_SCAN),
        )
        # the test size (INPUT.*_TEST) follows from eval mode (TrainTestResizeTransform)
        res = inference_on_dataset(model, loader, evaluator)
        if comm.is_main_process() and cfg.TEST.VIS_NUM > 0:
            chosen = [r for r in records if r.get("annotations") and r["image_id"] in evaluator.predictions]
            chosen = chosen[: int(cfg.TEST.VIS_NUM)]
            save_visualizations(chosen, [evaluator.predictions[r["image_id"]] for r in chosen],
                                DatasetMapper(cfg, is_train=False).read, f"{output_dir}/vis",
                                num=len(chosen), score_thresh=float(cfg.TEST.VIS_SCORE_THRESH))
        return res

    def metrics_table(self, results) -> str:
        """AP/AP50/AP75/APs/APm/APl/AR100 (percent) and CPM: :func:`print_metrics_table`."""
        from ..evaluation import print_metrics_table

        return print_metrics_table(results)

    def paper_reference(self, cfg, target: str) -> Tuple[str, Dict[str, Tuple[float, ...]]]:
        """Paper Table 16 (Faster R-CNN) or 17 (RF-DETR) rows on LungCT / Lung-PET-CT-Dx /
        DeepLesion, by ``MODEL.META_ARCHITECTURE``."""
        caption, table = PAPER_TABLES.get(cfg.MODEL.META_ARCHITECTURE, ("", {}))
        rows = table.get(paper_dataset_key(target), {})
        return (caption, rows) if rows else ("", {})
