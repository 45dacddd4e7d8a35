"""RF-DETR detector on any registry backbone (detector registry entry ``"rfdetr"``).

Source: ``rfdetr`` (Apache-2.0, v1.11.x; engineering_notes §4), imported and used unmodified:
``LWDETR`` (transformer decoder, two-stage query selection, heads, ``group_detr`` query groups),
``SetCriterion`` + ``HungarianMatcher`` (focal/IA-BCE class loss + L1 + GIoU, paper Eq. 18;
decision A17: rfdetr's weights 1/5/2) and ``PostProcess`` (top-k over query x class).

What we add is the boundary to our pipeline:

- :class:`RFDETRTransform` (``model.transform``): images ``list[Tensor[C, H, W]]`` in [0, 1] ->
  normalised square ``Tensor[B, 3, R, R]`` (R = ``MODEL.RFDETR.RESOLUTION``), targets (xyxy px,
  labels 1..K) -> rfdetr targets (cxcywh in [0, 1], labels 0..K-1; :mod:`.rfdetr_boxes`).
- ``model.backbone``: a :class:`~mdkd_det.modeling.backbone.Backbone` whose maps are the
  decoder's input ("projector-level maps"): rfdetr's DINOv2 + projector (``"rfdetr_dinov2"``,
  the plain RF-DETR) or any ``BACKBONE_REGISTRY`` entry with ``MODEL.RFDETR.IN_FEATURES``
  selected (the "plugin head", e.g. ResNet-18 FPN at strides 8/16 px, or the Stage-2
  ``FusionBackbone``). The LW-DETR's own ``backbone`` (a ``Joiner``) keeps rfdetr's position
  embedding and gets a :class:`FeatureBridge` that calls ``model.backbone``, so forward hooks on
  ``model.backbone`` see every feature computation (KD, domain-adversarial heads).
- outputs: train mode ``{loss name: weighted 0-dim loss}`` (``criterion.weight_dict`` applied:
  loss_ce, loss_bbox, loss_giou and their ``_0.._{L-2}`` / ``_enc`` auxiliary terms); eval mode
  ``list[dict(boxes [N, 4] xyxy px of each input image, scores [N], labels [N] in 1..K)]``.

So our trainer, hooks, checkpointer, DatasetMapper and COCOEvaluator work unchanged.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.image_list import ImageList

from ...utils.checkpoint_io import load_checkpoint_file
from ...utils.errors import CheckpointError, ConfigError
from ..backbone import Backbone, build_backbone
from ..backbone.rfdetr_dinov2 import RFDETRDinoV2Backbone, import_rfdetr, rfdetr_model_config
from ..registry import META_ARCH_REGISTRY
from .rfdetr_boxes import LABEL_OFFSET, to_rfdetr_targets

__all__ = ["RFDETRDetector", "RFDETRTransform", "LevelSelect", "FeatureBridge", "build_rfdetr",
           "to_lwdetr_state_dict", "from_lwdetr_state_dict"]

logger = logging.getLogger(__name__)


class RFDETRTransform(nn.Module):
    """Resize to a square R x R (bilinear), normalise, convert targets (see module docstring).

    Args:
        resolution: R in px (rfdetr trains and predicts at a fixed square size).
        mean, std: per-channel normalisation of [0, 1] pixels (``MODEL.PIXEL_MEAN/STD``).

    ``min_size`` / ``max_size`` exist so code written for torchvision's transform runs
    unchanged; they are informational (R is fixed in train and eval mode).

    Shapes:
        forward(images: list[Tensor[C, H_i, W_i]] in [0, 1], targets=None) ->
        ``(ImageList(Tensor[B, 3, R, R], [(R, R)] * B), rfdetr targets or None)``.
        Grey images (C = 1) are replicated to 3 channels.
    """

    def __init__(self, resolution: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.resolution = int(resolution)
        self.min_size = (self.resolution,)
        self.max_size = self.resolution
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1), persistent=False)

    def forward(self, images: Sequence[torch.Tensor], targets=None):
        r = self.resolution
        batch = []
        for img in images:
            if img.dim() != 3:
                raise ValueError(f"RF-DETR expects images [C, H, W], got shape {tuple(img.shape)}")
            if img.shape[0] == 1 and self.mean.shape[0] == 3:
                img = img.expand(3, -1, -1)
            x = F.interpolate(img[None].float(), size=(r, r), mode="bilinear", align_corners=False)[0]
            batch.append((x - self.mean) / self.std)
        tensors = torch.stack(batch)
        rf_targets = None
        if targets is not None:
            rf_targets = to_rfdetr_targets(targets, [tuple(i.shape[-2:]) for i in images])
        return ImageList(tensors, [(r, r)] * len(batch)), rf_targets


class LevelSelect(Backbone):
    """The ``names`` maps of ``inner`` (a :class:`Backbone`), same keys/strides/channels.

    ``inner``'s submodules are registered as this module's own children, so the state-dict
    keys are exactly ``inner``'s (a Stage-1 teacher checkpoint loads into a plain backbone of
    its registry name, e.g. in ``FusionBackbone``). ``train()`` reaches those children as usual;
    frozen teachers among them stay in ``eval()`` by
    :func:`~mdkd_det.modeling.frozen_teacher.freeze_teacher`.

    Raises:
        ConfigError: a name that is not one of ``inner``'s maps.
    """

    def __init__(self, inner: Backbone, names: Sequence[str]) -> None:
        super().__init__()
        shapes = inner.output_shape()
        missing = [n for n in names if n not in shapes]
        if missing:
            raise ConfigError(f"MODEL.RFDETR.IN_FEATURES {missing} are not maps of the backbone "
                              f"{type(inner).__name__} (maps: {list(shapes)})")
        self._inner = [inner]
        for child_name, child in inner.named_children():
            self.add_module(child_name, child)
        self.names = list(names)
        self.out_channels = int(inner.out_channels)
        for n in self.names:
            self._out_feature_channels[n] = int(shapes[n].channels)
            self._out_feature_strides[n] = int(shapes[n].stride)

    @property
    def inner(self) -> Backbone:
        """The wrapped backbone (e.g. a ``FusionBackbone`` with ``fusion_parameters()``)."""
        return self._inner[0]

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        if hasattr(self.inner, "forward_levels"):  # e.g. FusionBackbone: fuse these levels only
            return self.inner.forward_levels(x, self.names)
        feats = self.inner(x)
        return OrderedDict((n, feats[n]) for n in self.names)


class FeatureBridge(nn.Module):
    """Stands in for rfdetr's ``Backbone`` inside the LW-DETR ``Joiner``: calls our backbone
    (held outside the module tree, so its parameters are registered once, under
    ``model.backbone``) and wraps each map with its padding mask as rfdetr's ``NestedTensor``.

    Shapes:
        forward(NestedTensor(tensors [B, 3, R, R], mask [B, R, R])) ->
        ``(list[NestedTensor([B, C, R/s, R/s], [B, R/s, R/s])], None)``.
    """

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self._backbone = [backbone]

    def forward(self, tensor_list):
        from rfdetr.utilities.tensors import NestedTensor

        feats = self._backbone[0](tensor_list.tensors)
        mask = tensor_list.mask
        no_pad = bool(getattr(tensor_list, "no_padding", False))
        out = []
        for f in feats.values():
            m = F.interpolate(mask[None].float(), size=f.shape[-2:]).to(torch.bool)[0]
            out.append(NestedTensor(f, m, no_pad))
        return out, None


class RFDETRDetector(nn.Module):
    """RF-DETR with our model contract (module docstring).

    Args:
        backbone: projector-level maps (:class:`Backbone`), channels = ``hidden_dim``.
        lwdetr: an ``rfdetr.models.lwdetr.LWDETR`` built with as many projector levels as
            ``backbone`` has maps; its ``backbone[0]`` is replaced by a :class:`FeatureBridge`.
        criterion: rfdetr ``SetCriterion`` (Hungarian matcher inside).
        postprocess: rfdetr ``PostProcess``.
        transform: :class:`RFDETRTransform`.
        num_classes: K foreground classes.

    Attributes:
        num_queries, group_detr, hidden_dim: of the decoder (KD adapters read them).
    """

    def __init__(self, backbone: Backbone, lwdetr: nn.Module, criterion: nn.Module,
                 postprocess: nn.Module, transform: RFDETRTransform, num_classes: int) -> None:
        super().__init__()
        from rfdetr.models.backbone import Joiner

        self.transform = transform
        self.backbone = backbone
        lwdetr.backbone = Joiner(FeatureBridge(backbone), lwdetr.backbone[1])
        self.detr = lwdetr
        self.criterion = criterion
        self.postprocess = postprocess
        self.num_classes = int(num_classes)
        self.num_queries = int(lwdetr.num_queries)
        self.group_detr = int(lwdetr.group_detr)
        self.hidden_dim = int(lwdetr.transformer.d_model)

    @property
    def kd_embedding_dim(self) -> int:
        """Size of the decoder query embeddings (ROIKD; paper_notes A10)."""
        return self.hidden_dim

    def forward(self, images: Sequence[torch.Tensor], targets: Optional[List[Dict[str, torch.Tensor]]] = None):
        """Train: weighted loss dict (Eq. 18). Eval: detections in input-image px (module doc).

        Raises:
            ValueError: train mode without targets, or bad targets (from the box conversion).
        """
        if self.training and targets is None:
            raise ValueError("RFDETRDetector in train mode needs targets")
        sizes = [tuple(int(s) for s in img.shape[-2:]) for img in images]
        image_list, rf_targets = self.transform(images, targets if self.training else None)
        if self.training:
            out = self.detr(image_list.tensors, rf_targets)
            losses = self.criterion(out, rf_targets)
            w = self.criterion.weight_dict
            return {k: v * w[k] for k, v in losses.items() if k in w}
        return self.detections(self.detr(image_list.tensors), sizes)

    def detections(self, out: Dict[str, torch.Tensor], sizes: Sequence[tuple]) -> List[Dict[str, torch.Tensor]]:
        """rfdetr outputs -> ``list[dict(boxes xyxy px, scores, labels 1..K)]`` for images of
        ``sizes`` ``[(h, w)]`` px (the never-targeted extra logit is dropped first)."""
        logits = out["pred_logits"][..., : self.num_classes]
        target_sizes = torch.tensor(sizes, device=logits.device)
        res = self.postprocess({"pred_logits": logits, "pred_boxes": out["pred_boxes"]}, target_sizes)
        return [{"boxes": r["boxes"], "scores": r["scores"], "labels": r["labels"] + LABEL_OFFSET}
                for r in res]


def _projector_scale(names: Sequence[str]) -> List[str]:
    """rfdetr ``projector_scale`` for a plugin backbone with maps ``names``: only the number of
    levels matters to the decoder (deformable attention over normalised reference points, any
    strides), so levels are labelled P3, P4, P5 in order."""
    if not 1 <= len(names) <= 3:
        raise ConfigError(f"MODEL.RFDETR.IN_FEATURES {list(names)}: the RF-DETR decoder takes 1 to 3 "
                          "feature levels (rfdetr projector_scale P3-P5)")
    return ["P3", "P4", "P5"][: len(names)]


def to_lwdetr_state_dict(state_dict: Dict[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """Our ``RFDETRDetector`` state dict (``"rfdetr_dinov2"`` backbone) -> the keys of a plain
    rfdetr ``LWDETR`` (``RFDETRNano(...).model.model``): ``backbone.body.X`` ->
    ``backbone.0.X``, ``detr.Y`` -> ``Y``; criterion keys are dropped."""
    out = OrderedDict()
    for k, v in state_dict.items():
        if k.startswith("backbone.body."):
            out["backbone.0." + k[len("backbone.body."):]] = v
        elif k.startswith("detr."):
            out[k[len("detr."):]] = v
    return out


def from_lwdetr_state_dict(state_dict: Dict[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """Inverse of :func:`to_lwdetr_state_dict` (an rfdetr checkpoint's ``"model"`` -> ours)."""
    out = OrderedDict()
    for k, v in state_dict.items():
        if k.startswith("backbone.0."):
            out["backbone.body." + k[len("backbone.0."):]] = v
        elif not k.startswith("backbone."):
            out["detr." + k] = v
    return out


def _load_pretrained(model: RFDETRDetector, path: str, trust: bool = False) -> None:
    """Load an rfdetr checkpoint (``{"model": LWDETR state dict, "args": Namespace, ...}``)
    where names and shapes match (a COCO head with another class count is skipped), logging
    what was skipped. Read by the safe loader, whose allow-list covers rfdetr's format.

    Raises:
        CheckpointError: missing, unreadable or refused file; no state dict; nothing matches.
    """
    ckpt = load_checkpoint_file(path, trust=trust, what="MODEL.RFDETR.PRETRAIN_WEIGHTS")
    sd = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict):
        raise CheckpointError(f"MODEL.RFDETR.PRETRAIN_WEIGHTS '{path}' holds no state dict")
    ours = model.state_dict()
    mapped = from_lwdetr_state_dict(sd)
    keep = {k: v for k, v in mapped.items() if k in ours and ours[k].shape == v.shape}
    if not keep:
        raise CheckpointError(f"MODEL.RFDETR.PRETRAIN_WEIGHTS '{path}' matches no parameter")
    model.load_state_dict(keep, strict=False)
    logger.info("RF-DETR pretrained weights %s: loaded %d tensors, skipped %d (name/shape)",
                path, len(keep), len(mapped) - len(keep))


