"""Backbones: the :class:`Backbone` contract, built-ins and ``build_backbone``."""

from .base import Backbone, WrappedBackbone
from .build import build_backbone
from . import torchvision_fpn, timm_fpn, timm_classification, rfdetr_dinov2  # noqa: F401  (register built-ins)

__all__ = ["Backbone", "WrappedBackbone", "build_backbone"]
