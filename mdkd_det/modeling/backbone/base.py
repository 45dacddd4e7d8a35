"""``Backbone``: the one feature-extractor contract every model family plugs into.

It follows torchvision (``out_channels`` + ``OrderedDict`` of maps, what ``FasterRCNN`` needs)
and detectron2 (``output_shape()`` -> ``{name: ShapeSpec}``, ``size_divisibility``) at once,
so a backbone built here drops into a torchvision detector, the FusionBackbone or a
detectron2 adapter unchanged.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict

import torch
from torch import nn

from ..shape_spec import ShapeSpec


class Backbone(nn.Module):
    """Abstract multi-level feature extractor.

    Subclasses set ``self.out_channels`` (int, the same for every map) and
    ``self._out_feature_strides`` / ``self._out_feature_channels`` (dicts keyed by map name, in
    forward order), and implement ``forward``.

    Shapes:
        forward(x: Tensor[B, C, H, W]) -> OrderedDict[str, Tensor[B, out_channels, H/s, W/s]]
        where s is the map's stride in px.
    """

    out_channels: int

    def __init__(self) -> None:
        super().__init__()
        self._out_feature_strides: Dict[str, int] = {}
        self._out_feature_channels: Dict[str, int] = {}

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":  # pragma: no cover
        raise NotImplementedError

    @property
    def size_divisibility(self) -> int:
        """Input H and W must be multiples of this (px) for maps to align; detectron2 API."""
        return max(self._out_feature_strides.values()) if self._out_feature_strides else 0

    def output_shape(self) -> Dict[str, ShapeSpec]:
        """``{name: ShapeSpec(channels, stride)}`` for every output map, detectron2 style."""
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=stride)
            for name, stride in self._out_feature_strides.items()
        }


class WrappedBackbone(Backbone):
    """Adapts any module returning an ``OrderedDict`` of equal-channel maps to :class:`Backbone`.

    Strides are measured once with a dry-run forward on a zero image (``probe_size`` px, which
    must be a multiple of the coarsest stride), so torchvision, timm and plugin bodies need no
    hand-written stride tables.

    Args:
        body: module, ``forward(Tensor[B, C, H, W]) -> OrderedDict[str, Tensor]``.
        out_channels: channels of every map.
        in_channels: input channels C used for the probe.
        probe_size: square probe size in px.

    Raises:
        ValueError: if the maps do not all have ``out_channels`` channels.
    """

    def __init__(self, body: nn.Module, out_channels: int, in_channels: int = 3,
                 probe_size: int = 256) -> None:
        super().__init__()
        self.body = body
        self.out_channels = out_channels
        was_training = body.training
        body.eval()
        with torch.no_grad():
            feats = body(torch.zeros(1, in_channels, probe_size, probe_size))
        body.train(was_training)
        for name, f in feats.items():
            if f.shape[1] != out_channels:
                raise ValueError(
                    f"backbone map '{name}' has {f.shape[1]} channels, expected {out_channels}"
                )
            self._out_feature_channels[name] = int(f.shape[1])
            self._out_feature_strides[name] = int(round(probe_size / f.shape[-1]))

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return self.body(x)
