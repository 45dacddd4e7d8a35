"""``build_backbone``: config -> registered :class:`Backbone`."""

from __future__ import annotations

from ..registry import BACKBONE_REGISTRY
from .base import Backbone


def build_backbone(cfg, name: str | None = None) -> Backbone:
    """Build ``name`` (default ``cfg.MODEL.BACKBONE.NAME``) from ``BACKBONE_REGISTRY``.

    Raises:
        RegistryError: unknown name; the message lists registered names (plugins included).
        TypeError: the builder did not return a module with ``out_channels`` and an
            ``output_shape()``.
    """
    name = name or cfg.MODEL.BACKBONE.NAME
    backbone = BACKBONE_REGISTRY.get(name)(cfg)
    if not hasattr(backbone, "out_channels") or not hasattr(backbone, "output_shape"):
        raise TypeError(
            f"backbone '{name}' must provide out_channels and output_shape() "
            "(subclass mdkd_det.modeling.backbone.Backbone)"
        )
    return backbone
