"""3-D lesion candidates: per-slice detections of a volume linked across adjacent slices.

A radiologist's worklist needs lesions, not boxes per slice. :func:`link_detections` links the
2-D detections of consecutive slices into candidates, greedily and in slice order:

1. slice by slice (z ascending), detections by descending score;
2. a detection joins the open candidate of the same label whose last box lies at most
   ``max_gap`` skipped slices back (``z - last_z <= max_gap + 1``) and has the highest IoU
   (``torchvision.ops.box_iou``) with it, if that IoU is ``>= iou_thresh``; each candidate takes
   at most one detection per slice;
3. otherwise it opens a new candidate.

Each candidate has a z-range (first/last slice index), a 3-D box in voxels (the union of its
2-D boxes in px, z from ``z0 - 0.5`` to ``z1 + 0.5`` so a one-slice candidate is one slice
thick) and in patient mm (the 8 corners mapped by the volume's affine, axis-aligned min/max in
LPS+), the max and mean score and its slice count.

Source: greedy IoU tracking-by-detection (as in 2.5-D CT detectors that merge slice-wise boxes,
e.g. DeepLesion's 3-D evaluation); IoU from torchvision.
"""

from __future__ import annotations

import csv
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torchvision.ops import box_iou

__all__ = ["link_detections", "candidate_boxes", "write_candidates_csv", "CSV_FIELDS"]


def link_detections(per_slice: Sequence[Dict[str, torch.Tensor]], iou_thresh: float = 0.3,
                    max_gap: int = 0, score_thresh: float = 0.0) -> List[dict]:
    """Link per-slice detections into 3-D candidates (see module doc).

    Args:
        per_slice: for slice ``z`` (index in the list), a dict ``boxes [N, 4]`` xyxy px,
            ``scores [N]``, ``labels [N]`` (tensors or arrays).
        iou_thresh: minimum 2-D IoU between a detection and the candidate's last box.
        max_gap: slices without a detection a candidate may skip (0 = strictly adjacent).
        score_thresh: detections below this score are ignored.

    Returns:
        candidates sorted by descending max score: ``{"label": int, "z0", "z1": slice indices,
        "slices": [z, ...], "boxes": [[x1, y1, x2, y2] px per slice], "scores": [...],
        "max_score", "mean_score": float}``.

    Raises:
        ValueError: ``iou_thresh`` outside (0, 1] or ``max_gap < 0``.
    """
    if not 0.0 < float(iou_thresh) <= 1.0:
        raise ValueError(f"link_detections: iou_thresh must be in (0, 1], got {iou_thresh}")
    if int(max_gap) < 0:
        raise ValueError(f"link_detections: max_gap must be >= 0, got {max_gap}")
    cands: List[dict] = []
    for z, det in enumerate(per_slice):
        boxes = torch.as_tensor(np.asarray(det["boxes"], dtype=np.float32)).reshape(-1, 4)
        scores = np.asarray(det["scores"], dtype=np.float64).reshape(-1)
        labels = np.asarray(det["labels"], dtype=np.int64).reshape(-1)
        open_ = [c for c in cands if z - c["slices"][-1] <= int(max_gap) + 1]
        # IoU of every detection with every open candidate's last box, in one call
        last = torch.tensor([c["boxes"][-1] for c in open_], dtype=torch.float32).reshape(-1, 4)
        ious = box_iou(boxes, last).numpy() if len(open_) and len(boxes) else np.zeros((len(boxes), 0))
        taken = set()
        for i in np.argsort(-scores, kind="stable"):
            if scores[i] < score_thresh:
                continue
            best, best_iou = None, float(iou_thresh)
            for k, c in enumerate(open_):
                if k in taken or c["label"] != int(labels[i]):
                    continue
                if float(ious[i, k]) >= best_iou:
                    best, best_iou = k, float(ious[i, k])
            box = [float(v) for v in boxes[i]]
            if best is None:
                cands.append({"label": int(labels[i]), "slices": [z], "boxes": [box],
                              "scores": [float(scores[i])]})
            else:
                taken.add(best)
                c = open_[best]
                c["slices"].append(z), c["boxes"].append(box), c["scores"].append(float(scores[i]))
    for c in cands:
        c["z0"], c["z1"] = c["slices"][0], c["slices"][-1]
        c["max_score"] = max(c["scores"])
        c["mean_score"] = float(np.mean(c["scores"]))
    return sorted(cands, key=lambda c: (-c["max_score"], c["z0"]))


def candidate_boxes(cand: dict, volume=None) -> dict:
    """The 3-D boxes of one candidate.

    Returns:
        ``{"box_voxel": [x0, y0, z0, x1, y1, z1]`` (x, y px edges; z slice index +- 0.5),
        and with a ``volume`` (:class:`~mdkd_det.data.volume.Volume`) ``"box_mm":
        [x0, y0, z0, x1, y1, z1]`` (LPS+ mm, axis-aligned hull of the 8 corners) and
        ``"center_mm": [x, y, z]``.
    """
    b = np.asarray(cand["boxes"], dtype=np.float64)
    x0, y0 = b[:, 0].min(), b[:, 1].min()
    x1, y1 = b[:, 2].max(), b[:, 3].max()
    z0, z1 = cand["z0"] - 0.5, cand["z1"] + 0.5
    out = {"box_voxel": [float(v) for v in (x0, y0, z0, x1, y1, z1)]}
    if volume is not None:
        # box edges in px -> voxel-centre coordinates (pixel i spans [i, i + 1) px)
        corners = np.array([[x, y, z] for x in (x0 - 0.5, x1 - 0.5) for y in (y0 - 0.5, y1 - 0.5)
                            for z in (z0, z1)])
        mm = volume.voxel_to_mm(corners)
        lo, hi = mm.min(axis=0), mm.max(axis=0)
        out["box_mm"] = [float(v) for v in np.concatenate([lo, hi])]
        out["center_mm"] = [float(v) for v in (lo + hi) / 2]
    return out


#: columns of :func:`write_candidates_csv`.
CSV_FIELDS = ("volume", "candidate", "label", "class", "max_score", "mean_score", "num_slices",
              "z0", "z1", "x0_px", "y0_px", "x1_px", "y1_px", "x0_mm", "y0_mm", "z0_mm",
              "x1_mm", "y1_mm", "z1_mm", "center_x_mm", "center_y_mm", "center_z_mm")


def write_candidates_csv(path: str, rows: Sequence[dict], class_names: Optional[Sequence[str]] = None) -> None:
    """Write candidates (dicts from the predict tool: ``volume``, ``id`` + :func:`link_detections`
    + :func:`candidate_boxes` fields) as CSV with :data:`CSV_FIELDS` (px, slice index, mm)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for r in rows:
            bv, bm = r["box_voxel"], r.get("box_mm") or [float("nan")] * 6
            cm = r.get("center_mm") or [float("nan")] * 3
            name = class_names[r["label"] - 1] if class_names and 0 < r["label"] <= len(class_names) else ""
            w.writerow([r["volume"], r["id"], r["label"], name, f"{r['max_score']:.4f}", f"{r['mean_score']:.4f}",
                        len(r["slices"]), r["z0"], r["z1"], *(f"{v:.1f}" for v in (bv[0], bv[1], bv[3], bv[4])),
                        *(f"{v:.2f}" for v in bm), *(f"{v:.2f}" for v in cm)])
