"""Detector adapters for distillation: *where to tap* one model family (design.md).

An adapter knows three things about a family and nothing about the KD losses:

1. ``student_taps()``: the :class:`~mdkd_det.distill.taps.TapRecorder` specs to record during
   the student's own, unmodified training forward;
2. ``student_inputs(rec)``: turn those records into :class:`KDInputs`;
3. ``teacher_inputs(teacher, rec)``: run the frozen teacher (``torch.no_grad``) on the *same*
   transformed batch and, where regions must correspond, on the student's regions, and return
   :class:`KDInputs` aligned item by item with the student's.

Optionally, 4. ``student_forward_unlabeled(student, images)`` -> a :class:`TapRecorder` with
the same records as (1) from a forward *without targets* (no task loss; paper 003's unlabelled
target images, ``KD.UNLABELED``), so (2)-(3) and the distiller apply unchanged. Families
without it cannot train with ``KD.UNLABELED.ENABLED``.

Optionally, 5. ``kd_shapes(student, teacher)`` -> ``(student_shapes, teacher_shapes,
level_pairs)`` when the distilled levels are not the backbones' own levels paired by stride
(classification: :mod:`mdkd_det.distill.cls_adapter`).

An adapter may read ``self.kd_fields`` (the :class:`KDInputs` fields the active KD terms read,
set by the Distiller when the adapter declares the attribute or a term reads ``pixel_logits``)
to skip work nobody reads (the segmentation adapter runs the teacher's decoder only for
``pixel_logits``).

The :class:`~mdkd_det.distill.distiller.Distiller` consumes ``KDInputs`` only, so the Faster
R-CNN, RF-DETR, detectron2 and seg/cls paths share every loss and the whole KD step.
"""

from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn

from .adapter_base import KD_ADAPTER_REGISTRY, KDInputs, _unwrap, build_kd_adapter  # noqa: F401 (re-exported)
from .taps import Tap, TapRecorder, register_detector_taps, teacher_roi_outputs


class TwoStageAdapter:
    """Shared logic of two-stage (RPN + RoI head) detector adapters; subclasses say only how to
    read their family's records.

    Records (tap preset ``taps_preset``): ``images`` (the transformed batch), ``features``
    (backbone maps), ``sampled`` (the RoI head's sampled training proposals), ``box_features``
    (box-head embeddings [sum M_i, D]) and ``box_predictor`` (``(class_logits [sum M_i, K+1],
    box_deltas)``). The teacher runs its backbone on the student's transformed tensor and its
    RoI head on the student's sampled proposals, so region m is the same box for both (ClsKD /
    ROIKD correspondence, A10).

    Subclasses set ``taps_preset`` and implement :meth:`batch_tensor` and
    :meth:`sampled_regions`; the teacher's RoI head runs through :func:`teacher_roi_outputs`.
    """

    #: the teacher's maps come from ``teacher.backbone(batch)`` alone (FROZEN_TEACHER.CACHE_DIR)
    teacher_backbone_cacheable = True

    cls_kind = "softmax"
    taps_preset: str = ""

    def student_taps(self) -> Dict[str, object]:
        """Tap specs for :class:`TapRecorder` (preset ``taps_preset``)."""
        return register_detector_taps(self.taps_preset)

    def student_inputs(self, rec) -> KDInputs:
        """Student :class:`KDInputs` from the records of its own training forward: backbone
        maps [B, C, H/s, W/s], RoI embeddings [sum M_i, D] and logits [sum M_i, K+1]."""
        logits = rec.get("box_predictor")
        return KDInputs(
            features=rec["features"],
            region_embeddings=rec.get("box_features"),
            region_logits=logits[0] if logits is not None else None,
            images=self.batch_tensor(rec),
        )

    def teacher_inputs(self, teacher: nn.Module, rec) -> KDInputs:
        """Teacher :class:`KDInputs` on the student's transformed batch and sampled proposals,
        under ``torch.no_grad`` (rows aligned with :meth:`student_inputs`)."""
        teacher = _unwrap(teacher)
        with torch.no_grad():
            feats = teacher.backbone(self.batch_tensor(rec))
        emb = logits = None
        if rec.get("sampled") is not None:
            emb, logits = self.teacher_regions(teacher, feats, rec)
        return KDInputs(features=feats, region_embeddings=emb, region_logits=logits)

    def batch_tensor(self, rec) -> torch.Tensor:  # pragma: no cover - abstract
        """The student's normalised, padded batch ``Tensor[B, C, H, W]``."""
        raise NotImplementedError

    def sampled_regions(self, rec):  # pragma: no cover - abstract
        """``(proposals, image_sizes)`` of the student's sampled RoIs, in the form
        :func:`teacher_roi_outputs` takes for this family."""
        raise NotImplementedError

    def teacher_regions(self, teacher: nn.Module, feats, rec):
        """``(embeddings [sum M_i, D_t], class_logits [sum M_i, K+1])`` of the teacher's RoI
        head on the student's sampled proposals, without autograd history
        (:func:`teacher_roi_outputs`)."""
        return teacher_roi_outputs(teacher, feats, *self.sampled_regions(rec))


