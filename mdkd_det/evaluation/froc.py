"""Free-response ROC (FROC) sensitivity at fixed false-positive rates, and its mean (CPM).

Source: the FROC protocol of LUNA16 (Setio et al., MedIA 2017, Sec. "Evaluation") and the
DeepLesion benchmark (Yan et al., J. Med. Imaging 5(3), 2018; sensitivity at 0.5/1/2/4/8
FPs per image). The "competition performance metric" (CPM) is the mean sensitivity over the
requested FP rates (LUNA16 uses 1/8, 1/4, 1/2, 1, 2, 4, 8 FPs per scan; here: per image by
default, per scan with ``scan_ids``).

Choices (all documented in :func:`froc`):

- **Matching.** Per image, detections are visited in descending score order (stable for ties).
  A detection that hits at least one *not-yet-hit* ground-truth box is a true positive and
  claims the best such box (highest IoU for ``hit="iou"``; nearest box centre for
  ``hit="center"``). A detection that hits only already-hit boxes is *ignored*: neither TP nor
  FP (LUNA16 ignores such duplicate hits). A detection that hits nothing is a false positive.
  Greedy matching in score order is consistent with the threshold sweep: the matching at any
  threshold is the prefix of the full matching.
- **Sweep.** Detections of all images are pooled and every distinct score is a threshold
  (a detection is kept if ``score >= threshold``; tied scores enter together). The curve
  starts at (0 FP/image, sensitivity 0) for a threshold above every score.
- **No interpolation.** ``sens@r`` is the highest sensitivity among operating points whose FP
  rate is ``<= r`` (the step function used by DeepLesion's ``sens_at_FP``; LUNA16's script
  interpolates linearly between operating points instead, which can only give values >= ours).
  When even the lowest operating point with a detection exceeds ``r`` the value is 0.
- Sensitivity is a fraction in [0, 1] (not percent), as LUNA16/DeepLesion report it.
- With no ground-truth box at all every sensitivity (and the CPM) is NaN; with no image at all
  likewise.
- **Per scan** (``scan_ids``, config ``TEST.FROC_PER_SCAN``): the FP rate of an operating point is
  its false positives divided by the number of distinct scans (CT series) instead of images, as
  in the LUNA16 CPM; matching, sweep and the rate points are unchanged. Hits are still counted
  per 2D ground-truth box (a lesion visible on three slices counts three times); LUNA16 counts
  3D nodules, which 2D slice datasets cannot give without a 3D grouping of the boxes.
"""

from __future__ import annotations

from typing import Dict, Hashable, List, Optional, Sequence

import numpy as np
import torch
from torchvision.ops import box_iou

DEFAULT_FPS_PER_IMAGE = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)

__all__ = ["froc", "froc_key", "DEFAULT_FPS_PER_IMAGE"]


def froc_key(rate: float) -> str:
    """Result key of the sensitivity at ``rate`` FPs/image: ``"sens@0.125"``, ``"sens@1"``..."""
    return f"sens@{float(rate):g}"


