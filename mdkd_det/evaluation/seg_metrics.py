"""Binary segmentation metrics: IoU, DSC, precision, recall (percent) and HD95 (px) per 2D
patch, and :class:`SegEvaluator` aggregating them (paper §5 metrics, C42; decision A19).

Per patch with prediction P (probability >= threshold) and ground truth G:

- ``IoU = |P & G| / |P | G|``, ``DSC = 2|P & G| / (|P| + |G|)``, ``precision = |P & G| / |P|``,
  ``recall = |P & G| / |G|`` (foreground class; counts from numpy);
- ``HD95``: 95th percentile of the symmetric boundary distances in px, from
  ``monai.metrics.compute_hausdorff_distance(percentile=95)`` (MONAI, 8-connected edges,
  Euclidean distance).

Aggregation (A19; the paper gives none):

- the reported metrics are **means over the patches whose ground truth has foreground**;
- on such a patch an **empty prediction** scores IoU = DSC = recall = 0, precision = 0 (the
  prediction has no correct pixel), HD95 = the patch diagonal (sqrt(H^2 + W^2) px, A19);
- **patches with empty ground truth** are not in those means (all five metrics are undefined
  or degenerate there); they are reported separately as ``empty_gt_patches`` and
  ``empty_gt_fp_rate`` (percent of them with any predicted foreground pixel);
- ``DSC_global`` (percent) is the dataset-level Dice over all pixels of all patches.

The paper's IoU does not follow DSC = 2J/(1+J) (A19), so compare our IoU with it only roughly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from typing import Dict, List, Optional

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = ["hd95", "patch_metrics", "SegEvaluator"]


def hd95(pred: np.ndarray, gt: np.ndarray) -> float:
    """95th-percentile Hausdorff distance in px between two non-empty binary masks [H, W]
    (MONAI ``compute_hausdorff_distance``). Empty prediction with non-empty GT -> the patch
    diagonal; both empty -> 0.0; empty GT with a prediction -> the diagonal.
    """
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    diag = float(math.hypot(*gt.shape))
    if not pred.any() and not gt.any():
        return 0.0
    if not pred.any() or not gt.any():
        return diag
    from monai.metrics import compute_hausdorff_distance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = compute_hausdorff_distance(torch.from_numpy(pred)[None, None].float(),
                                       torch.from_numpy(gt)[None, None].float(),
                                       include_background=True, percentile=95)
    return float(d.reshape(-1)[0])


def patch_metrics(pred: np.ndarray, gt: np.ndarray) -> Dict[str, float]:
    """IoU, DSC, precision, recall (percent) and HD95 (px) of one patch (module docstring rules)
    plus the counts ``tp``, ``fp``, ``fn``. ``pred`` and ``gt`` are binary [H, W]."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise ValueError(f"patch_metrics: prediction {pred.shape} and ground truth {gt.shape} differ")
    tp = int((pred & gt).sum())
    fp = int((pred & ~gt).sum())
    fn = int((~pred & gt).sum())

    def ratio(a: int, b: int) -> float:
        return 100.0 * a / b if b else 0.0

    return {"IoU": ratio(tp, tp + fp + fn), "DSC": ratio(2 * tp, 2 * tp + fp + fn),
            "precision": ratio(tp, tp + fp), "recall": ratio(tp, tp + fn), "HD95": hd95(pred, gt),
            "tp": tp, "fp": fp, "fn": fn}


class SegEvaluator:
    """Evaluator for :func:`~mdkd_det.evaluation.inference_on_dataset` (reset/process/evaluate).

    Args:
        read_mask: ``record -> mask [H, W]`` (0/1) of the ground truth.
        threshold: foreground if the predicted probability >= threshold.
        output_dir: writes ``seg_metrics.json`` (aggregate + per patch) there when given.

    ``process(records, outputs)`` takes the segmenter's ``[{"sem_seg": Tensor[1, H, W]}]``.
    ``evaluate()`` returns ``{"sem_seg": {"IoU", "DSC", "precision", "recall", "HD95",
    "DSC_global", "num_patches", "fg_patches", "empty_gt_patches", "empty_gt_fp_rate"}}``.
    """

    def __init__(self, read_mask, threshold: float = 0.5, output_dir: Optional[str] = None) -> None:
        self.read_mask, self.threshold, self.output_dir = read_mask, float(threshold), output_dir
        self.rows: List[dict] = []

    def reset(self) -> None:
        self.rows = []

    def process(self, records, outputs) -> None:
        for rec, out in zip(records, outputs):
            prob = out["sem_seg"].detach().float().cpu().numpy().reshape(out["sem_seg"].shape[-2:])
            gt = np.asarray(self.read_mask(rec), bool)
            m = patch_metrics(prob >= self.threshold, gt)
            m.update(image_id=rec.get("image_id"), gt_pixels=int(gt.sum()), pred_pixels=m["tp"] + m["fp"])
            self.rows.append(m)

    def evaluate(self) -> Dict[str, dict]:
        fg = [r for r in self.rows if r["gt_pixels"] > 0]
        empty = [r for r in self.rows if r["gt_pixels"] == 0]
        agg = {k: float(np.mean([r[k] for r in fg])) if fg else float("nan")
               for k in ("IoU", "DSC", "precision", "recall", "HD95")}
        tp, fp, fn = (sum(r[k] for r in self.rows) for k in ("tp", "fp", "fn"))
        agg.update(DSC_global=100.0 * 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan"),
                   num_patches=len(self.rows), fg_patches=len(fg), empty_gt_patches=len(empty),
                   empty_gt_fp_rate=100.0 * sum(r["pred_pixels"] > 0 for r in empty) / len(empty)
                   if empty else float("nan"))
        if self.output_dir:
            os.makedirs(self.output_dir, exist_ok=True)
            with open(os.path.join(self.output_dir, "seg_metrics.json"), "w") as f:
                json.dump({"sem_seg": agg, "per_patch": self.rows}, f, indent=1)
        return {"sem_seg": agg}