@KD_ADAPTER_REGISTRY.register("torchvision_faster_rcnn")
class TorchvisionFasterRCNNAdapter(TwoStageAdapter):
    """torchvision ``FasterRCNN`` (engineering_notes §5; decision A10).

    Records: the transformed batch (``(ImageList, targets)``), the FPN maps, the sampled
    training proposals (``roi_heads.select_training_samples``), the RoI embeddings
    (``box_head`` output, [sum M_i, D]) and class logits (``box_predictor`` output,
    [sum M_i, K+1], background at index 0).
    """

    taps_preset = "torchvision_faster_rcnn"

    def batch_tensor(self, rec) -> torch.Tensor:
        """``ImageList.tensors`` of the transform's output."""
        return rec["images"][0].tensors

    def sampled_regions(self, rec):
        """``rec["sampled"][0]`` (proposal boxes ``list[Tensor[M_i, 4]]``) and the transform's
        ``image_sizes``."""
        return rec["sampled"][0], rec["images"][0].image_sizes

    def student_forward_unlabeled(self, student: nn.Module, images: List[torch.Tensor]) -> TapRecorder:
        """Student forward on unlabelled images, without targets (paper 003 Eq. 3, detection
        form; ``KD.UNLABELED``), recording what :meth:`student_inputs` / :meth:`teacher_inputs`
        read.

        The transform (train-size resize) and the backbone run in the student's own mode (train:
        BatchNorm uses and updates batch statistics, as in the labelled forward); the RPN runs in
        inference mode (``MODEL.RPN.*_TOPK_TEST`` proposals after NMS, no loss, no targets); the
        RoI head's box pooler, box head and predictor then run on *all* those proposals, with
        autograd (no sampling, no box post-processing). ``rec["sampled"] = (proposals,)`` makes
        them the regions the teacher's RoI head reads, as the sampled RoIs of a labelled step.

        Args:
            student: torchvision ``FasterRCNN`` (or its DDP wrapper).
            images: ``list[Tensor[C, H, W]]`` in [0, 1] at their original size (px), on the
                model's device.

        Returns:
            The closed recorder: ``images`` ``(ImageList, None)``, ``features``, ``sampled``
            ``(list[Tensor[P_i, 4]] xyxy px,)``, ``box_features`` ``[sum P_i, D]``,
            ``box_predictor`` ``(logits [sum P_i, K+1], deltas)``.
        """
        model = _unwrap(student)
        rpn, roi_heads = model.rpn, model.roi_heads
        modes = (rpn.training, roi_heads.training)
        with TapRecorder(model, self.student_taps()) as rec:
            try:
                rpn.train(False)
                roi_heads.train(False)
                image_list, _ = model.transform(images)
                feats = model.backbone(image_list.tensors)
                proposals, _ = rpn(image_list, feats)
                pooled = roi_heads.box_roi_pool(feats, proposals, image_list.image_sizes)
                roi_heads.box_predictor(roi_heads.box_head(pooled))
            finally:
                rpn.train(modes[0])
                roi_heads.train(modes[1])
        rec.records["sampled"] = (proposals,)
        return rec


@KD_ADAPTER_REGISTRY.register("encoder_features")
class EncoderFeaturesAdapter:
    """Feature-only KD for models whose ``backbone`` is called once per forward on the
    normalised batch (segmenters: encoder levels + bottleneck, paper C15; any model with a
    multi-level :class:`~mdkd_det.modeling.backbone.Backbone`).

    Student records: the backbone's input (the normalised, padded batch ``[B, C, H, W]``) and
    its output maps. The teacher's backbone runs on that same tensor under ``torch.no_grad``
    (for a joint teacher this is its :class:`FusionBackbone`, whose :class:`TeacherInput`
    re-normalises per teacher). No region terms: ``region_*`` are None, so the distiller
    computes only Con / FAlgn / CosSim / Att (Eq. 9: no output-level KD for seg, A30).

    Pixel logits (paper 002 LM / AAM): a model with a ``decoder`` (the segmenters) has its
    decoder output recorded; the teacher's decoder runs on its maps only when an active term
    reads ``pixel_logits`` (:attr:`kd_fields`), so the default KD step costs nothing more.
    """

    #: the teacher's maps come from ``teacher.backbone(batch)`` alone (FROZEN_TEACHER.CACHE_DIR)
    teacher_backbone_cacheable = True

    kd_fields: frozenset = frozenset()

    def student_taps(self) -> Dict[str, object]:
        """``{"features": backbone output, "backbone_input": backbone input}`` (+
        ``"pixel_logits"``: the decoder output, when a term reads it)."""
        taps = {"features": "backbone", "backbone_input": Tap("backbone", "input")}
        if "pixel_logits" in self.kd_fields:
            taps["pixel_logits"] = "decoder"
        return taps

    def student_inputs(self, rec) -> KDInputs:
        """Student maps ``OrderedDict[level, Tensor[B, C_l, H_l, W_l]]`` (with autograd), the
        normalised batch and, when recorded, the pixel logits [B, K, H, W]."""
        return KDInputs(features=rec["features"], images=rec["backbone_input"],
                        pixel_logits=rec.get("pixel_logits"))

    def teacher_inputs(self, teacher: nn.Module, rec) -> KDInputs:
        """Teacher maps on the student's backbone input (and its decoder's pixel logits when
        a term reads them), under ``torch.no_grad``."""
        teacher = _unwrap(teacher)
        x = rec["backbone_input"]
        with torch.no_grad():
            feats = teacher.backbone(x)
            pix = (teacher.decoder(feats, size=x.shape[-2:])
                   if "pixel_logits" in self.kd_fields and rec.get("pixel_logits") is not None else None)
        return KDInputs(features=feats, pixel_logits=pix)
