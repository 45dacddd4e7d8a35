"""RF-DETR's own encoder (windowed DINOv2 ViT + multi-scale projector) as a registry backbone.

Source: ``rfdetr`` (Apache-2.0, v1.11.x), used unmodified: ``rfdetr.models.lwdetr.
build_model_from_config`` builds an LW-DETR, and its ``backbone[0]`` (``rfdetr.models.backbone.
backbone.Backbone``: ``.encoder`` DinoV2, ``.projector`` MultiScaleProjector) becomes ``.body``
of :class:`RFDETRDinoV2Backbone`. Registered as ``"rfdetr_dinov2"``: with
``MODEL.META_ARCHITECTURE "rfdetr"`` this is the plain RF-DETR (the default for users who have
pretrained weights; engineering_notes §4). Its output maps are the projector maps the decoder
reads (paper_notes A9: the fusion point of the RF-DETR joint teacher).

:func:`rfdetr_model_config` turns ``MODEL.RFDETR.*`` into an rfdetr ``ModelConfig``; it is the
one place that maps our keys to rfdetr's.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import torch

from ...utils.errors import ConfigError
from ..registry import BACKBONE_REGISTRY
from .base import Backbone

__all__ = ["RFDETRDinoV2Backbone", "rfdetr_model_config", "PROJECTOR_STRIDE", "import_rfdetr"]

#: stride (px) of each rfdetr projector level.
PROJECTOR_STRIDE = {"P3": 8, "P4": 16, "P5": 32}


def import_rfdetr():
    """Import ``rfdetr`` (optional dependency, extra ``[rfdetr]``).

    Raises:
        ImportError: rfdetr is missing, with the install command.
    """
    try:
        import rfdetr  # noqa: F401
    except ImportError as e:  # pragma: no cover - the venv has it
        raise ImportError("MODEL.META_ARCHITECTURE 'rfdetr' needs the rfdetr package: "
                          "pip install 'mdkd_det[rfdetr]'") from e
    return rfdetr


def rfdetr_model_config(cfg, projector_scale: Optional[Sequence[str]] = None):
    """rfdetr ``ModelConfig`` of ``cfg.MODEL.RFDETR`` (variant defaults, then our overrides).

    ``num_classes`` = ``MODEL.ROI_HEADS.NUM_CLASSES`` (rfdetr adds one never-targeted logit),
    ``pretrain_weights`` = None (weights are loaded by our builder, never downloaded),
    ``positional_encoding_size`` = resolution / patch size.

    Raises:
        ConfigError: unknown ``MODEL.RFDETR.VARIANT``, or a resolution not divisible by
            patch size x windows (rfdetr's constraint).
    """
    import_rfdetr()
    from rfdetr import config as rc

    r = cfg.MODEL.RFDETR
    classes = {"nano": "RFDETRNanoConfig", "small": "RFDETRSmallConfig",
               "medium": "RFDETRMediumConfig", "large": "RFDETRLargeConfig"}
    variant = str(r.VARIANT).lower()
    if variant not in classes:
        raise ConfigError(f"MODEL.RFDETR.VARIANT '{r.VARIANT}': expected one of {sorted(classes)}")
    base = getattr(rc, classes[variant])
    probe = base(num_classes=1, pretrain_weights=None, device="cpu")
    res = int(r.RESOLUTION) or int(probe.resolution)
    div = int(probe.patch_size) * int(probe.num_windows)
    if res % div:
        raise ConfigError(f"MODEL.RFDETR.RESOLUTION {res} px must be a multiple of {div} "
                          f"(patch {probe.patch_size} x {probe.num_windows} windows)")
    kw = dict(num_classes=int(cfg.MODEL.ROI_HEADS.NUM_CLASSES), pretrain_weights=None,
              device=str(cfg.MODEL.DEVICE), resolution=res,
              positional_encoding_size=res // int(probe.patch_size),
              num_queries=int(r.NUM_QUERIES), group_detr=int(r.GROUP_DETR),
              num_select=int(r.NUM_QUERIES))
    if int(r.HIDDEN_DIM) > 0:
        kw["hidden_dim"] = int(r.HIDDEN_DIM)
    if int(r.DEC_LAYERS) > 0:
        kw["dec_layers"] = int(r.DEC_LAYERS)
    if projector_scale is not None:
        kw["projector_scale"] = list(projector_scale)
    elif r.PROJECTOR_SCALE:
        kw["projector_scale"] = list(r.PROJECTOR_SCALE)
    return base(**kw)


class RFDETRDinoV2Backbone(Backbone):
    """rfdetr's DINOv2 encoder + projector behind the :class:`Backbone` contract.

    Args:
        body: an ``rfdetr.models.backbone.backbone.Backbone`` (unmodified).
        projector_scale: its level names, e.g. ``["P4"]``.
        channels: projector output channels (``hidden_dim``, 256).

    Shapes:
        forward(x: Tensor[B, 3, R, R], normalised) -> OrderedDict{"p4": Tensor[B, 256, R/16,
        R/16], ...}, one map per projector level (strides 8/16/32 px for P3/P4/P5).
    """

    def __init__(self, body: torch.nn.Module, projector_scale: Sequence[str], channels: int) -> None:
        super().__init__()
        self.body = body
        self.out_channels = int(channels)
        self._names = [s.lower() for s in projector_scale]
        for s, n in zip(projector_scale, self._names):
            self._out_feature_channels[n] = self.out_channels
            self._out_feature_strides[n] = PROJECTOR_STRIDE[s]

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        from rfdetr.utilities.tensors import NestedTensor

        mask = torch.zeros((x.shape[0],) + tuple(x.shape[-2:]), dtype=torch.bool, device=x.device)
        out, _ = self.body(NestedTensor(x, mask, True))
        return OrderedDict((n, o.tensors) for n, o in zip(self._names, out))


@BACKBONE_REGISTRY.register("rfdetr_dinov2")
def build_rfdetr_dinov2(cfg) -> RFDETRDinoV2Backbone:
    """The encoder + projector of RF-DETR ``MODEL.RFDETR.VARIANT`` (random init; DINOv2 weights
    are not downloaded; ``MODEL.RFDETR.PRETRAIN_WEIGHTS`` loads a whole RF-DETR checkpoint in the
    detector builder)."""
    import_rfdetr()
    from rfdetr.models.lwdetr import build_model_from_config

    mc = rfdetr_model_config(cfg)
    lw = build_model_from_config(mc)
    return RFDETRDinoV2Backbone(lw.backbone[0], mc.projector_scale, mc.hidden_dim)
