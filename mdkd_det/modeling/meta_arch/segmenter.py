"""Encoder-decoder segmenters "unet" and "tresunet" (paper §4.2) in ``META_ARCH_REGISTRY``.

The model follows the detectors' train/eval contract, so the shared trainers, hooks, KD mixin
and pipeline run it unchanged:

- input: ``images: list[Tensor[C, H, W]]`` in [0, 1] (all of one size), normalised inside with
  ``MODEL.PIXEL_MEAN/STD`` (as torchvision's detection transform does), zero-padded to the
  backbone's ``size_divisibility``;
- train: ``model(images, targets) -> {"loss_dice"[, "loss_bce"]}`` (``targets[i]["masks"]``
  ``[1, H, W]`` binary), Dice (Eq. 1, teachers) or DiceBCE (Eq. 10, students) by
  ``MODEL.SEG.LOSS``;
- eval: ``model(images) -> [{"sem_seg": Tensor[1, H, W] foreground probability}]``;
- ``.backbone``: a :class:`~mdkd_det.modeling.backbone.Backbone` with encoder levels and the
  bottleneck (``MODEL.BACKBONE.NAME``: ``unet_encoder``, ``tresunet_encoder`` or ``fusion``
  for the joint teacher, whose decoder is new and trained from scratch, §3.2);
- KD: the ``"encoder_features"`` adapter (``ADAPTER_FOR_ARCH`` in :mod:`mdkd_det.distill.trainer`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...utils.errors import ConfigError
from ..backbone import Backbone, build_backbone
from ..registry import META_ARCH_REGISTRY
from ..seg.decoder import UNetDecoder
from ..seg.losses import seg_task_losses

__all__ = ["EncoderDecoderSegmenter", "build_unet", "build_tresunet"]


class EncoderDecoderSegmenter(nn.Module):
    """Binary segmenter = backbone (encoder levels + bottleneck) + :class:`UNetDecoder`.

    Args:
        backbone: multi-level :class:`Backbone`.
        block: decoder block, ``"unet"`` or ``"tresunet"``.
        pixel_mean, pixel_std: per-channel normalisation of [0, 1] inputs.
        loss: ``"dice"`` or ``"dice_bce"``; smooth: Dice smoothing (C16).

    Raises:
        ValueError: images of different sizes or channel counts in one batch; missing masks
            in training.
    """

    def __init__(self, backbone: Backbone, block: str, pixel_mean: Sequence[float],
                 pixel_std: Sequence[float], loss: str = "dice_bce", smooth: float = 1.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.decoder = UNetDecoder(backbone.output_shape(), block=block)
        self.loss_kind = loss
        self.smooth = float(smooth)
        self.register_buffer("pixel_mean", torch.tensor(list(pixel_mean)).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(list(pixel_std)).view(1, -1, 1, 1), persistent=False)

    def preprocess(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """Stack, normalise, pad: ``list[Tensor[C, H, W]] -> Tensor[B, C, H', W']`` with H', W'
        multiples of ``backbone.size_divisibility``."""
        sizes = {tuple(im.shape) for im in images}
        if len(sizes) != 1:
            raise ValueError(f"segmenter: images of one batch must share one shape, got {sorted(sizes)}")
        x = torch.stack(list(images))
        if x.shape[1] != self.pixel_mean.shape[1]:
            raise ValueError(f"segmenter: images have {x.shape[1]} channels, MODEL.PIXEL_MEAN has "
                             f"{self.pixel_mean.shape[1]} (set INPUT.CHANNELS accordingly)")
        x = (x - self.pixel_mean) / self.pixel_std
        d = int(self.backbone.size_divisibility or 1)
        ph, pw = (-x.shape[-2]) % d, (-x.shape[-1]) % d
        return F.pad(x, (0, pw, 0, ph)) if ph or pw else x

    def backbone_features(self, images: Sequence[torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
        """Encoder levels + bottleneck of ``images`` (the discriminator's input with r = 0)."""
        return self.backbone(self.preprocess(images))

    def forward(self, images: Sequence[torch.Tensor], targets: Optional[List[Dict]] = None):
        h, w = images[0].shape[-2:]
        x = self.preprocess(images)
        logits = self.decoder(self.backbone(x), size=x.shape[-2:])[..., :h, :w]
        if self.training:
            if targets is None or any("masks" not in t for t in targets):
                raise ValueError("segmenter: training needs targets with 'masks' [1, H, W]")
            masks = torch.stack([t["masks"].to(logits.dtype) for t in targets])
            return seg_task_losses(logits, masks, self.loss_kind, self.smooth)
        return [{"sem_seg": p} for p in torch.sigmoid(logits)]


_ENCODER_OF = {"unet": "unet_encoder", "tresunet": "tresunet_encoder"}


def _build(cfg, block: str, backbone: Optional[Backbone]) -> EncoderDecoderSegmenter:
    name = cfg.MODEL.BACKBONE.NAME
    if backbone is None:
        if name not in (_ENCODER_OF[block], "fusion"):
            raise ConfigError(f"MODEL.META_ARCHITECTURE '{block}' needs MODEL.BACKBONE.NAME "
                              f"'{_ENCODER_OF[block]}' (or 'fusion' for a joint teacher), got '{name}'")
        backbone = build_backbone(cfg)
    return EncoderDecoderSegmenter(backbone, block, cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD,
                                   loss=str(cfg.MODEL.SEG.LOSS), smooth=float(cfg.MODEL.SEG.DICE_SMOOTH))


@META_ARCH_REGISTRY.register("unet")
def build_unet(cfg, backbone: Optional[Backbone] = None) -> EncoderDecoderSegmenter:
    """UNet (``unet_encoder`` + double-conv decoder); ``backbone`` overrides (e.g. fusion).

    Raises:
        ConfigError: ``MODEL.BACKBONE.NAME`` is not ``unet_encoder`` or ``fusion``.
    """
    return _build(cfg, "unet", backbone)


@META_ARCH_REGISTRY.register("tresunet")
def build_tresunet(cfg, backbone: Optional[Backbone] = None) -> EncoderDecoderSegmenter:
    """TResUNet (``tresunet_encoder`` + residual decoder, §4.2); ``backbone`` overrides.

    Raises:
        ConfigError: ``MODEL.BACKBONE.NAME`` is not ``tresunet_encoder`` or ``fusion``.
    """
    return _build(cfg, "tresunet", backbone)
