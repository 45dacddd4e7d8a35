"""Segmentation encoders as :class:`~mdkd_det.modeling.backbone.Backbone` s (paper §4.2, C43).

Both return an ``OrderedDict`` of every encoder level plus the bottleneck, finest first, so the
shared mechanism reads them unchanged: ``FusionBackbone`` fuses them level by level (C9, C14:
"encoder and bottleneck"), ``DomainAdversarialHead`` reads the deepest map (A11: bottleneck),
the ``Distiller`` pairs student/teacher levels by stride (C15: "all encoder and bottleneck
layers"). Unlike the FPN backbones the channel count differs per level: read it from
``output_shape()``; ``out_channels`` is the bottleneck's.

- ``"unet_encoder"`` (UNet, Ronneberger et al. 2015): ``DEPTH`` x (max-pool + 2 x
  Conv3x3-BN-ReLU); levels ``enc1`` .. ``enc{DEPTH}`` at strides 1, 2, .., 2^(DEPTH-1) with
  ``BASE_CHANNELS * 2^l`` channels, ``bottleneck`` at stride 2^DEPTH.
- ``"tresunet_encoder"`` (TransResUNet, Tomar et al. 2022; paper §4.2): torchvision ResNet-50
  (``weights=None`` unless ``MODEL.BACKBONE.PRETRAINED``) stem / layer1 / layer2 / layer3 give
  ``enc1`` (s2, 64), ``enc2`` (s4, 256), ``enc3`` (s8, 512); the bottleneck (s16) is layer3
  (1024) -> Conv1x1 to ``TRANSFORMER_DIM`` -> ``TRANSFORMER_LAYERS`` pre-norm transformer encoder
  layers over the H/16 x W/16 tokens (learned positional embedding, resized to the grid) ->
  a dilated-convolution block (parallel 3x3 convs with ``DILATIONS``, summed, + residual).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from ..backbone.base import Backbone
from ..registry import BACKBONE_REGISTRY

__all__ = ["ConvBlock", "UNetEncoder", "TResUNetEncoder"]


class ConvBlock(nn.Sequential):
    """``(Conv3x3 -> BN -> ReLU) x 2``, the UNet double convolution. ``[B, C_in, H, W] ->
    [B, C_out, H, W]``; ``dilation`` widens both convs (padding = dilation keeps H, W)."""

    def __init__(self, in_ch: int, out_ch: int, dilation: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True),
        )


class UNetEncoder(Backbone):
    """UNet contracting path.

    Args:
        in_channels: input channels C.
        base_channels: channels of ``enc1`` (paper UNet: 64; CPU demo: 16).
        depth: number of 2x down-samplings (4: levels at strides 1..8 and bottleneck at 16).

    Shapes:
        forward(x: Tensor[B, C, H, W]) -> OrderedDict(enc1 [B, c, H, W], enc2 [B, 2c, H/2, W/2],
        ..., bottleneck [B, c * 2^depth, H/2^depth, W/2^depth]); H and W must be multiples of
        2^depth (``size_divisibility``; the segmenter pads).

    Raises:
        ValueError: ``depth`` < 1 or ``base_channels`` < 1.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 16, depth: int = 4) -> None:
        super().__init__()
        if depth < 1 or base_channels < 1:
            raise ValueError(f"UNetEncoder: depth and base_channels must be >= 1, got {depth}, {base_channels}")
        chans = [base_channels * 2 ** i for i in range(depth + 1)]
        self.blocks = nn.ModuleList([ConvBlock(in_channels, chans[0])])
        self.blocks.extend(ConvBlock(chans[i], chans[i + 1]) for i in range(depth))
        self.names = [f"enc{i + 1}" for i in range(depth)] + ["bottleneck"]
        for i, name in enumerate(self.names):
            self._out_feature_channels[name] = chans[i]
            self._out_feature_strides[name] = 2 ** i
        self.out_channels = chans[-1]

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        out = OrderedDict()
        for i, (name, block) in enumerate(zip(self.names, self.blocks)):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            out[name] = x
        return out


class DilatedBlock(nn.Module):
    """Sum of parallel 3x3 convs with the given dilations (+ BN, ReLU) and a residual:
    ``x + ReLU(BN(sum_d Conv3x3_d(x)))``. ``[B, C, H, W] -> [B, C, H, W]``."""

    def __init__(self, channels: int, dilations: Sequence[int] = (1, 2, 3)) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(channels, channels, 3, padding=int(d), dilation=int(d), bias=False) for d in dilations)
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.relu(self.norm(sum(conv(x) for conv in self.convs)))


