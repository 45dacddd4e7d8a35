"""torchvision Faster R-CNN built from config on a registry backbone.

Source: ``torchvision.models.detection.FasterRCNN`` (unmodified; KD hooks attach from outside).
The model takes images as ``list[Tensor[C, H, W]]`` in [0, 1] at their original size in px; its
``GeneralizedRCNNTransform`` normalises with ``MODEL.PIXEL_MEAN/STD`` and resizes to
``INPUT.MIN_SIZE_*`` / ``INPUT.MAX_SIZE_*``; detections come back in the input images' px.
Labels follow torchvision: 0 = background, ``contiguous_id + 1`` for classes.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator

from ..backbone import Backbone, build_backbone
from ..registry import DETECTOR_REGISTRY


def _anchor_generator(cfg, backbone: Backbone) -> AnchorGenerator:
    """One anchor size tuple per backbone level (extra config sizes are ignored, missing
    levels reuse the last size doubled), aspect ratios broadcast to every level."""
    levels = list(backbone.output_shape())
    sizes = [tuple(int(s) for s in lvl) for lvl in cfg.MODEL.ANCHOR_GENERATOR.SIZES]
    while len(sizes) < len(levels):
        sizes.append(tuple(2 * s for s in sizes[-1]))
    sizes = sizes[: len(levels)]
    ratios = [tuple(float(r) for r in lvl) for lvl in cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS]
    if len(ratios) == 1:
        ratios = ratios * len(levels)
    if len(ratios) != len(levels):
        raise ValueError(
            f"MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS has {len(ratios)} entries; the backbone has "
            f"{len(levels)} levels ({levels}); give one entry or one per level"
        )
    return AnchorGenerator(sizes=tuple(sizes), aspect_ratios=tuple(ratios))


@DETECTOR_REGISTRY.register("faster_rcnn")
def build_faster_rcnn(cfg, backbone: Backbone | None = None) -> nn.Module:
    """Build a torchvision ``FasterRCNN`` from ``cfg`` (detector registry entry "faster_rcnn").

    Args:
        cfg: config (MODEL.*, INPUT.*).
        backbone: a prebuilt :class:`Backbone` (e.g. a FusionBackbone); default builds
            ``MODEL.BACKBONE.NAME`` from the registry.

    Returns:
        ``FasterRCNN`` with ``MODEL.ROI_HEADS.NUM_CLASSES + 1`` outputs (background included).
        Train mode: ``model(images, targets) -> dict`` of loss_classifier, loss_box_reg,
        loss_objectness, loss_rpn_box_reg (paper Eq. 17). Eval mode: ``list[dict(boxes [N, 4]
        xyxy px, scores [N], labels [N])]``.
    """
    backbone = backbone if backbone is not None else build_backbone(cfg)
    from torchvision.models.detection.faster_rcnn import TwoMLPHead, FastRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign

    featmap_names = [k for k in backbone.output_shape() if k != "pool"]
    roi_pool = MultiScaleRoIAlign(featmap_names=featmap_names, output_size=7, sampling_ratio=2)
    rep = int(cfg.MODEL.ROI_HEADS.MLP_HEAD_DIM)
    box_head = TwoMLPHead(backbone.out_channels * 7 * 7, rep)
    num_classes = int(cfg.MODEL.ROI_HEADS.NUM_CLASSES) + 1
    model = FasterRCNN(
        backbone,
        num_classes=None,
        min_size=int(cfg.INPUT.MIN_SIZE_TRAIN),
        max_size=int(cfg.INPUT.MAX_SIZE_TRAIN),
        image_mean=list(cfg.MODEL.PIXEL_MEAN),
        image_std=list(cfg.MODEL.PIXEL_STD),
        rpn_anchor_generator=_anchor_generator(cfg, backbone),
        rpn_pre_nms_top_n_train=int(cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN),
        rpn_pre_nms_top_n_test=int(cfg.MODEL.RPN.PRE_NMS_TOPK_TEST),
        rpn_post_nms_top_n_train=int(cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN),
        rpn_post_nms_top_n_test=int(cfg.MODEL.RPN.POST_NMS_TOPK_TEST),
        rpn_nms_thresh=float(cfg.MODEL.RPN.NMS_THRESH),
        rpn_batch_size_per_image=int(cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE),
        rpn_positive_fraction=float(cfg.MODEL.RPN.POSITIVE_FRACTION),
        box_roi_pool=roi_pool,
        box_head=box_head,
        box_predictor=FastRCNNPredictor(rep, num_classes),
        box_score_thresh=float(cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST),
        box_nms_thresh=float(cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST),
        box_detections_per_img=int(cfg.MODEL.ROI_HEADS.DETECTIONS_PER_IMG),
        box_batch_size_per_image=int(cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE),
        box_positive_fraction=float(cfg.MODEL.ROI_HEADS.POSITIVE_FRACTION),
    )
    set_test_size(model, cfg, train=True)
    return model


def set_test_size(model: nn.Module, cfg, train: bool) -> None:
    """Point the model's resize transform at the train or test sizes (px) of ``cfg``.

    torchvision's ``GeneralizedRCNNTransform`` has one ``min_size``; we switch it with the mode.
    """
    t = model.transform
    t.min_size = (int(cfg.INPUT.MIN_SIZE_TRAIN if train else cfg.INPUT.MIN_SIZE_TEST),)
    t.max_size = int(cfg.INPUT.MAX_SIZE_TRAIN if train else cfg.INPUT.MAX_SIZE_TEST)
