"""Any timm model as an FPN backbone, through timm's ``features_only`` API.

Source: ``timm.create_model(name, features_only=True, out_indices=...)`` for the body and
torchvision's ``FeaturePyramidNetwork`` + ``LastLevelMaxPool`` for the pyramid. Output keys
'0'..'n-1' and 'pool'; strides come from ``feature_info.reduction()``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from ..registry import BACKBONE_REGISTRY
from .base import Backbone, WrappedBackbone


class _TimmFPNBody(nn.Module):
    def __init__(self, body: nn.Module, out_channels: int) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            body.feature_info.channels(), out_channels, extra_blocks=LastLevelMaxPool()
        )

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


@BACKBONE_REGISTRY.register("timm_fpn")
def build_timm_fpn(cfg) -> Backbone:
    """timm model ``MODEL.BACKBONE.TIMM_NAME`` (``features_only``) + FPN.

    Raises:
        ConfigError: unknown timm model name (with close matches), or
            ``MODEL.BACKBONE.PRETRAINED True`` without the weights (offline).
    """
    from .pretrained import create_timm_model

    body = create_timm_model(
        cfg.MODEL.BACKBONE.TIMM_NAME,
        pretrained=bool(cfg.MODEL.BACKBONE.PRETRAINED),
        features_only=True,
        out_indices=tuple(cfg.MODEL.BACKBONE.TIMM_OUT_INDICES),
        in_chans=int(cfg.INPUT.CHANNELS),
    )
    module = _TimmFPNBody(body, int(cfg.MODEL.FPN.OUT_CHANNELS))
    return WrappedBackbone(module, int(cfg.MODEL.FPN.OUT_CHANNELS), in_channels=cfg.INPUT.CHANNELS)
