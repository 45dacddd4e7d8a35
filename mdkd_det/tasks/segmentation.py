"""Segmentation task (binary, 2D): image+mask mapper, IoU/DSC/precision/recall/HD95 evaluation,
paper Table 3/4 reference rows, and the stage deltas of the MDKD pipeline.

Source: paper §4.2, §5 (metrics), Tables 3-4 (Lung MSD column), Eqs. 1, 9, 10; metrics in
:mod:`mdkd_det.evaluation.seg_metrics` (MONAI HD95; aggregation A19).
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

import torch

from ..data.catalog import MetadataCatalog
from ..utils.errors import ConfigError
from .base import TASK_REGISTRY, Task

logger = logging.getLogger(__name__)


def _paper(iou, dsc, rec, prec, hd):  # paper order IoU/DSC/Rec/Prec/HD95 -> our row_metrics order
    return (iou, dsc, prec, rec, hd)


#: Lung MSD column of paper Table 3 (TResUNet) and Table 4 (UNet); percent, HD95 in px.
PAPER_LUNG_MSD = {
    "tresunet": ("paper Table 3, Lung MSD (TResUNet, 3D volumes, GPU)", {
        "multi_head": _paper(81.22, 83.16, 83.99, 89.21, 10.21),
        "dataset_specific": _paper(88.06, 90.53, 90.86, 96.48, 7.71),
        "joint_teacher": _paper(88.56, 90.83, 91.16, 95.93, 6.78),
        "student": _paper(90.09, 92.72, 93.61, 95.40, 4.23)}),
    "unet": ("paper Table 4, Lung MSD (UNet, full data, GPU)", {
        "multi_head": _paper(78.87, 81.43, 82.73, 87.28, 12.71),
        "dataset_specific": _paper(85.45, 88.13, 89.97, 94.71, 9.87),
        "joint_teacher": _paper(85.93, 88.51, 90.34, 94.98, 9.01),
        "student": _paper(89.79, 92.36, 93.67, 95.14, 5.02)}),
}

#: paper Table 5: TResUNet teachers (Table 3 joint teacher) -> UNet student; baselines = Table 4.
PAPER_TABLE5_STUDENT = _paper(89.02, 91.43, 92.53, 95.62, 5.12)

#: stages whose model is a Stage-1/2 teacher: task loss Dice (Eq. 1; Alg. 1 l. 7, 17, 36).
TEACHER_STAGES = ("target_teacher", "source_teacher", "joint_teacher")
#: meta-architecture of the teachers per ``PIPELINE.TEACHER_BACKBONE`` (encoder + its decoder).
ARCH_OF_ENCODER = {"unet_encoder": "unet", "tresunet_encoder": "tresunet"}


@TASK_REGISTRY.register("segmentation")
class SegmentationTask(Task):
    """Binary segmentation: inputs from :class:`~mdkd_det.data.seg_mapper.SegDatasetMapper`;
    metrics IoU/DSC/precision/recall in percent and HD95 in px (means over patches with
    foreground, A19); ``model_best.pth`` by ``sem_seg/DSC``."""

    name = "segmentation"
    result_key = "sem_seg"
    primary_metric = "DSC"
    row_metrics = ("IoU", "DSC", "precision", "recall", "HD95")
    metric_titles = {"IoU": "IoU (%)", "DSC": "DSC (%)", "precision": "Precision (%)",
                     "recall": "Recall (%)", "HD95": "HD95 (px)"}

    def build_mapper(self, cfg, is_train: bool):
        """:class:`SegDatasetMapper` (image [C, H, W] in [0, 1], target ``masks`` [1, H, W])."""
        from ..data.seg_mapper import SegDatasetMapper

        return SegDatasetMapper(cfg, is_train=is_train)

    def check_dataset(self, cfg, dataset_name: str) -> None:
        """Raise ConfigError unless ``dataset_name`` is a segmentation dataset
        (metadata ``evaluator_type == "sem_seg"``)."""
        kind = MetadataCatalog.get(dataset_name).get("evaluator_type")
        if kind != "sem_seg":
            raise ConfigError(f"dataset '{dataset_name}' is not a segmentation dataset (evaluator_type "
                              f"{kind!r}); MODEL.TASK 'segmentation' needs masks, e.g. msd_lung_train")

    def evaluate(self, cfg, model: torch.nn.Module, dataset_name: str, records: List[dict],
                 output_dir: str) -> Dict[str, dict]:
        """IoU/DSC/precision/recall/HD95 on ``records``; writes ``seg_metrics.json`` (with
        per-patch values) under ``output_dir``.

        Returns:
            ``{"sem_seg": {"IoU", "DSC", "precision", "recall" (percent), "HD95" (px),
            "DSC_global", "fg_patches", "empty_gt_patches", "empty_gt_fp_rate", ...}}``.
        """
        from ..data.build import build_detection_test_loader
        from ..data.seg_mapper import read_seg_record
        from ..utils import comm
        from ..evaluation import inference_on_dataset
        from ..evaluation.seg_metrics import SegEvaluator

        loader = build_detection_test_loader(cfg, dataset_name, records=records,
                                             mapper=self.build_mapper(cfg, is_train=False), batch_size=16)
        window = tuple(cfg.INPUT.WINDOW)
        evaluator = SegEvaluator(lambda r: read_seg_record(r, window)[1], float(cfg.MODEL.SEG.THRESHOLD),
                                 output_dir if comm.is_main_process() else None)
        return inference_on_dataset(model, loader, evaluator)

    def paper_reference(self, cfg, target: str) -> Tuple[str, Dict[str, Tuple[float, ...]]]:
        """Paper Table 3 (TResUNet) / Table 4 (UNet) Lung MSD rows when the target is MSD lung."""
        if not target.startswith("msd_lung"):
            return "", {}
        student = cfg.MODEL.META_ARCHITECTURE
        teacher = ARCH_OF_ENCODER.get(cfg.PIPELINE.TEACHER_BACKBONE, student)
        if student == "unet" and teacher == "tresunet":
            rows = dict(PAPER_LUNG_MSD["unet"][1], joint_teacher=PAPER_LUNG_MSD["tresunet"][1]["joint_teacher"],
                        student=PAPER_TABLE5_STUDENT)
            return "paper Table 5, Lung MSD (TResUNet teachers -> UNet student)", rows
        return PAPER_LUNG_MSD.get(student, ("", {}))

    def configure_stage(self, cfg, stage: str, source: Optional[str] = None) -> None:
        """Teachers (target, source, joint) train with Dice (Eq. 1, Alg. 1 l. 7/17/36) and use
        the architecture of ``PIPELINE.TEACHER_BACKBONE`` (``tresunet_encoder`` -> "tresunet":
        TResUNet teachers for a UNet student, paper Table 5); the dataset-specific baseline,
        multi-head baseline and student keep ``MODEL.*`` and ``MODEL.SEG.LOSS`` (DiceBCE, Eq. 10
        / C37)."""
        if stage in TEACHER_STAGES:
            cfg.MODEL.SEG.LOSS = "dice"
            arch = ARCH_OF_ENCODER.get(cfg.PIPELINE.TEACHER_BACKBONE)
            if arch:
                cfg.MODEL.META_ARCHITECTURE = arch
