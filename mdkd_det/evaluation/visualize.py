"""Draw ground-truth and predicted boxes on grey CT slices (OpenCV) and save them as PNGs.

Source: OpenCV (``cv2.rectangle``, ``cv2.putText``, ``cv2.imwrite``).
"""

from __future__ import annotations

import os
import re
from typing import Callable, List, Optional, Sequence

import cv2
import numpy as np

__all__ = ["draw_detections", "save_visualizations"]

GT_COLOR_RGB = (0, 255, 0)
PRED_COLOR_RGB = (255, 0, 0)


def _np(x, dtype, shape_tail=None) -> np.ndarray:
    if x is None:
        return np.zeros((0,) + (shape_tail or ()), dtype=dtype)
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=dtype)
    if shape_tail is not None:
        a = a.reshape((-1,) + shape_tail)
    return a.reshape(-1) if shape_tail is None else a


def draw_detections(
    image01: np.ndarray,
    gt_boxes: Optional[Sequence] = None,
    det_boxes: Optional[Sequence] = None,
    det_scores: Optional[Sequence] = None,
    score_thresh: float = 0.3,
) -> np.ndarray:
    """Overlay boxes on a grey image.

    Args:
        image01: ``[H, W]`` float image in [0, 1] (values outside are clipped), e.g. a
            windowed CT slice.
        gt_boxes: ``[G, 4]`` XYXY px, drawn in green (may be None/empty).
        det_boxes: ``[D, 4]`` XYXY px, drawn in red with the score as text (may be None/empty).
        det_scores: ``[D]`` scores; detections with score < ``score_thresh`` are not drawn.
        score_thresh: minimum score of a drawn detection.

    Returns:
        ``[H, W, 3]`` uint8 image in **RGB** order.

    Raises:
        ValueError: ``image01`` is not 2-D, or boxes and scores differ in count.
    """
    img = np.asarray(image01, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"draw_detections: image01 must be [H, W] grey in [0, 1], got shape {img.shape}")
    grey = np.round(np.clip(np.nan_to_num(img), 0.0, 1.0) * 255.0).astype(np.uint8)
    canvas = np.ascontiguousarray(np.stack([grey, grey, grey], axis=-1))
    h, w = grey.shape
    thick = max(1, int(round(min(h, w) / 512)))
    font_scale = max(0.35, min(h, w) / 1400.0)
    gts = _np(gt_boxes, np.float64, (4,))
    dets = _np(det_boxes, np.float64, (4,))
    scores = _np(det_scores, np.float64) if det_scores is not None else np.ones(len(dets))
    if len(scores) != len(dets):
        raise ValueError(f"draw_detections: {len(dets)} det_boxes but {len(scores)} det_scores")

    def pt(x, y):
        return int(round(min(max(x, 0), w - 1))), int(round(min(max(y, 0), h - 1)))

    for b, s in zip(dets, scores):
        if s < score_thresh:
            continue
        p1, p2 = pt(b[0], b[1]), pt(b[2], b[3])
        cv2.rectangle(canvas, p1, p2, PRED_COLOR_RGB, thick)
        text_y = p1[1] - 3 if p1[1] > 12 else min(p2[1] + 12, h - 2)
        cv2.putText(canvas, f"{s:.2f}", (p1[0], text_y), cv2.FONT_HERSHEY_SIMPLEX, font_scale,
                    PRED_COLOR_RGB, 1, cv2.LINE_AA)  # fmt: skip
    for b in gts:  # drawn last so ground truth stays visible under many predictions
        cv2.rectangle(canvas, pt(b[0], b[1]), pt(b[2], b[3]), GT_COLOR_RGB, thick)
    return canvas


def _safe_name(x) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(x))[:80]


def save_visualizations(
    records: Sequence[dict],
    outputs: Sequence[dict],
    read_fn: Callable[[dict], np.ndarray],
    out_dir: str,
    num: int = 4,
    score_thresh: float = 0.3,
) -> List[str]:
    """Write PNGs of the first ``num`` records with GT (green) and predictions (red).

    Args:
        records: records (schema: ``mdkd_det/data/catalog.py``); GT from ``annotations``.
        outputs: torchvision detection dicts aligned with ``records`` (``boxes`` ``[N, 4]``
            XYXY px in original coordinates, ``scores`` ``[N]``); tensors or arrays.
        read_fn: ``read_fn(record) -> [H, W]`` windowed grey image in [0, 1]. If its size
            differs from the record's ``height``/``width``, boxes are rescaled to it.
        out_dir: output folder (created if needed).
        num: number of images to write.
        score_thresh: minimum score of a drawn prediction.

    Returns:
        paths of the written PNGs, ``<out_dir>/<index>_<image_id>.png``.

    Raises:
        ValueError: ``records`` and ``outputs`` differ in length; OSError if a PNG cannot be written.
    """
    if len(records) != len(outputs):
        raise ValueError(f"save_visualizations: {len(records)} records but {len(outputs)} outputs")
    os.makedirs(out_dir, exist_ok=True)
    paths: List[str] = []
    for i, (rec, out) in enumerate(zip(records[:num], outputs[:num])):
        img = read_fn(rec)
        h, w = np.asarray(img).shape[:2]
        sy = h / float(rec.get("height", h) or h)
        sx = w / float(rec.get("width", w) or w)
        scale = np.array([sx, sy, sx, sy])
        gt = np.asarray([a["bbox"] for a in rec.get("annotations") or []], dtype=np.float64).reshape(-1, 4)
        det = _np(out.get("boxes"), np.float64, (4,))
        sc = _np(out.get("scores"), np.float64) if out.get("scores") is not None else None
        vis = draw_detections(img, gt * scale, det * scale, sc, score_thresh)
        path = os.path.join(out_dir, f"{i:03d}_{_safe_name(rec.get('image_id', i))}.png")
        if not cv2.imwrite(path, cv2.cvtColor(vis, cv2.COLOR_RGB2BGR)):
            raise OSError(f"save_visualizations: could not write {path}")
        paths.append(path)
    return paths
