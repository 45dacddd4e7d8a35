"""UNet-style decoder over any multi-level encoder map dict (paper §4.2; §3.2 "new decoder").

Reads ``backbone.output_shape()`` only, so the same class decodes a UNet encoder, a TResUNet
encoder and the joint teacher's ``FusionBackbone`` (whose fused maps keep the teacher's levels;
paper C9: fused maps "feed a new decoder trained from scratch").
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .encoders import ConvBlock

__all__ = ["UNetDecoder", "ResidualBlock", "DECODER_BLOCKS"]


class ResidualBlock(nn.Module):
    """``ReLU(ConvBlock(x) + Conv1x1-BN(x))``: the residual decoder block of TResUNet.
    ``[B, C_in, H, W] -> [B, C_out, H, W]``."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.body = ConvBlock(in_ch, out_ch)
        self.short = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.short(x))


#: decoder block per ``MODEL.META_ARCHITECTURE``-style name.
DECODER_BLOCKS = {"unet": ConvBlock, "tresunet": ResidualBlock}


class UNetDecoder(nn.Module):
    """Expanding path: from the deepest map up, ``x = block(concat[upsample(x), skip])`` with
    ``skip`` the next finer level; then ``Conv1x1 -> 1`` logit map, bilinearly upsampled to the
    input size when the finest level has stride > 1 (TResUNet).

    Args:
        shapes: ``{level: ShapeSpec}`` in forward order (finest first, bottleneck last).
        block: ``"unet"`` (double conv) or ``"tresunet"`` (residual block).

    Shapes:
        forward(feats: OrderedDict[level, Tensor[B, C_l, H/s_l, W/s_l]], size=(H, W)) ->
        Tensor[B, 1, H, W] logits.

    Raises:
        ValueError: fewer than two levels or an unknown ``block``.
    """

    def __init__(self, shapes: Mapping, block: str = "unet") -> None:
        super().__init__()
        if block not in DECODER_BLOCKS:
            raise ValueError(f"UNetDecoder: block must be one of {sorted(DECODER_BLOCKS)}, got {block!r}")
        self.names = list(shapes)
        if len(self.names) < 2:
            raise ValueError(f"UNetDecoder needs at least two levels, got {self.names}")
        chans = [int(shapes[n].channels) for n in self.names]
        make = DECODER_BLOCKS[block]
        self.blocks = nn.ModuleList()
        c = chans[-1]
        for skip_c in reversed(chans[:-1]):
            self.blocks.append(make(c + skip_c, skip_c))
            c = skip_c
        self.head = nn.Conv2d(c, 1, 1)

    def forward(self, feats: Mapping[str, torch.Tensor], size=None) -> torch.Tensor:
        maps = [feats[n] for n in self.names]
        x = maps[-1]
        for blk, skip in zip(self.blocks, reversed(maps[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = blk(torch.cat([x, skip], dim=1))
        logits = self.head(x)
        if size is not None and tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
        return logits
