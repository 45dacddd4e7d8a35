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

import torch

from ..distill.adapters import KD_ADAPTER_REGISTRY, TwoStageAdapter
from ..distill.taps import MethodTap, Tap, register_detector_taps, teacher_roi_outputs

register_detector_taps("detectron2_generalized_rcnn", {
    "images": MethodTap("preprocess_image"),
    "features": Tap("backbone"),
    "sampled": MethodTap("roi_heads.label_and_sample_proposals"),
    "box_features": Tap("roi_heads.box_head"),
    "box_predictor": Tap("roi_heads.box_predictor"),
})


#: deprecated alias (one release): the one teacher RoI-head forward is
#: :func:`mdkd_det.distill.taps.teacher_roi_outputs`, which pools detectron2 heads too.
d2_teacher_roi_outputs = teacher_roi_outputs


@KD_ADAPTER_REGISTRY.register("detectron2_generalized_rcnn")
class D2GeneralizedRCNNAdapter(TwoStageAdapter):
    """detectron2 ``GeneralizedRCNN`` (Faster R-CNN); the KD mechanics are
    :class:`~mdkd_det.distill.adapters.TwoStageAdapter`'s, shared with torchvision."""

    taps_preset = "detectron2_generalized_rcnn"

    def batch_tensor(self, rec) -> torch.Tensor:
        """``ImageList.tensor`` returned by the student's ``preprocess_image``."""
        return rec["images"].tensor

    def sampled_regions(self, rec):
        """The student's sampled ``list[Instances]`` (``proposal_boxes``) and image sizes."""
        return rec["sampled"], rec["images"].image_sizes
