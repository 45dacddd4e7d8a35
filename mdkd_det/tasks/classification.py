"""Classification task: patch mapper, accuracy / per-class recall / confusion matrix evaluation.

Source: scikit-learn metrics (``accuracy_score``, ``recall_score``, ``confusion_matrix``,
``roc_auc_score``); paper Table 11 (pulmonary, MedViT_large, accuracy) for the reference rows.
Models: :mod:`mdkd_det.modeling.meta_arch.classifier`. Data: the lesion-patch sets
(:mod:`mdkd_det.data.datasets.lesion_patch`), or any record carrying ``label`` and an image.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ..data.catalog import MetadataCatalog
from ..data.io import read_image
from ..data.transforms import build_augmentation
from ..utils import comm
from ..utils.errors import ConfigError, DatasetError
from .base import TASK_REGISTRY, Task

logger = logging.getLogger(__name__)

#: Paper Table 11 (pulmonary, MedViT_large), accuracy in percent: mean of COVIDx-CXR, RT-PCR
#: Covid19 and COVID-QU-Ex [computed in paper_notes]; the student row per k (L1-L3, late-k).
PAPER_TABLE11_MEAN = {"multi_head": 84.43, "dataset_specific": 87.95, "joint_teacher": 92.26,
                      "student": {1: 90.11, 2: 90.41, 3: 90.06}}


class ClassificationMapper:
    """Callable ``mapper(record, seed=None) -> dict`` for image-level labels.

    Reads a lesion patch (records with ``patch_index``) or a whole image
    (:func:`~mdkd_det.data.io.read_image`), applies the seeded albumentations pipeline of
    ``INPUT.AUG`` in training (the same :func:`build_augmentation` as detection, with no boxes)
    and replicates grey to ``INPUT.CHANNELS``.

    Returns:
        ``{"image": FloatTensor[C, H, W] in [0, 1], "target": {"labels": Int64Tensor[1]}, "record"}``.

    Raises:
        DatasetError: record without ``label``, unreadable image (names the file).
    """

    def __init__(self, cfg, is_train: bool) -> None:
        self.channels = int(cfg.INPUT.CHANNELS)
        self.window = tuple(cfg.INPUT.WINDOW)
        self.aug = build_augmentation(cfg, is_train)

    def read(self, record: dict) -> np.ndarray:
        """Grey image [H, W] float32 in [0, 1]."""
        if "patch_index" in record:
            from ..data.datasets.lesion_patch import read_patch

            return read_patch(record)
        return read_image(record, window=self.window)

    def __call__(self, record: dict, seed: Optional[int] = None) -> dict:
        if "label" not in record:
            raise DatasetError(f"{record.get('file_name')}: classification record has no 'label'")
        img = self.read(record)
        if self.aug is not None:
            if seed is not None:
                self.aug.set_random_seed(int(seed))
            img = self.aug(image=img, bboxes=np.zeros((0, 4), np.float32), labels=np.zeros(0, np.int64))["image"]
        image = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None].expand(self.channels, -1, -1)
        return {"image": image, "target": {"labels": torch.tensor([int(record["label"])])}, "record": record}


def classification_metrics(y_true: List[int], scores: np.ndarray, class_names: List[str]) -> Tuple[dict, np.ndarray]:
    """Accuracy, balanced accuracy, per-class recall (percent), ROC AUC (binary, percent) and
    the confusion matrix (rows = true class, columns = predicted), with scikit-learn.

    Args:
        y_true: labels [N]; scores: softmax scores [N, K]; class_names: K names.
    """
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, recall_score, roc_auc_score

    k = len(class_names)
    y = np.asarray(y_true, dtype=np.int64)
    pred = scores.argmax(axis=1)
    cm = confusion_matrix(y, pred, labels=list(range(k)))
    rec = recall_score(y, pred, labels=list(range(k)), average=None, zero_division=0)
    m = {"accuracy": 100.0 * accuracy_score(y, pred),
         "balanced_accuracy": 100.0 * balanced_accuracy_score(y, pred) if len(set(y.tolist())) > 1 else float("nan")}
    m.update({f"recall/{c}": 100.0 * float(r) for c, r in zip(class_names, rec)})
    if k == 2 and len(set(y.tolist())) == 2:
        m["AUC"] = 100.0 * roc_auc_score(y, scores[:, 1])
    m["num_images"] = int(len(y))
    return m, cm


@torch.no_grad()
def predict_scores(cfg, model: torch.nn.Module, dataset_name: str, records: List[dict],
                   batch_size: int = 64) -> np.ndarray:
    """Softmax scores [N, K] of ``model`` on ``records`` (eval mode, in record order)."""
    from ..data.build import build_detection_test_loader

    loader = build_detection_test_loader(cfg, dataset_name, records=records, batch_size=batch_size,
                                         mapper=ClassificationMapper(cfg, is_train=False))
    was = model.training
    model.eval()
    out = []
    try:
        for batch in loader:
            device = next(model.parameters()).device
            res = model([d["image"].to(device) for d in batch])
            out.extend(r["scores"].float().cpu().numpy() for r in res)
    finally:
        model.train(was)
    return np.stack(out)


@TASK_REGISTRY.register("classification")
class ClassificationTask(Task):
    """Image-level classes: :class:`ClassificationMapper` inputs; accuracy (percent) selects
    ``model_best.pth`` and is the results-table column (paper Table 11)."""

    name = "classification"
    result_key = "cls"
    primary_metric = "accuracy"
    row_metrics = ("accuracy",)
    metric_titles = {"accuracy": "Accuracy (%)"}

    def build_mapper(self, cfg, is_train: bool) -> ClassificationMapper:
        """:class:`ClassificationMapper`."""
        return ClassificationMapper(cfg, is_train)

    def check_dataset(self, cfg, dataset_name: str) -> None:
        """Raise ConfigError if the dataset's class count differs from
        ``MODEL.CLASSIFIER.NUM_CLASSES``."""
        classes = MetadataCatalog.get(dataset_name).get("thing_classes")
        if classes is not None and len(classes) != int(cfg.MODEL.CLASSIFIER.NUM_CLASSES):
            raise ConfigError(f"dataset '{dataset_name}' has {len(classes)} classes {classes} but "
                              f"MODEL.CLASSIFIER.NUM_CLASSES is {cfg.MODEL.CLASSIFIER.NUM_CLASSES}")

    def evaluate(self, cfg, model: torch.nn.Module, dataset_name: str, records: List[dict],
                 output_dir: str) -> Dict[str, dict]:
        """Accuracy etc. (:func:`classification_metrics`) on ``records``; writes
        ``metrics.json``, ``confusion_matrix.json`` / ``.csv`` and ``predictions.json``
        (per image: id, label, scores) under ``output_dir``.

        Returns:
            ``{"cls": {"accuracy", "balanced_accuracy", "recall/<class>", "AUC", "num_images"}}``.
        """
        scores = predict_scores(cfg, model, dataset_name, records)
        classes = list(MetadataCatalog.get(dataset_name).get("thing_classes")
                       or [str(i) for i in range(scores.shape[1])])
        y = [int(r["label"]) for r in records]
        metrics, cm = classification_metrics(y, scores, classes)
        if comm.is_main_process():
            os.makedirs(output_dir, exist_ok=True)
            with open(os.path.join(output_dir, "metrics.json"), "w") as f:
                json.dump({"cls": metrics}, f, indent=2)
            with open(os.path.join(output_dir, "confusion_matrix.json"), "w") as f:
                json.dump({"classes": classes, "rows_true_cols_pred": cm.tolist()}, f, indent=2)
            with open(os.path.join(output_dir, "confusion_matrix.csv"), "w") as f:
                f.write("true\\pred," + ",".join(classes) + "\n")
                f.writelines(f"{c}," + ",".join(str(int(v)) for v in row) + "\n" for c, row in zip(classes, cm))
            with open(os.path.join(output_dir, "predictions.json"), "w") as f:
                json.dump([{"image_id": r["image_id"], "label": yy, "scores": [round(float(s), 5) for s in sc]}
                           for r, yy, sc in zip(records, y, scores)], f)
            logger.info("%s: accuracy %.2f%%, per-class recall %s, confusion matrix (rows true) %s",
                        dataset_name, metrics["accuracy"],
                        {c: round(metrics[f"recall/{c}"], 2) for c in classes}, cm.tolist())
        return {"cls": metrics}

    def configure_stage(self, cfg, stage: str, source: Optional[str] = None) -> None:
        """A Stage-1 source teacher trains with plain CE (paper Eq. 7, C1/C2:
        ``MODEL.CLASSIFIER.CLASS_WEIGHTS "none"``) on its source batch and its ``r``-weighted
        target batch. The Eq. 14 weights (C24, A15) come from the label histogram of
        ``DATASETS.TRAIN``, which is the target in that stage, so they would weight the source
        batches with the target's class frequencies. Every other stage trains on target data
        only, where those weights are the data's own (per-dataset) weights, and keeps
        ``MODEL.CLASSIFIER.CLASS_WEIGHTS``. This keeps the target teacher identical to the
        dataset-specific baseline (A24 reuse). Decision: docs/fidelity.md."""
        if stage == "source_teacher":
            cfg.MODEL.CLASSIFIER.CLASS_WEIGHTS = "none"

    def paper_reference(self, cfg, target: str) -> Tuple[str, Dict[str, Tuple[float, ...]]]:
        """Paper Table 11 mean accuracy (other data: chest X-ray/CT COVID sets), student row L_k."""
        k = int(cfg.KD.CLS.K)
        rows = {key: (v[k] if isinstance(v, dict) else v,) for key, v in PAPER_TABLE11_MEAN.items()
                if not isinstance(v, dict) or k in v}
        return f"paper Table 11 mean (COVID CXR/CT, MedViT_large, student L{k})", rows
