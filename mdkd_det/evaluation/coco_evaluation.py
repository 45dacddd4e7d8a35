"""COCO bbox metrics (faster-coco-eval) plus FROC, in detectron2's ``DatasetEvaluator`` style.

Usage::

    ev = COCOEvaluator("lungct_valid", records, MetadataCatalog.get("lungct_valid"), "out/")
    ev.reset()
    for batch in loader:
        ev.process([d["record"] for d in batch], model([d["image"] for d in batch]))
    results = ev.evaluate()   # {"bbox": {"AP": 41.2, ...}, "froc": {"sens@1": 0.8, ..., "CPM": ...}}

Source: detectron2 ``COCOEvaluator`` (API shape and the -1 -> NaN, x100 convention); metrics
from faster-coco-eval's ``COCOeval_faster`` (a C++ port of pycocotools' ``COCOeval``, checked
against pycocotools in tests/test_coco_evaluation.py); FROC from :mod:`.froc`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..utils.errors import DatasetError
from .froc import DEFAULT_FPS_PER_IMAGE, froc

logger = logging.getLogger(__name__)

__all__ = [
    "COCOEvaluator",
    "COCO_BBOX_METRIC_NAMES",
    "coco_bbox_metrics",
    "contiguous_to_dataset_ids",
    "to_json_safe",
]

#: Names of ``COCOeval.stats[0:12]`` in order (pycocotools ``summarize()``).
COCO_BBOX_METRIC_NAMES = (
    "AP", "AP50", "AP75", "APs", "APm", "APl",
    "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)  # fmt: skip


def _records_to_coco_dict(records: List[dict], metadata: Any) -> dict:
    """Ground-truth COCO dict of ``records`` (delegates to ``data.datasets.coco``)."""
    from ..data.datasets.coco import records_to_coco_dict

    return records_to_coco_dict(records, metadata)


def to_json_safe(obj: Any) -> Any:
    """Copy of ``obj`` with NaN/inf floats replaced by ``None`` and numpy scalars made Python.

    ``json.dump(..., allow_nan=False)`` then writes strict JSON (``null`` for NaN).
    """
    if isinstance(obj, dict):
        return {str(k): to_json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def contiguous_to_dataset_ids(metadata: Any, dataset_name: str = "?") -> Dict[int, int]:
    """Invert ``metadata.thing_dataset_id_to_contiguous_id`` (source id -> contiguous id).

    When several source ids map to one contiguous id, the smallest source id is used.

    Raises:
        DatasetError: the metadata of ``dataset_name`` lacks the mapping or it is empty.
    """
    mapping = getattr(metadata, "thing_dataset_id_to_contiguous_id", None)
    if not mapping:
        raise DatasetError(
            f"metadata of dataset '{dataset_name}' has no 'thing_dataset_id_to_contiguous_id'; "
            "COCOEvaluator needs it to write results with the source's category ids"
        )
    inv: Dict[int, int] = {}
    for src, contig in mapping.items():
        src, contig = int(src), int(contig)
        if contig not in inv or src < inv[contig]:
            inv[contig] = src
    return inv


def _scan_ids(records: List[dict], dataset_name: str) -> List[str]:
    """One scan id per record: ``series_id`` (one CT series), else ``patient_id``.

    Raises:
        DatasetError: a record has neither (naming the dataset and the image).
    """
    out = []
    for r in records:
        sid = r.get("series_id") or r.get("patient_id")
        if sid in (None, ""):
            raise DatasetError(
                f"dataset '{dataset_name}': TEST.FROC_PER_SCAN needs 'series_id' or 'patient_id' in "
                f"every record; image {r.get('image_id')!r} has neither"
            )
        out.append(str(sid))
    return out


def coco_bbox_metrics(gt_dict: dict, results: List[dict]) -> Dict[str, float]:
    """COCO bbox AP/AR (x100, NaN where COCO gives -1) with faster-coco-eval.

    Args:
        gt_dict: COCO ground-truth dict (``images``, ``annotations`` with xywh ``bbox`` and
            ``area``, ``categories``); annotation ids must be >= 1.
        results: COCO results list ``{"image_id", "category_id", "bbox": [x, y, w, h] px,
            "score"}``; may be empty (then every AP/AR with GT is 0).

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm",
        "ARl"}`` in percent; NaN when the statistic is undefined (no GT in that area range).

    Raises:
        DatasetError: a result refers to an image id that is not in ``gt_dict``.

    Source: ``faster_coco_eval.COCOeval_faster`` (pycocotools-compatible stats[0:12]).
    """
    from faster_coco_eval import COCO, COCOeval_faster

    if not gt_dict.get("images"):
        return {k: float("nan") for k in COCO_BBOX_METRIC_NAMES}
    gt_ids = {img["id"] for img in gt_dict["images"]}
    bad = sorted({r["image_id"] for r in results} - gt_ids, key=str)
    if bad:
        raise DatasetError(f"COCO results refer to image ids not in the ground truth: {bad[:10]}")
    quiet = logger.debug
    coco_gt = COCO(copy.deepcopy(gt_dict), print_function=quiet)
    coco_dt = coco_gt.loadRes(copy.deepcopy(results))
    ev = COCOeval_faster(coco_gt, coco_dt, "bbox", print_function=quiet)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    stats = np.asarray(ev.stats, dtype=np.float64)[: len(COCO_BBOX_METRIC_NAMES)]
    return {k: (float(v) * 100.0 if v >= 0 else float("nan")) for k, v in zip(COCO_BBOX_METRIC_NAMES, stats)}


def _to_numpy(x, dtype) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _dist_info():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist, dist.get_rank(), dist.get_world_size()
    return None, 0, 1


class COCOEvaluator:
    """COCO bbox metrics and FROC of a detector on one dataset (detectron2 evaluator API).

    Args:
        dataset_name: name used in logs and errors.
        records: the dataset's records (schema: ``mdkd_det/data/catalog.py``); they define the
            ground truth and the evaluated image set (every record counts, processed or not,
            as in detectron2; a warning names how many were never processed).
        metadata: the dataset's ``Metadata``; needs ``thing_dataset_id_to_contiguous_id``
            (``thing_classes`` for the number of classes, else taken from the mapping).
        output_dir: where ``coco_instances_results.json`` and ``metrics.json`` are written
            (created if needed); ``None`` writes nothing.
        froc_fps: FP/image (FP/scan with ``froc_per_scan``) rates of the FROC sensitivities.
        froc_hit: ``"iou"`` or ``"center"`` (see :func:`.froc.froc`).
        froc_iou: IoU threshold for ``froc_hit="iou"``.
        froc_per_scan: count FROC false positives per scan (the records' ``series_id``, else
            ``patient_id``) instead of per image, as the LUNA16 CPM (``TEST.FROC_PER_SCAN``).

    The ground-truth COCO dict comes from ``data.datasets.coco.records_to_coco_dict`` (COCO
    xywh, the records' own image ids, source category ids, annotation ids from 1; built lazily,
    on rank 0 only). Results always use the ground truth's own image and category ids: the
    source's ids (the inverse of ``thing_dataset_id_to_contiguous_id``) whenever that mapping is
    one-to-one; for a many-to-one mapping ``records_to_coco_dict`` writes ``contiguous + 1``
    and the results follow it (see ``_map_category_ids``), so metrics are never computed
    against mismatched ids.
    FROC is class-agnostic (a lesion found with the wrong class still counts), as in LUNA16
    and DeepLesion, and uses every detection (COCO keeps the top 100 per image).

    Raises:
        DatasetError: a record without ``series_id``/``patient_id`` when ``froc_per_scan``,
            duplicate image ids in ``records``, metadata without the category
            mapping, ground-truth categories that cannot be matched, a processed record whose image id is not among ``records``, a predicted
            label outside 1..K, or outputs whose shapes disagree.
        ValueError: ``froc_hit`` unknown.

    Source: detectron2 ``COCOEvaluator``; metrics: faster-coco-eval; FROC: LUNA16/DeepLesion.
    """

    def __init__(
        self,
        dataset_name: str,
        records: List[dict],
        metadata: Any,
        output_dir: Optional[str] = None,
        froc_fps: Sequence[float] = DEFAULT_FPS_PER_IMAGE,
        froc_hit: str = "iou",
        froc_iou: float = 0.5,
        froc_per_scan: bool = False,
    ) -> None:
        if froc_hit not in ("iou", "center"):
            raise ValueError(f"COCOEvaluator: froc_hit must be 'iou' or 'center', got {froc_hit!r}")
        self.dataset_name = dataset_name
        self.records = list(records)
        self.metadata = metadata
        self.output_dir = output_dir
        self.froc_fps = tuple(float(r) for r in froc_fps)
        self.froc_hit = froc_hit
        self.froc_iou = float(froc_iou)
        self.scan_ids = _scan_ids(self.records, dataset_name) if froc_per_scan else None

        self._contig_to_src = contiguous_to_dataset_ids(metadata, dataset_name)
        classes = getattr(metadata, "thing_classes", None)
        self.num_classes = len(classes) if classes else max(self._contig_to_src) + 1
        missing = [c for c in range(self.num_classes) if c not in self._contig_to_src]
        if missing:
            raise DatasetError(
                f"dataset '{dataset_name}': thing_dataset_id_to_contiguous_id has no source id "
                f"for contiguous ids {missing} (thing_classes has {self.num_classes} entries)"
            )
        ids = [r["image_id"] for r in self.records]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1}, key=str)[:10]
            raise DatasetError(f"dataset '{dataset_name}': duplicate image_id in records: {dup}")
        self._known_ids = set(ids)
        self._gt_dict: Optional[dict] = None
        self._coco_image_id: Optional[Dict[Any, Any]] = None
        self._coco_category_id: Optional[Dict[int, int]] = None
        self._predictions: Dict[Any, Dict[str, np.ndarray]] = {}

    # ------------------------------------------------------------------ ground truth
    @property
    def gt_dict(self) -> dict:
        """Ground-truth COCO dict (built once from the records)."""
        if self._gt_dict is None:
            self._gt_dict = _records_to_coco_dict(self.records, self.metadata)
            self._coco_image_id = self._map_image_ids(self._gt_dict)
            self._coco_category_id = self._map_category_ids(self._gt_dict)
        return self._gt_dict

    def _map_image_ids(self, gt: dict) -> Dict[Any, Any]:
        """Record image_id -> COCO image id of ``gt``.

        Identity when every record id is a COCO image id (COCO sources keep their ids);
        otherwise by position, since ``records_to_coco_dict`` writes one image per record in
        record order (ids ``1..N`` for string ids, see ``coco_image_ids``).

        Raises:
            DatasetError: neither applies (image count differs from the record count).
        """
        images = gt.get("images", [])
        coco_ids = {img["id"] for img in images}
        rec_ids = [r["image_id"] for r in self.records]
        if all(i in coco_ids for i in rec_ids):
            return {i: i for i in rec_ids}
        if len(images) != len(rec_ids):
            raise DatasetError(
                f"dataset '{self.dataset_name}': the ground-truth COCO dict has {len(images)} images "
                f"for {len(rec_ids)} records and does not use the records' image ids"
            )
        return {i: img["id"] for i, img in zip(rec_ids, images)}

    def _map_category_ids(self, gt: dict) -> Dict[int, int]:
        """Contiguous id -> COCO category id used by ``gt`` (what results must use).

        ``records_to_coco_dict`` lists one category per contiguous id, in contiguous order,
        named after ``thing_classes``. When ``gt``'s categories line up that way, their ids are
        used (they equal the smallest-source-id inverse whenever the source mapping is
        one-to-one; for a many-to-one mapping the GT builder may write other ids, and the
        results must follow the GT). Otherwise the smallest-source-id inverse is used if all
        its ids exist in ``gt``.

        Raises:
            DatasetError: no consistent mapping exists.
        """
        cats = gt.get("categories", [])
        classes = list(getattr(self.metadata, "thing_classes", None) or [])
        if len(cats) == self.num_classes and (
            not classes or [str(c.get("name")) for c in cats] == [str(n) for n in classes]
        ):
            out = {c: int(cat["id"]) for c, cat in enumerate(cats)}
            if out != {c: self._contig_to_src[c] for c in out}:
                logger.info(
                    "COCOEvaluator('%s'): ground-truth category ids %s differ from the smallest "
                    "source ids %s; results follow the ground truth",
                    self.dataset_name, out, self._contig_to_src,
                )
            return out
        gt_ids = {int(cat["id"]) for cat in cats}
        if all(self._contig_to_src[c] in gt_ids for c in range(self.num_classes)):
            return dict(self._contig_to_src)
        raise DatasetError(
            f"dataset '{self.dataset_name}': cannot match contiguous ids to the ground-truth "
            f"categories {[(c.get('id'), c.get('name')) for c in cats]} "
            f"(thing_classes {classes}, source ids {self._contig_to_src})"
        )

    # ------------------------------------------------------------------ evaluator API
    def reset(self) -> None:
        """Forget all processed predictions."""
        self._predictions = {}

    @property
    def predictions(self) -> Dict[Any, Dict[str, np.ndarray]]:
        """This process's predictions so far: ``{image_id: {"boxes" [N, 4] xyxy px, "scores"
        [N], "labels" [N] contiguous ids}}``."""
        return self._predictions

    def process(self, inputs: List[dict], outputs: List[dict]) -> None:
        """Store the detections of one batch.

        Args:
            inputs: records of the batch (only ``image_id`` is used).
            outputs: torchvision detection dicts, one per input: ``boxes`` ``[N, 4]`` XYXY px in
                original image coordinates, ``scores`` ``[N]``, ``labels`` ``[N]`` int64 in
                1..K (contiguous id + 1; 0 = background is not allowed). Tensors may be on
                any device.

        Raises:
            DatasetError: lengths differ, unknown image id, shape mismatch, label outside 1..K.
        """
        if len(inputs) != len(outputs):
            raise DatasetError(
                f"COCOEvaluator.process: {len(inputs)} inputs but {len(outputs)} outputs"
            )
        known = self._known_ids
        for rec, out in zip(inputs, outputs):
            img_id = rec["image_id"]
            if img_id not in known:
                raise DatasetError(
                    f"COCOEvaluator('{self.dataset_name}'): image_id {img_id!r} is not in the "
                    "evaluator's records"
                )
            boxes = _to_numpy(out["boxes"], np.float64).reshape(-1, 4)
            scores = _to_numpy(out["scores"], np.float64).reshape(-1)
            labels = _to_numpy(out["labels"], np.int64).reshape(-1)
            if not (boxes.shape[0] == scores.shape[0] == labels.shape[0]):
                raise DatasetError(
                    f"COCOEvaluator: image {img_id!r}: {boxes.shape[0]} boxes, "
                    f"{scores.shape[0]} scores, {labels.shape[0]} labels"
                )
            if labels.size and (labels.min() < 1 or labels.max() > self.num_classes):
                raise DatasetError(
                    f"COCOEvaluator: image {img_id!r}: labels must be in 1..{self.num_classes} "
                    f"(contiguous id + 1), got range {labels.min()}..{labels.max()}"
                )
            self._predictions[img_id] = {"boxes": boxes, "scores": scores, "labels": labels - 1}

    def _gather(self) -> Optional[Dict[Any, Dict[str, np.ndarray]]]:
        """All ranks' predictions on rank 0 (``all_gather_object``); ``None`` on other ranks."""
        dist, rank, world = _dist_info()
        if world == 1:
            return self._predictions
        gathered: List[Any] = [None] * world
        dist.all_gather_object(gathered, self._predictions)
        if rank != 0:
            return None
        merged: Dict[Any, Dict[str, np.ndarray]] = {}
        for part in gathered:  # a DistributedSampler may repeat images: keep the first
            for k, v in part.items():
                merged.setdefault(k, v)
        return merged

    def results_list(self, predictions: Optional[Dict[Any, Dict[str, np.ndarray]]] = None) -> List[dict]:
        """COCO results list (source image/category ids, xywh px) of the processed predictions."""
        preds = self._predictions if predictions is None else predictions
        _ = self.gt_dict  # builds the image- and category-id maps
        out: List[dict] = []
        for rec in self.records:
            p = preds.get(rec["image_id"])
            if p is None:
                continue
            cid = self._coco_image_id[rec["image_id"]]
            b = p["boxes"]
            for k in np.argsort(-p["scores"], kind="stable"):
                x1, y1, x2, y2 = (float(v) for v in b[k])
                out.append(
                    {
                        "image_id": cid,
                        "category_id": self._coco_category_id[int(p["labels"][k])],
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "score": float(p["scores"][k]),
                    }
                )
        return out

    def _froc(self, preds: Dict[Any, Dict[str, np.ndarray]]) -> Dict[str, float]:
        gts, dets, scs = [], [], []
        for rec in self.records:
            anns = rec.get("annotations") or []
            gts.append(np.asarray([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4))
            p = preds.get(rec["image_id"])
            dets.append(p["boxes"] if p is not None else np.zeros((0, 4)))
            scs.append(p["scores"] if p is not None else np.zeros(0))
        return froc(gts, dets, scs, self.froc_fps, self.froc_hit, self.froc_iou, scan_ids=self.scan_ids)

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        """Compute metrics; on rank 0 write the files and return them, elsewhere return ``{}``.

        Returns:
            ``{"bbox": {AP..ARl in percent, NaN if undefined}, "froc": {"sens@r" fractions,
            "CPM", counts}}``.

        Files (when ``output_dir`` is set): ``coco_instances_results.json`` (COCO results
        list) and ``metrics.json`` (the returned dict, NaN written as ``null``).
        """
        preds = self._gather()
        if preds is None:
            return {}
        n_missing = sum(1 for r in self.records if r["image_id"] not in preds)
        if n_missing:
            logger.warning(
                "COCOEvaluator('%s'): %d of %d images were never processed; they count as "
                "images without detections",
                self.dataset_name, n_missing, len(self.records),
            )
        results = self.results_list(preds)
        bbox = coco_bbox_metrics(self.gt_dict, results)
        froc_res = self._froc(preds)
        metrics = {"bbox": bbox, "froc": froc_res}
        if self.output_dir:
            os.makedirs(self.output_dir, exist_ok=True)
            with open(os.path.join(self.output_dir, "coco_instances_results.json"), "w") as f:
                json.dump(to_json_safe(results), f, allow_nan=False)
            with open(os.path.join(self.output_dir, "metrics.json"), "w") as f:
                json.dump(to_json_safe(metrics), f, indent=2, allow_nan=False)
        logger.info(
            "COCOEvaluator('%s'): %d images, %d detections: AP %.2f AP50 %.2f CPM %.4f",
            self.dataset_name, len(self.records), len(results),
            bbox["AP"], bbox["AP50"], froc_res["CPM"],
        )
        return metrics