def _as_boxes(arr, what: str, i: int) -> np.ndarray:
    a = np.asarray(arr, dtype=np.float64)
    if a.size == 0:
        return np.zeros((0, 4), dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 4:
        raise ValueError(f"froc: {what}[{i}] must have shape [N, 4] (x1, y1, x2, y2 px), got {a.shape}")
    return a


def _match_image(
    gt: np.ndarray, det: np.ndarray, scores: np.ndarray, hit: str, iou_thresh: float
) -> np.ndarray:
    """Greedy score-ordered matching of one image; returns flags per detection, in input order.

    Flag 1 = true positive, 0 = false positive, -1 = ignored (hits only already-hit GT).
    """
    n_det, n_gt = det.shape[0], gt.shape[0]
    flags = np.zeros(n_det, dtype=np.int8)
    if n_det == 0 or n_gt == 0:
        return flags
    iou = box_iou(torch.from_numpy(det), torch.from_numpy(gt)).numpy()  # [D, G]
    if hit == "iou":
        hits = iou >= iou_thresh
        quality = iou
    else:  # centre of the detection inside the GT box (borders included)
        cx = (det[:, 0] + det[:, 2]) / 2.0
        cy = (det[:, 1] + det[:, 3]) / 2.0
        hits = (
            (cx[:, None] >= gt[None, :, 0])
            & (cx[:, None] <= gt[None, :, 2])
            & (cy[:, None] >= gt[None, :, 1])
            & (cy[:, None] <= gt[None, :, 3])
        )
        gcx = (gt[:, 0] + gt[:, 2]) / 2.0
        gcy = (gt[:, 1] + gt[:, 3]) / 2.0
        quality = -np.hypot(cx[:, None] - gcx[None, :], cy[:, None] - gcy[None, :])
    taken = np.zeros(n_gt, dtype=bool)
    for d in np.argsort(-scores, kind="stable"):
        if not hits[d].any():
            continue  # false positive (flag stays 0)
        free = hits[d] & ~taken
        if free.any():
            g = int(np.argmax(np.where(free, quality[d], -np.inf)))
            taken[g] = True
            flags[d] = 1
        else:
            flags[d] = -1  # duplicate hit on an already-found lesion: ignored
    return flags


def froc(
    gt_boxes: Sequence[np.ndarray],
    det_boxes: Sequence[np.ndarray],
    det_scores: Sequence[np.ndarray],
    fps_per_image: Sequence[float] = DEFAULT_FPS_PER_IMAGE,
    hit: str = "iou",
    iou_thresh: float = 0.5,
    scan_ids: Optional[Sequence[Hashable]] = None,
) -> Dict[str, float]:
    """FROC sensitivities at fixed FPs/image (or FPs/scan) and their mean (CPM), over a set of images.

    Args:
        gt_boxes: one array per image, ``[G_i, 4]`` XYXY in px (``G_i`` may be 0).
        det_boxes: one array per image, ``[D_i, 4]`` XYXY in px (``D_i`` may be 0).
        det_scores: one array per image, ``[D_i]`` confidence scores.
        fps_per_image: FP rates (false positives per image; per scan with ``scan_ids``) at
            which sensitivity is read.
        hit: ``"iou"`` (IoU >= ``iou_thresh`` with the GT box) or ``"center"`` (the detection's
            centre lies inside the GT box, borders included).
        iou_thresh: IoU threshold for ``hit="iou"``.
        scan_ids: optional, one scan (CT series) id per image; then the FP rate is false
            positives per *scan* (number of distinct ids), as in the LUNA16 CPM.

    Returns:
        ``{"sens@0.125": s, ..., "sens@8": s, "CPM": mean of those, "num_images": N,
        "num_gt": G, "num_tp": TP at the lowest threshold, "num_fp": FP at the lowest
        threshold}``, plus ``"num_scans"`` with ``scan_ids``; sensitivities are fractions in
        [0, 1], NaN when there is no GT box.
        See the module docstring for matching, sweep and interpolation choices.

    Raises:
        ValueError: the three lists (and ``scan_ids``) differ in length, an array has the wrong shape, boxes and
            scores of one image differ in count, ``hit`` is unknown, or ``fps_per_image`` is
            empty or has a non-positive rate.

    Source: LUNA16 (Setio et al. 2017) / DeepLesion (Yan et al. 2018) FROC; IoU from
    ``torchvision.ops.box_iou``.
    """
    if not (len(gt_boxes) == len(det_boxes) == len(det_scores)):
        raise ValueError(
            f"froc: gt_boxes, det_boxes and det_scores need one entry per image, got "
            f"{len(gt_boxes)}, {len(det_boxes)}, {len(det_scores)}"
        )
    if scan_ids is not None and len(scan_ids) != len(gt_boxes):
        raise ValueError(f"froc: scan_ids needs one entry per image, got {len(scan_ids)} for {len(gt_boxes)} images")
    if hit not in ("iou", "center"):
        raise ValueError(f"froc: hit must be 'iou' or 'center', got {hit!r}")
    rates = [float(r) for r in fps_per_image]
    if not rates or any(not r > 0 for r in rates):
        raise ValueError(f"froc: fps_per_image must be non-empty positive rates, got {fps_per_image}")

    n_img = len(gt_boxes)
    n_gt = 0
    all_scores: List[np.ndarray] = []
    all_flags: List[np.ndarray] = []
    for i in range(n_img):
        gt = _as_boxes(gt_boxes[i], "gt_boxes", i)
        det = _as_boxes(det_boxes[i], "det_boxes", i)
        sc = np.asarray(det_scores[i], dtype=np.float64).reshape(-1)
        if sc.shape[0] != det.shape[0]:
            raise ValueError(
                f"froc: image {i} has {det.shape[0]} detection boxes but {sc.shape[0]} scores"
            )
        n_gt += gt.shape[0]
        all_scores.append(sc)
        all_flags.append(_match_image(gt, det, sc, hit, iou_thresh))

    scores = np.concatenate(all_scores) if all_scores else np.zeros(0)
    flags = np.concatenate(all_flags) if all_flags else np.zeros(0, dtype=np.int8)
    order = np.argsort(-scores, kind="stable")
    scores, flags = scores[order], flags[order]
    cum_tp = np.cumsum(flags == 1)
    cum_fp = np.cumsum(flags == 0)
    # operating points: the last detection of every group of tied scores
    last_of_group = np.ones(scores.shape[0], dtype=bool)
    if scores.size > 1:
        last_of_group[:-1] = scores[:-1] != scores[1:]
    tp_pts = np.concatenate([[0], cum_tp[last_of_group]]).astype(np.float64)
    fp_pts = np.concatenate([[0], cum_fp[last_of_group]]).astype(np.float64)

    out: Dict[str, float] = {}
    if n_gt == 0 or n_img == 0:
        for r in rates:
            out[froc_key(r)] = float("nan")
        out["CPM"] = float("nan")
    else:
        sens = tp_pts / n_gt
        fppi = fp_pts / (n_img if scan_ids is None else len(set(scan_ids)))  # FPs per image or scan
        vals = []
        for r in rates:
            ok = fppi <= r + 1e-12  # tolerance for float FP/image rates such as 1/8
            v = float(sens[ok].max())  # the origin (0, 0) is always ok
            out[froc_key(r)] = v
            vals.append(v)
        out["CPM"] = float(np.mean(vals))
    out["num_images"] = n_img
    out["num_gt"] = int(n_gt)
    out["num_tp"] = int(tp_pts[-1])
    out["num_fp"] = int(fp_pts[-1])
    if scan_ids is not None:
        out["num_scans"] = len(set(scan_ids))
    return out
