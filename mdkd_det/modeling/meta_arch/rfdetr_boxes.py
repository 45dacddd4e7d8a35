"""Box and label conversion at the RF-DETR model boundary (pure functions).

Our datasets and evaluator use torchvision's convention: boxes ``xyxy`` in pixels of the image
the mapper produced, labels ``1..K`` (0 = background). rfdetr's ``SetCriterion`` /
``HungarianMatcher`` (``rfdetr.models.criterion``, ``rfdetr.models.matcher``) take boxes as
normalised ``(cx, cy, w, h)`` in [0, 1] and class indices ``0..K-1`` (its class head has K + 1
sigmoid logits; the last one is never a target). Source: torchvision ``ops.box_convert``.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor
from torchvision.ops import box_convert

__all__ = ["xyxy_px_to_cxcywh_norm", "cxcywh_norm_to_xyxy_px", "to_rfdetr_targets", "LABEL_OFFSET"]

#: our label (1..K) = rfdetr class index (0..K-1) + LABEL_OFFSET.
LABEL_OFFSET = 1


def _wh(size: Tuple[int, int], like: Tensor) -> Tensor:
    h, w = size
    return torch.tensor([w, h, w, h], dtype=like.dtype, device=like.device)


def xyxy_px_to_cxcywh_norm(boxes: Tensor, size: Tuple[int, int]) -> Tensor:
    """``boxes [N, 4]`` xyxy px of an image of ``size = (h, w)`` px -> ``[N, 4]`` cxcywh in
    [0, 1] (fractions of w and h)."""
    if boxes.numel() == 0:
        return boxes.reshape(0, 4).float()
    return box_convert(boxes.float(), "xyxy", "cxcywh") / _wh(size, boxes.float())


def cxcywh_norm_to_xyxy_px(boxes: Tensor, size: Tuple[int, int]) -> Tensor:
    """Inverse of :func:`xyxy_px_to_cxcywh_norm`: ``[N, 4]`` normalised cxcywh -> xyxy px of an
    image of ``size = (h, w)``."""
    if boxes.numel() == 0:
        return boxes.reshape(0, 4).float()
    return box_convert(boxes.float() * _wh(size, boxes.float()), "cxcywh", "xyxy")


def to_rfdetr_targets(targets: Sequence[Dict[str, Tensor]], sizes: Sequence[Tuple[int, int]]
                      ) -> List[Dict[str, Tensor]]:
    """Our targets (``boxes [N, 4]`` xyxy px, ``labels [N]`` in 1..K) of images of ``sizes``
    ``[(h, w)]`` px -> rfdetr targets (``boxes`` cxcywh in [0, 1], ``labels`` int64 in 0..K-1).

    Raises:
        ValueError: a label < 1 (background or negative) or a missing key (names the image index).
    """
    out = []
    for i, (t, size) in enumerate(zip(targets, sizes)):
        if "boxes" not in t or "labels" not in t:
            raise ValueError(f"RF-DETR target {i} needs 'boxes' and 'labels', has {sorted(t)}")
        labels = t["labels"].to(torch.int64)
        if labels.numel() and int(labels.min()) < LABEL_OFFSET:
            raise ValueError(f"RF-DETR target {i}: labels must be 1..K (0 = background), got "
                             f"{labels.tolist()}")
        out.append({"boxes": xyxy_px_to_cxcywh_norm(t["boxes"], size),
                    "labels": labels - LABEL_OFFSET})
    return out