class TResUNetEncoder(Backbone):
    """ResNet-50 encoder + transformer bottleneck + dilated convs (TResUNet, paper §4.2).

    Args:
        in_channels: input channels (3 uses torchvision's stem as is).
        dim: transformer width (channels of the bottleneck map).
        layers, heads: transformer encoder layers and attention heads (``dim % heads == 0``).
        dilations: dilation rates of the bottleneck's dilated block.
        pretrained: load torchvision ImageNet ResNet-50 weights (needs them cached; off here).
        max_tokens_side: side of the learned positional-embedding grid (bilinearly resized to
            the actual H/16 x W/16 grid).

    Shapes:
        forward(x: Tensor[B, C, H, W]) -> OrderedDict(enc1 [B, 64, H/2, W/2], enc2 [B, 256, H/4,
        W/4], enc3 [B, 512, H/8, W/8], bottleneck [B, dim, H/16, W/16]).

    Raises:
        ValueError: ``dim`` not divisible by ``heads``.
    """

    def __init__(self, in_channels: int = 3, dim: int = 256, layers: int = 2, heads: int = 4,
                 dilations: Sequence[int] = (1, 2, 3), pretrained: bool = False,
                 max_tokens_side: int = 16) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"TResUNetEncoder: TRANSFORMER_DIM {dim} must be divisible by TRANSFORMER_HEADS {heads}")
        r = models.resnet50(weights=models.ResNet50_Weights.IMAGENET1K_V1 if pretrained else None)
        if in_channels != 3:
            r.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.stem = nn.Sequential(r.conv1, r.bn1, r.relu)
        self.layer1 = nn.Sequential(r.maxpool, r.layer1)
        self.layer2, self.layer3 = r.layer2, r.layer3
        self.reduce = nn.Sequential(nn.Conv2d(1024, dim, 1, bias=False), nn.BatchNorm2d(dim), nn.ReLU(inplace=True))
        self.pos = nn.Parameter(torch.zeros(1, dim, max_tokens_side, max_tokens_side))
        nn.init.trunc_normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.dilated = DilatedBlock(dim, dilations)
        for name, ch, s in (("enc1", 64, 2), ("enc2", 256, 4), ("enc3", 512, 8), ("bottleneck", dim, 16)):
            self._out_feature_channels[name] = ch
            self._out_feature_strides[name] = s
        self.out_channels = dim

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        e1 = self.stem(x)
        e2 = self.layer1(e1)
        e3 = self.layer2(e2)
        b = self.reduce(self.layer3(e3))
        h, w = b.shape[-2:]
        pos = self.pos if self.pos.shape[-2:] == (h, w) else F.interpolate(
            self.pos, size=(h, w), mode="bilinear", align_corners=False)
        tokens = (b + pos).flatten(2).transpose(1, 2)  # [B, h*w, dim]
        b = self.transformer(tokens).transpose(1, 2).reshape(b.shape)
        return OrderedDict(enc1=e1, enc2=e2, enc3=e3, bottleneck=self.dilated(b))


@BACKBONE_REGISTRY.register("unet_encoder")
def build_unet_encoder(cfg) -> UNetEncoder:
    """``UNetEncoder(INPUT.CHANNELS, MODEL.SEG.BASE_CHANNELS, MODEL.SEG.DEPTH)``."""
    return UNetEncoder(int(cfg.INPUT.CHANNELS), int(cfg.MODEL.SEG.BASE_CHANNELS), int(cfg.MODEL.SEG.DEPTH))


@BACKBONE_REGISTRY.register("tresunet_encoder")
def build_tresunet_encoder(cfg) -> TResUNetEncoder:
    """``TResUNetEncoder`` from ``MODEL.SEG.TRANSFORMER_*`` / ``DILATIONS`` and
    ``MODEL.BACKBONE.PRETRAINED``."""
    from ..backbone.pretrained import pretrained_weights_guard

    s = cfg.MODEL.SEG
    with pretrained_weights_guard(bool(cfg.MODEL.BACKBONE.PRETRAINED), "torchvision resnet50 (TResUNet)"):
        return TResUNetEncoder(int(cfg.INPUT.CHANNELS), dim=int(s.TRANSFORMER_DIM), layers=int(s.TRANSFORMER_LAYERS),
                               heads=int(s.TRANSFORMER_HEADS), dilations=tuple(int(d) for d in s.DILATIONS),
                               pretrained=bool(cfg.MODEL.BACKBONE.PRETRAINED))
