"""Teacher-student query correspondence for DETR-style KD (paper_notes A10, RF-DETR decision).

Pure functions, no model access. The cost between student query i and teacher query j is
DETR's matching cost with the teacher's predictions as targets:

    C[i, j] = w_class * || p_s[i] - p_t[j] ||_1 + w_bbox * || b_s[i] - b_t[j] ||_1
              + w_giou * (1 - GIoU(b_s[i], b_t[j]))

with p = per-class sigmoid probabilities [K], b = normalised (cx, cy, w, h) boxes. The match is
one-to-one (``scipy.optimize.linear_sum_assignment``), restricted to the teacher's top-K queries
by max class probability. Defaults w = (1, 5, 2) follow A10 (rfdetr's matcher weights for the
box terms).
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou

__all__ = ["query_pair_cost", "hungarian_pairs", "pair_queries"]


def query_pair_cost(s_prob: Tensor, s_boxes: Tensor, t_prob: Tensor, t_boxes: Tensor,
                    w_class: float = 1.0, w_bbox: float = 5.0, w_giou: float = 2.0) -> Tensor:
    """Cost matrix ``[Qs, Qt]`` (module docstring) of student vs teacher queries.

    Args:
        s_prob, t_prob: ``[Qs, K]`` / ``[Qt, K]`` class probabilities in [0, 1].
        s_boxes, t_boxes: ``[Qs, 4]`` / ``[Qt, 4]`` normalised cxcywh.

    Raises:
        ValueError: shapes that do not fit.
    """
    if s_prob.dim() != 2 or t_prob.dim() != 2 or s_prob.shape[1] != t_prob.shape[1]:
        raise ValueError(f"query_pair_cost: probabilities must be [Q, K] with equal K, got "
                         f"{tuple(s_prob.shape)} and {tuple(t_prob.shape)}")
    if s_boxes.shape != (s_prob.shape[0], 4) or t_boxes.shape != (t_prob.shape[0], 4):
        raise ValueError(f"query_pair_cost: boxes must be [Q, 4] cxcywh, got {tuple(s_boxes.shape)} "
                         f"and {tuple(t_boxes.shape)}")
    s_prob, t_prob, s_boxes, t_boxes = (x.detach().float() for x in (s_prob, t_prob, s_boxes, t_boxes))
    c_cls = torch.cdist(s_prob, t_prob, p=1)
    c_box = torch.cdist(s_boxes, t_boxes, p=1)
    giou = generalized_box_iou(box_convert(s_boxes, "cxcywh", "xyxy"), box_convert(t_boxes, "cxcywh", "xyxy"))
    return w_class * c_cls + w_bbox * c_box + w_giou * (1.0 - giou)


def hungarian_pairs(cost: Tensor) -> Tuple[Tensor, Tensor]:
    """Minimum-cost one-to-one assignment of rows to columns of ``cost [R, C]``.

    Returns:
        ``(rows, cols)`` int64 tensors of length min(R, C), sorted by row.
    """
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost.detach().cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


def pair_queries(s_logits: Tensor, s_boxes: Tensor, t_logits: Tensor, t_boxes: Tensor,
                 top_k: int = 0, **weights: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Pair every student query with a distinct teacher query, image by image.

    Args:
        s_logits, t_logits: ``[B, Qs, K]`` / ``[B, Qt, K]`` sigmoid-head logits.
        s_boxes, t_boxes: ``[B, Qs, 4]`` / ``[B, Qt, 4]`` normalised cxcywh.
        top_k: teacher queries considered per image, highest max probability first
            (0 = Qs); must be >= Qs so that every student query is paired (M_i = Qs).
        weights: ``w_class``, ``w_bbox``, ``w_giou`` of :func:`query_pair_cost`.

    Returns:
        ``(batch_idx, s_idx, t_idx)`` int64 ``[B * Qs]``, ordered by (image, student query), so
        ``x_s[batch_idx, s_idx]`` and ``x_t[batch_idx, t_idx]`` are aligned row by row.

    Raises:
        ValueError: batch sizes differ, or fewer than Qs teacher queries are available.
    """
    b, qs = s_logits.shape[:2]
    qt = t_logits.shape[1]
    if t_logits.shape[0] != b:
        raise ValueError(f"pair_queries: student batch {b} vs teacher batch {t_logits.shape[0]}")
    k = min(int(top_k) or qs, qt)
    if k < qs:
        raise ValueError(f"pair_queries: {k} teacher queries (top_k={top_k}, teacher has {qt}) "
                         f"cannot pair all {qs} student queries; use a teacher with >= {qs} queries")
    s_prob, t_prob = s_logits.detach().sigmoid(), t_logits.detach().sigmoid()
    bi, si, ti = [], [], []
    for i in range(b):
        top = t_prob[i].max(dim=-1).values.topk(k).indices
        cost = query_pair_cost(s_prob[i], s_boxes[i], t_prob[i, top], t_boxes[i, top], **weights)
        rows, cols = hungarian_pairs(cost)
        bi.append(torch.full_like(rows, i))
        si.append(rows)
        ti.append(top.cpu()[cols])
    dev = s_logits.device
    return torch.cat(bi).to(dev), torch.cat(si).to(dev), torch.cat(ti).to(dev)
