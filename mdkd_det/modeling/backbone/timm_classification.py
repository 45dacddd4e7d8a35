"""Classification backbones from timm under the :class:`Backbone` contract (issue 5; C43, A16).

A timm classifier body is run with ``forward_intermediates`` (timm >= 1.0): the maps of chosen
stages plus the final pre-pooling map (EfficientNet's ``conv_head``, Next-ViT's final norm) are
returned as an ``OrderedDict`` in depth order, the last level named ``"head"``. So the same
registry, ``FusionBackbone``, ``DomainAdversarialHead`` (deepest level) and Distiller see a
classifier exactly like a detector backbone. Unlike an FPN, levels keep their own channel
counts (``output_shape()`` gives them); ``out_channels`` is the last level's (what the classifier
head reads).

Registered (``BACKBONE_REGISTRY``):

- ``"efficientnet_b0"``: timm ``efficientnet_b0``; levels ``blocks2`` (40 ch, stride 8),
  ``blocks4`` (112, 16), ``blocks5`` (192, 32), ``blocks6`` (320, 32), ``head`` (1280, 32): the
  last MBConv stages and the conv head (A16: the student's last k levels are distilled).
- ``"medvit"``: a MedViT-style CNN-Transformer hybrid. MedViT (Manzari et al. 2023) stacks
  convolution blocks (ECB) and local transformer blocks (LTB, efficient MHSA + convolutional
  mixing) in four stages, a design taken from Next-ViT (NCB / NTB blocks); timm ships Next-ViT,
  so we use timm's ``NextViT`` with compact depths ``MODEL.CLASSIFIER.MEDVIT_DEPTHS`` (default
  [1, 1, 5, 1], about 14 M parameters). Levels ``stages1`` (256 ch, stride 8), ``stages2``
  (512, 16), ``head`` (1024, 32, the normalised last stage).

``MODEL.BACKBONE.PRETRAINED`` is honoured only where timm has cached weights (none here; A16
problem 4: random init is the paper's setting).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

from ..registry import BACKBONE_REGISTRY
from .base import Backbone


class TimmClassificationBackbone(Backbone):
    """Multi-level maps of a timm classifier via ``forward_intermediates``.

    Args:
        model: a timm model with ``forward_intermediates`` (``num_classes=0``).
        indices: intermediate indices to keep (timm's numbering for ``extra_blocks``).
        names: one name per kept index.
        extra_blocks: passed to ``forward_intermediates`` (EfficientNet: every block stage).
        in_channels: input channels C of the probe; probe_size: probe side (px).

    Shapes:
        forward(x: Tensor[B, C, H, W]) -> OrderedDict[name, Tensor[B, C_l, H/s_l, W/s_l]], last
        key ``"head"`` (the pre-pooling map of the classifier).

    Raises:
        ValueError: ``indices`` and ``names`` differ in length.
    """

    def __init__(self, model: nn.Module, indices: Sequence[int], names: Sequence[str],
                 extra_blocks: bool = False, in_channels: int = 3, probe_size: int = 64) -> None:
        super().__init__()
        if len(indices) != len(names):
            raise ValueError(f"TimmClassificationBackbone: {len(indices)} indices for {len(names)} names")
        self.body = model
        self.indices = [int(i) for i in indices]
        self.names = list(names) + ["head"]
        self.extra_blocks = bool(extra_blocks)
        was = model.training
        model.eval()
        with torch.no_grad():
            feats = self.forward(torch.zeros(1, in_channels, probe_size, probe_size))
        model.train(was)
        for name, f in feats.items():
            self._out_feature_channels[name] = int(f.shape[1])
            self._out_feature_strides[name] = int(round(probe_size / f.shape[-1]))
        self.out_channels = self._out_feature_channels["head"]

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        kw = {"extra_blocks": True} if self.extra_blocks else {}
        final, inter = self.body.forward_intermediates(x, indices=self.indices, **kw)
        out = OrderedDict(zip(self.names[:-1], inter))
        out["head"] = final
        return out


def _timm(name: str, cfg, **kw) -> nn.Module:
    from .pretrained import create_timm_model

    return create_timm_model(name, bool(cfg.MODEL.BACKBONE.PRETRAINED), key="MODEL.BACKBONE.NAME", num_classes=0,
                             in_chans=int(cfg.INPUT.CHANNELS), **kw)


@BACKBONE_REGISTRY.register("efficientnet_b0")
def build_efficientnet_b0(cfg) -> TimmClassificationBackbone:
    """timm EfficientNet-B0 (C43): levels blocks2/blocks4/blocks5/blocks6/head (see module doc)."""
    return TimmClassificationBackbone(_timm("efficientnet_b0", cfg), indices=(3, 5, 6, 7),
                                      names=("blocks2", "blocks4", "blocks5", "blocks6"),
                                      extra_blocks=True, in_channels=int(cfg.INPUT.CHANNELS))


@BACKBONE_REGISTRY.register("medvit")
def build_medvit(cfg) -> TimmClassificationBackbone:
    """MedViT-style hybrid = timm Next-ViT with ``MODEL.CLASSIFIER.MEDVIT_DEPTHS`` (see module
    doc); attention dropout ``MODEL.CLASSIFIER.ATTN_DROPOUT`` (Tables 9/12)."""
    depths = tuple(int(d) for d in cfg.MODEL.CLASSIFIER.MEDVIT_DEPTHS)
    if len(depths) != 4 or depths[2] % 5:
        raise ValueError(f"MODEL.CLASSIFIER.MEDVIT_DEPTHS={list(depths)}: need 4 stages, the third a "
                         "multiple of 5 (Next-ViT's stage-3 pattern)")
    from timm.models.nextvit import NextViT

    model = NextViT(in_chans=int(cfg.INPUT.CHANNELS), num_classes=0, depths=depths,
                    attn_drop_rate=float(cfg.MODEL.CLASSIFIER.ATTN_DROPOUT))
    return TimmClassificationBackbone(model, indices=(1, 2), names=("stages1", "stages2"),
                                      in_channels=int(cfg.INPUT.CHANNELS))
