"""torchvision Faster R-CNN built from config on a registry backbone.

Source: ``torchvision.models.detection.FasterRCNN`` (unmodified; KD hooks attach from outside).
The model takes images as ``list[Tensor[C, H, W]]`` in [0, 1] at their original size in px; its
``GeneralizedRCNNTransform`` normalises with ``MODEL.PIXEL_MEAN/STD`` and resizes to
``INPUT.MIN_SIZE_TRAIN/MAX_SIZE_TRAIN`` in train mode and ``INPUT.MIN_SIZE_TEST/MAX_SIZE_TEST`` in
eval mode (:class:`TrainTestResizeTransform`: ``build_model(cfg).eval()`` predicts at the test
size, with no extra call); detections come back in the input images' px.
Labels follow torchvision: 0 = background, ``contiguous_id + 1`` for classes.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from ..backbone import Backbone, build_backbone
from ..registry import META_ARCH_REGISTRY


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


@META_ARCH_REGISTRY.register("faster_rcnn")
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
    model.transform = TrainTestResizeTransform(
        train_size=(int(cfg.INPUT.MIN_SIZE_TRAIN), int(cfg.INPUT.MAX_SIZE_TRAIN)),
        test_size=(int(cfg.INPUT.MIN_SIZE_TEST), int(cfg.INPUT.MAX_SIZE_TEST)),
        image_mean=list(cfg.MODEL.PIXEL_MEAN), image_std=list(cfg.MODEL.PIXEL_STD),
    )
    return model


class TrainTestResizeTransform(GeneralizedRCNNTransform):
    """torchvision's ``GeneralizedRCNNTransform`` whose resize follows the module mode.

    torchvision's transform has one ``min_size``/``max_size`` for both modes, so a model built
    with the training sizes would silently predict at the training size after ``.eval()``. Here
    the sizes are chosen per call from ``self.training``: ``train_size`` in train mode,
    ``test_size`` in eval mode. This is the single place where the test size is applied (the
    evaluator, :class:`~mdkd_det.engine.DefaultPredictor` and tools only call ``model.eval()``).

    Args:
        train_size, test_size: ``(min_size, max_size)`` in px of the shorter / longer side
            (``INPUT.MIN_SIZE_TRAIN``/``MAX_SIZE_TRAIN`` and ``..._TEST``).
        image_mean, image_std: per-channel normalisation of [0, 1] pixels (``MODEL.PIXEL_*``).

    Shapes: as ``GeneralizedRCNNTransform`` (``list[Tensor[C, H, W]]`` -> ``ImageList``).
    """

    def __init__(self, train_size, test_size, image_mean, image_std) -> None:
        super().__init__(int(train_size[0]), int(train_size[1]), image_mean, image_std)
        self.train_size = (int(train_size[0]), int(train_size[1]))
        self.test_size = (int(test_size[0]), int(test_size[1]))

    def resize(self, image, target=None):
        lo, hi = self.train_size if self.training else self.test_size
        self.min_size, self.max_size = (lo,), hi
        return super().resize(image, target)
