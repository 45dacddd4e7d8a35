"""torchvision backbones with FPN: ResNet-18/34/50 and MobileNetV3-Large.

Source: ``torchvision.models.detection.backbone_utils`` (``_resnet_fpn_extractor``,
``_mobilenet_extractor``). No weights are downloaded unless ``MODEL.BACKBONE.PRETRAINED`` is set.
Output keys: ResNet '0','1','2','3','pool' at strides 4, 8, 16, 32, 64 px; MobileNetV3 '0','1',
'pool' at strides 32, 32, 64 px. Every map has ``MODEL.FPN.OUT_CHANNELS`` channels.
"""

from __future__ import annotations

from torch import nn
from torchvision import models
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _mobilenet_extractor
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops import misc as misc_ops

from ..registry import BACKBONE_REGISTRY
from .base import Backbone, WrappedBackbone
from .pretrained import pretrained_weights_guard

_RESNET_WEIGHTS = {
    "resnet18": models.ResNet18_Weights.IMAGENET1K_V1,
    "resnet34": models.ResNet34_Weights.IMAGENET1K_V1,
    "resnet50": models.ResNet50_Weights.IMAGENET1K_V1,
}


def _norm_layer(name: str):
    if name == "BN":
        return nn.BatchNorm2d
    if name == "FrozenBN":
        return misc_ops.FrozenBatchNorm2d
    raise ValueError(f"MODEL.BACKBONE.NORM must be 'BN' or 'FrozenBN', got '{name}'")


def build_resnet_fpn(cfg, depth_name: str) -> Backbone:
    """ResNet + FPN from ``cfg.MODEL.BACKBONE`` / ``cfg.MODEL.FPN``.

    ``MODEL.BACKBONE.TRAINABLE_LAYERS`` (0..5) freezes stages from the stem upwards, as
    torchvision's ``trainable_backbone_layers``.

    Returns:
        Backbone with keys '0'..'3' and 'pool' (strides 4..64 px), ``MODEL.FPN.OUT_CHANNELS``
        channels each.
    """
    weights = _RESNET_WEIGHTS[depth_name] if cfg.MODEL.BACKBONE.PRETRAINED else None
    with pretrained_weights_guard(weights is not None, f"torchvision {depth_name}"):
        body = getattr(models, depth_name)(weights=weights, norm_layer=_norm_layer(cfg.MODEL.BACKBONE.NORM))
    trainable = int(cfg.MODEL.BACKBONE.TRAINABLE_LAYERS)
    if not 0 <= trainable <= 5:
        raise ValueError(f"MODEL.BACKBONE.TRAINABLE_LAYERS must be in 0..5, got {trainable}")
    train_prefixes = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable]
    if trainable == 5:
        train_prefixes.append("bn1")
    for name, p in body.named_parameters():
        if not any(name.startswith(prefix) for prefix in train_prefixes):
            p.requires_grad_(False)
    c2 = 64 if depth_name in ("resnet18", "resnet34") else 256
    fpn = BackboneWithFPN(
        body,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        in_channels_list=[c2, c2 * 2, c2 * 4, c2 * 8],
        out_channels=int(cfg.MODEL.FPN.OUT_CHANNELS),
        extra_blocks=LastLevelMaxPool(),
    )
    return WrappedBackbone(fpn, fpn.out_channels, in_channels=cfg.INPUT.CHANNELS)


@BACKBONE_REGISTRY.register("resnet18_fpn")
def build_resnet18_fpn(cfg) -> Backbone:
    """ResNet-18 + FPN (torchvision)."""
    return build_resnet_fpn(cfg, "resnet18")


@BACKBONE_REGISTRY.register("resnet34_fpn")
def build_resnet34_fpn(cfg) -> Backbone:
    """ResNet-34 + FPN (torchvision)."""
    return build_resnet_fpn(cfg, "resnet34")


@BACKBONE_REGISTRY.register("resnet50_fpn")
def build_resnet50_fpn(cfg) -> Backbone:
    """ResNet-50 + FPN (torchvision), the paper's Faster R-CNN backbone (A18)."""
    return build_resnet_fpn(cfg, "resnet50")


@BACKBONE_REGISTRY.register("mobilenet_v3_large_fpn")
def build_mobilenet_v3_large_fpn(cfg) -> Backbone:
    """MobileNetV3-Large + FPN (torchvision): keys '0', '1', 'pool' at strides 32, 32, 64 px."""
    weights = models.MobileNet_V3_Large_Weights.IMAGENET1K_V1 if cfg.MODEL.BACKBONE.PRETRAINED else None
    with pretrained_weights_guard(weights is not None, "torchvision mobilenet_v3_large"):
        body = models.mobilenet_v3_large(weights=weights, norm_layer=_norm_layer(cfg.MODEL.BACKBONE.NORM))
    fpn = _mobilenet_extractor(body, True, int(cfg.MODEL.BACKBONE.TRAINABLE_LAYERS) + 1)
    if cfg.MODEL.FPN.OUT_CHANNELS != fpn.out_channels:
        raise ValueError("mobilenet_v3_large_fpn supports MODEL.FPN.OUT_CHANNELS 256 only")
    return WrappedBackbone(fpn, fpn.out_channels, in_channels=cfg.INPUT.CHANNELS)