@META_ARCH_REGISTRY.register("rfdetr")
def build_rfdetr(cfg, backbone: Optional[Backbone] = None) -> RFDETRDetector:
    """Build an RF-DETR from ``cfg`` (detector registry entry ``"rfdetr"``).

    ``MODEL.BACKBONE.NAME`` ``"rfdetr_dinov2"`` gives the plain RF-DETR (variant
    ``MODEL.RFDETR.VARIANT``); any other registry backbone gives the plugin head over its
    ``MODEL.RFDETR.IN_FEATURES`` maps ([] = all but ``pool``; 1 to 3 maps, any strides), which
    must have ``hidden_dim`` channels. ``MODEL.RFDETR.PRETRAIN_WEIGHTS`` ("" = none, the
    default) loads an rfdetr checkpoint by name and shape. ``MODEL.RFDETR.BACKBONE_INIT`` ("" =
    none) initialises the backbone (not a ``fusion`` one) from any of our detector checkpoints
    with the same backbone (e.g. a Faster R-CNN trained on the target: the CPU protocol).
    ``MODEL.HEAD_INIT`` (any family; :func:`~mdkd_det.engine.defaults.build_model`) loads the
    decoder + heads of an RF-DETR checkpoint.

    Args:
        cfg: config (MODEL.*, INPUT.*).
        backbone: a prebuilt backbone (e.g. shared by a multi-head model, or a FusionBackbone).

    Raises:
        ConfigError: bad variant/resolution, unknown or mis-sized IN_FEATURES.
    """
    import_rfdetr()
    from rfdetr.config import TrainConfig
    from rfdetr.models.lwdetr import build_criterion_from_config, build_model_from_config
    from rfdetr.models.postprocess import PostProcess

    backbone = backbone if backbone is not None else build_backbone(cfg)
    init = str(cfg.MODEL.RFDETR.BACKBONE_INIT)
    trust = bool(cfg.MODEL.TRUST_CHECKPOINTS)
    if init and cfg.MODEL.BACKBONE.NAME != "fusion":
        from ..fusion import load_teacher_backbone

        load_teacher_backbone(backbone, init, trust=trust)  # strict on the backbone keys; names the file
        logger.info("RF-DETR backbone initialised from %s", init)
    shapes = backbone.output_shape()
    names = list(cfg.MODEL.RFDETR.IN_FEATURES) or [k for k in shapes if k != "pool"]
    sel = backbone if names == list(shapes) else LevelSelect(backbone, names)
    sel_shapes = sel.output_shape()
    scale = _projector_scale(names)
    mc = rfdetr_model_config(cfg, None if isinstance(backbone, RFDETRDinoV2Backbone) else scale)
    bad = {n: s.channels for n, s in sel_shapes.items() if s.channels != mc.hidden_dim}
    if bad:
        raise ConfigError(f"RF-DETR decoder width is {mc.hidden_dim}; backbone maps {bad} have other "
                          "channel counts (set MODEL.FPN.OUT_CHANNELS / FUSION.OUT_CHANNELS to it)")
    lw = build_model_from_config(mc)
    criterion, _ = build_criterion_from_config(mc, TrainConfig(dataset_dir=".", output_dir="."))
    k = int(cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    post = PostProcess(num_select=min(int(cfg.MODEL.ROI_HEADS.DETECTIONS_PER_IMG), mc.num_queries * k))
    transform = RFDETRTransform(mc.resolution, cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD)
    if isinstance(backbone, RFDETRDinoV2Backbone) and sel_shapes.keys() != {s.lower() for s in mc.projector_scale}:
        raise ConfigError("rfdetr_dinov2 backbone and MODEL.RFDETR.PROJECTOR_SCALE disagree")
    model = RFDETRDetector(sel, lw, criterion, post, transform, k)
    if cfg.MODEL.RFDETR.PRETRAIN_WEIGHTS:
        _load_pretrained(model, cfg.MODEL.RFDETR.PRETRAIN_WEIGHTS, trust)
    return model


#: RF-DETR takes the pipeline's ``backbone_init`` checkpoint here (:func:`~mdkd_det.modeling.build.backbone_init_key`).
build_rfdetr.backbone_init_key = "MODEL.RFDETR.BACKBONE_INIT"
