"""Modeling: registries, backbones, fusion, detectors, domain-adversarial heads."""

from .registry import BACKBONE_REGISTRY, DETECTOR_REGISTRY  # noqa: F401
from . import backbone, fusion, meta_arch, seg  # noqa: F401  (register built-ins)
from .build import build_model  # noqa: F401,E402
