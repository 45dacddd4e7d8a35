"""``build_model``: the detector of a config (detectron2's ``modeling.build_model``)."""

from __future__ import annotations

import torch

from .registry import DETECTOR_REGISTRY


def build_model(cfg, backbone=None) -> torch.nn.Module:
    """Build ``MODEL.META_ARCHITECTURE`` from ``DETECTOR_REGISTRY`` on ``MODEL.DEVICE``.

    Args:
        cfg: config (``MODEL.*``, ``INPUT.*``).
        backbone: optional prebuilt backbone (e.g. a ``FusionBackbone``).

    Returns:
        the model in train mode (torchvision API). ``.eval()`` switches Faster R-CNN to the
        test size (``INPUT.*_TEST``).

    Raises:
        RegistryError: unknown detector or backbone name (lists registered names).
    """
    from . import meta_arch  # noqa: F401  (register built-ins)

    model = DETECTOR_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg, backbone=backbone)
    return model.to(torch.device(cfg.MODEL.DEVICE))
