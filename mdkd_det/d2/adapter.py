"""KD adapter for detectron2 ``GeneralizedRCNN`` + ``StandardROIHeads`` (Faster R-CNN).

Where to tap (detectron2 @ 02b5c4e, ``modeling/meta_arch/rcnn.py`` and
``modeling/roi_heads/roi_heads.py``), registered as tap preset
``"detectron2_generalized_rcnn"``:

=================  ==========================================  =================================
record             tap                                         value
=================  ==========================================  =================================
``images``         method ``preprocess_image``                 ``ImageList``: ``tensor`` [B, C,
                                                               H, W] normalised, padded;
                                                               ``image_sizes``
``features``       module ``backbone``                         ``{p2..p6: Tensor[B, C, H/s, W/s]}``
``sampled``        method ``roi_heads.label_and_sample_...``   ``list[Instances]`` with
                                                               ``proposal_boxes`` (M_i boxes,
                                                               px of the resized image)
``box_features``   module ``roi_heads.box_head``               ``Tensor[sum M_i, D]`` (1024)
``box_predictor``  module ``roi_heads.box_predictor``          ``(scores [sum M_i, K+1], deltas)``
=================  ==========================================  =================================

detectron2's softmax head puts background at the LAST index (torchvision: first); ClsKD only
compares student and teacher logits of the same head type, so either is fine.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from ..distill.adapters import KD_ADAPTER_REGISTRY, TwoStageAdapter
from ..distill.taps import MethodTap, Tap, register_detector_taps

register_detector_taps("detectron2_generalized_rcnn", {
    "images": MethodTap("preprocess_image"),
    "features": Tap("backbone"),
    "sampled": MethodTap("roi_heads.label_and_sample_proposals"),
    "box_features": Tap("roi_heads.box_head"),
    "box_predictor": Tap("roi_heads.box_predictor"),
})


def d2_teacher_roi_outputs(teacher: nn.Module, teacher_feats, proposals
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """A detectron2 teacher's box head on the STUDENT's sampled proposals (ClsKD / ROIKD, A10).

    ``box_pooler([feats[f] for f in box_in_features], boxes) -> box_head -> box_predictor``
    under ``torch.no_grad()`` (as ``StandardROIHeads._forward_box``), so row m of the outputs
    is row m of the student's ``box_features`` / scores.

    Args:
        teacher: detectron2 ``GeneralizedRCNN`` with ``StandardROIHeads``.
        teacher_feats: ``{p-name: Tensor[B, C, H/s, W/s]}`` on the student's batch.
        proposals: the student's sampled ``list[Instances]`` (``proposal_boxes``).

    Returns:
        ``(embeddings Tensor[sum M_i, D], scores Tensor[sum M_i, K+1])`` without history.
    """
    heads = teacher.roi_heads
    with torch.no_grad():
        boxes = [p.proposal_boxes for p in proposals]
        pooled = heads.box_pooler([teacher_feats[f] for f in heads.box_in_features], boxes)
        embeddings = heads.box_head(pooled)
        scores, _ = heads.box_predictor(embeddings)
    return embeddings, scores


@KD_ADAPTER_REGISTRY.register("detectron2_generalized_rcnn")
class D2GeneralizedRCNNAdapter(TwoStageAdapter):
    """detectron2 ``GeneralizedRCNN`` (Faster R-CNN); the KD mechanics are
    :class:`~mdkd_det.distill.adapters.TwoStageAdapter`'s, shared with torchvision."""

    taps_preset = "detectron2_generalized_rcnn"

    def batch_tensor(self, rec) -> torch.Tensor:
        """``ImageList.tensor`` returned by the student's ``preprocess_image``."""
        return rec["images"].tensor

    def teacher_regions(self, teacher: nn.Module, feats, rec):
        """:func:`d2_teacher_roi_outputs` on the student's sampled proposals."""
        return d2_teacher_roi_outputs(teacher, feats, rec["sampled"])
