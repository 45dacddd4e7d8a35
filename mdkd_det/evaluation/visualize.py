"""Draw ground-truth and predicted boxes on grey CT slices (OpenCV) and save them as PNGs.

Source: OpenCV (``cv2.rectangle``, ``cv2.putText``, ``cv2.imwrite``).
"""

from __future__ import annotations

import os
import re
from typing import Callable, List, Optional, Sequence

import cv2
import numpy as np

__all__ = ["draw_detections", "save_overlay", "save_visualizations"]

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


#: boxes whose longer side is below this (px) get a zoomed inset in :func:`save_overlay`.
SMALL_BOX_PX = 32
_CLASS_COLORS = ("#ff3030", "#30a0ff", "#ffd020", "#30ff60", "#ff40ff", "#40ffff")


def save_overlay(image01: np.ndarray, boxes, scores, labels, path: str, class_names: Sequence[str] = ("lesion",),
                 title: str = "", score_thresh: float = 0.5, max_insets: int = 3) -> str:
    """Write one slice with its detections as a PNG (matplotlib, Agg).

    The windowed slice in grey; each detection with ``score >= score_thresh`` as a rectangle in
    its class colour with ``"<class> <score>"`` on a dark label (readable on bright and dark
    tissue); a legend of the classes drawn and the threshold; and for up to ``max_insets``
    boxes whose longer side is under :data:`SMALL_BOX_PX` px a 4x-zoomed inset (with lines to
    its place in the slice), so small nodules stay visible.

    Args:
        image01: ``[H, W]`` windowed slice in [0, 1].
        boxes: ``[N, 4]`` xyxy px; scores ``[N]``; labels ``[N]`` in 1..K.
        path: PNG to write (folder created).
        class_names: name of label ``k`` is ``class_names[k - 1]``.

    Returns:
        ``path``.

    Raises:
        ValueError: ``image01`` not 2-D or boxes/scores/labels of different lengths.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    img = np.clip(np.nan_to_num(np.asarray(image01, dtype=np.float32)), 0.0, 1.0)
    if img.ndim != 2:
        raise ValueError(f"save_overlay: image01 must be [H, W] in [0, 1], got shape {img.shape}")
    b = _np(boxes, np.float64, (4,))
    s = _np(scores, np.float64)
    lab = _np(labels, np.int64)
    if not len(b) == len(s) == len(lab):
        raise ValueError(f"save_overlay: {len(b)} boxes, {len(s)} scores, {len(lab)} labels")
    keep = s >= score_thresh
    b, s, lab = b[keep], s[keep], lab[keep]
    h, w = img.shape
    fig = plt.figure(figsize=(7.2, 7.2 * h / w + 0.4), dpi=100)
    ax = fig.add_axes([0, 0, 1, 0.94])  # room for the title
    ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)

    def color(k):
        return _CLASS_COLORS[(int(k) - 1) % len(_CLASS_COLORS)]

    def name(k):
        return class_names[int(k) - 1] if 0 < int(k) <= len(class_names) else f"class {int(k)}"

    for box, sc, k in zip(b, s, lab):
        ax.add_patch(Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False,
                               edgecolor=color(k), linewidth=1.5))
        ax.text(box[0], max(box[1] - 3, 0), f"{name(k)} {sc:.2f}", color="white", fontsize=8,
                va="bottom", ha="left", bbox=dict(facecolor=color(k), alpha=0.75, pad=1, edgecolor="none"))
    small = [i for i in range(len(b)) if max(b[i, 2] - b[i, 0], b[i, 3] - b[i, 1]) < SMALL_BOX_PX][:max_insets]
    for j, i in enumerate(small):
        x0, y0, x1, y1 = b[i]
        cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, SMALL_BOX_PX / 2 + 4
        size = 0.26
        ins = ax.inset_axes([1 - size - 0.01, 0.01 + j * (size + 0.02), size, size])
        ins.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ins.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color(lab[i]), linewidth=1.5))
        ins.set_xlim(cx - half, cx + half)
        ins.set_ylim(cy + half, cy - half)
        ins.set_xticks([]), ins.set_yticks([])
        for sp in ins.spines.values():
            sp.set_edgecolor(color(lab[i]))
        ins.set_title(f"x4 {name(lab[i])} {s[i]:.2f}", fontsize=7, color="white", pad=2,
                      bbox=dict(facecolor="black", alpha=0.6, pad=1, edgecolor="none"))
        ax.indicate_inset_zoom(ins, edgecolor=color(lab[i]))
    drawn = sorted(set(int(k) for k in lab))
    handles = [Line2D([], [], color=color(k), linewidth=2, label=name(k)) for k in drawn]
    handles.append(Line2D([], [], linestyle="none", label=f"{len(b)} shown, score >= {score_thresh:.2f}"))
    ax.legend(handles=handles, loc="upper left", fontsize=8, framealpha=0.7)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
